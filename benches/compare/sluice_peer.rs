//! Sluice runners over real gRPC. The same runners drive the raw-tonic baseline, which
//! serves the same `sluice.v1` RPCs without a broker behind them.
//!
//! Its load loops (publishers, fillers, workers, subscribers) look like the other peers'
//! on purpose and are not shared: each peer is measured through its own client code, and
//! a shared loop could bias one; what is shared (`common.rs`) is pacing, metering, the
//! drain wait and the wording of outcomes.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice::pb;
use sluice::pb::broker_client::BrokerClient;
use tonic::transport::{Channel, Endpoint};

use crate::common::*;

/// A client of the `sluice.v1.Broker` service.
pub type Client = BrokerClient<Channel>;

/// A `sluice serve` child process, killed on drop.
pub struct SluiceProcess {
    child: Child,
    /// Its listen address.
    pub addr: SocketAddr,
    /// Its own data directory (removed on drop), so no figure recovers another's state.
    _data_dir: tempfile::TempDir,
}

impl SluiceProcess {
    /// Starts `sluice serve` on a free loopback port with `extra` flags. `Ok(Err(text))`
    /// means the binary refused the flags (it exited with that stderr).
    pub async fn start(extra: &[String]) -> Res<Result<SluiceProcess, String>> {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let data_dir = data_dir()?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--max-subscriptions", "100000"])
            .args(extra)
            .env("SLUICE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let t0 = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Ok(Err(format!("exit {status}: {}", one_line(err.trim()))));
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                // Stop piping stderr into a buffer nobody reads.
                drop(child.stderr.take());
                return Ok(Ok(SluiceProcess {
                    child,
                    addr,
                    _data_dir: data_dir,
                }));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                return Err("sluice did not start listening within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The broker's version line (`sluice --version`).
    pub fn version() -> String {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    }
}

/// A fresh directory for a `sluice serve` data dir (removed on drop). The disk probe
/// measures in one made here too, so its figures are those of the brokers' filesystem.
pub fn data_dir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("sluice-bench-").tempdir()
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens one HTTP/2 connection.
async fn channel(addr: SocketAddr) -> Res<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(1024 * 1024))
        .initial_connection_window_size(Some(8 * 1024 * 1024))
        .max_frame_size(sluice::client::MAX_FRAME_BYTES)
        .connect()
        .await?)
}

/// Opens one HTTP/2 connection for the generated client.
pub async fn connect(addr: SocketAddr) -> Res<Client> {
    Ok(BrokerClient::new(channel(addr).await?)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024))
}

/// How a runner sends Publish and Enqueue requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Produce {
    /// One unary call per request (the raw-tonic baseline serves only these).
    Unary,
    /// The Rust client's `Publisher` / `Enqueuer`: requests pipelined over one
    /// PublishStream / EnqueueStream call per connection.
    Stream,
}

/// One producer connection, sending the way its [`Produce`] says.
#[derive(Clone)]
pub enum Producer {
    Unary(Client),
    Stream(sluice::client::Publisher, sluice::client::Enqueuer),
}

impl Producer {
    /// `n` producers sharing one connection to `addr`; with [`Produce::Stream`] each
    /// sends on a stream of its own (a stream's requests are applied one after another,
    /// so `n` requests in flight take `n` streams to be applied side by side).
    pub async fn open_many(addr: SocketAddr, how: Produce, n: usize) -> Res<Vec<Producer>> {
        Ok(match how {
            Produce::Unary => vec![Producer::Unary(connect(addr).await?); n],
            Produce::Stream => {
                let client = sluice::client::Client::from_channel(channel(addr).await?);
                (0..n)
                    .map(|_| Producer::Stream(client.publisher(), client.enqueuer()))
                    .collect()
            }
        })
    }

    /// A producer connected to `addr`.
    pub async fn open(addr: SocketAddr, how: Produce) -> Res<Producer> {
        Ok(match how {
            Produce::Unary => Producer::Unary(connect(addr).await?),
            Produce::Stream => {
                let client = sluice::client::Client::from_channel(channel(addr).await?);
                Producer::Stream(client.publisher(), client.enqueuer())
            }
        })
    }

    async fn publish(&self, req: &pb::PublishRequest) -> Res<()> {
        match self {
            Producer::Unary(c) => {
                c.clone().publish(req.clone()).await?;
            }
            Producer::Stream(p, _) => {
                let messages = req
                    .messages
                    .iter()
                    .map(|m| sluice::client::Message::new(m.payload.clone()))
                    .collect();
                p.publish_batch(&req.topic, messages).await?;
            }
        }
        Ok(())
    }

    /// Enqueues `req`'s jobs.
    pub async fn enqueue(&self, req: &pb::EnqueueRequest) -> Res<()> {
        match self {
            Producer::Unary(c) => {
                c.clone().enqueue(req.clone()).await?;
            }
            Producer::Stream(_, e) => {
                let jobs = req
                    .jobs
                    .iter()
                    .map(|j| sluice::client::Job::new(j.payload.clone()))
                    .collect();
                e.enqueue_batch(&req.queue, jobs).await?;
            }
        }
        Ok(())
    }
}

fn publish_request(topic: &str, batch: usize, size: usize) -> pb::PublishRequest {
    let body = Bytes::from(payload(size, 0, 0));
    pb::PublishRequest {
        topic: topic.to_string(),
        messages: (0..batch)
            .map(|_| pb::PublishMessage {
                payload: body.clone(),
                ..Default::default()
            })
            .collect(),
    }
}

fn enqueue_request(queue: &str, batch: usize, size: usize) -> pb::EnqueueRequest {
    enqueue_of(queue, batch, Bytes::from(payload(size, 0, 0)))
}

/// An Enqueue of `n` jobs that all carry `body`.
pub fn enqueue_of(queue: &str, n: usize, body: Bytes) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        queue: queue.to_string(),
        jobs: (0..n)
            .map(|_| pb::JobSpec {
                payload: body.clone(),
                ..Default::default()
            })
            .collect(),
    }
}

async fn subscribe(
    client: &mut Client,
    topic: &str,
) -> Res<tonic::Streaming<pb::SubscribeResponse>> {
    Ok(client
        .subscribe(pb::SubscribeRequest {
            pattern: topic.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// Receives until the meter stops; counts messages (and gaps in `gaps`).
fn spawn_counting_subscriber(
    mut stream: tonic::Streaming<pb::SubscribeResponse>,
    meter: Meter,
    gaps: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !meter.stopped() {
            match tokio::time::timeout(Duration::from_millis(100), stream.message()).await {
                Ok(Ok(Some(batch))) => {
                    meter.add(batch.messages.len() as u64);
                    gaps.fetch_add(batch.gaps.len() as u64, Ordering::Relaxed);
                }
                Ok(_) => {
                    meter.error();
                    break;
                }
                Err(_) => {}
            }
        }
    })
}

/// S1: one publisher (`in_flight` concurrent calls of `batch` messages) and `subs`
/// subscribers, each on its own connection; delivered messages per second.
pub async fn s1(
    addr: SocketAddr,
    s: &Settings,
    how: Produce,
    subs: usize,
    batch: usize,
) -> Res<Outcome> {
    let topic = format!("bench.s1.{}", run_id());
    let meter = Meter::new();
    let gaps = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..subs {
        let mut c = connect(addr).await?;
        let stream = subscribe(&mut c, &topic).await?;
        readers.push(spawn_counting_subscriber(
            stream,
            meter.clone(),
            gaps.clone(),
        ));
    }
    let published = Arc::new(AtomicU64::new(0));
    let publisher = Producer::open(addr, how).await?;
    let req = publish_request(&topic, batch, 128);
    let mut pubs = Vec::new();
    for _ in 0..s.in_flight {
        let (c, req, meter, published) = (
            publisher.clone(),
            req.clone(),
            meter.clone(),
            published.clone(),
        );
        pubs.push(tokio::spawn(async move {
            while !meter.stopped() {
                match c.publish(&req).await {
                    Ok(_) => {
                        published.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        meter.error();
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }));
    }
    let p0 = published.load(Ordering::Relaxed);
    let (n, el) = meter.measure(s).await;
    let p1 = published.load(Ordering::Relaxed);
    for t in pubs.into_iter().chain(readers) {
        let _ = t.await;
    }
    Ok(Outcome::Measured {
        main: format!("{} msg/s delivered", thousands(rate(n, el))),
        extra: format!(
            "published ≈{} msg/s (incl. warm-up); gap notices {}; errors {}",
            thousands(rate(p1 - p0, el + s.warmup)),
            gaps.load(Ordering::Relaxed),
            meter.errors.load(Ordering::Relaxed)
        ),
    })
}

/// A unary worker: Lease `batch` (100 ms long poll) and Ack them all in one call, until
/// `done` says so; counts acks in `meter`, and records each job's latency in `hist` when
/// given one.
pub async fn lease_ack_worker(
    mut c: Client,
    queue: String,
    consumer: String,
    batch: usize,
    meter: Meter,
    done: impl Fn(&Meter) -> bool,
    mut hist: Option<hdrhistogram::Histogram<u64>>,
) -> Option<hdrhistogram::Histogram<u64>> {
    while !done(&meter) {
        let jobs = match c
            .lease(pb::LeaseRequest {
                queue: queue.clone(),
                max_jobs: batch as u32,
                visibility_timeout_ms: 60_000,
                wait_ms: 100,
                consumer: consumer.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner().jobs,
            Err(_) => {
                meter.error();
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        if jobs.is_empty() {
            continue;
        }
        let n = jobs.len() as u64;
        let acks = jobs
            .into_iter()
            .map(|j| {
                if let Some(h) = hist.as_mut()
                    && let Some(st) = stamp_of(&j.payload)
                {
                    record_since(h, st);
                }
                pb::LeaseAck {
                    lease_id: j.lease_id,
                    result: Bytes::new(),
                }
            })
            .collect();
        match c.ack(pb::AckRequest { acks }).await {
            Ok(_) => meter.add(n),
            Err(_) => meter.error(),
        }
    }
    hist
}

/// S2: 2 producers (each `in_flight` concurrent Enqueue calls of `batch` jobs) and 4
/// workers (Lease `batch`, then Ack all of them in one call); acked jobs per second.
pub async fn s2(addr: SocketAddr, s: &Settings, batch: usize) -> Res<Outcome> {
    let how = Produce::Unary;
    let queue = format!("bench.s2.{}", run_id());
    let meter = Meter::new();
    let mut tasks = Vec::new();
    let enqueued = Arc::new(AtomicU64::new(0));
    for _ in 0..2 {
        let producer = Producer::open(addr, how).await?;
        let req = enqueue_request(&queue, batch, 256);
        for _ in 0..s.in_flight {
            let (c, req, meter, enq) = (
                producer.clone(),
                req.clone(),
                meter.clone(),
                enqueued.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !meter.stopped() {
                    match c.enqueue(&req).await {
                        Ok(_) => {
                            enq.fetch_add(batch as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            // Full queue (max depth): back off briefly.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }));
        }
    }
    for w in 0..4 {
        let c = connect(addr).await?;
        let (queue, meter) = (queue.clone(), meter.clone());
        tasks.push(tokio::spawn(async move {
            let done = |m: &Meter| m.stopped();
            lease_ack_worker(c, queue, format!("w{w}"), batch, meter, done, None).await;
        }));
    }
    let (n, el) = meter.measure(s).await;
    for t in tasks {
        let _ = t.await;
    }
    Ok(Outcome::Measured {
        main: format!("{} jobs/s acked", thousands(rate(n, el))),
        extra: format!(
            "enqueued ≈{} jobs/s (incl. warm-up); errors {}",
            thousands(rate(enqueued.load(Ordering::Relaxed), el + s.warmup)),
            meter.errors.load(Ordering::Relaxed)
        ),
    })
}

/// S3 publish->deliver: open-loop Publish of 1 message at `rate_per_s`, one subscriber.
pub async fn s3_topic(
    addr: SocketAddr,
    s: &Settings,
    how: Produce,
    rate_per_s: u64,
) -> Res<Outcome> {
    let (h, stats) = fanout_latency(addr, s, how, rate_per_s, 1, None).await?;
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

/// p50 / p99 / p99.9 compact form.
pub fn percentiles_short(h: &hdrhistogram::Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {} / p99 {} / p99.9 {} µs",
        thousands(h.value_at_quantile(0.5)),
        thousands(h.value_at_quantile(0.99)),
        thousands(h.value_at_quantile(0.999))
    )
}

/// Open-loop publisher at `rate_per_s` to `subs` subscribers (100 per connection); returns
/// the merged latency histogram and the generator's statistics. With `pid`, the broker's
/// RSS growth per subscriber is written to `mem_per_sub`.
async fn fanout_latency(
    addr: SocketAddr,
    s: &Settings,
    how: Produce,
    rate_per_s: u64,
    subs: usize,
    pid: Option<(u32, &mut Option<i64>)>,
) -> Res<(hdrhistogram::Histogram<u64>, OpenLoopStats)> {
    let topic = format!("bench.lat.{}", run_id());
    let publisher = Producer::open(addr, how).await?;
    let rss0 = pid.as_ref().and_then(|(p, _)| rss_bytes(*p));
    let meter = Meter::new();
    let mut readers = Vec::new();
    let mut client = None;
    for i in 0..subs {
        if i % 100 == 0 {
            client = Some(connect(addr).await?);
        }
        let c = client.as_mut().expect("connected");
        let mut stream = subscribe(c, &topic).await?;
        let meter = meter.clone();
        readers.push(tokio::spawn(async move {
            let mut h = histogram();
            while !meter.stopped() {
                match tokio::time::timeout(Duration::from_millis(100), stream.message()).await {
                    Ok(Ok(Some(batch))) => {
                        for m in &batch.messages {
                            if let Some(st) = stamp_of(&m.payload) {
                                record_since(&mut h, st);
                            }
                        }
                        meter.add(batch.messages.len() as u64);
                    }
                    Ok(_) => break,
                    Err(_) => {}
                }
            }
            h
        }));
    }
    if let Some((p, out)) = pid {
        tokio::time::sleep(Duration::from_millis(200)).await;
        *out = rss_delta(rss0, rss_bytes(p));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = topic.clone();
    let stats = open_loop(rate_per_s, s.warmup, s.window, move |seq, intended| {
        let c = publisher.clone();
        let req = pb::PublishRequest {
            topic: t.clone(),
            messages: vec![pb::PublishMessage {
                payload: Bytes::from(payload(128, seq, intended)),
                ..Default::default()
            }],
        };
        async move { c.publish(&req).await }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    meter.stop.store(true, Ordering::Relaxed);
    let mut h = histogram();
    for r in readers {
        h.add(r.await?)?;
    }
    Ok((h, stats))
}

/// S3 enqueue->lease: open-loop Enqueue of 1 job at `rate_per_s`, 2 workers long-polling
/// Lease (up to 100 jobs) and acking every lease.
pub async fn s3_queue(addr: SocketAddr, s: &Settings, rate_per_s: u64) -> Res<Outcome> {
    let queue = format!("bench.s3q.{}", run_id());
    let producer = connect(addr).await?;
    let meter = Meter::new();
    let mut workers = Vec::new();
    for w in 0..2 {
        let c = connect(addr).await?;
        let (queue, meter) = (queue.clone(), meter.clone());
        workers.push(tokio::spawn(async move {
            let done = |m: &Meter| m.stopped();
            let name = format!("w{w}");
            lease_ack_worker(c, queue, name, 100, meter, done, Some(histogram()))
                .await
                .unwrap_or_else(histogram)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let q = queue.clone();
    let stats = open_loop(rate_per_s, s.warmup, s.window, move |seq, intended| {
        let mut c = producer.clone();
        let req = enqueue_of(&q, 1, Bytes::from(payload(128, seq, intended)));
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
        h.add(w.await?)?;
    }
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

/// S4: open-loop Publish at `rate_per_s` to `subs` subscribers; deliveries/s, p99 and the
/// broker's RSS growth per subscriber (when its pid is known).
pub async fn s4(
    addr: SocketAddr,
    pid: Option<u32>,
    s: &Settings,
    rate_per_s: u64,
    subs: usize,
) -> Res<Outcome> {
    let mut mem = None;
    let (h, stats) = fanout_latency(
        addr,
        s,
        Produce::Unary,
        rate_per_s,
        subs,
        pid.map(|p| (p, &mut mem)),
    )
    .await?;
    let delivered = h.len();
    Ok(Outcome::Measured {
        main: format!(
            "{} deliveries/s, p99 {} µs",
            thousands(rate(delivered, stats.elapsed)),
            thousands(h.value_at_quantile(0.99))
        ),
        extra: format!(
            "offered {} deliveries/s; {}; {}; broker RSS per subscriber {}",
            thousands(rate_per_s * subs as u64),
            percentiles(&h),
            stats.lag_text(),
            match mem {
                Some(d) => format!("{} B", thousands((d.max(0) as u64) / subs as u64)),
                None => "n/a".into(),
            }
        ),
    })
}

async fn queue_stats(c: &mut Client, queue: &str) -> Res<pb::QueueStats> {
    let r = c
        .stats(pb::StatsRequest {
            queues: vec![queue.to_string()],
            topics: vec![],
        })
        .await?
        .into_inner();
    r.queues
        .into_iter()
        .find(|q| q.name == queue)
        .ok_or_else(|| "queue missing from stats".into())
}

async fn create_queue(c: &mut Client, queue: &str, max_depth: u64, zero_backoff: bool) -> Res<()> {
    c.create_queue(pb::CreateQueueRequest {
        name: queue.to_string(),
        policy: Some(pb::QueuePolicy {
            max_depth,
            max_attempts: 1000,
            backoff: zero_backoff.then(|| pb::BackoffPolicy {
                delays_ms: vec![0],
                ..Default::default()
            }),
            ..Default::default()
        }),
    })
    .await?;
    Ok(())
}

/// Enqueues `n` jobs of `size` bytes in batches of 1,000 with `in_flight` concurrent calls.
async fn fill(addr: SocketAddr, queue: &str, n: u64, in_flight: usize) -> Res<Duration> {
    let c = connect(addr).await?;
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let (mut c, next, queue) = (c.clone(), next.clone(), queue.to_string());
        tasks.push(tokio::spawn(async move {
            let full = enqueue_request(&queue, 1000, 128);
            loop {
                let start = next.fetch_add(1000, Ordering::Relaxed);
                if start >= n {
                    return Ok::<(), tonic::Status>(());
                }
                let k = (n - start).min(1000) as usize;
                let mut req = full.clone();
                req.jobs.truncate(k);
                c.enqueue(req).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(t0.elapsed())
}

/// S5 backlog: `n` x 128 B enqueued, RSS growth per job, then drained by 4 workers
/// (Lease 1,000 + Ack).
pub async fn s5_backlog(addr: SocketAddr, pid: Option<u32>, s: &Settings, n: u64) -> Res<Outcome> {
    let queue = format!("bench.s5.{}", run_id());
    let mut admin = connect(addr).await?;
    create_queue(&mut admin, &queue, n + 1000, false).await?;
    let rss0 = pid.and_then(rss_bytes);
    let fill_time = fill(addr, &queue, n, s.in_flight).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss1 = pid.and_then(rss_bytes);
    let t0 = Instant::now();
    let drained = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = connect(addr).await?;
        let (queue, drained) = (queue.clone(), drained.clone());
        tasks.push(tokio::spawn(async move {
            while drained.load(Ordering::Relaxed) < n {
                let jobs = c
                    .lease(pb::LeaseRequest {
                        queue: queue.clone(),
                        max_jobs: 1000,
                        visibility_timeout_ms: 600_000,
                        wait_ms: 50,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .jobs;
                if jobs.is_empty() {
                    continue;
                }
                let k = jobs.len() as u64;
                let acks = jobs
                    .into_iter()
                    .map(|j| pb::LeaseAck {
                        lease_id: j.lease_id,
                        result: Bytes::new(),
                    })
                    .collect();
                c.ack(pb::AckRequest { acks }).await?;
                drained.fetch_add(k, Ordering::Relaxed);
            }
            Ok::<(), tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let drain_time = t0.elapsed();
    let rss_growth = rss_delta(rss0, rss1);
    let over_payload = rss_growth.map_or(0.0, |d| d as f64 / n as f64 - 128.0);
    let item = format!("job ({over_payload:.0} B over the 128 B payload)");
    Ok(backlog_outcome(
        n, fill_time, drain_time, rss_growth, "broker", &item,
    ))
}

/// S5 expiry: `m` jobs leased with deadlines that all fall at the same instant; the time
/// from that instant until the broker shows all `m` pending again.
pub async fn s5_expiry(addr: SocketAddr, s: &Settings, m: u64) -> Res<Outcome> {
    let queue = format!("bench.s5x.{}", run_id());
    let mut admin = connect(addr).await?;
    create_queue(&mut admin, &queue, m + 1000, true).await?;
    let fill_time = fill(addr, &queue, m, s.in_flight).await?;
    // All leases end at `deadline`, whatever moment each was taken.
    // Leasing uses as many concurrent calls as filling did, so 3x the fill time plus 2 s
    // leaves room for a slower lease path.
    let deadline = now_ns() + 3 * fill_time.as_nanos() as u64 + 2_000_000_000;
    let leased = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..s.in_flight {
        let mut c = connect(addr).await?;
        let (queue, leased) = (queue.clone(), leased.clone());
        tasks.push(tokio::spawn(async move {
            while leased.load(Ordering::Relaxed) < m {
                let left_ms = deadline.saturating_sub(now_ns()) / 1_000_000;
                if left_ms < 50 {
                    return Err::<(), BoxError>(
                        "leasing took longer than the planned deadline".into(),
                    );
                }
                let jobs = c
                    .lease(pb::LeaseRequest {
                        queue: queue.clone(),
                        max_jobs: 1000,
                        visibility_timeout_ms: left_ms,
                        wait_ms: 20,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .jobs;
                leased.fetch_add(jobs.len() as u64, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let leased_n = leased.load(Ordering::Relaxed);
    let wait = deadline.saturating_sub(now_ns());
    tokio::time::sleep(Duration::from_nanos(wait)).await;
    let t_deadline = now_ns();
    let done = wait_until(Duration::from_millis(2), Duration::from_secs(60), || {
        let mut c = admin.clone();
        let queue = queue.clone();
        async move {
            matches!(queue_stats(&mut c, &queue).await, Ok(st) if st.pending >= m && st.leased == 0)
        }
    })
    .await;
    let _ = t_deadline;
    Ok(match done {
        Some(d) => Outcome::Measured {
            main: format!(
                "{} expiring leases requeued in {} ms",
                thousands(leased_n),
                d.as_millis()
            ),
            extra: format!(
                "time from the common lease deadline until Stats shows all {} pending (polled every 2 ms)",
                thousands(m)
            ),
        },
        None => Outcome::Failed("not all leases requeued within 60 s".into()),
    })
}

/// A worker on the streaming Consume RPC: grants `credits`, acks every delivered batch on
/// the stream and grants the same number of credits again. Counts acks sent (the stream
/// answers refused settlements only, in `errors`).
pub async fn consume_worker(
    addr: SocketAddr,
    queue: String,
    name: String,
    credits: u32,
    meter: Meter,
    mut hist: Option<hdrhistogram::Histogram<u64>>,
) -> Res<Option<hdrhistogram::Histogram<u64>>> {
    let mut c = connect(addr).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ConsumeRequest>(64);
    tx.send(pb::ConsumeRequest {
        queue,
        consumer: name,
        visibility_timeout_ms: 60_000,
        credits,
        ..Default::default()
    })
    .await?;
    let mut stream = c
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while !meter.stopped() {
        match tokio::time::timeout(Duration::from_millis(100), stream.message()).await {
            Ok(Ok(Some(resp))) => {
                for _ in &resp.errors {
                    meter.error();
                }
                let n = resp.jobs.len();
                if n == 0 {
                    continue;
                }
                let acks = resp
                    .jobs
                    .into_iter()
                    .map(|j| {
                        if let Some(h) = hist.as_mut()
                            && let Some(st) = stamp_of(&j.payload)
                        {
                            record_since(h, st);
                        }
                        pb::LeaseAck {
                            lease_id: j.lease_id,
                            result: Bytes::new(),
                        }
                    })
                    .collect();
                tx.send(pb::ConsumeRequest {
                    credits: n as u32,
                    acks,
                    ..Default::default()
                })
                .await?;
                meter.add(n as u64);
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {}
        }
    }
    Ok(hist)
}

/// S2 on the streaming Consume RPC: 2 producers as in [`s2`], 4 Consume workers with
/// `batch` credits each.
pub async fn s2_consume(
    addr: SocketAddr,
    s: &Settings,
    how: Produce,
    batch: usize,
) -> Res<Outcome> {
    let queue = format!("bench.s2c.{}", run_id());
    let meter = Meter::new();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (queue, meter) = (queue.clone(), meter.clone());
        tasks.push(tokio::spawn(async move {
            if consume_worker(
                addr,
                queue,
                format!("w{w}"),
                batch as u32,
                meter.clone(),
                None,
            )
            .await
            .is_err()
            {
                meter.error();
            }
        }));
    }
    let enqueued = Arc::new(AtomicU64::new(0));
    for _ in 0..2 {
        let producer = Producer::open(addr, how).await?;
        let req = enqueue_request(&queue, batch, 256);
        for _ in 0..s.in_flight {
            let (c, req, meter, enq) = (
                producer.clone(),
                req.clone(),
                meter.clone(),
                enqueued.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !meter.stopped() {
                    match c.enqueue(&req).await {
                        Ok(_) => {
                            enq.fetch_add(batch as u64, Ordering::Relaxed);
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            }));
        }
    }
    let (n, el) = meter.measure(s).await;
    for t in tasks {
        let _ = t.await;
    }
    Ok(Outcome::Measured {
        main: format!("{} jobs/s acked", thousands(rate(n, el))),
        extra: format!(
            "acks sent on the Consume stream, credits = batch; {}; enqueued ≈{} jobs/s (incl. warm-up); errors {}",
            match how {
                Produce::Unary => "Enqueue calls",
                Produce::Stream => "EnqueueStream",
            },
            thousands(rate(enqueued.load(Ordering::Relaxed), el + s.warmup)),
            meter.errors.load(Ordering::Relaxed)
        ),
    })
}

/// S3 enqueue->lease on the streaming Consume RPC: open-loop Enqueue of 1 job, 2 Consume
/// workers with 100 credits each.
pub async fn s3_consume(
    addr: SocketAddr,
    s: &Settings,
    how: Produce,
    rate_per_s: u64,
) -> Res<Outcome> {
    let queue = format!("bench.s3c.{}", run_id());
    let producer = Producer::open(addr, how).await?;
    let meter = Meter::new();
    let mut workers = Vec::new();
    for w in 0..2 {
        workers.push(tokio::spawn(consume_worker(
            addr,
            queue.clone(),
            format!("w{w}"),
            100,
            meter.clone(),
            Some(histogram()),
        )));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Shaped like the S2 publish and S3 lease runs' loops, kept apart: the request each
    // sends and the way it is answered are what the scenario measures.
    let q = queue.clone();
    let stats = open_loop(rate_per_s, s.warmup, s.window, move |seq, intended| {
        let c = producer.clone();
        let req = pb::EnqueueRequest {
            queue: q.clone(),
            jobs: vec![pb::JobSpec {
                payload: Bytes::from(payload(128, seq, intended)),
                ..Default::default()
            }],
        };
        async move { c.enqueue(&req).await }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    meter.stop.store(true, Ordering::Relaxed);
    let mut h = histogram();
    for w in workers {
        if let Some(x) = w.await?? {
            h.add(x)?;
        }
    }
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

/// Sluice's own broker and gRPC service, served in the harness process on a listener
/// whose accepted sockets get TCP_NODELAY (as `sluice serve` sets on its own). A
/// diagnostic: broker and clients share one process and one runtime, so comparing this row
/// with the binary's row shows what the process boundary (and a second scheduler on the
/// same 2 cores) costs.
pub struct InProcessSluice {
    /// Its address.
    pub addr: SocketAddr,
    broker: sluice::broker::Broker,
    stop: tokio_util::sync::CancellationToken,
}

impl InProcessSluice {
    /// Starts it on 127.0.0.1:0, served by the same `serve` as `sluice serve`.
    pub async fn start() -> Res<InProcessSluice> {
        use sluice::broker::{Broker, BrokerConfig, Limits};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let broker = Broker::new(BrokerConfig {
            limits: Limits {
                max_subscriptions: 100_000,
                ..Limits::default()
            },
            ..BrokerConfig::default()
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let served = broker.clone();
        tokio::spawn(async move {
            let options = sluice::broker::ServeOptions::default();
            if let Err(e) =
                sluice::broker::serve(listener, served, options, token.cancelled_owned()).await
            {
                eprintln!("in-process sluice server failed: {e}");
            }
        });
        Ok(InProcessSluice { addr, broker, stop })
    }
}

impl Drop for InProcessSluice {
    fn drop(&mut self) {
        self.broker.shutdown_token().cancel();
        self.stop.cancel();
    }
}
