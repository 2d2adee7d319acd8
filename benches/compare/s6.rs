//! Scenario S6: Sluice on Redis (the `RedisEngine`) against BullMQ on the same Redis.
//!
//! Shape of S2 (2 producers, 4 workers, 256 B, every job acked) at batch 100 and batch 1,
//! on private `redis-server`s the harness starts (never the system Redis on 6379):
//!
//! * one server (replicas 0), one server plus a `--replicaof` replica (replicas 1), and a
//!   3 primary + 3 replica Redis Cluster (replicas 0 and 1);
//! * Sluice with 1 node and with 3 nodes: in-process `RedisEngine`s, each served by
//!   `sluice::broker::serve` on its own loopback port, clients spread over them;
//! * BullMQ (`benches/compare/bullmq/bench.js`, Node.js) on the same servers.
//!
//! Figures per row: acked jobs/s (closed loop; producers pause while 20,000 jobs wait
//! unacked, for every system: unbounded producers saturate Redis and starve the workers),
//! the Redis cost of a fixed number of jobs (INFO commandstats summed over every node before
//! and after, plus MONITOR on the primaries to tell the commands clients sent from those
//! that scripts ran), enqueue->lease latency at an open-loop 5,000 jobs/s, and on the
//! cluster the time writes are unavailable after the primary owning the queue's slot is
//! SIGKILLed.
//!
//! `SLUICE_S6_SETUPS` (comma separated: `single`, `replicated`, `cluster`; default all)
//! runs only those setups, for profiling one of them; the failover figure needs `cluster`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice::broker::testing::redis::{RedisCluster, RedisServer};
use sluice::broker::{RedisConfig, RedisEngine};
use sluice::pb;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::common::*;
use crate::sluice_peer::{
    Produce, Producer, connect, consume_worker, enqueue_of, lease_ack_worker, percentiles_short,
};

/// Open-loop rate of the latency figure.
pub const RATE: u64 = 5_000;
/// Closed-loop producers pause while this many jobs wait unacked (same for every system).
const MAX_BACKLOG: u64 = 20_000;
/// Variant text of the throughput rows.
fn throughput_variant(batch: usize) -> String {
    format!("2 producers -> 4 workers, 256 B, batch {batch}, ack every lease, on Redis")
}
/// Variant text of the latency rows.
fn latency_variant() -> String {
    format!(
        "enqueue->lease, open loop {} jobs/s, batch 1, 4 workers (Consume credits / concurrency 100), on Redis",
        thousands(RATE)
    )
}
const FAILOVER_VARIANT: &str = "writes resume after SIGKILL of the primary owning the queue's slot (3+3 cluster, cluster-node-timeout 1,000 ms)";

/// One measured S6 row.
pub struct S6Row {
    /// Variant (the table it belongs to).
    pub variant: String,
    /// The system and its setup.
    pub system: String,
    /// Its figures.
    pub outcome: Outcome,
    /// Numbers the verdicts read: (jobs/s, round trips per job, setup key).
    facts: Facts,
}

#[derive(Default, Clone)]
struct Facts {
    batch: usize,
    per_s: Option<f64>,
    round_trips_per_job: Option<f64>,
    replicas: u32,
    topo: &'static str,
    bullmq: bool,
    nodes: usize,
    /// Sluice's workers on Consume streams rather than unary Lease and Ack calls.
    consume: bool,
    resume_after_failover_ms: Option<f64>,
}

/// The Redis servers of one setup.
enum Topology {
    Single {
        primary: RedisServer,
        replica: Option<RedisServer>,
    },
    Cluster(RedisCluster),
}

impl Topology {
    fn name(&self) -> &'static str {
        match self {
            Topology::Single { replica: None, .. } => "1 server",
            Topology::Single { .. } => "1 server + 1 replica",
            Topology::Cluster(_) => "3+3 cluster",
        }
    }

    fn seeds(&self) -> Vec<String> {
        match self {
            Topology::Single { primary, .. } => vec![primary.url()],
            Topology::Cluster(c) => c.seeds(),
        }
    }

    /// (primaries, replicas) ports.
    fn ports(&self) -> (Vec<u16>, Vec<u16>) {
        match self {
            Topology::Single { primary, replica } => {
                (vec![primary.port], replica.iter().map(|r| r.port).collect())
            }
            Topology::Cluster(c) => {
                let primaries = c.primaries();
                let replicas = c
                    .seeds()
                    .iter()
                    .filter_map(|u| u.rsplit(':').next()?.parse().ok())
                    .filter(|p| !primaries.contains(p))
                    .collect();
                (primaries, replicas)
            }
        }
    }
}

async fn start_topology(kind: &'static str) -> Res<Topology> {
    Ok(tokio::task::spawn_blocking(move || match kind {
        "single" => Topology::Single {
            primary: RedisServer::start(),
            replica: None,
        },
        "replicated" => {
            let primary = RedisServer::start();
            let replica =
                RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
            Topology::Single {
                primary,
                replica: Some(replica),
            }
        }
        _ => Topology::Cluster(RedisCluster::start(3, 1)),
    })
    .await?)
}

/// Waits until the single server's replica is online (a WAIT before that times out).
async fn replica_online(port: u16) -> Res<()> {
    let ok = wait_until(
        Duration::from_millis(20),
        Duration::from_secs(10),
        || async move {
            info(port, "replication")
                .await
                .is_ok_and(|t| t.contains("state=online"))
        },
    )
    .await;
    ok.map(|_| ())
        .ok_or_else(|| "the replica did not come online".into())
}

async fn info(port: u16, section: &str) -> Res<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut c = client.get_multiplexed_async_connection().await?;
    Ok(redis::cmd("INFO").arg(section).query_async(&mut c).await?)
}

/// Commands and script calls counted by INFO commandstats (the harness's own INFO and
/// MONITOR excluded).
#[derive(Default, Clone, Copy)]
struct Calls {
    commands: u64,
    scripts: u64,
    /// Microseconds Redis spent in script calls (`usec`, the commands they ran included).
    script_usec: u64,
}

async fn commandstats(ports: &[u16]) -> Res<Calls> {
    let mut sum = Calls::default();
    for &port in ports {
        for line in info(port, "commandstats").await?.lines() {
            let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            if name == "info" || name == "monitor" {
                continue;
            }
            let field = |key: &str| -> u64 {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            let calls = field("calls=");
            sum.commands += calls;
            if matches!(
                name,
                "eval" | "evalsha" | "eval_ro" | "evalsha_ro" | "fcall" | "fcall_ro"
            ) {
                sum.scripts += calls;
                sum.script_usec += field("usec=");
            }
        }
    }
    Ok(sum)
}

/// MONITOR on every primary: counts the commands clients sent (lines naming a client
/// address) apart from those scripts ran (`[db lua]`).
struct Monitors {
    top_level: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Monitors {
    async fn start(ports: &[u16]) -> Res<Monitors> {
        let top_level = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for &port in ports {
            let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            sock.write_all(b"MONITOR\r\n").await?;
            let mut lines = BufReader::new(sock).lines();
            // "+OK" first.
            lines.next_line().await?;
            let counter = top_level.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok(Some(l)) = lines.next_line().await {
                    // `+1700000000.123456 [0 127.0.0.1:50000] "evalsha" ...`; the harness's
                    // own INFO calls are left out.
                    if !l.contains(" lua] ") && !l.contains("\"info\"") {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        // MONITOR takes effect once the server has read it: let the first lines arrive.
        tokio::time::sleep(Duration::from_millis(30)).await;
        Ok(Monitors { top_level, tasks })
    }

    async fn stop(self) -> u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for t in &self.tasks {
            t.abort();
        }
        self.top_level.load(Ordering::Relaxed)
    }
}

/// Cost of `jobs` jobs: (commandstats on primaries, on replicas, top-level commands).
struct Cost {
    jobs: u64,
    primaries: Calls,
    replicas: Calls,
    top_level: u64,
    /// Requests Sluice's nodes sent serving the jobs (`RedisEngine::redis_requests` less
    /// `redis_background_requests`): network round trips, a pipeline counting once. None
    /// for BullMQ.
    node_requests: Option<u64>,
    /// Requests of the nodes' sweeps over the run (`redis_background_requests`), and
    /// their rate per node per second: upkeep, whatever the job rate. None for BullMQ.
    node_background: Option<(u64, f64)>,
    /// Microseconds in script calls on the primaries over a second run of the same jobs
    /// without MONITOR (which formats every command and would count in this figure).
    quiet_script_usec: Option<u64>,
}

impl Cost {
    fn per_job(&self, n: u64) -> f64 {
        n as f64 / self.jobs.max(1) as f64
    }

    /// This cost with the script time of `quiet`, the same jobs measured without MONITOR.
    fn timed_by(self, quiet: &Cost) -> Cost {
        Cost {
            quiet_script_usec: Some(quiet.primaries.script_usec),
            ..self
        }
    }

    fn text(&self) -> String {
        let requests = self.node_requests.map_or(String::new(), |n| {
            format!(
                ", {:.3} requests from the nodes serving the jobs (network round trips; a WAIT with its fence write is one pipeline)",
                self.per_job(n)
            )
        });
        let background = self.node_background.map_or(String::new(), |(n, per_s)| {
            format!(
                " and {:.3} from their sweeps ({per_s:.0} a second per node, whatever the job rate)",
                self.per_job(n)
            )
        });
        format!(
            "cost over {} jobs: {:.3} top-level commands{requests}{background}, {:.2} commands incl. those run by scripts, {:.3} script calls per job on primaries, {:.0} µs of Redis time in scripts per job ({}); replicas applied {:.2} commands per job",
            thousands(self.jobs),
            self.per_job(self.top_level),
            self.per_job(self.primaries.commands),
            self.per_job(self.primaries.scripts),
            self.per_job(self.quiet_script_usec.unwrap_or(self.primaries.script_usec)),
            if self.quiet_script_usec.is_some() {
                "a second run without MONITOR"
            } else {
                "with MONITOR on"
            },
            self.per_job(self.replicas.commands)
        )
    }

    /// Round trips per job: the nodes' requests serving the jobs where counted (enqueue,
    /// lease, ack and WAIT, as the target counts them), else top-level commands.
    fn round_trips_per_job(&self) -> f64 {
        self.per_job(self.node_requests.unwrap_or(self.top_level))
    }
}

/// Measures what `run` costs in Redis: `run` must return once `jobs` jobs are acked, and
/// call `mark` right before its load starts. With `monitor`, MONITOR counts the top-level
/// commands (0 without it).
async fn measured_cost<F, Fut>(topo: &Topology, jobs: u64, monitor: bool, run: F) -> Res<Cost>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Res<()>>,
{
    let (primaries, replicas) = topo.ports();
    let mon = match monitor {
        true => Some(Monitors::start(&primaries).await?),
        false => None,
    };
    let p0 = commandstats(&primaries).await?;
    let r0 = commandstats(&replicas).await?;
    let m0 = mon
        .as_ref()
        .map_or(0, |m| m.top_level.load(Ordering::Relaxed));
    run().await?;
    // Replicas apply asynchronously: give them a moment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let p1 = commandstats(&primaries).await?;
    let r1 = commandstats(&replicas).await?;
    let m1 = match mon {
        Some(m) => m.stop().await,
        None => 0,
    };
    Ok(Cost {
        jobs,
        primaries: Calls {
            commands: p1.commands - p0.commands,
            scripts: p1.scripts - p0.scripts,
            script_usec: p1.script_usec - p0.script_usec,
        },
        replicas: Calls {
            commands: r1.commands.saturating_sub(r0.commands),
            scripts: r1.scripts.saturating_sub(r0.scripts),
            script_usec: r1.script_usec.saturating_sub(r0.script_usec),
        },
        top_level: m1.saturating_sub(m0),
        node_requests: None,
        node_background: None,
        quiet_script_usec: None,
    })
}

/// Sluice nodes: in-process Redis engines, each served on its own loopback port.
struct Nodes {
    addrs: Vec<SocketAddr>,
    engines: Vec<RedisEngine>,
    stop: CancellationToken,
}

impl Nodes {
    async fn start(seeds: Vec<String>, replicas: u32, n: usize) -> Res<Nodes> {
        let stop = CancellationToken::new();
        let mut addrs = Vec::new();
        let mut engines = Vec::new();
        for _ in 0..n {
            let mut config = RedisConfig::new(seeds.clone());
            config.replicas = replicas;
            // For A/B runs of the lease-ahead (README, "Lease-ahead on Consume streams").
            if let Ok(depth) = std::env::var("SLUICE_REDIS_LEASE_AHEAD") {
                config.lease_ahead = depth
                    .parse()
                    .map_err(|e| format!("SLUICE_REDIS_LEASE_AHEAD={depth:?}: {e}"))?;
            }
            let engine = RedisEngine::connect(config)
                .await
                .map_err(|e| format!("RedisEngine::connect: {e}"))?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(listener.local_addr()?);
            let (served, token) = (engine.clone(), stop.clone());
            tokio::spawn(async move {
                let options = sluice::broker::ServeOptions::default();
                if let Err(e) =
                    sluice::broker::serve(listener, served, options, token.cancelled_owned()).await
                {
                    eprintln!("sluice on redis: serve failed: {e}");
                }
            });
            engines.push(engine);
        }
        Ok(Nodes {
            addrs,
            engines,
            stop,
        })
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.addrs[i % self.addrs.len()]
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for e in &self.engines {
            e.shutdown();
        }
        self.stop.cancel();
    }
}

/// `n` jobs of 256 B carrying `seq` and `stamp` (for latency) in one request.
fn enqueue_req(queue: &str, n: usize, seq: u64, stamp: u64) -> pb::EnqueueRequest {
    enqueue_of(queue, n, Bytes::from(payload(256, seq, stamp)))
}

/// The S2 shape over `nodes`: producers bounded by [`MAX_BACKLOG`] (closed loop) or by
/// `jobs` in total (cost run); returns the workers' meter and the tasks. Producers keep
/// [`Settings::in_flight`] requests going each (as BullMQ's keep that many `add` calls),
/// over one connection: on as many EnqueueStreams with `consume`, as unary Enqueue calls
/// otherwise. With `consume`,
/// workers are Consume streams (credits = batch, acks sent with the next credits);
/// otherwise unary Lease and Ack calls.
async fn sluice_load(
    nodes: &Nodes,
    s: &Settings,
    queue: &str,
    batch: usize,
    jobs: Option<u64>,
    consume: bool,
) -> Res<(Meter, Vec<tokio::task::JoinHandle<()>>)> {
    let meter = Meter::new();
    let enqueued = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (queue, meter) = (queue.to_string(), meter.clone());
        let addr = nodes.addr(w);
        if consume {
            tasks.push(tokio::spawn(async move {
                let name = format!("w{w}");
                if consume_worker(addr, queue, name, batch as u32, meter.clone(), None)
                    .await
                    .is_err()
                {
                    meter.error();
                }
            }));
            continue;
        }
        let c = connect(addr).await?;
        tasks.push(tokio::spawn(async move {
            let done = move |m: &Meter| {
                m.stopped() || jobs.is_some_and(|n| m.count.load(Ordering::Relaxed) >= n)
            };
            lease_ack_worker(c, queue, String::new(), batch, meter, done, None).await;
        }));
    }
    let how = if consume {
        Produce::Stream
    } else {
        Produce::Unary
    };
    for p in 0..2 {
        for c in Producer::open_many(nodes.addr(p), how, s.in_flight).await? {
            let (meter, enq) = (meter.clone(), enqueued.clone());
            let req = enqueue_req(queue, batch, 0, 0);
            tasks.push(tokio::spawn(async move {
                while !meter.stopped() {
                    let backlog = enq
                        .load(Ordering::Relaxed)
                        .saturating_sub(meter.count.load(Ordering::Relaxed));
                    if backlog > MAX_BACKLOG {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    let mut req = req.clone();
                    if let Some(n) = jobs {
                        let start = enq.fetch_add(batch as u64, Ordering::Relaxed);
                        if start >= n {
                            return;
                        }
                        req.jobs.truncate((n - start).min(batch as u64) as usize);
                        if c.enqueue(&req).await.is_err() {
                            meter.error();
                        }
                        continue;
                    }
                    match c.enqueue(&req).await {
                        Ok(_) => {
                            enq.fetch_add(batch as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            meter.error();
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }));
        }
    }
    Ok((meter, tasks))
}

async fn sluice_throughput(
    nodes: &Nodes,
    s: &Settings,
    batch: usize,
    consume: bool,
) -> Res<(f64, String)> {
    let queue = format!("bench.s6.{}.{}", run_id(), fastrand_suffix());
    let (meter, tasks) = sluice_load(nodes, s, &queue, batch, None, consume).await?;
    let (n, el) = meter.measure(s).await;
    for t in tasks {
        let _ = t.await;
    }
    drop_queue(nodes, &queue).await;
    let per_s = rate(n, el) as f64;
    Ok((
        per_s,
        format!("errors {}", meter.errors.load(Ordering::Relaxed)),
    ))
}

async fn sluice_cost(
    topo: &Topology,
    nodes: &Nodes,
    s: &Settings,
    batch: usize,
    consume: bool,
    monitor: bool,
) -> Res<Cost> {
    let queue = format!("bench.s6c.{}.{}", run_id(), fastrand_suffix());
    let jobs = cost_jobs(batch);
    // The queue exists (and every node knows it) before counting starts.
    for i in 0..nodes.addrs.len() {
        connect(nodes.addr(i))
            .await?
            .enqueue(enqueue_req(&queue, 1, 0, 0))
            .await?;
    }
    let mut drain = connect(nodes.addr(0)).await?;
    loop {
        let leased = drain
            .lease(pb::LeaseRequest {
                queue: queue.clone(),
                max_jobs: 100,
                visibility_timeout_ms: 60_000,
                wait_ms: 0,
                consumer: String::new(),
            })
            .await?
            .into_inner()
            .jobs;
        if leased.is_empty() {
            break;
        }
        let acks = leased
            .into_iter()
            .map(|j| pb::LeaseAck {
                lease_id: j.lease_id,
                result: Bytes::new(),
            })
            .collect();
        drain.ack(pb::AckRequest { acks }).await?;
    }
    let requests = || {
        nodes.engines.iter().fold((0, 0), |(all, upkeep), e| {
            (
                all + e.redis_requests(),
                upkeep + e.redis_background_requests(),
            )
        })
    };
    let before = requests();
    let ahead = || {
        nodes.engines.iter().fold((0, 0), |(served, back), e| {
            let (s, b) = e.lease_ahead_counts();
            (served + s, back + b)
        })
    };
    let ahead_before = ahead();
    let started = Instant::now();
    let cost = measured_cost(topo, jobs, monitor, || async {
        let (meter, tasks) = sluice_load(nodes, s, &queue, batch, Some(jobs), consume).await?;
        let done = wait_until(Duration::from_millis(2), Duration::from_secs(60), || {
            let c = meter.count.load(Ordering::Relaxed);
            async move { c >= jobs }
        })
        .await;
        meter.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        done.map(|_| ())
            .ok_or_else(|| BoxError::from(format!("{jobs} jobs not acked within 60 s")))
    })
    .await
    .map(|c| {
        let (all, upkeep) = requests();
        let (all, upkeep) = (all - before.0, upkeep - before.1);
        let per_node_s =
            upkeep as f64 / started.elapsed().as_secs_f64() / nodes.engines.len() as f64;
        let (served, back) = ahead();
        eprintln!(
            "S6 cost run, {jobs} jobs at batch {batch}: {} served from jobs leased ahead, {} \
             given back",
            served - ahead_before.0,
            back - ahead_before.1
        );
        Cost {
            node_requests: Some(all - upkeep),
            node_background: Some((upkeep, per_node_s)),
            ..c
        }
    });
    drop_queue(nodes, &queue).await;
    cost
}

/// Deletes a finished run's queue, so the next runs' sweeps do not visit it (BullMQ's
/// workers look at their own queue only).
async fn drop_queue(nodes: &Nodes, queue: &str) {
    if let Ok(mut c) = connect(nodes.addr(0)).await {
        let _ = c
            .delete_queue(pb::DeleteQueueRequest {
                name: queue.to_string(),
            })
            .await;
    }
}

/// Enqueue->lease latency at an open-loop [`RATE`]: unary single-job enqueues (each
/// stamped when it was due), 4 Consume workers with 100 credits each.
async fn sluice_latency(nodes: &Nodes, s: &Settings) -> Res<Outcome> {
    let queue = format!("bench.s6l.{}.{}", run_id(), fastrand_suffix());
    let meter = Meter::new();
    let mut workers = Vec::new();
    for w in 0..4 {
        let (addr, queue, meter) = (nodes.addr(w), queue.clone(), meter.clone());
        let name = format!("l{w}");
        workers.push(tokio::spawn(async move {
            consume_worker(addr, queue, name, 100, meter, Some(histogram()))
                .await
                .ok()
                .flatten()
        }));
    }
    let mut producers = Vec::new();
    for p in 0..2 {
        producers.push(connect(nodes.addr(p)).await?);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let q = queue.clone();
    let stats = open_loop(RATE, s.warmup, s.window, move |seq, intended| {
        let mut c = producers[(seq % 2) as usize].clone();
        let req = enqueue_req(&q, 1, seq, intended);
        async move {
            c.enqueue(req).await?;
            Ok(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    meter.stop.store(true, Ordering::Relaxed);
    let mut h = histogram();
    for w in workers {
        if let Some(x) = w.await? {
            h.add(x)?;
        }
    }
    drop_queue(nodes, &queue).await;
    Ok(Outcome::Measured {
        main: percentiles_short(&h),
        extra: format!(
            "sent {} in {:.1} s, failed {}; {}; {}",
            thousands(stats.sent),
            stats.elapsed.as_secs_f64(),
            stats.failed,
            percentiles(&h),
            stats.lag_text()
        ),
    })
}

fn fastrand_suffix() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn cost_jobs(batch: usize) -> u64 {
    if batch >= 100 { 10_000 } else { 2_000 }
}

/// The BullMQ directory (`benches/compare/bullmq`).
fn bullmq_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/compare/bullmq"
    ))
}

/// Installs BullMQ's node modules from the committed lock file when they are missing
/// (`npm ci`); the error says why BullMQ cannot run.
pub async fn ensure_bullmq() -> Result<String, String> {
    let dir = bullmq_dir();
    let node = tokio::process::Command::new("node")
        .arg("--version")
        .output()
        .await
        .map_err(|e| format!("node not found: {e}"))?;
    let node_version = String::from_utf8_lossy(&node.stdout).trim().to_string();
    if !dir.join("node_modules/bullmq/package.json").exists() {
        let out = tokio::time::timeout(
            Duration::from_secs(180),
            tokio::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .output(),
        )
        .await
        .map_err(|_| "npm ci timed out after 180 s (npm registry unreachable?)".to_string())?
        .map_err(|e| format!("npm not found: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "npm ci failed (npm registry unreachable?): {}",
                one_line(String::from_utf8_lossy(&out.stderr).trim())
            ));
        }
    }
    let pkg = std::fs::read_to_string(dir.join("node_modules/bullmq/package.json"))
        .map_err(|e| e.to_string())?;
    let version = serde_json::from_str::<serde_json::Value>(&pkg)
        .ok()
        .and_then(|v| v["version"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    Ok(format!(
        "BullMQ {version} (ioredis), Node.js {node_version}"
    ))
}

/// Runs `node bench.js <mode> <args>` against `topo`: between its "ready" line and its
/// result, `during` is measured (commandstats); returns the result JSON and the cost.
async fn bullmq(
    topo: &Topology,
    mode: &str,
    args: &[String],
    cost_jobs: Option<u64>,
    monitor: bool,
) -> Res<(serde_json::Value, Option<Cost>)> {
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("bench.js")
        .arg(mode)
        .arg("--redis")
        .arg(topo.seeds().join(","))
        .args(args)
        .current_dir(bullmq_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    if matches!(topo, Topology::Cluster(_)) {
        cmd.arg("--cluster");
    }
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| "bullmq: not ready within 30 s")??
        .unwrap_or_default();
    if !ready.contains("\"ready\"") {
        return Err(format!("bullmq: {}", one_line(&ready)).into());
    }
    let mut result = None;
    let cost = match cost_jobs {
        Some(jobs) => Some(
            measured_cost(topo, jobs, monitor, || async {
                stdin.write_all(b"go\n").await?;
                result = lines.next_line().await?;
                Ok(())
            })
            .await?,
        ),
        None => {
            stdin.write_all(b"go\n").await?;
            result = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .map_err(|_| "bullmq: no result within 60 s")??;
            None
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let text = result.ok_or("bullmq exited without a result")?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    if let Some(e) = v.get("error") {
        return Err(format!("bullmq: {e}").into());
    }
    Ok((v, cost))
}

fn bullmq_args(s: &Settings, batch: usize, wait: u32) -> Vec<String> {
    vec![
        "--batch".into(),
        batch.to_string(),
        "--wait".into(),
        wait.to_string(),
        "--warmup-ms".into(),
        s.warmup.as_millis().to_string(),
        "--window-ms".into(),
        s.window.as_millis().to_string(),
        "--max-backlog".into(),
        MAX_BACKLOG.to_string(),
    ]
}

/// What one system of a setup is.
#[derive(Clone, Copy)]
enum Sys {
    /// Sluice nodes, workers on Consume streams or unary Lease and Ack calls.
    Sluice {
        nodes: usize,
        consume: bool,
    },
    BullMq,
}

fn label(sys: Sys, topo: &Topology, replicas: u32) -> String {
    match sys {
        Sys::Sluice { nodes, consume } => format!(
            "Sluice on Redis ({}), {nodes} node{}, {}, --redis-replicas {replicas}",
            if consume { "Consume" } else { "Lease/Ack" },
            if nodes == 1 { "" } else { "s" },
            topo.name()
        ),
        Sys::BullMq if replicas == 0 => format!("BullMQ, {}", topo.name()),
        Sys::BullMq => format!(
            "BullMQ + WAIT {replicas} after each add (producer side only), {}",
            topo.name()
        ),
    }
}

fn outcome(r: Res<Outcome>) -> Outcome {
    Outcome::from_result(r)
}

/// Runs every S6 figure; `bullmq` is BullMQ's version line, or why it cannot run.
pub async fn run(s: &Settings, bullmq_ready: &Result<String, String>) -> Vec<S6Row> {
    // BullMQ's workers take about a second to reach their rate: every S6 system gets the
    // same longer warm-up.
    let s = &Settings {
        warmup: s.warmup.max(Duration::from_millis(2000)),
        window: s.window.max(Duration::from_millis(1000)),
        ..s.clone()
    };
    let mut rows = Vec::new();
    let setups: [(&'static str, &[u32]); 3] =
        [("single", &[0]), ("replicated", &[1]), ("cluster", &[0, 1])];
    let mut cluster_left = None;
    let only = std::env::var("SLUICE_S6_SETUPS").ok();
    for (kind, replica_settings) in setups {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|x| x.trim() == kind))
        {
            continue;
        }
        let t0 = Instant::now();
        let topo = match start_topology(kind).await {
            Ok(t) => t,
            Err(e) => {
                rows.push(S6Row {
                    variant: throughput_variant(100),
                    system: kind.into(),
                    outcome: Outcome::Failed(format!("redis setup failed: {e}")),
                    facts: Facts::default(),
                });
                continue;
            }
        };
        if let Topology::Single {
            replica: Some(_),
            primary,
        } = &topo
            && let Err(e) = replica_online(primary.port).await
        {
            eprintln!("S6 {}: {e}", topo.name());
        }
        println!(
            "S6  started {} in {:.1} s",
            topo.name(),
            t0.elapsed().as_secs_f64()
        );
        for &replicas in replica_settings {
            for sys in [
                Sys::Sluice {
                    nodes: 1,
                    consume: true,
                },
                Sys::Sluice {
                    nodes: 3,
                    consume: true,
                },
                Sys::Sluice {
                    nodes: 1,
                    consume: false,
                },
                Sys::BullMq,
            ] {
                let name = label(sys, &topo, replicas);
                let topo_key = match kind {
                    "cluster" => "cluster",
                    _ => "single",
                };
                let facts = |batch| Facts {
                    batch,
                    replicas,
                    topo: topo_key,
                    bullmq: matches!(sys, Sys::BullMq),
                    nodes: match sys {
                        Sys::Sluice { nodes, .. } => nodes,
                        Sys::BullMq => 0,
                    },
                    consume: matches!(sys, Sys::Sluice { consume: true, .. }),
                    ..Facts::default()
                };
                let mut push = |variant: String, outcome: Outcome, facts: Facts| {
                    let (main, extra) = match &outcome {
                        Outcome::Measured { main, extra } => (main.clone(), extra.clone()),
                        Outcome::Unavailable(w) | Outcome::NotApplicable(w) => {
                            ("unavailable".into(), w.clone())
                        }
                        Outcome::Failed(w) => ("failed".into(), w.clone()),
                    };
                    println!("S6  {variant:<70} {name:<70} {main:<40} {extra}");
                    rows.push(S6Row {
                        variant,
                        system: name.clone(),
                        outcome,
                        facts,
                    });
                };
                match sys {
                    Sys::Sluice { nodes: n, consume } => {
                        let nodes = match Nodes::start(topo.seeds(), replicas, n).await {
                            Ok(x) => x,
                            Err(e) => {
                                push(
                                    throughput_variant(100),
                                    Outcome::Failed(one_line(&e.to_string())),
                                    facts(100),
                                );
                                continue;
                            }
                        };
                        for batch in [100usize, 1] {
                            let mut f = facts(batch);
                            let r = async {
                                let (per_s, errs) =
                                    sluice_throughput(&nodes, s, batch, consume).await?;
                                let quiet =
                                    sluice_cost(&topo, &nodes, s, batch, consume, false).await?;
                                let cost = sluice_cost(&topo, &nodes, s, batch, consume, true)
                                    .await?
                                    .timed_by(&quiet);
                                f.per_s = Some(per_s);
                                f.round_trips_per_job = Some(cost.round_trips_per_job());
                                Ok::<_, BoxError>(Outcome::Measured {
                                    main: format!("{} jobs/s acked", thousands(per_s as u64)),
                                    extra: format!("{}; {errs}", cost.text()),
                                })
                            }
                            .await;
                            push(throughput_variant(batch), outcome(r), f);
                        }
                        if consume {
                            push(
                                latency_variant(),
                                outcome(sluice_latency(&nodes, s).await),
                                facts(1),
                            );
                        }
                        drop(nodes);
                        tokio::time::sleep(Duration::from_millis(150)).await;
                    }
                    Sys::BullMq => {
                        let why = match bullmq_ready {
                            Ok(_) => None,
                            Err(e) => Some(e.clone()),
                        };
                        for batch in [100usize, 1] {
                            let mut f = facts(batch);
                            let o = match &why {
                                Some(e) => Outcome::Unavailable(e.clone()),
                                None => outcome(
                                    async {
                                        let a = bullmq_args(s, batch, replicas);
                                        let (v, _) = bullmq(&topo, "throughput", &a, None, false).await?;
                                        let per_s = v["per_s"].as_f64().unwrap_or(0.0);
                                        let mut a = a.clone();
                                        let jobs = cost_jobs(batch);
                                        a.extend(["--jobs".into(), jobs.to_string()]);
                                        let (_, quiet) =
                                            bullmq(&topo, "cost", &a, Some(jobs), false).await?;
                                        let (c, cost) =
                                            bullmq(&topo, "cost", &a, Some(jobs), true).await?;
                                        let cost = cost
                                            .zip(quiet)
                                            .map(|(c, q)| c.timed_by(&q))
                                            .ok_or("no cost")?;
                                        f.per_s = Some(per_s);
                                        f.round_trips_per_job = Some(cost.round_trips_per_job());
                                        Ok(Outcome::Measured {
                                            main: format!(
                                                "{} jobs/s acked",
                                                thousands(per_s as u64)
                                            ),
                                            extra: format!(
                                                "{}; errors {}; worker concurrency {batch}, addBulk {batch}",
                                                cost.text(),
                                                v["errors"].as_u64().unwrap_or(0)
                                                    + c["errors"].as_u64().unwrap_or(0)
                                            ),
                                        })
                                    }
                                    .await,
                                ),
                            };
                            push(throughput_variant(batch), o, f);
                        }
                        let o = match &why {
                            Some(e) => Outcome::Unavailable(e.clone()),
                            None => outcome(
                                async {
                                    let mut a = bullmq_args(s, 100, replicas);
                                    a.extend(["--rate".into(), RATE.to_string()]);
                                    let (v, _) = bullmq(&topo, "latency", &a, None, false).await?;
                                    let g = |k: &str| v[k].as_u64().unwrap_or(0);
                                    Ok(Outcome::Measured {
                                        main: format!(
                                            "p50 {} / p99 {} / p99.9 {} µs",
                                            thousands(g("p50_us")),
                                            thousands(g("p99_us")),
                                            thousands(g("p999_us"))
                                        ),
                                        extra: format!(
                                            "sent {}, failed {}, leased {} within the run; max {} µs; generator lag p99 {} µs (Node.js event loop)",
                                            thousands(g("sent")),
                                            g("failed"),
                                            thousands(g("samples")),
                                            thousands(g("max_us")),
                                            thousands(g("lag_p99_us"))
                                        ),
                                    })
                                }
                                .await,
                            ),
                        };
                        push(latency_variant(), o, facts(1));
                    }
                }
            }
        }
        if let Topology::Cluster(c) = topo {
            cluster_left = Some(c);
        }
    }
    // The failover figure reuses the cluster (all its primaries are up and in sync).
    let o = match cluster_left {
        Some(c) => failover(c).await,
        None => Err("no cluster".into()),
    };
    let mut f = Facts::default();
    let o = o.map(|(outcome, after_failover)| {
        f.resume_after_failover_ms = Some(after_failover);
        outcome
    });
    let o = outcome(o);
    let (main, extra) = match &o {
        Outcome::Measured { main, extra } => (main.clone(), extra.clone()),
        Outcome::Failed(w) => ("failed".into(), w.clone()),
        _ => (String::new(), String::new()),
    };
    println!("S6  {FAILOVER_VARIANT} {main} {extra}");
    rows.push(S6Row {
        variant: FAILOVER_VARIANT.into(),
        system: "Sluice on Redis, 1 node, 3+3 cluster, --redis-replicas 0".into(),
        outcome: o,
        facts: f,
    });
    rows
}

/// A producer enqueues one job at a time, continuously; the primary owning the queue's
/// slot is SIGKILLed; returns the outcome and the ms from the failover being visible to
/// the first enqueue that succeeded after the kill.
async fn failover(cluster: RedisCluster) -> Res<(Outcome, f64)> {
    let nodes = Nodes::start(cluster.seeds(), 0, 1).await?;
    let queue = format!("bench.s6f.{}", run_id());
    let tag = format!("{{q:{queue}}}");
    let mut c = connect(nodes.addr(0)).await?;
    c.enqueue(enqueue_req(&queue, 1, 0, 0)).await?;
    let kill_at = Arc::new(AtomicU64::new(u64::MAX));
    let resumed_at = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let producer = {
        let (kill_at, resumed_at, failed, stop, queue) = (
            kill_at.clone(),
            resumed_at.clone(),
            failed.clone(),
            stop.clone(),
            queue.clone(),
        );
        let mut c = c.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let started = now_ns();
                let mut req = tonic::Request::new(enqueue_req(&queue, 1, 0, 0));
                req.set_timeout(Duration::from_secs(2));
                match c.enqueue(req).await {
                    Ok(_) => {
                        if started > kill_at.load(Ordering::Relaxed)
                            && resumed_at.load(Ordering::Relaxed) == 0
                        {
                            resumed_at.store(now_ns(), Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before_kill = failed.load(Ordering::Relaxed);
    let victim = {
        let tag = tag.clone();
        let mut cluster = cluster;
        tokio::task::spawn_blocking(move || {
            let port = cluster.primary_for_key(&tag);
            kill_at.store(now_ns(), Ordering::Relaxed);
            cluster.kill(port);
            let t_kill = now_ns();
            cluster.wait_for_failover(port, Duration::from_secs(30));
            (cluster, port, t_kill, now_ns())
        })
    };
    let (cluster, port, t_kill, t_promoted) = victim.await?;
    let done = wait_until(Duration::from_millis(2), Duration::from_secs(30), || {
        let r = resumed_at.load(Ordering::Relaxed);
        async move { r != 0 }
    })
    .await;
    stop.cancel();
    let _ = producer.await;
    drop(nodes);
    drop(cluster);
    if done.is_none() {
        return Err("writes did not resume within 30 s of the failover".into());
    }
    let resumed = resumed_at.load(Ordering::Relaxed);
    let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e6;
    let after_failover = ms(t_promoted, resumed);
    Ok((
        Outcome::Measured {
            main: format!(
                "writes resumed {:.0} ms after the kill, {:.0} ms after the failover was visible",
                ms(t_kill, resumed),
                after_failover
            ),
            extra: format!(
                "primary :{port} killed; replica promoted {:.0} ms after the kill (CLUSTER NODES, polled every 50 ms via redis-cli); {} enqueues failed meanwhile (1 in flight, 2 s deadline each, 5 ms pause after a failure); {} failed before the kill",
                ms(t_kill, t_promoted),
                failed.load(Ordering::Relaxed) - before_kill,
                before_kill
            ),
        },
        after_failover,
    ))
}

/// S6 targets (issue 19), judged from this run's rows.
pub fn verdicts(rows: &[S6Row]) -> Vec<String> {
    let yes = |b: bool| if b { "MET" } else { "MISSED" };
    let mut out = Vec::new();
    let find = |pred: &dyn Fn(&Facts) -> bool| rows.iter().find(|r| pred(&r.facts));
    // Sluice vs BullMQ at equal durability: replicas 0 vs BullMQ; replicas 1 vs BullMQ with
    // producer-side WAIT (which promises less: see the report).
    for topo in ["single", "cluster"] {
        for replicas in [0u32, 1] {
            for batch in [100usize, 1] {
                let Some(b) = find(&|f| {
                    f.bullmq && f.topo == topo && f.replicas == replicas && f.batch == batch
                })
                .and_then(|r| r.facts.per_s) else {
                    continue;
                };
                for (nodes, consume) in [(1usize, true), (3, true), (1, false)] {
                    if let Some(v) = find(&|f| {
                        !f.bullmq
                            && f.nodes == nodes
                            && f.consume == consume
                            && f.topo == topo
                            && f.replicas == replicas
                            && f.batch == batch
                    })
                    .and_then(|r| r.facts.per_s)
                    {
                        out.push(format!(
                            "S6 {topo}, replicas {replicas}, batch {batch}: Sluice ({}, {nodes} node{}) >= 2x BullMQ jobs/s: {} ({} vs {} jobs/s, {:.2}x)",
                            if consume { "Consume" } else { "Lease/Ack" },
                            if nodes == 1 { "" } else { "s" },
                            yes(v >= 2.0 * b),
                            thousands(v as u64),
                            thousands(b as u64),
                            v / b.max(1.0)
                        ));
                    }
                }
            }
        }
    }
    for r in rows.iter().filter(|r| !r.facts.bullmq && r.facts.nodes > 0) {
        if let Some(t) = r.facts.round_trips_per_job {
            let limit = if r.facts.batch >= 100 { 0.05 } else { 4.0 };
            out.push(format!(
                "S6 Redis round trips per job <= {limit} at batch {}, {}: {} (measured {t:.3} requests from the nodes serving the jobs, a pipeline counting once; their sweeps' are apart)",
                r.facts.batch,
                r.system,
                yes(t <= limit)
            ));
        }
    }
    if let Some(ms) = rows.iter().find_map(|r| r.facts.resume_after_failover_ms) {
        out.push(format!(
            "S6 writes resume within 2 s after the cluster promotes a replica: {} (measured {ms:.0} ms)",
            yes(ms <= 2000.0)
        ));
    }
    out
}

/// The report's S6 part: method, cost model, and the tables in the report's format.
pub fn report(md: &mut String, rows: &[S6Row], bullmq: &Result<String, String>, command: &str) {
    use std::fmt::Write as _;
    let _ = writeln!(md, "\n## S6: Sluice on Redis vs BullMQ\n");
    let _ = writeln!(
        md,
        "- Redis: private `redis-server` 7.0 processes started by the harness (never the \
         system Redis): 1 server without persistence (`--redis-replicas 0`), 1 server plus a \
         `--replicaof` replica (`--redis-replicas 1`), and a 3 primary + 3 replica Redis \
         Cluster (AOF on, `cluster-node-timeout 1000`), measured with replicas 0 and 1.\n\
         - Sluice: in-process `RedisEngine`s in the harness process, each served by \
         `sluice::broker::serve` on its own loopback port (1 node, or 3 nodes with the 2 \
         producers and 4 workers spread over them), 4 requests in flight per producer as \
         BullMQ's. \"Consume\": producers on EnqueueStream (batch jobs a request, a stream per \
         request in flight), workers \
         on the Consume stream with credits = batch, acking what they got together with the next credits \
         (the Redis engine then acks and leases in one script, as BullMQ's `moveToFinished` \
         fetches the next job; with its default `--redis-lease-ahead 256` a node leases ahead \
         of a quick worker's credits and answers its next credit from the jobs it holds: \
         README, \"Lease-ahead on Consume streams\"). \"Lease/Ack\": unary Enqueue (batch), Lease (max_jobs = \
         batch, 100 ms long poll) and one Ack call per lease.\n\
         - BullMQ: {} in one Node.js process (`benches/compare/bullmq/bench.js`), queue \
         prefix `{{s6}}` (one cluster slot), 2 `Queue`s (own connections) with 4 `add` / \
         `addBulk(batch)` loops each, 4 `Worker`s with `concurrency` = batch (BullMQ has no \
         batched fetch or completion: every job is moved to active and to completed by its \
         own script call), jobs removed on completion.\n\
         - Durability: Sluice with `--redis-replicas 1` answers Enqueue and Ack after `WAIT 1` \
         confirmed them on a replica; a Consume stream's acks (which have no answer) are \
         confirmed whenever the stream would wait and before it ends, not before each next \
         lease, as the WAL engine does for fsync. BullMQ has no such option; its replicas-1 \
         rows send `WAIT 1 1000` on the producer's connection after each add, so enqueues \
         are confirmed like Sluice's, but completions (acks) are not: these rows promise \
         less than Sluice's, and there is no BullMQ equivalent of an acked-and-replicated \
         completion.\n\
         - Throughput: closed loop, every system's producers pause while 20,000 jobs wait \
         unacked (unbounded producers saturate Redis and starve the workers: the figure would \
         be the backlog's growth). Warm-up 2 s (BullMQ's workers take about a second to \
         reach their rate), then the window.\n\
         - Cost (machine-independent): a separate run of a fixed number of jobs (10,000 at \
         batch 100, 2,000 at batch 1) in the same shape. INFO commandstats `calls` summed \
         over the primaries before and after counts every command, including those scripts \
         ran; MONITOR on the primaries tells the top-level commands clients sent (one round \
         trip each unless pipelined) from the ones scripts ran (`[0 lua]`). Replicas' \
         commandstats count what they applied. The Redis time in scripts per job (`usec` \
         of the script calls, the commands they ran included: the figure that bounds a \
         primary's jobs/s) comes from a second cost run of the same jobs without MONITOR, \
         which formats every command it shows. For Sluice, the nodes also count the \
         requests they send (`RedisEngine::redis_requests`): network round trips, where a \
         pipeline counts once (a WAIT goes with its fence write, `SET <tag>:wait-fence`, in \
         one pipeline, so it is one round trip but two top-level commands), and apart from \
         them those of their 100 ms sweeps (`redis_background_requests`: upkeep per node \
         per second, whatever the job rate). The round-trip verdicts read the requests \
         serving the jobs (enqueue, lease, ack and WAIT, as the target names them); the \
         sweeps' are shown beside them. The commandstats figures include all background \
         work during the run (Sluice's sweeps, BullMQ's stalled-job checks).\n\
         - Latency: open-loop Enqueue / `add` of 1 job at {} jobs/s (2 producers), 4 workers \
         (Consume credits 100 / concurrency 100), receive time minus intended send time.\n\
         - Unavailability: 1 Sluice node on the 3+3 cluster with `--redis-replicas 0`, one \
         producer enqueuing 1 job at a time; the primary owning the queue's slot \
         (`RedisCluster::primary_for_key`) is SIGKILLed. (With `--redis-replicas 1` the \
         promoted replica has no replica of its own, so WAIT cannot be satisfied until one \
         rejoins: writes stay UNAVAILABLE by design.)\n\
         - Per-shard cost model: every operation on a queue is one script call in that \
         queue's slot, so a queue lives on one shard and its cost is the per-job figures \
         above on that shard's primary (plus, with replicas, one WAIT per shard per group of \
         concurrent answers, and the replica applying the script's effects). N queues spread \
         over N shards scale the cluster's capacity ~linearly while each queue's own rate is \
         bounded by its shard's single-threaded primary: queue rate <= (primary's commands/s) \
         / (commands per job). Sluice nodes hold no state, so adding nodes adds gRPC and \
         encoding capacity, not Redis capacity. This 2-core machine runs every Redis process, \
         every Sluice node and every client at once, so it cannot show that scaling; the \
         cost per job is the figure that carries over.",
        match bullmq {
            Ok(v) => v.clone(),
            Err(e) => format!("BullMQ (unavailable in this run: {e})"),
        },
        thousands(RATE)
    );
    let v = verdicts(rows);
    if !v.is_empty() {
        let _ = writeln!(md, "\n### S6 targets (issue 19, this run)\n");
        for x in v {
            let _ = writeln!(md, "- {x}");
        }
    }
    let mut by_variant: BTreeMap<usize, (&str, Vec<&S6Row>)> = BTreeMap::new();
    let mut order: Vec<&str> = Vec::new();
    for r in rows {
        if !order.contains(&r.variant.as_str()) {
            order.push(&r.variant);
        }
        let i = order.iter().position(|x| *x == r.variant).expect("pushed");
        by_variant
            .entry(i)
            .or_insert((&r.variant, Vec::new()))
            .1
            .push(r);
    }
    for (_, (variant, rs)) in by_variant {
        let _ = writeln!(
            md,
            "\n### S6 — {variant}\n\n| system | result | details | reproduce |\n|---|---|---|---|"
        );
        for r in rs {
            let (main, extra) = match &r.outcome {
                Outcome::Measured { main, extra } => (main.clone(), extra.clone()),
                Outcome::Unavailable(w) => ("unavailable".into(), w.clone()),
                Outcome::NotApplicable(w) => ("n/a".into(), w.clone()),
                Outcome::Failed(w) => ("failed".into(), w.clone()),
            };
            let _ = writeln!(md, "| {} | {main} | {extra} | `{command}` |", r.system);
        }
    }
    let _ = writeln!(md);
}
