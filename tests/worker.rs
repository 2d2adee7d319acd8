//! The `Worker` runner and request/reply over real gRPC.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TestBroker, eventually, within};
use futures::future::BoxFuture;
use sluice::client::{
    Client, ClientError, Done, JobContext, JobError, UnknownKind, Worker, WorkerReport,
};
use sluice::pb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Email {
    to: String,
}

/// Starts `worker` in the background; cancel the token to shut it down.
fn spawn(
    worker: Worker,
) -> (
    CancellationToken,
    JoinHandle<sluice::client::Result<WorkerReport>>,
) {
    let token = CancellationToken::new();
    let stop = token.clone();
    let handle = tokio::spawn(worker.run(async move { stop.cancelled().await }));
    (token, handle)
}

async fn stop(
    token: CancellationToken,
    handle: JoinHandle<sluice::client::Result<WorkerReport>>,
) -> WorkerReport {
    token.cancel();
    within(handle).await.unwrap().unwrap()
}

/// Polls GetJob until the job is in `state`.
async fn wait_for_state(client: &Client, id: &str, state: pb::JobState) -> pb::Job {
    eventually(|| async {
        let job = client.get_job(id).await.unwrap();
        match job.state() == state {
            true => Ok(job),
            false => Err(format!("job {id} is {:?}, not {state:?}", job.state())),
        }
    })
    .await
}

async fn enqueue_email(client: &Client, queue: &str, kind: &str, to: &str) -> String {
    client
        .enqueue_json(queue, &Email { to: to.into() })
        .unwrap()
        .kind(kind)
        .send()
        .await
        .unwrap()
        .job_id
}

/// A handler of `Email` jobs that takes `work` to do each (the time a job stays in flight
/// is what the tests using it are about); it counts its calls and signals each start, so
/// a test can wait until a job is in flight.
#[derive(Clone)]
struct TimedHandler {
    work: Duration,
    calls: Arc<AtomicUsize>,
    started: Arc<tokio::sync::Notify>,
}

impl TimedHandler {
    fn new(work: Duration) -> Self {
        Self {
            work,
            calls: Arc::default(),
            started: Arc::default(),
        }
    }

    fn handler(
        &self,
    ) -> impl Fn(JobContext<Email>) -> BoxFuture<'static, Result<(), JobError>> + Send + Sync + 'static
    {
        let this = self.clone();
        move |_job| {
            let this = this.clone();
            Box::pin(async move {
                this.calls.fetch_add(1, Ordering::SeqCst);
                this.started.notify_one();
                // The job's work: time in flight is the point.
                tokio::time::sleep(this.work).await;
                Ok(())
            })
        }
    }
}

fn fast_retries(max_attempts: u32) -> pb::QueuePolicy {
    pb::QueuePolicy {
        max_attempts,
        backoff: Some(pb::BackoffPolicy {
            delays_ms: vec![10],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn concurrency_limit_is_respected_and_every_job_completes() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut ids = Vec::new();
    for i in 0..9 {
        ids.push(enqueue_email(&client, "emails", "welcome", &format!("u{i}@x.test")).await);
    }
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let worker = Worker::new(client.clone(), "emails")
        .concurrency(3)
        .handle_json("welcome", {
            let (running, peak) = (running.clone(), peak.clone());
            move |job: JobContext<Email>| {
                let (running, peak) = (running.clone(), peak.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    // The work itself: long enough for three handlers to overlap.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(Done::with_result(format!("sent to {}", job.value.to)))
                }
            }
        });
    let (token, handle) = spawn(worker);
    for id in &ids {
        let job = wait_for_state(&client, id, pb::JobState::Completed).await;
        assert!(String::from_utf8_lossy(&job.result).starts_with("sent to u"));
    }
    let report = stop(token, handle).await;
    assert_eq!(peak.load(Ordering::SeqCst), 3, "peak concurrency");
    assert_eq!(report.completed, 9);
    assert_eq!(report.retried + report.dead_lettered + report.released, 0);
}

#[tokio::test]
async fn extension_keeps_a_long_job_alive_past_its_visibility_timeout() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let id = enqueue_email(&client, "slow", "welcome", "a@x.test").await;
    // More than three visibility timeouts.
    let slow = TimedHandler::new(Duration::from_millis(1_600));
    let worker = Worker::new(client.clone(), "slow")
        .visibility_timeout(Duration::from_millis(500))
        .handle_json("welcome", slow.handler());
    // A second worker competing for the queue would get the job if the lease lapsed.
    let rival = TimedHandler::new(Duration::ZERO);
    let rival_worker = Worker::new(client.clone(), "slow")
        .consumer("rival")
        .handle_json("welcome", rival.handler());
    let (token, handle) = spawn(worker);
    // The rival starts once the first worker holds the job.
    within(slow.started.notified()).await;
    let (rival_token, rival_handle) = spawn(rival_worker);
    let job = wait_for_state(&client, &id, pb::JobState::Completed).await;
    assert_eq!(job.attempts, 1);
    let report = stop(token, handle).await;
    stop(rival_token, rival_handle).await;
    assert_eq!(report.completed, 1);
    assert_eq!(report.lost_leases, 0);
    assert_eq!(slow.calls.load(Ordering::SeqCst), 1);
    assert_eq!(rival.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn errors_retry_with_backoff_then_dead_letter() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    client.create_queue("flaky", fast_retries(3)).await.unwrap();
    let id = enqueue_email(&client, "flaky", "welcome", "a@x.test").await;
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let worker = Worker::new(client.clone(), "flaky").handle_json("welcome", {
        let attempts = attempts.clone();
        move |job: JobContext<Email>| {
            attempts.lock().unwrap().push(job.attempt());
            async move {
                // Any std error converts into a retryable JobError through `?`.
                Err::<(), _>(std::io::Error::other("smtp: 421 try again later"))?;
                Ok(())
            }
        }
    });
    let (token, handle) = spawn(worker);
    let job = wait_for_state(&client, &id, pb::JobState::Dead).await;
    let report = stop(token, handle).await;
    assert_eq!(*attempts.lock().unwrap(), [1, 2, 3]);
    assert_eq!(job.attempts, 3);
    assert_eq!(job.last_error, "smtp: 421 try again later");
    assert_eq!(job.dead_letter_queue, "flaky.dlq");
    assert_eq!(report.retried, 2);
    assert_eq!(report.dead_lettered, 1);
    let dead = client
        .rpc()
        .list_jobs(pb::ListJobsRequest {
            queue: "flaky.dlq".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(dead[0].headers["x-sluice-original-queue"], "flaky");
}

#[tokio::test]
async fn permanent_errors_and_undecodable_payloads_dead_letter_at_once() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    client.create_queue("mail", fast_retries(5)).await.unwrap();
    let rejected = enqueue_email(&client, "mail", "welcome", "nobody@invalid.test").await;
    let garbage = client
        .enqueue("mail", "not json")
        .kind("welcome")
        .send()
        .await
        .unwrap()
        .job_id;
    let worker = Worker::new(client.clone(), "mail").handle_json(
        "welcome",
        |job: JobContext<Email>| async move {
            Err::<(), _>(JobError::permanent(format!(
                "550 mailbox {} does not exist",
                job.value.to
            )))
        },
    );
    let (token, handle) = spawn(worker);
    let job = wait_for_state(&client, &rejected, pb::JobState::Dead).await;
    assert_eq!(job.attempts, 1);
    assert_eq!(
        job.last_error,
        "550 mailbox nobody@invalid.test does not exist"
    );
    let job = wait_for_state(&client, &garbage, pb::JobState::Dead).await;
    assert_eq!(job.attempts, 1);
    assert!(
        job.last_error.contains("cannot decode payload"),
        "{}",
        job.last_error
    );
    assert!(job.last_error.contains(&garbage), "{}", job.last_error);
    let report = stop(token, handle).await;
    assert_eq!(report.dead_lettered, 2);
    assert_eq!(report.retried, 0);
}

#[tokio::test]
async fn unknown_kinds_are_retried_or_dead_lettered_by_policy() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    client.create_queue("q1", fast_retries(2)).await.unwrap();
    client.create_queue("q2", fast_retries(5)).await.unwrap();
    let a = enqueue_email(&client, "q1", "sms", "a@x.test").await;
    let b = enqueue_email(&client, "q2", "sms", "b@x.test").await;
    let handler = |_job: JobContext<Email>| async move { Ok(()) };
    let w1 = Worker::new(client.clone(), "q1")
        .handle_json("welcome", handler)
        .handle_json("reminder", handler);
    let w2 = Worker::new(client.clone(), "q2")
        .unknown_kind(UnknownKind::DeadLetter)
        .handle_json("welcome", handler);
    let (t1, h1) = spawn(w1);
    let (t2, h2) = spawn(w2);
    let job = wait_for_state(&client, &a, pb::JobState::Dead).await;
    assert_eq!(job.attempts, 2, "retried once before dying");
    assert_eq!(
        job.last_error,
        "no handler for job kind \"sms\" on this worker (handled kinds: reminder, welcome)"
    );
    let job = wait_for_state(&client, &b, pb::JobState::Dead).await;
    assert_eq!(job.attempts, 1, "dead-lettered at once");
    stop(t1, h1).await;
    stop(t2, h2).await;
}

#[tokio::test]
async fn graceful_drain_finishes_in_flight_jobs_and_stops_leasing() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let first = enqueue_email(&client, "drain", "welcome", "a@x.test").await;
    // An in-flight job the drain must wait for.
    let in_flight = TimedHandler::new(Duration::from_millis(400));
    let worker = Worker::new(client.clone(), "drain")
        .consumer("drainer")
        .drain_timeout(Duration::from_secs(5))
        .handle_json("welcome", in_flight.handler());
    let (token, handle) = spawn(worker);
    within(in_flight.started.notified()).await;
    // The consumer name is visible while it holds the lease.
    let consumers = client
        .rpc()
        .list_consumers(pb::ListConsumersRequest {
            queue: "drain".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .consumers;
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0].name, "drainer");
    assert_eq!(consumers[0].leases_held, 1);

    let began = Instant::now();
    let report = stop(token, handle).await;
    // Waited for the handler, but not for the 30 s long poll.
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(report.completed, 1);
    assert_eq!(report.released, 0);
    assert_eq!(
        client.get_job(&first).await.unwrap().state(),
        pb::JobState::Completed
    );
    // Nothing is leased after shutdown.
    let later = enqueue_email(&client, "drain", "welcome", "b@x.test").await;
    // A negative: time for a lease that must not happen to show (no state to wait on).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        client.get_job(&later).await.unwrap().state(),
        pb::JobState::Pending
    );
}

#[tokio::test]
async fn drain_timeout_releases_unfinished_jobs_for_redelivery() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let id = enqueue_email(&client, "stuck", "welcome", "a@x.test").await;
    // A job that outlives the drain timeout.
    let stuck = TimedHandler::new(Duration::from_secs(60));
    let worker = Worker::new(client.clone(), "stuck")
        .drain_timeout(Duration::from_millis(200))
        .handle_json("welcome", stuck.handler());
    let (token, handle) = spawn(worker);
    within(stuck.started.notified()).await;
    let report = stop(token, handle).await;
    assert_eq!(report.released, 1);
    assert_eq!(report.completed, 0);
    // Released with a 1 ms retry delay: another worker can lease it right away (a long
    // poll returns as soon as the delay has passed, far before its wait ends).
    let leases = client
        .lease("stuck")
        .wait(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].job_id(), id);
    assert_eq!(leases[0].attempt(), 2);
    let job = client.get_job(&id).await.unwrap();
    assert!(job.last_error.starts_with("released"), "{}", job.last_error);
    for lease in leases {
        lease.ack().await.unwrap();
    }
}

#[tokio::test]
async fn bad_worker_settings_name_the_setting_the_range_and_the_value() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let handler = |_job: JobContext<Email>| async move { Ok(()) };
    let err = Worker::new(client.clone(), "q")
        .concurrency(0)
        .handle_json("k", handler)
        .run(async {})
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: worker concurrency: 0 is outside the allowed range 1..=10000"
    );
    let err = Worker::new(client.clone(), "q")
        .visibility_timeout(Duration::from_millis(10))
        .handle_json("k", handler)
        .run(async {})
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("visibility_timeout: 10ms"),
        "{err}"
    );
    let err = Worker::new(client.clone(), "q")
        .run(async {})
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("handlers: none registered"),
        "{err}"
    );
    // A bad queue name is the broker's INVALID_ARGUMENT, returned at once, not retried.
    let err = within(
        Worker::new(client, "bad..name")
            .handle_json("k", handler)
            .run(std::future::pending()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Sum {
    a: i64,
    b: i64,
}

#[tokio::test]
async fn request_reply_round_trips_errors_and_times_out() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let token = CancellationToken::new();
    let responder = tokio::spawn({
        let client = client.clone();
        let stop = token.clone();
        async move {
            client
                .respond_json(
                    "math.add",
                    |req: sluice::client::Delivery<Sum>| async move {
                        req.value.a.checked_add(req.value.b).ok_or_else(|| {
                            format!(
                                "field a + b: overflows i64 ({} + {})",
                                req.value.a, req.value.b
                            )
                        })
                    },
                    async move { stop.cancelled().await },
                )
                .await
        }
    });
    // The responder subscribes in the background; retry the first request until it is up.
    let sum: i64 = within(async {
        loop {
            match client
                .request_json("math.add", &Sum { a: 2, b: 40 }, Duration::from_millis(300))
                .await
            {
                Ok(v) => return v,
                Err(ClientError::Timeout(_)) => continue,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!(sum, 42);

    // Concurrent requests each get their own answer.
    let calls = (0..5).map(|i| {
        let client = client.clone();
        async move {
            client
                .request_json::<_, i64>("math.add", &Sum { a: i, b: 100 }, Duration::from_secs(5))
                .await
                .unwrap()
        }
    });
    assert_eq!(
        futures::future::join_all(calls).await,
        [100, 101, 102, 103, 104]
    );

    let err = client
        .request_json::<_, i64>(
            "math.add",
            &Sum { a: i64::MAX, b: 1 },
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    match err {
        ClientError::Remote { topic, message } => {
            assert_eq!(topic, "math.add");
            assert!(message.contains("overflows i64"), "{message}");
        }
        other => panic!("expected a remote error, got {other}"),
    }
    // An undecodable request is answered with the decode error.
    let err = client
        .request("math.add", "not json", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Remote { message, .. } if message.contains("cannot decode")),
        "{err}"
    );

    // Nobody answers on this topic.
    let began = Instant::now();
    let err = client
        .request("math.nobody", "x", Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout(d) if d == Duration::from_millis(200)));
    assert!(began.elapsed() >= Duration::from_millis(200));

    token.cancel();
    within(responder).await.unwrap().unwrap();
    // Inboxes are deleted after each call.
    let stats = client.stats().await.unwrap();
    assert!(
        stats.topics.iter().all(|t| !t.name.starts_with("_inbox.")),
        "{:?}",
        stats.topics.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn reply_without_reply_to_names_the_message_and_the_header() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut sub = client.subscribe("plain").raw().await.unwrap();
    client.publish("plain", "hi").await.unwrap();
    let delivery = within(futures::StreamExt::next(&mut sub))
        .await
        .unwrap()
        .unwrap();
    let err = client.reply(&delivery, "answer").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "message plain#1 has no \"reply_to\" header to reply to"
    );
}

#[tokio::test]
async fn protobuf_handlers_get_decoded_messages_and_results_are_stored() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let gap = pb::Gap {
        topic: "t".into(),
        first_missing: 3,
        next_available: 9,
    };
    let id = client
        .enqueue_encoded("proto", &sluice::client::Protobuf, &gap)
        .unwrap()
        .kind("gap")
        .send()
        .await
        .unwrap()
        .job_id;
    let worker = Worker::new(client.clone(), "proto").handle_protobuf(
        "gap",
        |job: JobContext<pb::Gap>| async move {
            assert_eq!(job.kind(), "gap");
            assert_eq!(job.queue(), "proto");
            assert!(!job.is_last_attempt());
            assert_eq!(job.headers()["content-type"], "application/protobuf");
            Ok(Done::json(&serde_json::json!({
                "missing": job.value.next_available - job.value.first_missing
            })))
        },
    );
    let (token, handle) = spawn(worker);
    let job = wait_for_state(&client, &id, pb::JobState::Completed).await;
    assert_eq!(job.result.as_ref(), br#"{"missing":6}"#);
    assert_eq!(stop(token, handle).await.completed, 1);
}

/// A broker on a fixed loopback address, stopped by cancelling the returned token.
/// Serves a fresh in-memory broker on `listener` until the token is cancelled.
async fn broker_on(listener: tokio::net::TcpListener) -> (CancellationToken, JoinHandle<()>) {
    use sluice::broker::{Broker, BrokerConfig, ServeOptions, serve};
    let stop = CancellationToken::new();
    let options = ServeOptions {
        drain_timeout: Duration::from_millis(500),
        ..ServeOptions::default()
    };
    let handle = tokio::spawn({
        let stop = stop.clone();
        async move {
            serve(
                listener,
                Broker::new(BrokerConfig::default()),
                options,
                async move { stop.cancelled().await },
            )
            .await
            .unwrap();
        }
    });
    (stop, handle)
}

#[tokio::test]
async fn a_worker_rides_out_a_broker_restart() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_first, first) = broker_on(listener).await;
    let client = Client::connect(format!("http://{addr}")).await.unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let worker = Worker::new(client.clone(), "emails").handle_json("welcome", {
        let done = done.clone();
        move |_job: JobContext<Email>| {
            let done = done.clone();
            async move {
                done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    });
    let (token, handle) = spawn(worker);
    let before = enqueue_email(&client, "emails", "welcome", "a@x.test").await;
    wait_for_state(&client, &before, pb::JobState::Completed).await;

    // The broker goes away (its memory with it) and comes back on the same address.
    stop_first.cancel();
    within(first).await.unwrap();
    // An outage of a while, which the worker must ride out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !handle.is_finished(),
        "the worker must keep retrying, not exit"
    );
    // The restart takes the same address again: that is the scenario under test.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (stop_second, second) = broker_on(listener).await;

    // The client reconnects on its own; an enqueue goes through once it has.
    let after = eventually(|| async {
        let email = Email {
            to: "b@x.test".into(),
        };
        let sent = client.enqueue_json("emails", &email).unwrap();
        sent.kind("welcome").send().await.map(|e| e.job_id)
    })
    .await;
    wait_for_state(&client, &after, pb::JobState::Completed).await;
    let report = stop(token, handle).await;
    assert_eq!(report.completed, 2);
    assert_eq!(done.load(Ordering::SeqCst), 2);
    stop_second.cancel();
    within(second).await.unwrap();
}
