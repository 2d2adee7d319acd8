//! The live dashboard: one self-contained page (inline CSS and JS, canvas charts, no
//! external resources) fed by server-sent events.
//!
//! One sampler task per HTTP server takes the broker's stats every sample interval,
//! keeps a bounded history of totals for the charts, and publishes the newest frame on a
//! `watch` channel. Every open page reads that channel, so the cost of a sample does not
//! grow with the number of viewers, and a slow viewer only ever misses stale frames.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;

use crate::broker::domain::queue::QueueCounts;
use crate::broker::domain::schedule::{Schedule, Trigger};
use crate::broker::domain::schema::SchemaTarget;
use crate::broker::domain::time::Millis;
use crate::broker::engine::local::stats::TopicCounts;
use crate::broker::engine::{Engine, StatsSnapshot};
use crate::broker::ops::{AppState, HttpOptions};
use crate::broker::sync::lock;

/// The page served at `/`.
pub(crate) const PAGE: &str = include_str!("dashboard.html");

/// Most worker rows in a frame: the busiest and most recently seen first.
const MAX_WORKERS: usize = 200;
/// Workers idle for longer than this (and holding no lease) are left out of frames.
const WORKER_IDLE_MS: u64 = 10 * 60 * 1000;

/// One queue's row: its counters as the engine's snapshot holds them, and its depth.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct QueueRow<'a> {
    /// Name.
    pub name: &'a str,
    /// The snapshot's counters, as fields of the row.
    #[serde(flatten)]
    pub counts: &'a QueueCounts,
    /// Live jobs (pending, scheduled, leased and retrying), the charts' trend line.
    pub depth: u64,
    /// The queue's current message schema revision (0: none).
    pub schema_revision: u32,
}

impl<'a> QueueRow<'a> {
    fn of((name, counts): &'a (String, QueueCounts), schemas: &HashMap<SchemaTarget, u32>) -> Self {
        Self {
            name,
            counts,
            depth: counts.pending + counts.scheduled + counts.leased + counts.retrying,
            schema_revision: schemas
                .get(&SchemaTarget::queue(name))
                .copied()
                .unwrap_or(0),
        }
    }
}

/// One topic's row: its counters and its schema revision.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TopicRow<'a> {
    /// The snapshot's counters, as fields of the row.
    #[serde(flatten)]
    pub counts: &'a TopicCounts,
    /// The topic's current message schema revision (0: none).
    pub schema_revision: u32,
}

impl<'a> TopicRow<'a> {
    fn of(counts: &'a TopicCounts, schemas: &HashMap<SchemaTarget, u32>) -> Self {
        Self {
            counts,
            schema_revision: schemas
                .get(&SchemaTarget::topic(&counts.name))
                .copied()
                .unwrap_or(0),
        }
    }
}

/// One worker's row.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WorkerView {
    /// The queue it leases from.
    pub queue: String,
    /// Its consumer name.
    pub name: String,
    /// Its peer address at its last lease.
    pub address: String,
    /// Leases it holds.
    pub leases_held: u32,
    /// Its last call, unix ms.
    pub last_seen_unix_ms: u64,
    /// Jobs it acked.
    pub done: u64,
    /// Deliveries it failed.
    pub failed: u64,
}

/// One recurring schedule's row.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScheduleView {
    /// Name.
    pub name: String,
    /// `cron <expr> <zone>` or `every <ms> ms`.
    pub trigger: String,
    /// The queue its jobs go to.
    pub queue: String,
    /// Whether it is paused.
    pub paused: bool,
    /// The last tick handled, unix ms (0: none yet).
    pub last_fire_unix_ms: u64,
    /// The next tick, unix ms (0: paused, or no more ticks).
    pub next_fire_unix_ms: u64,
    /// The job of the last fired tick ("" before the first).
    pub last_job_id: String,
    /// Ticks that enqueued a job.
    pub fired: u64,
    /// Ticks skipped, as missed or as overlapping.
    pub skipped: u64,
}

impl ScheduleView {
    fn of(s: &Schedule) -> Self {
        Self {
            name: s.spec.name.clone(),
            trigger: match &s.spec.trigger {
                Trigger::Cron { expr, tz } => format!("cron {expr} {tz}"),
                Trigger::Interval { every_ms } => format!("every {every_ms} ms"),
            },
            queue: s.spec.template.queue.clone(),
            paused: s.paused,
            last_fire_unix_ms: s.state.last_fire_ms.unwrap_or(0),
            next_fire_unix_ms: if s.paused {
                0
            } else {
                s.state.next_fire_ms.unwrap_or(0)
            },
            last_job_id: s
                .state
                .last_job_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            fired: s.state.fired,
            skipped: s.state.skipped_missed + s.state.skipped_overlap,
        }
    }
}

/// Whole-broker totals and throughput at one moment: one point of the charts.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Sample {
    /// When, unix ms.
    pub t: Millis,
    /// Visible jobs, all queues.
    pub pending: u64,
    /// Scheduled jobs, all queues.
    pub scheduled: u64,
    /// Leased jobs, all queues.
    pub leased: u64,
    /// Retrying jobs, all queues.
    pub retrying: u64,
    /// Jobs enqueued per second since the previous sample.
    pub enqueued_per_s: f64,
    /// Jobs acked per second since the previous sample.
    pub acked_per_s: f64,
    /// Deliveries failed per second since the previous sample.
    pub failed_per_s: f64,
    /// Messages published per second since the previous sample.
    pub published_per_s: f64,
}

/// What an open page receives once per sample: the engine's snapshot as it is, with the
/// workers and the chart point.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Frame<'a> {
    /// When the stats were taken, unix ms.
    pub taken_at_unix_ms: Millis,
    /// The sample interval, ms (the charts' x step).
    pub interval_ms: u64,
    /// Queues by name.
    pub queues: Vec<QueueRow<'a>>,
    /// Topics by name.
    pub topics: Vec<TopicRow<'a>>,
    /// Workers, most recently seen first.
    pub workers: Vec<WorkerView>,
    /// Recurring schedules, by name.
    pub schedules: Vec<ScheduleView>,
    /// The chart point of this frame.
    pub sample: &'a Sample,
}

/// Counter totals of one snapshot, for throughput between samples.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    at: Millis,
    enqueued: u64,
    completed: u64,
    failed: u64,
    published: u64,
}

impl Totals {
    fn of(s: &StatsSnapshot) -> Self {
        let mut t = Self {
            at: s.taken_at,
            ..Self::default()
        };
        for (_, c) in &s.queues {
            t.enqueued += c.enqueued;
            t.completed += c.completed;
            t.failed += c.failed;
        }
        t.published = s.topics.iter().map(|c| c.published).sum();
        t
    }
}

async fn worker_views<E: Engine>(broker: &E, s: &StatsSnapshot) -> Vec<WorkerView> {
    let now = s.taken_at;
    let mut seen = Vec::with_capacity(s.queues.len());
    for (queue, _) in &s.queues {
        if let Ok(consumers) = broker.list_consumers(queue).await {
            seen.push((queue, consumers));
        }
    }
    let mut out: Vec<WorkerView> = seen
        .into_iter()
        .flat_map(|(queue, consumers)| {
            consumers
                .into_iter()
                .filter(|(_, c)| c.leases_held > 0 || c.last_seen + WORKER_IDLE_MS > now)
                .map(|(name, c)| WorkerView {
                    queue: queue.clone(),
                    name: name.to_string(),
                    address: c.address,
                    leases_held: c.leases_held,
                    last_seen_unix_ms: c.last_seen,
                    done: c.done,
                    failed: c.failed,
                })
        })
        .collect();
    out.sort_by(|a, b| {
        b.last_seen_unix_ms
            .cmp(&a.last_seen_unix_ms)
            .then_with(|| a.queue.cmp(&b.queue))
            .then_with(|| a.name.cmp(&b.name))
    });
    out.truncate(MAX_WORKERS);
    out
}

/// Per-second rate of a counter between two totals; a counter that went down (its queue
/// was deleted) counts as no progress rather than negative throughput.
fn per_second(now: u64, before: u64, elapsed_ms: u64) -> f64 {
    if elapsed_ms == 0 {
        return 0.0;
    }
    now.saturating_sub(before) as f64 * 1000.0 / elapsed_ms as f64
}

fn sample(s: &StatsSnapshot, totals: Totals, previous: Option<Totals>) -> Sample {
    let mut sample = Sample {
        t: totals.at,
        ..Sample::default()
    };
    for (_, c) in &s.queues {
        sample.pending += c.pending;
        sample.scheduled += c.scheduled;
        sample.leased += c.leased;
        sample.retrying += c.retrying;
    }
    if let Some(p) = previous {
        let dt = totals.at.saturating_sub(p.at);
        sample.enqueued_per_s = per_second(totals.enqueued, p.enqueued, dt);
        sample.acked_per_s = per_second(totals.completed, p.completed, dt);
        sample.failed_per_s = per_second(totals.failed, p.failed, dt);
        sample.published_per_s = per_second(totals.published, p.published, dt);
    }
    sample
}

/// Takes one frame of the broker's state: the frame, encoded, and its chart point; `None`
/// when the engine cannot be read (Redis unreachable), so the last frame stays up.
async fn take_frame<E: Engine>(
    broker: &E,
    interval_ms: u64,
    previous: Option<Totals>,
) -> Option<(Arc<str>, Sample, Totals)> {
    let stats = match broker.stats(&[], &[]).await {
        Ok(stats) => stats,
        Err(e) => {
            tracing::warn!(error = %e, "dashboard: reading stats failed; keeping the last frame");
            return None;
        }
    };
    let workers = worker_views(broker, &stats).await;
    // A frame without schedules beats no frame: the queues' figures still show.
    let schedules = match broker.list_schedules().await {
        Ok(all) => all.iter().map(ScheduleView::of).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard: reading schedules failed");
            Vec::new()
        }
    };
    // Revision numbers only: the schemas themselves are shown by GetSchema.
    let schemas = broker.schema_revisions().await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "dashboard: reading schema revisions failed");
        HashMap::new()
    });
    let totals = Totals::of(&stats);
    let sample = sample(&stats, totals, previous);
    let frame = Frame {
        taken_at_unix_ms: stats.taken_at,
        interval_ms,
        queues: stats
            .queues
            .iter()
            .map(|q| QueueRow::of(q, &schemas))
            .collect(),
        topics: stats
            .topics
            .iter()
            .map(|t| TopicRow::of(t, &schemas))
            .collect(),
        workers,
        schedules,
        sample: &sample,
    };
    let encoded = encode(&frame);
    Some((encoded, sample, totals))
}

struct Shared {
    history: Mutex<VecDeque<Sample>>,
    capacity: usize,
}

/// The dashboard's sampling task and its outputs. Cloning shares them.
#[derive(Clone)]
pub(crate) struct Sampler {
    shared: Arc<Shared>,
    frames: watch::Receiver<Arc<str>>,
}

impl Sampler {
    /// Takes a first frame now and starts sampling every `options.sample_interval`
    /// until `stop` is cancelled.
    pub(crate) async fn start<E: Engine>(
        broker: E,
        options: &HttpOptions,
        stop: CancellationToken,
    ) -> Self {
        let interval = options.sample_interval.max(Duration::from_millis(50));
        let interval_ms = interval.as_millis() as u64;
        let shared = Arc::new(Shared {
            history: Mutex::new(VecDeque::with_capacity(options.history.min(4096))),
            capacity: options.history.max(1),
        });
        let (first, mut totals) = match take_frame(&broker, interval_ms, None).await {
            Some((frame, _, totals)) => (frame, Some(totals)),
            None => (Arc::from("{}"), None),
        };
        let (tx, rx) = watch::channel(first);
        let sampler = Self {
            shared: shared.clone(),
            frames: rx,
        };
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick completes at once; the first frame was taken above.
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let Some((frame, sample, now)) = take_frame(&broker, interval_ms, totals).await
                else {
                    continue;
                };
                totals = Some(now);
                {
                    let mut history = lock(&shared.history);
                    if history.len() == shared.capacity {
                        history.pop_front();
                    }
                    history.push_back(sample);
                }
                // Nobody may be watching; the frame is still kept for the next viewer.
                tx.send_replace(frame);
            }
        });
        sampler
    }

    fn latest(&self) -> Arc<str> {
        self.frames.borrow().clone()
    }

    fn history_json(&self) -> String {
        let history = lock(&self.shared.history);
        serde_json::to_string(&*history).expect("samples serialise")
    }
}

fn encode(frame: &Frame) -> Arc<str> {
    Arc::from(serde_json::to_string(frame).expect("frames serialise"))
}

fn json(body: impl Into<axum::body::Body>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.into(),
    )
        .into_response()
}

/// `GET /api/stats`: the newest frame.
pub(super) async fn latest<E: Engine>(State(state): State<AppState<E>>) -> Response {
    json(state.sampler.latest().to_string())
}

/// `GET /api/history`: the kept samples, oldest first.
pub(super) async fn history<E: Engine>(State(state): State<AppState<E>>) -> Response {
    json(state.sampler.history_json())
}

/// `GET /api/events`: the newest frame at once, then every new one, as `stats` events,
/// until the client leaves or the server stops.
pub(super) async fn events<E: Engine>(
    State(state): State<AppState<E>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let shutdown = state.stop.clone().cancelled_owned();
    let stream = WatchStream::new(state.sampler.frames.clone())
        .map(|frame| Ok(Event::default().event("stats").data(&*frame)))
        .take_until(shutdown);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(row: &serde_json::Value) -> Vec<&str> {
        let mut names: Vec<&str> = row
            .as_object()
            .expect("a row is an object")
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn frame_rows_have_the_fields_the_page_reads() {
        let snapshot = StatsSnapshot {
            queues: vec![(
                "q".into(),
                QueueCounts {
                    pending: 1,
                    leased: 2,
                    ..QueueCounts::default()
                },
            )],
            topics: vec![TopicCounts {
                name: "t".into(),
                ..TopicCounts::default()
            }],
            ..StatsSnapshot::default()
        };
        let sample = Sample::default();
        let frame = Frame {
            taken_at_unix_ms: 0,
            interval_ms: 1_000,
            queues: snapshot
                .queues
                .iter()
                .map(|q| QueueRow::of(q, &HashMap::new()))
                .collect(),
            topics: snapshot
                .topics
                .iter()
                .map(|t| TopicRow::of(t, &HashMap::new()))
                .collect(),
            workers: Vec::new(),
            schedules: Vec::new(),
            sample: &sample,
        };
        let json = serde_json::to_value(&frame).expect("frames serialise");
        assert_eq!(
            fields(&json["queues"][0]),
            [
                "ack_rate",
                "cancelled",
                "completed",
                "consumers",
                "created_by_consumer",
                "dead",
                "depth",
                "enqueue_rate",
                "enqueued",
                "failed",
                "in_flight_limited_ms",
                "leased",
                "max_in_flight",
                "name",
                "oldest_pending_age_ms",
                "paused",
                "pending",
                "rate_limit_burst",
                "rate_limit_per_second",
                "rate_limited_ms",
                "rate_tokens",
                "retrying",
                "scheduled",
                "schema_revision",
            ]
        );
        assert_eq!(json["queues"][0]["name"], "q");
        assert_eq!(json["queues"][0]["depth"], 3);
        assert_eq!(
            fields(&json["topics"][0]),
            [
                "first_sequence",
                "gaps",
                "last_sequence",
                "name",
                "publish_rate",
                "published",
                "retained_bytes",
                "retained_messages",
                "schema_revision",
                "subscribers",
            ]
        );
    }
}
