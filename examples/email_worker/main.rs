//! Email worker of the example system: leases the `emails` queue with 3 concurrent
//! handlers and sends welcome, reminder and overdue emails.
//!
//! Delivery: over plain SMTP to `SMTP_URL` (`smtp://host:port`) with lettre, or, when no
//! SMTP server is configured, as `.eml` files written to `OUTBOX_DIR` (default `./outbox`).
//! A transient SMTP failure (4xx, connection refused, timeout) is returned as a retryable
//! error, so the job retries with the queue's backoff; a permanent one (5xx: the server
//! rejected the address or the message) dead-letters the job at once into `emails.dlq`.
//!
//! ```text
//! python3 examples/smtp_sink.py --port 2525         # prints each email (--reject, --stall)
//! cargo run --release --example email_worker -- --smtp-url smtp://127.0.0.1:2525
//! ```

#[path = "../shared/mod.rs"]
mod shared;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::future::BoxFuture;
use lettre::message::{Mailbox, Message, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use shared::{EMAILS, TODO_OVERDUE, TODO_REMINDER, TodoEvent, USER_REGISTERED, UserRegistered};
use sluice::client::{Done, JobContext, JobError, Policy};

/// Email worker of the Sluice example system.
#[derive(Debug, Parser)]
struct Args {
    /// How to reach the broker.
    #[command(flatten)]
    broker: shared::BrokerArgs,
    /// SMTP server, `smtp://host:port` (plain SMTP, no TLS). Unset: write `.eml` files.
    #[arg(long, env = "SMTP_URL")]
    smtp_url: Option<String>,
    /// Where `.eml` files go when no SMTP server is configured.
    #[arg(long, env = "OUTBOX_DIR", default_value = "outbox")]
    outbox_dir: PathBuf,
    /// Sender address.
    #[arg(
        long,
        env = "EMAIL_FROM",
        default_value = "Sluice Todo <no-reply@todo.example>"
    )]
    from: String,
    /// Handlers (3 by default), consumer name and lease duration.
    #[command(flatten)]
    worker: shared::WorkerArgs<3>,
    /// SMTP command timeout in ms.
    #[arg(long, env = "SMTP_TIMEOUT_MS", default_value_t = 30_000)]
    smtp_timeout_ms: u64,
    /// Most emails sent per second, by all email workers together (the `emails` queue's
    /// rate limit, set when this worker starts; 0 removes it). Unset: left as it is.
    #[arg(long, env = "EMAIL_RATE_LIMIT")]
    rate_limit: Option<u32>,
    /// Emails sent at once after a quiet spell under `--rate-limit`: 1 spaces them evenly.
    #[arg(long, env = "EMAIL_RATE_BURST", default_value_t = 1)]
    rate_burst: u32,
}

impl shared::ExampleArgs for Args {
    fn broker(&self) -> &shared::BrokerArgs {
        &self.broker
    }
}

/// Where emails go.
enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Outbox(PathBuf),
}

struct Mailer {
    transport: Transport,
    from: Mailbox,
}

/// Parses `smtp://host[:port]` (port 25 by default).
fn parse_smtp_url(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("smtp://")
        .ok_or_else(|| format!("SMTP_URL {url:?}: must start with smtp:// (plain SMTP)"))?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => {
            let port = port.parse().map_err(|_| {
                format!("SMTP_URL {url:?}: port {port:?} is not a number in 1..=65535")
            })?;
            Ok((host.to_owned(), port))
        }
        None if !rest.is_empty() => Ok((rest.to_owned(), 25)),
        None => Err(format!("SMTP_URL {url:?}: no host")),
    }
}

impl Mailer {
    /// Sends one email; classifies failures for the worker.
    async fn send(
        &self,
        job_id: &str,
        to: &str,
        subject: &str,
        body: String,
    ) -> Result<String, JobError> {
        let to: Mailbox = to.parse().map_err(|e| {
            JobError::permanent(format!("field email: {to:?} is not an address: {e}"))
        })?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to.clone())
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            // Lets a reader match an email with its job (and a test count duplicates).
            .message_id(Some(format!("<{job_id}@sluice-todo.example>")))
            .body(body)
            .map_err(|e| JobError::permanent(format!("cannot build the email: {e}")))?;
        match &self.transport {
            Transport::Smtp(smtp) => match smtp.send(message).await {
                Ok(response) => Ok(format!(
                    "sent to {} via SMTP: {}",
                    to.email,
                    response.message().collect::<Vec<_>>().join(" ")
                )),
                Err(e) if e.is_permanent() => Err(JobError::permanent(format!(
                    "SMTP rejected the email to {}: {e}",
                    to.email
                ))),
                Err(e) => Err(JobError::retry(format!(
                    "SMTP failed for {}: {e}",
                    to.email
                ))),
            },
            Transport::Outbox(dir) => {
                let path = dir.join(format!("{job_id}.eml"));
                let tmp = dir.join(format!(".{job_id}.eml.tmp"));
                // Write then rename, so a reader never sees half a file.
                tokio::fs::write(&tmp, message.formatted()).await?;
                tokio::fs::rename(&tmp, &path).await?;
                Ok(format!("written to {}", path.display()))
            }
        }
    }
}

/// One email to send.
struct Email {
    to: String,
    subject: String,
    body: String,
}

fn welcome(user: &UserRegistered) -> Email {
    Email {
        to: user.email.clone(),
        subject: format!("Welcome to Sluice Todo, {}!", user.name),
        body: format!(
            "Hi {},\n\nYour account (user #{}) is ready. Add your first todo with POST /todos.\n\nThe Sluice Todo team\n",
            user.name, user.user_id
        ),
    }
}

fn reminder(todo: &TodoEvent) -> Email {
    Email {
        to: todo.email.clone(),
        subject: format!("Reminder: \"{}\" is due", todo.title),
        body: format!(
            "Hi {},\n\nYour todo #{} \"{}\" is due at {}.\nMark it done with PUT /todos/{}/complete.\n\nThe Sluice Todo team\n",
            todo.user_name,
            todo.todo_id,
            todo.title,
            todo.due_at.as_deref().unwrap_or("(no due time)"),
            todo.todo_id
        ),
    }
}

fn overdue(todo: &TodoEvent) -> Email {
    Email {
        to: todo.email.clone(),
        subject: format!("Overdue: \"{}\"", todo.title),
        body: format!(
            "Hi {},\n\nYour todo #{} \"{}\" was due at {} and is not done yet.\n\nThe Sluice Todo team\n",
            todo.user_name,
            todo.todo_id,
            todo.title,
            todo.due_at.as_deref().unwrap_or("(no due time)")
        ),
    }
}

/// A handler that renders the job's payload as an email and sends it.
fn email_handler<T: Send + 'static>(
    mailer: Arc<Mailer>,
    render: fn(&T) -> Email,
) -> impl Fn(JobContext<T>) -> BoxFuture<'static, Result<Done, JobError>> + Send + Sync + 'static {
    move |job: JobContext<T>| {
        let mailer = mailer.clone();
        Box::pin(async move {
            let email = render(&job.value);
            let sent = mailer
                .send(job.job_id(), &email.to, &email.subject, email.body)
                .await?;
            tracing::info!(
                job_id = job.job_id(),
                kind = job.kind(),
                attempt = job.attempt(),
                "email {sent}"
            );
            Ok(Done::with_result(sent))
        })
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shared::process_main("email_worker", run).await
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let from: Mailbox = args
        .from
        .parse()
        .map_err(|e| format!("EMAIL_FROM {:?}: not a mailbox: {e}", args.from))?;
    let transport = match &args.smtp_url {
        Some(url) if !url.is_empty() => {
            let (host, port) = parse_smtp_url(url)?;
            tracing::info!(%host, port, "sending over SMTP");
            // Plain SMTP (no STARTTLS): the example targets a local relay or test server.
            Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                    .port(port)
                    .timeout(Some(Duration::from_millis(args.smtp_timeout_ms)))
                    .build(),
            )
        }
        _ => {
            std::fs::create_dir_all(&args.outbox_dir)
                .map_err(|e| format!("OUTBOX_DIR {}: {e}", args.outbox_dir.display()))?;
            tracing::info!(dir = %args.outbox_dir.display(), "no SMTP_URL: writing .eml files");
            Transport::Outbox(args.outbox_dir.clone())
        }
    };
    let mailer = Arc::new(Mailer { transport, from });

    let client = shared::join_system(&args.broker).await?;
    if let Some(per_second) = args.rate_limit {
        // The limit is the queue's, so it holds however many workers run; an SMTP relay's
        // sending quota is the usual reason for one.
        let policy = match per_second {
            0 => Policy::new().no_rate_limit(),
            n => Policy::new().rate_limit(n, args.rate_burst),
        };
        client.update_queue(EMAILS, policy).await?;
        tracing::info!(
            per_second,
            burst = args.rate_burst,
            "emails queue rate limit set"
        );
    }
    shared::run_worker(client, EMAILS, &args.worker, "email worker", |worker| {
        worker
            .drain_timeout(Duration::from_secs(10))
            .handle_json(USER_REGISTERED, email_handler(mailer.clone(), welcome))
            .handle_json(TODO_REMINDER, email_handler(mailer.clone(), reminder))
            .handle_json(TODO_OVERDUE, email_handler(mailer, overdue))
    })
    .await?;
    Ok(())
}
