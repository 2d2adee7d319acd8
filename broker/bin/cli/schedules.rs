//! `sluice schedules ...`: list, create, update, delete, pause and resume recurring
//! schedules (each needs `admin` on the schedule's queue).

use serde_json::{Value, json};

use sluice::pb;

use super::table::{Table, age, count};
use super::{
    CliError, Connection, Result, connect, headers, or_dash, payload, payload_json, print_json,
    print_text,
};

/// `sluice schedules`.
#[derive(Debug, Clone, clap::Args)]
pub struct SchedulesArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: SchedulesAction,
}

/// The `sluice schedules` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SchedulesAction {
    /// List schedules with their last and next fire and last job.
    List(ListArgs),
    /// Create a schedule.
    Create(DefineArgs),
    /// Replace a schedule's definition (its progress and paused flag are kept).
    Update(DefineArgs),
    /// Delete a schedule (the jobs it enqueued stay).
    Delete(NamedArgs),
    /// Stop a schedule firing.
    Pause(NamedArgs),
    /// Resume a paused schedule from its next tick.
    Resume(NamedArgs),
}

/// `sluice schedules list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Only the schedules of this queue.
    #[arg(long, default_value = "")]
    pub queue: String,
}

/// `sluice schedules delete|pause|resume NAME`.
#[derive(Debug, Clone, clap::Args)]
pub struct NamedArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Schedule name.
    pub name: String,
}

/// `sluice schedules create|update NAME --queue Q (--cron EXPR [--tz ZONE] | --every-ms N)`.
#[derive(Debug, Clone, clap::Args)]
pub struct DefineArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Schedule name.
    pub name: String,
    /// The queue its jobs go to.
    #[arg(long)]
    pub queue: String,
    /// A cron expression (5 fields, or 6 with seconds first).
    #[arg(
        long,
        conflicts_with = "every_ms",
        required_unless_present = "every_ms"
    )]
    pub cron: Option<String>,
    /// The IANA time zone of `--cron` (default UTC).
    #[arg(long, default_value = "UTC", requires = "cron")]
    pub tz: String,
    /// A fixed interval, ms (at least 1000).
    #[arg(long)]
    pub every_ms: Option<u64>,
    /// The jobs' kind.
    #[arg(long, default_value = "")]
    pub kind: String,
    /// The jobs' payload: literal text, `@path` for a file's bytes, or `-` for stdin.
    #[arg(long, default_value = "")]
    pub payload: String,
    /// 0 (lowest) to 9.
    #[arg(long, default_value_t = 0)]
    pub priority: u32,
    /// A header `key=value` of the jobs (repeatable).
    #[arg(long = "header", value_name = "KEY=VALUE")]
    pub headers: Vec<String>,
    /// Ticks missed while no broker could fire them enqueue nothing (default: the most
    /// recent one runs once).
    #[arg(long)]
    pub skip_missed: bool,
    /// Skip a tick while the previous tick's job has not finished.
    #[arg(long)]
    pub skip_overlap: bool,
    /// Create it paused.
    #[arg(long)]
    pub paused: bool,
}

impl DefineArgs {
    fn spec(&self) -> Result<pb::ScheduleSpec> {
        let trigger = match (&self.cron, self.every_ms) {
            (Some(expression), None) => pb::schedule_spec::Trigger::Cron(pb::CronTrigger {
                expression: expression.clone(),
                time_zone: self.tz.clone(),
            }),
            (None, Some(ms)) => pb::schedule_spec::Trigger::IntervalMs(ms),
            _ => return Err(CliError::Usage("give --cron or --every-ms".into())),
        };
        Ok(pb::ScheduleSpec {
            name: self.name.clone(),
            trigger: Some(trigger),
            job: Some(pb::ScheduleJob {
                queue: self.queue.clone(),
                kind: self.kind.clone(),
                payload: payload(&self.payload)?,
                headers: headers(&self.headers)?,
                priority: self.priority,
            }),
            missed_ticks: if self.skip_missed {
                pb::MissedTickPolicy::Skip
            } else {
                pb::MissedTickPolicy::RunOnce
            } as i32,
            overlap: if self.skip_overlap {
                pb::OverlapPolicy::Skip
            } else {
                pb::OverlapPolicy::Allow
            } as i32,
            paused: self.paused,
        })
    }
}

/// Runs a `sluice schedules` subcommand.
pub async fn schedules(a: SchedulesArgs) -> Result<()> {
    match a.action {
        SchedulesAction::List(a) => list(a).await,
        SchedulesAction::Create(a) => {
            let spec = a.spec()?;
            let info = connect(&a.conn).await?.create_schedule(spec).await?;
            show(&a.conn, &[info.into_inner()])
        }
        SchedulesAction::Update(a) => {
            let spec = a.spec()?;
            let info = connect(&a.conn).await?.update_schedule(spec).await?;
            show(&a.conn, &[info.into_inner()])
        }
        SchedulesAction::Delete(a) => {
            let name = a.name.clone();
            connect(&a.conn)
                .await?
                .delete_schedule(pb::DeleteScheduleRequest { name: name.clone() })
                .await?;
            if a.conn.json {
                print_json(&json!({ "deleted": name }))
            } else {
                print_text(&format!("deleted schedule {name}\n"))
            }
        }
        SchedulesAction::Pause(a) => {
            let name = a.name.clone();
            let info = connect(&a.conn)
                .await?
                .pause_schedule(pb::PauseScheduleRequest { name })
                .await?;
            show(&a.conn, &[info.into_inner()])
        }
        SchedulesAction::Resume(a) => {
            let name = a.name.clone();
            let info = connect(&a.conn)
                .await?
                .resume_schedule(pb::ResumeScheduleRequest { name })
                .await?;
            show(&a.conn, &[info.into_inner()])
        }
    }
}

async fn list(a: ListArgs) -> Result<()> {
    let list = connect(&a.conn)
        .await?
        .list_schedules(pb::ListSchedulesRequest {
            queue: a.queue.clone(),
        })
        .await?
        .into_inner();
    if list.schedules.is_empty() && !a.conn.json {
        return print_text("no schedules\n");
    }
    show(&a.conn, &list.schedules)
}

/// The trigger in a few words: `cron 0 * * * * Europe/Paris` or `every 1s`.
fn trigger_text(spec: &pb::ScheduleSpec) -> String {
    match &spec.trigger {
        Some(pb::schedule_spec::Trigger::Cron(c)) => {
            format!("cron {} {}", c.expression, c.time_zone)
        }
        Some(pb::schedule_spec::Trigger::IntervalMs(ms)) => format!("every {}", age(*ms)),
        None => "-".into(),
    }
}

fn policies_text(spec: &pb::ScheduleSpec) -> String {
    let missed = if spec.missed_ticks == pb::MissedTickPolicy::Skip as i32 {
        "skip-missed"
    } else {
        "run-once"
    };
    let overlap = if spec.overlap == pb::OverlapPolicy::Skip as i32 {
        "skip-overlap"
    } else {
        "allow-overlap"
    };
    format!("{missed},{overlap}")
}

fn schedule_json(s: &pb::ScheduleInfo) -> Value {
    let spec = s.schedule.clone().unwrap_or_default();
    let job = spec.job.clone().unwrap_or_default();
    let (payload, encoding) = payload_json(&job.payload);
    json!({
        "name": spec.name,
        "trigger": trigger_text(&spec),
        "queue": job.queue,
        "kind": job.kind,
        "payload": payload,
        "payload_encoding": encoding,
        "headers": job.headers,
        "priority": job.priority,
        "missed_ticks": if spec.missed_ticks == pb::MissedTickPolicy::Skip as i32 { "skip" } else { "run_once" },
        "overlap": if spec.overlap == pb::OverlapPolicy::Skip as i32 { "skip" } else { "allow" },
        "paused": spec.paused,
        "last_fire_unix_ms": s.last_fire_unix_ms,
        "next_fire_unix_ms": s.next_fire_unix_ms,
        "last_job_id": s.last_job_id,
        "fired": s.fired,
        "skipped_missed": s.skipped_missed,
        "skipped_overlap": s.skipped_overlap,
        "created_unix_ms": s.created_unix_ms,
    })
}

fn show(conn: &Connection, schedules: &[pb::ScheduleInfo]) -> Result<()> {
    if conn.json {
        let all: Vec<Value> = schedules.iter().map(schedule_json).collect();
        return print_json(&json!({ "schedules": all }));
    }
    let now = sluice::broker::now_ms();
    let mut t = Table::new(&[
        "SCHEDULE",
        "TRIGGER",
        "QUEUE",
        "KIND",
        "STATUS",
        "LAST-FIRE",
        "NEXT-FIRE",
        ">FIRED",
        ">SKIPPED",
        "POLICIES",
        "LAST-JOB",
    ]);
    for s in schedules {
        let spec = s.schedule.clone().unwrap_or_default();
        let job = spec.job.clone().unwrap_or_default();
        t.row(vec![
            spec.name.clone(),
            trigger_text(&spec),
            job.queue,
            or_dash(&job.kind),
            if spec.paused { "paused" } else { "active" }.into(),
            match s.last_fire_unix_ms {
                0 => "-".into(),
                t => format!("{} ago", age(now.saturating_sub(t))),
            },
            match s.next_fire_unix_ms {
                0 => "-".into(),
                t => format!("in {}", age(t.saturating_sub(now))),
            },
            count(s.fired),
            count(s.skipped_missed + s.skipped_overlap),
            policies_text(&spec),
            or_dash(&s.last_job_id),
        ]);
    }
    print_text(&t.render())
}
