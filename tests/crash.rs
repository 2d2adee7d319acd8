//! Crash test: the real `sluice` binary with the write-ahead log, producers, a publisher,
//! lease/ack consumers and a live subscriber over gRPC, SIGKILLed at random moments (some
//! during recovery) and restarted on the same data directory, under each fsync policy. A
//! ledger of every acknowledged operation then checks: no acknowledged enqueue lost, no
//! acked job delivered again, duplicates bounded by the leases in flight at each kill, no
//! corrupt payload; and for the topic, that the subscriber (resuming right after its last
//! sequence after each kill) received every acknowledged publish exactly once under its
//! sequence, that no sequence ever named two payloads, that the broker still holds every
//! acknowledged publish, and that the subscriber never saw a gap. A second broker on a
//! directory in use is refused.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{SERVE_LOG, connect_child as connect};
use sluice::pb;
use sluice::pb::broker_client::BrokerClient;
use tonic::transport::Channel;

const QUEUE: &str = "crash";
const TOPIC: &str = "crash-events";
const KILL_CYCLES: usize = 8;
/// The publisher's id in payload ids (the enqueue producers are 0 and 1).
const PUBLISHER: usize = 9;

/// The segment size of the crash runs: small, so rolls and compactions happen between
/// kills too.
const SEGMENT_BYTES: &str = "131072";

fn spawn_broker(dir: &Path) -> Child {
    spawn_broker_with(dir, "always", SEGMENT_BYTES, "1")
}

/// Starts the binary on a port of its own choosing; [`connect`] reads which from its log.
/// With `--wal-sync-threads <sync_threads>`.
fn spawn_broker_with(dir: &Path, fsync: &str, segment_bytes: &str, sync_threads: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--segment-bytes",
            segment_bytes,
            "--storage",
            "wal",
            "--fsync",
            fsync,
            "--wal-sync-threads",
            sync_threads,
        ])
        .env("SLUICE_LOG", SERVE_LOG)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the sluice binary")
}

fn payload(producer: usize, n: u64) -> (String, Bytes) {
    let id = format!("p{producer}-{n}");
    let body = format!("{id}:{}", "z".repeat(256 - id.len() - 10));
    let crc = crc32c::crc32c(body.as_bytes());
    (id, Bytes::from(format!("{body}#{crc:08x}")))
}

/// The next `count` payloads of `producer`, numbered on from `next`.
fn payloads(producer: usize, next: &Mutex<u64>, count: u64) -> Vec<(String, Bytes)> {
    let mut n = next.lock().unwrap();
    let first = *n + 1;
    *n += count;
    (first..=*n).map(|i| payload(producer, i)).collect()
}

/// The payload's id, if its checksum holds.
fn check(payload: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(payload).ok()?;
    let (body, crc) = text.rsplit_once('#')?;
    (u32::from_str_radix(crc, 16).ok()? == crc32c::crc32c(body.as_bytes()))
        .then(|| body.split(':').next().unwrap_or_default().to_owned())
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged enqueues: job id -> payload id.
    enqueued: HashMap<String, String>,
    /// Payload ids sent whose enqueue was not acknowledged (may or may not exist).
    maybe: HashSet<String>,
    /// Deliveries per job id, and the job's payload id.
    deliveries: HashMap<String, (u32, String)>,
    /// Jobs whose ack was acknowledged.
    acked: HashSet<String>,
    /// Leased and not (yet) acknowledged as acked.
    in_flight: HashSet<String>,
    violations: Vec<String>,
    corrupt: u64,
}

async fn produce(
    mut client: BrokerClient<Channel>,
    producer: usize,
    next: Arc<Mutex<u64>>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let batch = payloads(producer, &next, 20);
        let jobs = batch
            .iter()
            .map(|(_, p)| pb::JobSpec {
                payload: p.clone(),
                kind: "crash".into(),
                ..Default::default()
            })
            .collect();
        let reply = client
            .enqueue(pb::EnqueueRequest {
                queue: QUEUE.into(),
                jobs,
            })
            .await;
        let failed = {
            let mut ledger = ledger.lock().unwrap();
            match reply {
                Ok(r) => {
                    for (result, (id, _)) in r.into_inner().results.iter().zip(&batch) {
                        ledger.enqueued.insert(result.job_id.clone(), id.clone());
                    }
                    false
                }
                Err(_) => {
                    ledger.maybe.extend(batch.into_iter().map(|(id, _)| id));
                    true
                }
            }
        };
        if failed {
            // A retrying producer's back-off while the broker is down.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Leases and acks; returns when `stop` is set or (draining) when the queue is empty.
async fn consume(
    mut client: BrokerClient<Channel>,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    drain: bool,
) {
    while !stop.load(Ordering::Relaxed) {
        let leased = client
            .lease(pb::LeaseRequest {
                queue: QUEUE.into(),
                max_jobs: 50,
                visibility_timeout_ms: 600_000,
                wait_ms: if drain { 500 } else { 50 },
                consumer: "crash-test".into(),
            })
            .await;
        let Ok(leased) = leased else {
            // A retrying consumer's back-off while the broker is down.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let jobs = leased.into_inner().jobs;
        if jobs.is_empty() {
            if drain {
                return;
            }
            continue;
        }
        {
            let mut l = ledger.lock().unwrap();
            for j in &jobs {
                let Some(payload_id) = check(&j.payload) else {
                    l.corrupt += 1;
                    continue;
                };
                if l.acked.contains(&j.job_id) {
                    l.violations
                        .push(format!("job {} delivered again after its ack", j.job_id));
                }
                l.deliveries
                    .entry(j.job_id.clone())
                    .or_insert((0, payload_id))
                    .0 += 1;
                l.in_flight.insert(j.job_id.clone());
            }
        }
        let acks = jobs
            .iter()
            .map(|j| pb::LeaseAck {
                lease_id: j.lease_id.clone(),
                ..Default::default()
            })
            .collect();
        if client.ack(pb::AckRequest { acks }).await.is_ok() {
            let mut l = ledger.lock().unwrap();
            for j in &jobs {
                l.in_flight.remove(&j.job_id);
                l.acked.insert(j.job_id.clone());
            }
        }
    }
}

/// What the topic side of a run saw: acknowledged publishes and the live subscriber's
/// deliveries, each naming a payload under a sequence.
#[derive(Default)]
struct TopicLedger {
    /// Acknowledged publishes: payload id -> sequence.
    acknowledged: HashMap<String, u64>,
    /// The first payload anyone (a publish answer or a delivery) named under a sequence.
    named: HashMap<u64, String>,
    /// What the subscriber received under each sequence (the first payload it got there).
    received: HashMap<u64, String>,
    /// The subscriber's last sequence; it resumes at the next one after a kill.
    last: u64,
    /// Sequences that named two different payloads.
    reused: BTreeSet<u64>,
    /// Deliveries that were not the subscriber's last sequence + 1: (last, got).
    out_of_order: Vec<(u64, u64)>,
    gaps: Vec<String>,
    corrupt: u64,
}

impl TopicLedger {
    /// Notes that `sequence` named payload `id`, as a publish answer or a delivery saw it.
    fn name(&mut self, sequence: u64, id: &str) {
        match self.named.get(&sequence) {
            Some(first) if first != id => {
                self.reused.insert(sequence);
            }
            Some(_) => {}
            None => {
                self.named.insert(sequence, id.to_owned());
            }
        }
    }

    fn acknowledge(&mut self, sequence: u64, id: String) {
        self.name(sequence, &id);
        self.acknowledged.insert(id, sequence);
    }

    fn receive(&mut self, sequence: u64, id: String) {
        if sequence != self.last + 1 {
            self.out_of_order.push((self.last, sequence));
        }
        self.name(sequence, &id);
        self.received.entry(sequence).or_insert(id);
        self.last = sequence;
    }

    /// Acknowledged publishes that `log` (sequence -> payload id) does not hold under
    /// their sequence, in sequence order.
    fn absent_from(&self, log: &HashMap<u64, String>) -> Vec<u64> {
        let mut absent: Vec<u64> = self
            .acknowledged
            .iter()
            .filter(|(id, seq)| log.get(seq) != Some(id))
            .map(|(_, seq)| *seq)
            .collect();
        absent.sort_unstable();
        absent
    }
}

/// Reads [`TOPIC`] from sequence 1 up to `newest` (or for at most 20 s): the log as the
/// broker kept it, sequence -> payload id.
async fn replay(mut client: BrokerClient<Channel>, newest: u64) -> HashMap<u64, String> {
    let mut log = HashMap::new();
    let request = pb::SubscribeRequest {
        pattern: TOPIC.into(),
        resume_from: [(TOPIC.to_owned(), 1)].into(),
        ..Default::default()
    };
    let mut stream = client.subscribe(request).await.unwrap().into_inner();
    let mut last = 0;
    while last < newest {
        let next = tokio::time::timeout(Duration::from_secs(20), stream.message()).await;
        let Ok(Ok(Some(batch))) = next else { break };
        for m in batch.messages {
            last = m.sequence;
            log.insert(m.sequence, check(&m.payload).unwrap_or_default());
        }
    }
    log
}

/// Publishes batches of 10 to [`TOPIC`] and records each acknowledged sequence.
async fn publish(
    mut client: BrokerClient<Channel>,
    next: Arc<Mutex<u64>>,
    topic: Arc<Mutex<TopicLedger>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let batch = payloads(PUBLISHER, &next, 10);
        let messages = batch
            .iter()
            .map(|(_, p)| pb::PublishMessage {
                payload: p.clone(),
                ..Default::default()
            })
            .collect();
        let reply = client
            .publish(pb::PublishRequest {
                topic: TOPIC.into(),
                messages,
            })
            .await;
        match reply {
            Ok(r) => {
                let mut t = topic.lock().unwrap();
                for (result, (id, _)) in r.into_inner().results.iter().zip(batch) {
                    t.acknowledge(result.sequence, id);
                }
            }
            // A retrying publisher's back-off while the broker is down.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Follows [`TOPIC`] from the ledger's last sequence + 1, as a reconnecting subscriber
/// does, until the stream ends (the broker died) or `stop` is set.
async fn subscribe(
    mut client: BrokerClient<Channel>,
    topic: Arc<Mutex<TopicLedger>>,
    stop: Arc<AtomicBool>,
) {
    let mut stream = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let from = topic.lock().unwrap().last + 1;
        let request = pb::SubscribeRequest {
            pattern: TOPIC.into(),
            resume_from: [(TOPIC.to_owned(), from)].into(),
            ..Default::default()
        };
        match client.subscribe(request).await {
            Ok(reply) => break reply.into_inner(),
            // A reconnecting subscriber's back-off while the broker is down.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some(batch)) = stream.message().await else {
            return;
        };
        let mut t = topic.lock().unwrap();
        for gap in batch.gaps {
            t.gaps.push(format!(
                "gap: sequences {}..{} missed",
                gap.first_missing, gap.next_available
            ));
        }
        for m in batch.messages {
            match check(&m.payload) {
                Some(id) => t.receive(m.sequence, id),
                None => t.corrupt += 1,
            }
        }
    }
}

/// One crash run under `--fsync <fsync>`: [`KILL_CYCLES`] cycles of 2 enqueue producers,
/// 1 publisher, 2 lease/ack consumers and a subscriber against the real binary, each
/// ended by a SIGKILL at a random moment (a third of them during recovery), then a
/// restart that drains the queue and lets the subscriber catch up; asserts the ledger.
async fn crash_ledger(fsync: &str, seed: u64) {
    crash_ledger_with(fsync, seed, SEGMENT_BYTES, "1").await;
}

/// Polls the segment files of `dir` until `stop` is set; returns how many files (inodes)
/// it saw under two names: segments the broker kept after a compaction and reused.
async fn watch_reuse(dir: std::path::PathBuf, stop: Arc<AtomicBool>) -> usize {
    use std::os::unix::fs::MetadataExt as _;
    let mut names: HashMap<u64, BTreeSet<String>> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let segment =
                name.ends_with(".free") || (name.ends_with(".wal") && !name.starts_with("snap-"));
            if let (true, Ok(meta)) = (segment, entry.metadata()) {
                names.entry(meta.ino()).or_default().insert(name);
            }
        }
        // A sample of the directory now and then: the files change under the broker.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    names.values().filter(|n| n.len() > 1).count()
}

/// [`crash_ledger`] with segments of `segment_bytes` and `sync_threads` fsyncs at once;
/// returns how many segment files the broker reused during the run (see [`watch_reuse`]).
async fn crash_ledger_with(
    fsync: &str,
    seed: u64,
    segment_bytes: &str,
    sync_threads: &str,
) -> usize {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let stop_watching = Arc::new(AtomicBool::new(false));
    let reuse = tokio::spawn(watch_reuse(dir.path().to_owned(), stop_watching.clone()));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let topic = Arc::new(Mutex::new(TopicLedger::default()));
    let counters: Vec<Arc<Mutex<u64>>> = (0..3).map(|_| Arc::new(Mutex::new(0))).collect();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut allowed_duplicates = 0usize;
    let mut kills_during_recovery = 0;

    for cycle in 0..KILL_CYCLES {
        let mut child = spawn_broker_with(dir.path(), fsync, segment_bytes, sync_threads);
        if cycle % 3 == 1 {
            // Kill it while it recovers (or just after): no client is running, so no lease
            // is in flight, and the next start must still find everything.
            std::thread::sleep(Duration::from_millis(rng.u64(0..40)));
            child.kill().unwrap();
            child.wait().unwrap();
            kills_during_recovery += 1;
            child = spawn_broker_with(dir.path(), fsync, segment_bytes, sync_threads);
        }
        let mut client = connect(&mut child).await;
        if cycle == 0 {
            // Retention far above what a run publishes: a gap can only be a defect.
            client
                .create_topic(pb::CreateTopicRequest {
                    name: TOPIC.into(),
                    retention: Some(pb::RetentionPolicy {
                        max_messages: 10_000_000,
                        max_bytes: 1 << 30,
                        max_age_ms: 0,
                    }),
                })
                .await
                .unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (p, next) in counters[..2].iter().enumerate() {
            tasks.push(tokio::spawn(produce(
                client.clone(),
                p,
                next.clone(),
                ledger.clone(),
                stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(publish(
            client.clone(),
            counters[2].clone(),
            topic.clone(),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(subscribe(
            client.clone(),
            topic.clone(),
            stop.clone(),
        )));
        for _ in 0..2 {
            tasks.push(tokio::spawn(consume(
                client.clone(),
                ledger.clone(),
                stop.clone(),
                false,
            )));
        }
        // The load runs for a random while, then the kill comes at that random moment.
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1200))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        // Every lease the consumers received and whose ack was not acknowledged (counted
        // after the tasks end, so replies received just before the kill are included) may
        // be delivered once more.
        let mut l = ledger.lock().unwrap();
        allowed_duplicates += l.in_flight.len();
        l.in_flight.clear();
    }

    // Final run: drain the queue, and let the subscriber catch up with the newest
    // acknowledged publish.
    let mut child = spawn_broker_with(dir.path(), fsync, segment_bytes, sync_threads);
    let client = connect(&mut child).await;
    let stop = Arc::new(AtomicBool::new(false));
    let subscriber = tokio::spawn(subscribe(client.clone(), topic.clone(), stop.clone()));
    consume(client.clone(), ledger.clone(), stop.clone(), true).await;
    let newest = topic
        .lock()
        .unwrap()
        .acknowledged
        .values()
        .max()
        .copied()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while topic.lock().unwrap().last < newest && Instant::now() < deadline {
        // A poll of the subscriber's progress; past the deadline the checks below report
        // what it missed, which says more than a time-out would.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kept = replay(client.clone(), newest).await;
    stop.store(true, Ordering::Relaxed);
    child.kill().unwrap();
    child.wait().unwrap();
    subscriber.await.unwrap();
    stop_watching.store(true, Ordering::Relaxed);
    let reused = reuse.await.unwrap();

    let l = ledger.lock().unwrap();
    let lost: Vec<&String> = l
        .enqueued
        .keys()
        .filter(|id| !l.deliveries.contains_key(*id))
        .collect();
    let duplicates: usize = l.deliveries.values().map(|(n, _)| *n as usize - 1).sum();
    let enqueued_ids: HashSet<&String> = l.enqueued.values().collect();
    // A job delivered but never acknowledged as enqueued must come from an enqueue whose
    // answer the kill swallowed: its payload was sent.
    let phantom: Vec<&String> = l
        .deliveries
        .iter()
        .filter(|(id, _)| !l.enqueued.contains_key(*id))
        .map(|(_, (_, payload_id))| payload_id)
        .collect();
    let invented: Vec<&&String> = phantom.iter().filter(|p| !l.maybe.contains(**p)).collect();
    let t = topic.lock().unwrap();
    let missed = t.absent_from(&t.received);
    let lost_publishes = t.absent_from(&kept);
    eprintln!(
        "crash test (--fsync {fsync}): {KILL_CYCLES} kill cycles ({kills_during_recovery} during \
         recovery) in {:.1} s; {} enqueues acknowledged, {} unacknowledged attempts, {} jobs \
         delivered, {} acks acknowledged, {duplicates} duplicate deliveries (allowed \
         {allowed_duplicates}), {} lost, {} acked-then-redelivered, {} corrupt, {} delivered \
         jobs from unacknowledged enqueues; topic: {} publishes acknowledged, {} lost, {} messages \
         received, {} acknowledged publishes the subscriber missed, {} sequences reused, {} \
         out of order, {} gaps, {} corrupt",
        started.elapsed().as_secs_f64(),
        l.enqueued.len(),
        l.maybe.len(),
        l.deliveries.len(),
        l.acked.len(),
        lost.len(),
        l.violations.len(),
        l.corrupt,
        phantom.len(),
        t.acknowledged.len(),
        lost_publishes.len(),
        t.received.len(),
        missed.len(),
        t.reused.len(),
        t.out_of_order.len(),
        t.gaps.len(),
        t.corrupt,
    );
    assert!(l.enqueued.len() > 1000, "too little work to mean anything");
    assert!(lost.is_empty(), "acknowledged enqueues lost: {lost:?}");
    assert!(l.violations.is_empty(), "{:?}", l.violations);
    assert_eq!(l.corrupt, 0, "corrupt payloads delivered");
    assert!(
        duplicates <= allowed_duplicates,
        "{duplicates} duplicates > {allowed_duplicates} leases in flight at the kills"
    );
    assert!(invented.is_empty(), "jobs nobody enqueued: {invented:?}");
    assert!(
        enqueued_ids.len() == l.enqueued.len(),
        "two jobs carry one payload"
    );
    assert!(
        t.acknowledged.len() > 500,
        "too few publishes to mean anything"
    );
    assert!(
        lost_publishes.is_empty(),
        "acknowledged publishes the broker no longer holds under their sequence: {lost_publishes:?}"
    );
    assert!(
        missed.is_empty(),
        "acknowledged publishes the subscriber did not receive under their sequence: {missed:?}"
    );
    assert!(
        t.reused.is_empty(),
        "sequences that named two payloads: {:?}",
        t.reused
    );
    assert!(
        t.out_of_order.is_empty(),
        "deliveries that were not last + 1 (last, got): {:?}",
        t.out_of_order
    );
    assert!(t.gaps.is_empty(), "{:?}", t.gaps);
    assert_eq!(t.corrupt, 0, "corrupt messages delivered");
    assert!(started.elapsed() < Duration::from_secs(60));
    reused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_loses_no_acknowledged_work() {
    crash_ledger("always", 0xC4A5).await;
}

/// With `--fsync interval:<ms>` a request is answered once its record is written to the
/// kernel, so killing the process (not the machine) loses nothing acknowledged either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_with_interval_fsync_loses_no_acknowledged_work() {
    crash_ledger("interval:50", 0x1A7E).await;
}

/// With segments of 16 KiB the log rolls and compacts many times a cycle, and the
/// broker appends into preallocated segments a compaction freed, zeroed and kept for
/// reuse, when the kills come: the ledger holds, and files were reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_segments_are_reused_loses_no_acknowledged_work() {
    let reused = crash_ledger_with("always", 0x5E65, "16384", "1").await;
    eprintln!("segment files reused: {reused}");
    assert!(reused > 0, "no segment file was reused");
}

/// With 3 fsyncs at once (`--wal-sync-threads 3`), groups synced out of order and
/// segments rolled while syncs are in flight: the ledger holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_with_overlapped_fsyncs_loses_no_acknowledged_work() {
    crash_ledger_with("always", 0x0F5C, "65536", "3").await;
}

/// A second broker on a data directory in use exits at once, naming the directory and the
/// lock, and leaves the running one serving.
#[tokio::test]
async fn a_second_broker_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn_broker(dir.path());
    let mut client = connect(&mut first).await;

    let second = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("SLUICE_LOG", "off")
        .output()
        .expect("running the sluice binary");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--data-dir")
            && stderr.contains("in use by another broker")
            && stderr.contains("LOCK"),
        "{stderr}"
    );

    let stats = client.stats(pb::StatsRequest::default()).await;
    assert!(stats.is_ok(), "the first broker stopped serving: {stats:?}");
    first.kill().unwrap();
    first.wait().unwrap();
    // A killed broker's lock goes with its process.
    let mut third = spawn_broker(dir.path());
    connect(&mut third).await;
    third.kill().unwrap();
    third.wait().unwrap();
}
