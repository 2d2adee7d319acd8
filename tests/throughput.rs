//! S2-like throughput of the real binary with `--storage memory` versus the WAL. Not a
//! timed test: ignored by default, run by hand (the README's "Durability" section names
//! the command; its figures come from `benches/compare`):
//!
//! ```text
//! cargo test --release --test throughput -- --ignored --nocapture
//! ```

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{SERVE_LOG, serve_addrs};
use sluice::pb;
use sluice::pb::broker_client::BrokerClient;
use tonic::transport::Channel;

const RUN: Duration = Duration::from_secs(5);

async fn connect(url: &str) -> BrokerClient<Channel> {
    BrokerClient::connect(url.to_owned())
        .await
        .expect("connect to the broker")
}

/// The URL of a `sluice serve` child started with `--listen 127.0.0.1:0` and a piped
/// stdout, read from its start-up log (it listens before it logs).
async fn url_of(child: &mut std::process::Child) -> String {
    let stdout = child.stdout.take().expect("the broker's stdout is piped");
    format!("http://{}", serve_addrs(stdout, false).await.grpc)
}

/// Runs 2 producers (batches of 100 x 256 B) and 4 workers (lease 100, ack the batch)
/// for [`RUN`]; returns (enqueued/s, acked/s).
async fn s2(storage_args: &[&str]) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(storage_args)
        .env("SLUICE_LOG", SERVE_LOG)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let url = url_of(&mut child).await;
    let stop = Arc::new(AtomicBool::new(false));
    let enqueued = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let mut client = connect(&url).await;
        let (stop, enqueued) = (stop.clone(), enqueued.clone());
        tasks.push(tokio::spawn(async move {
            let payload = Bytes::from(vec![b'x'; 256]);
            while !stop.load(Ordering::Relaxed) {
                let jobs = (0..100)
                    .map(|_| pb::JobSpec {
                        payload: payload.clone(),
                        ..Default::default()
                    })
                    .collect();
                client
                    .enqueue(pb::EnqueueRequest {
                        queue: "s2".into(),
                        jobs,
                    })
                    .await
                    .unwrap();
                enqueued.fetch_add(100, Ordering::Relaxed);
            }
        }));
    }
    for w in 0..4 {
        let mut client = connect(&url).await;
        let (stop, acked) = (stop.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let jobs = client
                    .lease(pb::LeaseRequest {
                        queue: "s2".into(),
                        max_jobs: 100,
                        visibility_timeout_ms: 30_000,
                        wait_ms: 100,
                        consumer: format!("w{w}"),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .jobs;
                if jobs.is_empty() {
                    continue;
                }
                let n = jobs.len() as u64;
                let acks = jobs
                    .into_iter()
                    .map(|j| pb::LeaseAck {
                        lease_id: j.lease_id,
                        ..Default::default()
                    })
                    .collect();
                client.ack(pb::AckRequest { acks }).await.unwrap();
                acked.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    // The measurement window: its length is what the rates are per.
    tokio::time::sleep(RUN).await;
    let (e, a) = (
        enqueued.load(Ordering::Relaxed),
        acked.load(Ordering::Relaxed),
    );
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    (e as f64 / secs, a as f64 / secs)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, run by hand with --release"]
async fn s2_memory_versus_wal() {
    for (name, args) in [
        ("memory", &["--storage", "memory"][..]),
        (
            "wal, --fsync always",
            &["--storage", "wal", "--fsync", "always"][..],
        ),
        (
            "wal, --fsync interval:10",
            &["--storage", "wal", "--fsync", "interval:10"][..],
        ),
    ] {
        let (enqueued, acked) = s2(args).await;
        eprintln!("S2 {name}: {enqueued:.0} enqueued jobs/s, {acked:.0} acked jobs/s");
        assert!(acked > 0.0, "{name}: nothing acked");
    }
}

/// The p50 and p99 of `n` sequential single-job enqueues, ms.
async fn enqueue_latency(client: &mut BrokerClient<Channel>, n: usize) -> (f64, f64) {
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        client
            .enqueue(pb::EnqueueRequest {
                queue: format!("q{}", i % 10_000),
                jobs: vec![pb::JobSpec {
                    payload: Bytes::from_static(b"x"),
                    ..Default::default()
                }],
            })
            .await
            .unwrap();
        took.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    took.sort_by(f64::total_cmp);
    (took[n / 2], took[n * 99 / 100])
}

/// Enqueue latency over 10,000 queues, alone and with 20 WatchStats watchers at 100 ms
/// (issue 17, item 11: each watcher computed its own snapshot every tick).
/// `SLUICE_BENCH_BIN` runs another build of the binary (e.g. an older one, to compare).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand (--release for the README's figures)"]
async fn enqueue_latency_with_20_stats_watchers_over_10000_queues() {
    let binary =
        std::env::var("SLUICE_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sluice").into());
    let mut child = Command::new(binary)
        // Each queue also holds a slot for its dead-letter queue under --max-queues.
        .args([
            "serve",
            "--storage",
            "memory",
            "--listen",
            "127.0.0.1:0",
            "--max-queues",
            "20000",
        ])
        .env("SLUICE_LOG", SERVE_LOG)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let url = url_of(&mut child).await;
    let mut client = connect(&url).await;
    let creators: Vec<_> = (0..8)
        .map(|k| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut client = connect(&url).await;
                for i in (k..10_000).step_by(8) {
                    client
                        .enqueue(pb::EnqueueRequest {
                            queue: format!("q{i}"),
                            jobs: vec![pb::JobSpec::default()],
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for c in creators {
        c.await.unwrap();
    }
    let (alone_p50, alone_p99) = enqueue_latency(&mut client, 500).await;
    let mut watchers = Vec::new();
    for _ in 0..20 {
        let mut watcher = connect(&url).await;
        let mut frames = watcher
            .watch_stats(pb::WatchStatsRequest {
                filter: None,
                interval_ms: 100,
            })
            .await
            .unwrap()
            .into_inner();
        // Measured only once every watcher is ticking: each has had its first frame.
        frames
            .message()
            .await
            .unwrap()
            .expect("a first stats frame");
        watchers.push(tokio::spawn(async move {
            let mut n = 1u64;
            while let Ok(Some(_)) = frames.message().await {
                n += 1;
            }
            n
        }));
    }
    let (watched_p50, watched_p99) = enqueue_latency(&mut client, 500).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let mut frames = 0;
    for w in watchers {
        frames += w.await.unwrap();
    }
    eprintln!(
        "enqueue over 10,000 queues: alone p50 {alone_p50:.2} ms p99 {alone_p99:.2} ms; with 20 watchers at 100 ms p50 {watched_p50:.2} ms p99 {watched_p99:.2} ms ({frames} frames)"
    );
}
