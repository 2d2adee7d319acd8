//! Crash test: the real `sluice` binary with the write-ahead log, producers and lease/ack
//! consumers over gRPC, SIGKILLed at random moments (some during recovery) and restarted
//! on the same data directory. A ledger of every acknowledged operation then checks:
//! no acknowledged enqueue lost, no acked job delivered again, duplicates bounded by the
//! leases in flight at each kill, no corrupt payload. A second broker on a directory in
//! use is refused.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::free_port;
use sluice::pb;
use sluice::pb::broker_client::BrokerClient;
use tonic::transport::Channel;

const QUEUE: &str = "crash";
const KILL_CYCLES: usize = 8;

fn spawn_broker(dir: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        // Small segments, so rolls and compactions happen between kills too.
        .args([
            "--segment-bytes",
            "131072",
            "--storage",
            "wal",
            "--fsync",
            "always",
        ])
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the sluice binary")
}

async fn connect(port: u16, child: &mut Child) -> BrokerClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the broker exited during startup: {status}");
        }
        if let Ok(client) = BrokerClient::connect(format!("http://127.0.0.1:{port}")).await {
            return client;
        }
        assert!(
            Instant::now() < deadline,
            "the broker did not start in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn payload(producer: usize, n: u64) -> (String, Bytes) {
    let id = format!("p{producer}-{n}");
    let body = format!("{id}:{}", "z".repeat(256 - id.len() - 10));
    let crc = crc32c::crc32c(body.as_bytes());
    (id, Bytes::from(format!("{body}#{crc:08x}")))
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
        let batch: Vec<(String, Bytes)> = {
            let mut n = next.lock().unwrap();
            (0..20)
                .map(|_| {
                    *n += 1;
                    payload(producer, *n)
                })
                .collect()
        };
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_loses_no_acknowledged_work() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let counters: Vec<Arc<Mutex<u64>>> = (0..2).map(|_| Arc::new(Mutex::new(0))).collect();
    let mut rng = fastrand::Rng::with_seed(0xC4A5);
    let mut allowed_duplicates = 0usize;
    let mut kills_during_recovery = 0;

    for cycle in 0..KILL_CYCLES {
        let port = free_port();
        let mut child = spawn_broker(dir.path(), port);
        if cycle % 3 == 1 {
            // Kill it while it recovers (or just after): no client is running, so no lease
            // is in flight, and the next start must still find everything.
            std::thread::sleep(Duration::from_millis(rng.u64(0..40)));
            child.kill().unwrap();
            child.wait().unwrap();
            kills_during_recovery += 1;
            child = spawn_broker(dir.path(), port);
        }
        let client = connect(port, &mut child).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (p, next) in counters.iter().enumerate() {
            tasks.push(tokio::spawn(produce(
                client.clone(),
                p,
                next.clone(),
                ledger.clone(),
                stop.clone(),
            )));
        }
        for _ in 0..2 {
            tasks.push(tokio::spawn(consume(
                client.clone(),
                ledger.clone(),
                stop.clone(),
                false,
            )));
        }
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

    // Final run: drain everything that is left.
    let port = free_port();
    let mut child = spawn_broker(dir.path(), port);
    let client = connect(port, &mut child).await;
    let stop = Arc::new(AtomicBool::new(false));
    consume(client.clone(), ledger.clone(), stop, true).await;
    child.kill().unwrap();
    child.wait().unwrap();

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
    eprintln!(
        "crash test: {KILL_CYCLES} kill cycles ({kills_during_recovery} during recovery) in {:.1} s; \
         {} enqueues acknowledged, {} unacknowledged attempts, {} jobs delivered, {} acks \
         acknowledged, {duplicates} duplicate deliveries (allowed {allowed_duplicates}), \
         {} lost, {} acked-then-redelivered, {} corrupt, {} delivered jobs from \
         unacknowledged enqueues",
        started.elapsed().as_secs_f64(),
        l.enqueued.len(),
        l.maybe.len(),
        l.deliveries.len(),
        l.acked.len(),
        lost.len(),
        l.violations.len(),
        l.corrupt,
        phantom.len(),
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
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// A second broker on a data directory in use exits at once, naming the directory and the
/// lock, and leaves the running one serving.
#[tokio::test]
async fn a_second_broker_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut first = spawn_broker(dir.path(), port);
    let mut client = connect(port, &mut first).await;

    let second = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
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
    let port = free_port();
    let mut third = spawn_broker(dir.path(), port);
    connect(port, &mut third).await;
    third.kill().unwrap();
    third.wait().unwrap();
}
