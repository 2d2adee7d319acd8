//! A Lease or Consume on a queue that does not exist: by default the queue is created (a
//! worker may start before the first enqueue) and flagged `created_by_consumer` in Stats
//! until a producer, policy or pause names it; with `--strict-queues` it is NOT_FOUND,
//! naming the queue and the closest existing name. On both engines
//! (`SLUICE_TEST_ENGINE=redis` for the Redis one).

mod common;

use std::sync::{Arc, Mutex};

use common::TestBroker;
use common::rpc::{ConsumeStream, assert_refused, lease, open_consume, queue_stats, stats};
use sluice::broker::BrokerConfig;
use sluice::client::Rpc;
use sluice::pb;
use tonic::Code;

/// Enqueues one job into `queue`.
async fn enqueue(rpc: &mut Rpc, queue: &str) {
    rpc.enqueue(pb::EnqueueRequest {
        queue: queue.into(),
        jobs: vec![pb::JobSpec {
            payload: "job".into(),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
}

/// Opens a consume stream on `queue`: the call's own outcome (a refusal comes back as the
/// call's status, before any job).
async fn consume(rpc: &mut Rpc, queue: &str) -> Result<ConsumeStream, tonic::Status> {
    let first = pb::ConsumeRequest {
        queue: queue.into(),
        consumer: "typo-worker".into(),
        credits: 1,
        ..Default::default()
    };
    open_consume(rpc, first).await
}

/// Whether Stats flags queue `name` as created by a consumer.
async fn flagged(rpc: &mut Rpc, name: &str) -> bool {
    queue_stats(&stats(rpc).await, name).created_by_consumer
}

#[tokio::test]
async fn a_queue_only_consumers_name_is_created_and_flagged_until_a_producer_names_it() {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    enqueue(&mut rpc, "emails").await;

    // A worker with a typo: the lease works (empty) and the queue exists, flagged.
    assert!(lease(&mut rpc, "email", "typo-worker", 10).await.is_empty());
    assert!(flagged(&mut rpc, "email").await);
    assert!(!flagged(&mut rpc, "emails").await);
    // A consume stream on a name nothing else uses: the same.
    let _stream = consume(&mut rpc, "reports").await.unwrap();
    common::eventually(|| {
        let mut rpc = rpc.clone();
        async move {
            let s = stats(&mut rpc).await;
            match s.queues.iter().find(|q| q.name == "reports") {
                Some(q) if q.created_by_consumer => Ok(()),
                _ => Err("reports is not listed as created by a consumer yet"),
            }
        }
    })
    .await;

    // A dead-letter queue a policy names is known: a worker draining it is no typo.
    assert!(
        lease(&mut rpc, "emails.dlq", "dlq-worker", 10)
            .await
            .is_empty()
    );
    assert!(!flagged(&mut rpc, "emails.dlq").await);

    // Workers that start first: the first enqueue clears the flag, and the job is theirs.
    assert!(
        lease(&mut rpc, "orders", "early-worker", 10)
            .await
            .is_empty()
    );
    assert!(flagged(&mut rpc, "orders").await);
    enqueue(&mut rpc, "orders").await;
    assert!(!flagged(&mut rpc, "orders").await);
    assert_eq!(lease(&mut rpc, "orders", "early-worker", 10).await.len(), 1);

    // Setting a policy names the queue too (an operator created it on purpose).
    rpc.update_queue(pb::UpdateQueueRequest {
        name: "email".into(),
        policy: Some(pb::QueuePolicy {
            max_attempts: 3,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    assert!(!flagged(&mut rpc, "email").await);
    // And so does pausing it.
    rpc.pause_queue(pb::PauseQueueRequest {
        name: "reports".into(),
    })
    .await
    .unwrap();
    assert!(!flagged(&mut rpc, "reports").await);
}

#[tokio::test]
async fn with_strict_queues_lease_and_consume_on_an_unknown_queue_are_not_found() {
    let mut config = BrokerConfig::default();
    config.limits.strict_queues = true;
    let broker = TestBroker::start_with(config).await;
    let mut rpc = broker.rpc().await;
    enqueue(&mut rpc, "emails").await;

    let typo = rpc
        .lease(pb::LeaseRequest {
            queue: "email".into(),
            max_jobs: 1,
            ..Default::default()
        })
        .await;
    assert_refused(
        typo,
        Code::NotFound,
        &[
            "queue \"email\" does not exist",
            "did you mean \"emails\"?",
            "--strict-queues",
        ],
    );
    assert_refused(
        consume(&mut rpc, "email").await,
        Code::NotFound,
        &["queue \"email\" does not exist", "did you mean \"emails\"?"],
    );
    // Nothing close: no suggestion.
    let far = rpc
        .lease(pb::LeaseRequest {
            queue: "reports".into(),
            max_jobs: 1,
            ..Default::default()
        })
        .await
        .expect_err("an unknown queue is refused");
    assert_eq!(far.code(), Code::NotFound);
    assert!(!far.message().contains("did you mean"), "{}", far.message());
    // The refusals created nothing.
    let names: Vec<String> = stats(&mut rpc)
        .await
        .queues
        .into_iter()
        .map(|q| q.name)
        .collect();
    assert_eq!(names, ["emails"]);

    // Known queues work: an existing one, a dead-letter queue a policy names, one made
    // by CreateQueue.
    assert_eq!(lease(&mut rpc, "emails", "worker", 10).await.len(), 1);
    assert!(lease(&mut rpc, "emails.dlq", "worker", 10).await.is_empty());
    rpc.create_queue(pb::CreateQueueRequest {
        name: "reports".into(),
        policy: None,
    })
    .await
    .unwrap();
    let _stream = consume(&mut rpc, "reports").await.unwrap();
    let s = stats(&mut rpc).await;
    assert!(s.queues.iter().all(|q| !q.created_by_consumer));
}

/// What the broker logs, captured: a `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The lines logged so far that contain `needle`.
    fn lines_with(&self, needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

// One thread (the default test runtime): the broker's tasks log to this thread's
// subscriber.
#[tokio::test]
async fn the_broker_warns_once_naming_the_queue_and_the_closest_name() {
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    enqueue(&mut rpc, "emails").await;
    for _ in 0..3 {
        assert!(lease(&mut rpc, "email", "typo-worker", 1).await.is_empty());
    }
    let warned = log.lines_with("created queue \"email\"");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].contains("WARN"), "{}", warned[0]);
    assert!(
        warned[0].contains("(did you mean \"emails\"?)"),
        "{}",
        warned[0]
    );
    // Nothing is said of queues that producers or policies name.
    enqueue(&mut rpc, "reports").await;
    lease(&mut rpc, "reports", "worker", 1).await;
    lease(&mut rpc, "emails.dlq", "worker", 1).await;
    assert!(log.lines_with("created queue \"reports\"").is_empty());
    assert!(log.lines_with("created queue \"emails.dlq\"").is_empty());
}
