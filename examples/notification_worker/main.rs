//! Notification worker of the example system: leases the `notifications` queue (bound to
//! `todo.completed`) with 2 concurrent handlers and delivers achievement notifications.
//!
//! With `WEBHOOK_URL` set, each notification is first POSTed there as JSON (header
//! `Idempotency-Key: <job id>`): a 2xx response is success, 408 / 429 / 5xx / connection
//! errors retry with the queue's backoff, other 4xx dead-letter the job at once. Every
//! delivered notification is then published as `notification.delivered` (idempotency key =
//! job id), which the todo app stores and shows at `GET /users/{id}/notifications`; with no
//! webhook that topic is the only channel.
//!
//! ```text
//! python3 examples/webhook_sink.py --port 8080     # a receiver that prints each POST
//! cargo run --release --example notification_worker -- --webhook-url http://127.0.0.1:8080/hook
//! ```

#[path = "../shared/mod.rs"]
mod shared;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use shared::{NOTIFICATION_DELIVERED, NOTIFICATIONS, Notification, TODO_COMPLETED, TodoEvent};
use sluice::client::{Client, Done, JobContext, JobError, Message};

/// Notification worker of the Sluice example system.
#[derive(Debug, Parser)]
struct Args {
    /// How to reach the broker.
    #[command(flatten)]
    broker: shared::BrokerArgs,
    /// Webhook receiving each notification as an HTTP POST with a JSON body (http:// only).
    #[arg(long, env = "WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// Handlers (2 by default), consumer name and lease duration.
    #[command(flatten)]
    worker: shared::WorkerArgs<2>,
}

impl shared::ExampleArgs for Args {
    fn broker(&self) -> &shared::BrokerArgs {
        &self.broker
    }
}

struct Notifier {
    client: Client,
    http: reqwest::Client,
    webhook: Option<String>,
}

impl Notifier {
    async fn deliver(&self, job: JobContext<TodoEvent>) -> Result<Done, JobError> {
        let todo = &job.value;
        let mut notification = Notification {
            id: job.job_id().to_owned(),
            user_id: todo.user_id,
            todo_id: todo.todo_id,
            title: "Achievement unlocked".to_owned(),
            message: format!(
                "{} completed \"{}\". Well done!",
                todo.user_name, todo.title
            ),
            channel: "app".to_owned(),
            delivered_at: shared::now_rfc3339(),
        };
        if let Some(url) = &self.webhook {
            notification.channel = "webhook".to_owned();
            let response = self
                .http
                .post(url)
                .header("Idempotency-Key", job.job_id())
                .json(&notification)
                .send()
                .await
                // reqwest's own text is only "error sending request for url (...)": the
                // cause (connection refused, a timeout) is what the job's last error needs.
                .map_err(|e| {
                    JobError::retry(format!("webhook {url}: {}", sluice::client::root_cause(&e)))
                })?;
            let status = response.status();
            if !status.is_success() {
                let message = format!("webhook {url} answered {status}");
                let transient = status.is_server_error()
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                return Err(if transient {
                    JobError::retry(message)
                } else {
                    JobError::permanent(message)
                });
            }
        }
        let payload = serde_json::to_vec(&notification)?;
        // The idempotency key makes a retry after a failed ack publish nothing twice.
        let message = Message::new(payload)
            .header(sluice::client::CONTENT_TYPE, "application/json")
            .key(notification.user_id.to_string())
            .idempotency_key(notification.id.clone());
        self.client
            .publish_message(NOTIFICATION_DELIVERED, message)
            .await?;
        tracing::info!(
            job_id = job.job_id(),
            user_id = notification.user_id,
            channel = %notification.channel,
            "achievement notification delivered"
        );
        Ok(Done::json(&notification))
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shared::process_main("notification_worker", run).await
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let webhook = args.webhook_url.filter(|u| !u.is_empty());
    if let Some(url) = &webhook
        && !url.starts_with("http://")
    {
        return Err(format!(
            "WEBHOOK_URL {url:?}: must start with http:// (this example is built without TLS)"
        )
        .into());
    }
    let client = shared::join_system(&args.broker).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let notifier = Arc::new(Notifier {
        client: client.clone(),
        http,
        webhook,
    });
    tracing::info!(webhook = ?notifier.webhook, "delivering notifications");
    let args = &args.worker;
    shared::run_worker(
        client,
        NOTIFICATIONS,
        args,
        "notification worker",
        |worker| {
            worker.handle_json(TODO_COMPLETED, move |job: JobContext<TodoEvent>| {
                let notifier = notifier.clone();
                async move { notifier.deliver(job).await }
            })
        },
    )
    .await?;
    Ok(())
}
