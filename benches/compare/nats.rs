//! NATS runners (async-nats on 127.0.0.1:4222): core NATS and JetStream.
//!
//! Core NATS has no acks: a publisher's batch is followed by a `flush` (one round trip, the
//! analogue of waiting for the broker's answer). JetStream publishers wait for every
//! PubAck of a batch; topic consumers are pull consumers with `AckPolicy::None` (Sluice
//! subscriptions are not acked); work-queue consumers are one shared durable pull consumer
//! with `AckPolicy::Explicit`, fetching `batch` messages, acking each and flushing once per
//! batch. Memory table: `StorageType::Memory`; durable table: `StorageType::File`.
//!
//! Its load loops (publishers, fillers, workers, subscribers) look like the other peers'
//! on purpose and are not shared: each peer is measured through its own client code, and
//! a shared loop could bias one; what is shared (`common.rs`) is pacing, metering, the
//! drain wait and the wording of outcomes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;

use crate::common::*;

/// Address probed for availability.
pub const ADDR: &str = "127.0.0.1:4222";

async fn connect() -> Res<async_nats::Client> {
    Ok(async_nats::connect(ADDR).await?)
}

/// The server's version and JetStream status.
pub async fn version() -> String {
    match connect().await {
        Ok(c) => {
            let info = c.server_info();
            let js = jetstream::new(c.clone());
            // Probe JetStream by creating and deleting a stream: account-info parsing
            // differs between server versions, stream creation does not.
            let probe = format!("bench_probe_{}", run_id());
            let js_state = match js
                .create_stream(stream::Config {
                    name: probe.clone(),
                    subjects: vec![format!("bench.probe.{}", run_id())],
                    storage: stream::StorageType::Memory,
                    ..Default::default()
                })
                .await
            {
                Ok(_) => {
                    let _ = js.delete_stream(&probe).await;
                    "JetStream enabled".to_string()
                }
                Err(e) => format!("JetStream not usable: {e}"),
            };
            format!("nats-server {} ({js_state})", info.version)
        }
        Err(e) => format!("nats-server unavailable: {e}"),
    }
}

/// The server's pid.
pub fn pid() -> Option<u32> {
    pid_by_name("nats-server")
}

fn storage_type(storage: Storage) -> stream::StorageType {
    match storage {
        Storage::Memory => stream::StorageType::Memory,
        Storage::Durable => stream::StorageType::File,
    }
}

/// Core S1: `subs` subscribers, one publisher (`in_flight` loops of `batch` + flush).
pub async fn core_s1(s: &Settings, subs: usize, batch: usize) -> Res<Outcome> {
    let subject = format!("bench.s1.{}", run_id());
    let meter = Meter::new();
    let mut tasks = Vec::new();
    for _ in 0..subs {
        let c = connect().await?;
        let mut sub = c.subscribe(subject.clone()).await?;
        c.flush().await?;
        let meter = meter.clone();
        tasks.push(tokio::spawn(async move {
            while !meter.stopped() {
                match tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
                    Ok(Some(_)) => meter.add(1),
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            drop(c);
        }));
    }
    let publisher = connect().await?;
    let body = Bytes::from(payload(128, 0, 0));
    for _ in 0..s.in_flight {
        let (c, subject, body, meter) = (
            publisher.clone(),
            subject.clone(),
            body.clone(),
            meter.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !meter.stopped() {
                for _ in 0..batch {
                    if c.publish(subject.clone(), body.clone()).await.is_err() {
                        meter.error();
                    }
                }
                if c.flush().await.is_err() {
                    meter.error();
                }
            }
        }));
    }
    let (n, el) = meter.measure(s).await;
    for t in tasks {
        let _ = t.await;
    }
    Ok(Outcome::Measured {
        main: format!("{} msg/s delivered", thousands(rate(n, el))),
        extra: format!(
            "no acks (core NATS drops for slow consumers); errors {}",
            meter.errors.load(Ordering::Relaxed)
        ),
    })
}

/// Core fan-out latency with `subs` subscribers (100 per connection).
async fn core_fanout(
    s: &Settings,
    rate_per_s: u64,
    subs: usize,
) -> Res<(hdrhistogram::Histogram<u64>, OpenLoopStats, Option<i64>)> {
    let subject = format!("bench.lat.{}", run_id());
    let rss0 = pid().and_then(rss_bytes);
    let meter = Meter::new();
    let mut readers = Vec::new();
    let mut conns: Vec<async_nats::Client> = Vec::new();
    for i in 0..subs {
        if i % 100 == 0 {
            conns.push(connect().await?);
        }
        let c = conns.last().expect("conn");
        let mut sub = c.subscribe(subject.clone()).await?;
        let meter = meter.clone();
        readers.push(tokio::spawn(async move {
            let mut h = histogram();
            while !meter.stopped() {
                match tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
                    Ok(Some(m)) => {
                        if let Some(st) = stamp_of(&m.payload) {
                            record_since(&mut h, st);
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            h
        }));
    }
    for c in &conns {
        c.flush().await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mem = rss_delta(rss0, pid().and_then(rss_bytes));
    let publisher = connect().await?;
    let subj = subject.clone();
    let st = open_loop(rate_per_s, s.warmup, s.window, move |seq, intended| {
        let (c, subj) = (publisher.clone(), subj.clone());
        async move {
            c.publish(subj, Bytes::from(payload(128, seq, intended)))
                .await?;
            c.flush().await?;
            Ok(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    meter.stop.store(true, Ordering::Relaxed);
    let mut h = histogram();
    for r in readers {
        h.add(r.await?)?;
    }
    Ok((h, st, mem))
}

fn latency_outcome(h: &hdrhistogram::Histogram<u64>, st: OpenLoopStats, note: &str) -> Outcome {
    Outcome::Measured {
        main: crate::sluice_peer::percentiles_short(h),
        extra: format!(
            "{note}sent {} in {:.1} s, failed {}; {}",
            thousands(st.sent),
            st.elapsed.as_secs_f64(),
            st.failed,
            percentiles(h)
        ),
    }
}

/// Core S3 publish->deliver.
pub async fn core_s3(s: &Settings, rate_per_s: u64) -> Res<Outcome> {
    let (h, st, _) = core_fanout(s, rate_per_s, 1).await?;
    Ok(latency_outcome(&h, st, "publish + flush; "))
}

/// Core S4 fan-out.
pub async fn core_s4(s: &Settings, rate_per_s: u64, subs: usize) -> Res<Outcome> {
    let (h, st, mem) = core_fanout(s, rate_per_s, subs).await?;
    Ok(fanout_outcome(&h, st, mem, rate_per_s, subs, "nats-server"))
}

/// A JetStream stream created for one measurement and deleted afterwards.
struct JsStream {
    js: jetstream::Context,
    name: String,
    subject: String,
    stream: stream::Stream,
}

impl JsStream {
    async fn create(
        tag: &str,
        storage: Storage,
        retention: stream::RetentionPolicy,
    ) -> Res<JsStream> {
        let js = jetstream::new(connect().await?);
        let name = format!("bench_{tag}_{}", run_id());
        let subject = format!("bench.{tag}.{}", run_id());
        let stream = js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![subject.clone()],
                storage: storage_type(storage),
                retention,
                max_messages: 20_000_000,
                ..Default::default()
            })
            .await?;
        Ok(JsStream {
            js,
            name,
            subject,
            stream,
        })
    }

    async fn delete(self) {
        let _ = self.js.delete_stream(&self.name).await;
    }
}

/// Publishes `n` copies of `body` and waits for every PubAck.
async fn js_publish_acked(
    js: &jetstream::Context,
    subject: &str,
    body: &Bytes,
    n: usize,
) -> Res<()> {
    let mut acks = Vec::with_capacity(n);
    for _ in 0..n {
        acks.push(js.publish(subject.to_string(), body.clone()).await?);
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

fn spawn_js_publishers(
    js: &jetstream::Context,
    subject: &str,
    batch: usize,
    size: usize,
    in_flight: usize,
    meter: &Meter,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..in_flight)
        .map(|_| {
            let (js, subject, meter) = (js.clone(), subject.to_string(), meter.clone());
            let body = Bytes::from(payload(size, 0, 0));
            tokio::spawn(async move {
                while !meter.stopped() {
                    if js_publish_acked(&js, &subject, &body, batch).await.is_err() {
                        meter.error();
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect()
}

async fn topic_consumer(st: &JsStream) -> Res<consumer::pull::Stream> {
    let c: consumer::PullConsumer = st
        .stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await?;
    Ok(c.messages().await?)
}

/// JetStream S1: `subs` no-ack pull consumers, one publisher waiting for PubAcks.
pub async fn js_s1(s: &Settings, subs: usize, batch: usize, storage: Storage) -> Res<Outcome> {
    let st = JsStream::create("s1", storage, stream::RetentionPolicy::Limits).await?;
    let r = async {
        let meter = Meter::new();
        let mut tasks = Vec::new();
        for _ in 0..subs {
            let mut msgs = topic_consumer(&st).await?;
            let meter = meter.clone();
            tasks.push(tokio::spawn(async move {
                while !meter.stopped() {
                    match tokio::time::timeout(Duration::from_millis(100), msgs.next()).await {
                        Ok(Some(Ok(_))) => meter.add(1),
                        Ok(Some(Err(_))) => meter.error(),
                        Ok(None) => break,
                        Err(_) => {}
                    }
                }
            }));
        }
        tasks.extend(spawn_js_publishers(
            &st.js,
            &st.subject,
            batch,
            128,
            s.in_flight,
            &meter,
        ));
        let (n, el) = meter.measure(s).await;
        for t in tasks {
            let _ = t.await;
        }
        Ok::<_, BoxError>(meter.outcome(n, el, "msg/s delivered"))
    }
    .await;
    st.delete().await;
    r
}

async fn work_consumer(st: &JsStream) -> Res<consumer::PullConsumer> {
    Ok(st
        .stream
        .get_or_create_consumer(
            "workers",
            consumer::pull::Config {
                durable_name: Some("workers".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 100_000,
                ..Default::default()
            },
        )
        .await?)
}

/// One worker: fetch up to `batch`, ack each, flush; counts acked messages. With a
/// histogram, records each message's latency.
async fn js_worker(
    consumer: consumer::PullConsumer,
    client: async_nats::Client,
    batch: usize,
    meter: Meter,
    mut hist: Option<hdrhistogram::Histogram<u64>>,
) -> Option<hdrhistogram::Histogram<u64>> {
    while !meter.stopped() {
        let msgs = consumer
            .fetch()
            .max_messages(batch)
            .expires(Duration::from_millis(100))
            .messages()
            .await;
        let Ok(mut msgs) = msgs else {
            meter.error();
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut n = 0u64;
        while let Some(m) = msgs.next().await {
            match m {
                Ok(m) => {
                    if let Some(h) = hist.as_mut()
                        && let Some(st) = stamp_of(&m.message.payload)
                    {
                        record_since(h, st);
                    }
                    if m.ack().await.is_ok() {
                        n += 1;
                    } else {
                        meter.error();
                    }
                }
                Err(_) => break,
            }
        }
        if n > 0 {
            if client.flush().await.is_err() {
                meter.error();
            }
            meter.add(n);
        }
    }
    hist
}

/// JetStream S2: work-queue stream, 2 producers waiting for PubAcks, 4 workers sharing
/// one durable pull consumer with explicit acks.
pub async fn js_s2(s: &Settings, batch: usize, storage: Storage) -> Res<Outcome> {
    let st = JsStream::create("s2", storage, stream::RetentionPolicy::WorkQueue).await?;
    let r = async {
        let meter = Meter::new();
        let mut tasks = Vec::new();
        work_consumer(&st).await?;
        for _ in 0..4 {
            let client = connect().await?;
            let js = jetstream::new(client.clone());
            let stream = js.get_stream(&st.name).await?;
            let consumer: consumer::PullConsumer = stream.get_consumer("workers").await?;
            let meter = meter.clone();
            tasks.push(tokio::spawn(async move {
                js_worker(consumer, client, batch, meter, None).await;
            }));
        }
        for _ in 0..2 {
            let js = jetstream::new(connect().await?);
            tasks.extend(spawn_js_publishers(
                &js,
                &st.subject,
                batch,
                256,
                s.in_flight,
                &meter,
            ));
        }
        let (n, el) = meter.measure(s).await;
        for t in tasks {
            let _ = t.await;
        }
        Ok::<_, BoxError>(Outcome::Measured {
            main: format!("{} jobs/s acked", thousands(rate(n, el))),
            extra: format!(
                "acks are fire-and-forget + one flush per batch; errors {}",
                meter.errors.load(Ordering::Relaxed)
            ),
        })
    }
    .await;
    st.delete().await;
    r
}

async fn js_open_loop(
    js: &jetstream::Context,
    subject: &str,
    rate_per_s: u64,
    s: &Settings,
) -> OpenLoopStats {
    let (js, subject) = (js.clone(), subject.to_string());
    open_loop(rate_per_s, s.warmup, s.window, move |seq, intended| {
        let (js, subject) = (js.clone(), subject.clone());
        async move {
            js.publish(subject, Bytes::from(payload(128, seq, intended)))
                .await?
                .await?;
            Ok(())
        }
    })
    .await
}

async fn js_fanout(
    s: &Settings,
    rate_per_s: u64,
    subs: usize,
    storage: Storage,
) -> Res<(hdrhistogram::Histogram<u64>, OpenLoopStats, Option<i64>)> {
    let st = JsStream::create("lat", storage, stream::RetentionPolicy::Limits).await?;
    let r = async {
        let rss0 = pid().and_then(rss_bytes);
        let meter = Meter::new();
        let mut readers = Vec::new();
        for _ in 0..subs {
            let mut msgs = topic_consumer(&st).await?;
            let meter = meter.clone();
            readers.push(tokio::spawn(async move {
                let mut h = histogram();
                while !meter.stopped() {
                    match tokio::time::timeout(Duration::from_millis(100), msgs.next()).await {
                        Ok(Some(Ok(m))) => {
                            if let Some(st) = stamp_of(&m.message.payload) {
                                record_since(&mut h, st);
                            }
                        }
                        Ok(Some(Err(_))) => {}
                        Ok(None) => break,
                        Err(_) => {}
                    }
                }
                h
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mem = rss_delta(rss0, pid().and_then(rss_bytes));
        let stats = js_open_loop(&st.js, &st.subject, rate_per_s, s).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        meter.stop.store(true, Ordering::Relaxed);
        let mut h = histogram();
        for r in readers {
            h.add(r.await?)?;
        }
        Ok::<_, BoxError>((h, stats, mem))
    }
    .await;
    st.delete().await;
    r
}

/// JetStream S3 publish->deliver (file storage in the durable table).
pub async fn js_s3_topic(s: &Settings, rate_per_s: u64, storage: Storage) -> Res<Outcome> {
    let (h, st, _) = js_fanout(s, rate_per_s, 1, storage).await?;
    Ok(latency_outcome(&h, st, "publish awaits PubAck; "))
}

/// JetStream S4 fan-out (one no-ack consumer per subscriber).
pub async fn js_s4(s: &Settings, rate_per_s: u64, subs: usize) -> Res<Outcome> {
    let (h, st, mem) = js_fanout(s, rate_per_s, subs, Storage::Memory).await?;
    Ok(fanout_outcome(&h, st, mem, rate_per_s, subs, "nats-server"))
}

/// JetStream S3 enqueue->lease: work-queue stream (file storage in the durable table), 2
/// workers fetching up to 100.
pub async fn js_s3_queue(s: &Settings, rate_per_s: u64, storage: Storage) -> Res<Outcome> {
    let st = JsStream::create("s3q", storage, stream::RetentionPolicy::WorkQueue).await?;
    let r = async {
        let meter = Meter::new();
        let mut workers = Vec::new();
        work_consumer(&st).await?;
        for _ in 0..2 {
            let client = connect().await?;
            let stream = jetstream::new(client.clone()).get_stream(&st.name).await?;
            let consumer: consumer::PullConsumer = stream.get_consumer("workers").await?;
            let meter = meter.clone();
            workers.push(tokio::spawn(js_worker(
                consumer,
                client,
                100,
                meter,
                Some(histogram()),
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stats = js_open_loop(&st.js, &st.subject, rate_per_s, s).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        meter.stop.store(true, Ordering::Relaxed);
        let mut h = histogram();
        for w in workers {
            if let Some(x) = w.await? {
                h.add(x)?;
            }
        }
        Ok::<_, BoxError>(latency_outcome(&h, stats, "publish awaits PubAck; "))
    }
    .await;
    st.delete().await;
    r
}

/// JetStream S5 backlog: `n` x 128 B in a memory work-queue stream, nats-server RSS growth,
/// drained by 4 workers fetching 1,000 with explicit acks.
pub async fn js_s5_backlog(s: &Settings, n: u64) -> Res<Outcome> {
    let st = JsStream::create("s5", Storage::Memory, stream::RetentionPolicy::WorkQueue).await?;
    let r = async {
        work_consumer(&st).await?;
        let rss0 = pid().and_then(rss_bytes);
        let next = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..s.in_flight {
            let (js, subject, next) = (st.js.clone(), st.subject.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let body = Bytes::from(payload(128, 0, 0));
                loop {
                    let start = next.fetch_add(1000, Ordering::Relaxed);
                    if start >= n {
                        return Ok::<(), BoxError>(());
                    }
                    let k = (n - start).min(1000) as usize;
                    js_publish_acked(&js, &subject, &body, k).await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        let fill_time = t0.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss1 = pid().and_then(rss_bytes);
        let meter = Meter::new();
        let t1 = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..4 {
            let client = connect().await?;
            let stream = jetstream::new(client.clone()).get_stream(&st.name).await?;
            let consumer: consumer::PullConsumer = stream.get_consumer("workers").await?;
            workers.push(tokio::spawn(js_worker(
                consumer,
                client,
                1000,
                meter.clone(),
                None,
            )));
        }
        let drain_time = drained(&meter, n, t1, workers).await?;
        let rss_growth = rss_delta(rss0, rss1);
        let outcome = backlog_outcome(
            n,
            fill_time,
            drain_time,
            rss_growth,
            "nats-server",
            "message",
        );
        Ok::<_, BoxError>(outcome)
    }
    .await;
    st.delete().await;
    r
}

/// Deletes every JetStream stream whose name starts with `bench_` (left behind when a
/// figure was cut off by its time limit).
pub async fn sweep() -> usize {
    let Ok(c) = connect().await else { return 0 };
    let js = jetstream::new(c);
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    let mut n = 0;
    for name in names.into_iter().filter(|n| n.starts_with("bench_")) {
        if js.delete_stream(&name).await.is_ok() {
            n += 1;
        }
    }
    n
}
