//! What is visible before the log has it, in-process, with a storage that holds the
//! writer inside a write or an fsync on demand: a subscriber sees a message only once it
//! is durable under the fsync policy (even if its publisher gave up waiting), and with
//! `--fsync interval:<ms>` a request is answered once its record is written to the
//! kernel, never before, and without waiting for the fsync.

mod common;

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::storage::{FileHook, HookedStorage};
use common::{eventually, within};
use futures::StreamExt;
use sluice::broker::testing::NewJob;
use sluice::broker::testing::NewMessage;
use sluice::broker::testing::Pattern;
use sluice::broker::testing::{Start, SubscribeSpec, Subscription};
use sluice::broker::{Broker, BrokerConfig};
use sluice::broker::{FsyncPolicy, StoreConfig};
use tokio::task::JoinHandle;

/// Which call of a log file the gate holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Write,
    Sync,
}

/// Holds the writer thread in `hold` calls while closed, counting the calls held.
#[derive(Debug)]
struct Gate {
    hold: Hold,
    closed: Mutex<bool>,
    opened: Condvar,
    held: AtomicU64,
}

impl Gate {
    fn new(hold: Hold) -> Arc<Self> {
        Arc::new(Self {
            hold,
            closed: Mutex::new(false),
            opened: Condvar::new(),
            held: AtomicU64::new(0),
        })
    }

    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.opened.notify_all();
    }

    fn pass(&self, call: Hold) {
        if call != self.hold {
            return;
        }
        let mut closed = self.closed.lock().unwrap();
        if *closed {
            self.held.fetch_add(1, Ordering::SeqCst);
            while *closed {
                closed = self.opened.wait(closed).unwrap();
            }
        }
    }

    /// Closes the gate, spawns `request` and waits until the writer is held at the gate
    /// (with the request's record: nothing else writes meanwhile).
    async fn hold<T: Send + 'static>(
        &self,
        request: impl Future<Output = T> + Send + 'static,
    ) -> JoinHandle<T> {
        *self.closed.lock().unwrap() = true;
        let task = tokio::spawn(request);
        eventually(|| async {
            match self.held.load(Ordering::SeqCst) {
                0 => Err("the writer never reached the gate"),
                _ => Ok(()),
            }
        })
        .await;
        task
    }
}

impl FileHook for Gate {
    fn before_write(&self) -> io::Result<()> {
        self.pass(Hold::Write);
        Ok(())
    }

    fn before_sync(&self) -> io::Result<()> {
        self.pass(Hold::Sync);
        Ok(())
    }
}

fn open(dir: &std::path::Path, gate: &Arc<Gate>, fsync: FsyncPolicy) -> Broker {
    let storage = HookedStorage::open(dir, gate.clone());
    let config = StoreConfig {
        fsync,
        ..StoreConfig::default()
    };
    Broker::open(BrokerConfig::default(), storage, config)
        .unwrap()
        .0
}

fn message(payload: &'static str) -> Vec<NewMessage> {
    vec![NewMessage {
        payload: Bytes::from_static(payload.as_bytes()),
        ..NewMessage::default()
    }]
}

fn job(payload: &'static str) -> Vec<NewJob> {
    vec![NewJob {
        payload: Bytes::from_static(payload.as_bytes()),
        kind: "test".into(),
        ..NewJob::default()
    }]
}

fn subscribe(broker: &Broker, start: Start) -> Subscription {
    broker
        .subscribe(SubscribeSpec {
            pattern: Pattern::parse("pattern", "t").unwrap(),
            start,
            resume_from: Default::default(),
            on_gap: Default::default(),
            max_batch: 100,
        })
        .unwrap()
}

/// The next batch: (sequence, payload) of each message.
async fn next_batch(subscription: &mut Subscription) -> Vec<(u64, String)> {
    let batch = within(subscription.next()).await.unwrap().unwrap();
    batch
        .messages
        .iter()
        .flat_map(|s| s.messages())
        .map(|m| {
            let payload = String::from_utf8_lossy(&m.entry.payload).into_owned();
            (m.sequence, payload)
        })
        .collect()
}

fn stop(broker: &Broker) {
    broker.shutdown();
    broker.close_storage();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_sees_a_message_only_once_its_fsync_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::new(Hold::Sync);
    let broker = open(dir.path(), &gate, FsyncPolicy::Always);
    broker.publish("t", message("first")).await.unwrap();
    let mut earliest = subscribe(&broker, Start::Earliest);
    assert_eq!(next_batch(&mut earliest).await, [(1, "first".into())]);

    // The second message is appended and written; the writer is held in its fsync.
    let publish = gate
        .hold({
            let broker = broker.clone();
            async move { broker.publish("t", message("second")).await }
        })
        .await;
    assert!(
        futures::poll!(earliest.next()).is_pending(),
        "a subscriber was handed a message whose fsync had not finished"
    );
    // A new subscription starts after the newest durable message, replays only those,
    // and the published count is what was appended.
    let mut latest = subscribe(&broker, Start::Latest);
    let mut replay = subscribe(&broker, Start::Earliest);
    assert_eq!(next_batch(&mut replay).await, [(1, "first".into())]);
    assert!(futures::poll!(replay.next()).is_pending());
    assert_eq!(broker.stats(&[], &["t".into()]).topics[0].last_sequence, 2);

    // The publisher gives up; its message still reaches everyone once it is durable.
    publish.abort();
    gate.open();
    for subscription in [&mut earliest, &mut latest, &mut replay] {
        assert_eq!(next_batch(subscription).await, [(2, "second".into())]);
    }
    stop(&broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_interval_fsync_an_answer_waits_for_the_write_and_not_for_the_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::new(Hold::Write);
    // No fsync runs during the test: an answer that waited for one would time out.
    let broker = open(
        dir.path(),
        &gate,
        FsyncPolicy::Interval(Duration::from_secs(60)),
    );
    within(broker.enqueue("q", job("a"))).await.unwrap();
    within(broker.publish("t", message("m1"))).await.unwrap();
    let mut subscription = subscribe(&broker, Start::Earliest);
    assert_eq!(next_batch(&mut subscription).await, [(1, "m1".into())]);

    // The writer is held inside a write; what is appended now is not written yet.
    let held = gate
        .hold({
            let broker = broker.clone();
            async move { broker.enqueue("q", job("b")).await }
        })
        .await;
    let mut enqueue = Box::pin(broker.enqueue("q", job("c")));
    let mut publish = Box::pin(broker.publish("t", message("m2")));
    assert!(
        futures::poll!(enqueue.as_mut()).is_pending(),
        "an enqueue was answered before its record was written"
    );
    assert!(
        futures::poll!(publish.as_mut()).is_pending(),
        "a publish was answered before its record was written"
    );
    assert!(futures::poll!(subscription.next()).is_pending());

    gate.open();
    within(held).await.unwrap().unwrap();
    within(enqueue).await.unwrap();
    let published = within(publish).await.unwrap();
    assert_eq!(published[0].sequence, 2);
    assert_eq!(next_batch(&mut subscription).await, [(2, "m2".into())]);
    stop(&broker);
}

/// A Consume worker's next job does not wait for its ack's fsync, which would cost it two
/// group commits a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_stream_leases_on_while_its_ack_waits_for_the_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::new(Hold::Sync);
    let broker = open(dir.path(), &gate, FsyncPolicy::Always);
    within(broker.enqueue("q", job("a"))).await.unwrap();
    within(broker.enqueue("q", job("b"))).await.unwrap();
    let served = common::TestBroker::serving(broker.clone()).await;
    let client = served.client().await;
    let mut consumer = client.consume("q").prefetch(1).open().await.unwrap();
    let first = within(consumer.next()).await.unwrap().unwrap();
    assert_eq!(&first.payload()[..], b"a");

    // The ack (with one more credit) is appended and written; the writer is held in its
    // fsync, and the next job comes anyway.
    let ack = gate.hold(async move { first.ack().await }).await;
    let second = within(consumer.next()).await.unwrap().unwrap();
    assert_eq!(&second.payload()[..], b"b");
    within(ack).await.unwrap().unwrap();
    second.ack().await.unwrap();

    gate.open();
    eventually(|| async {
        match broker.stats(&["q".into()], &[]).queues[0].1.completed {
            2 => Ok(()),
            n => Err(format!("{n} of 2 jobs completed")),
        }
    })
    .await;
    stop(&broker);
}

/// Panics in the writer thread's next write once armed, as a bug in the writer would.
#[derive(Debug, Default)]
struct PanicOnWrite {
    armed: std::sync::atomic::AtomicBool,
}

impl FileHook for PanicOnWrite {
    fn before_write(&self) -> io::Result<()> {
        if self.armed.load(Ordering::SeqCst) {
            panic!("injected: the WAL writer panics in a write");
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_writer_that_panics_fails_the_log_instead_of_leaving_requests_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Arc::new(PanicOnWrite::default());
    let storage = HookedStorage::open(dir.path(), hook.clone());
    let broker = Broker::open(BrokerConfig::default(), storage, StoreConfig::default())
        .unwrap()
        .0;
    broker.enqueue("q", job("before")).await.unwrap();
    hook.armed.store(true, Ordering::SeqCst);
    // Without a guard the writer thread dies and this request waits for ever.
    let refused = within(broker.enqueue("q", job("after")))
        .await
        .expect_err("a change the writer never wrote is refused");
    assert!(
        matches!(refused, sluice::broker::BrokerError::StorageFailed(_)),
        "{refused:?}"
    );
    let later = broker.publish("t", message("later")).await.unwrap_err();
    assert!(
        matches!(later, sluice::broker::BrokerError::StorageFailed(_)),
        "{later:?}"
    );
    broker.shutdown();
}
