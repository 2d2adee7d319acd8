//! RabbitMQ runners (lapin, AMQP 0-9-1 on 127.0.0.1:5672, guest/guest).
//!
//! Equal acks: publishers use publisher confirms and wait for every batch to be confirmed;
//! work-queue consumers use manual acks (one `multiple` ack per received batch) with a
//! prefetch equal to the batch size; topic subscribers consume with `no_ack` in the memory
//! table (Sluice subscriptions are not acked either). Durable table: durable queues and
//! exchanges and persistent messages (delivery mode 2), and topic subscribers ack (one
//! `multiple` ack per [`SUBSCRIBER_ACK_EVERY`] deliveries): RabbitMQ confirms a persistent
//! message that every queue has handed to a no-ack consumer without writing it to disk
//! (`rabbit_confirms.py`), which would make its durable topic rows promise no more than
//! its memory rows, where Sluice's answer a publish after its fsync.
//!
//! Its load loops (publishers, fillers, workers, subscribers) look like the other peers'
//! on purpose and are not shared: each peer is measured through its own client code, and
//! a shared loop could bias one; what is shared (`common.rs`) is pacing, metering, the
//! drain wait and the wording of outcomes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::common::*;

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Address probed for availability.
pub const ADDR: &str = "127.0.0.1:5672";

/// The server's version from `rabbitmqctl version`.
pub fn version() -> String {
    std::process::Command::new("rabbitmqctl")
        .arg("version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| format!("RabbitMQ {}", String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| "RabbitMQ (version unknown: rabbitmqctl not usable)".into())
}

/// The broker's pid (the Erlang VM).
pub fn pid() -> Option<u32> {
    pid_by_name("beam.smp")
}

async fn connect() -> Res<Connection> {
    Ok(Connection::connect(URI, ConnectionProperties::default()).await?)
}

fn props(storage: Storage) -> BasicProperties {
    match storage {
        Storage::Memory => BasicProperties::default(),
        Storage::Durable => BasicProperties::default().with_delivery_mode(2),
    }
}

fn qopts(storage: Storage) -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: storage == Storage::Durable,
        ..Default::default()
    }
}

async fn confirm_channel(conn: &Connection) -> Res<Channel> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Publishes `n` messages and waits for all their confirms.
async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    n: usize,
    p: &BasicProperties,
) -> Res<()> {
    let mut confirms = Vec::with_capacity(n);
    for _ in 0..n {
        confirms.push(
            ch.basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                p.clone(),
            )
            .await?,
        );
    }
    for c in confirms {
        if c.await?.is_nack() {
            return Err("publish nacked by RabbitMQ".into());
        }
    }
    Ok(())
}

/// What a publishing loop sends: `batch` copies of `body` with `props`.
struct Batch {
    batch: usize,
    body: Vec<u8>,
    props: BasicProperties,
}

impl Batch {
    fn new(batch: usize, size: usize, storage: Storage) -> Self {
        Batch {
            batch,
            body: payload(size, 0, 0),
            props: props(storage),
        }
    }
}

/// Starts `in_flight` publishing loops on one confirm channel; returns their handles.
fn spawn_publishers(
    ch: &Channel,
    exchange: &str,
    key: &str,
    what: Batch,
    in_flight: usize,
    meter: &Meter,
) -> Vec<tokio::task::JoinHandle<()>> {
    let what = Arc::new(what);
    (0..in_flight)
        .map(|_| {
            let (ch, ex, key, meter, what) = (
                ch.clone(),
                exchange.to_string(),
                key.to_string(),
                meter.clone(),
                what.clone(),
            );
            tokio::spawn(async move {
                while !meter.stopped() {
                    if publish_confirmed(&ch, &ex, &key, &what.body, what.batch, &what.props)
                        .await
                        .is_err()
                    {
                        meter.error();
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect()
}

async fn declare_fanout(ch: &Channel, name: &str, storage: Storage) -> Res<()> {
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: storage == Storage::Durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// How many deliveries a durable topic subscriber acks at once (`multiple`).
const SUBSCRIBER_ACK_EVERY: u64 = 32;

/// Deliveries a durable subscriber may hold unacked: far above what it holds back between
/// two acks, so the prefetch never throttles it.
const SUBSCRIBER_PREFETCH: u16 = 4096;

/// A subscriber queue bound to `exchange`, consumed on its own channel: without acks in
/// the memory table, with acks (see [`Subscriber::received`]) in the durable table.
async fn subscriber(
    conn: &Connection,
    exchange: &str,
    queue: &str,
    storage: Storage,
) -> Res<Subscriber> {
    let ch = conn.create_channel().await?;
    ch.queue_declare(queue.into(), qopts(storage), FieldTable::default())
        .await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let acks = storage == Storage::Durable;
    if acks {
        ch.basic_qos(SUBSCRIBER_PREFETCH, BasicQosOptions::default())
            .await?;
    }
    let consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: !acks,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(Subscriber {
        consumer,
        acks,
        unacked: 0,
    })
}

/// A topic subscriber's consumer, and whether it acks what it receives.
struct Subscriber {
    consumer: lapin::Consumer,
    acks: bool,
    unacked: u64,
}

impl Subscriber {
    /// The next delivery (as `Consumer::next`).
    async fn next(&mut self) -> Option<lapin::Result<lapin::message::Delivery>> {
        self.consumer.next().await
    }

    /// Counts `d` as received: a durable subscriber acks it and everything before it once
    /// [`SUBSCRIBER_ACK_EVERY`] are unacked.
    async fn received(&mut self, d: &lapin::message::Delivery) {
        if !self.acks {
            return;
        }
        self.unacked += 1;
        if self.unacked >= SUBSCRIBER_ACK_EVERY {
            self.unacked = 0;
            let _ = d.ack(BasicAckOptions { multiple: true }).await;
        }
    }
}

async fn cleanup(queues: &[String], exchange: Option<&str>) {
    if let Ok(conn) = connect().await
        && let Ok(ch) = conn.create_channel().await
    {
        for q in queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        if let Some(ex) = exchange {
            let _ = ch
                .exchange_delete(ex.into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "bench done".into()).await;
    }
}

/// S1: fanout exchange, `subs` subscriber queues (see [`subscriber`]), one confirmed
/// publisher.
pub async fn s1(s: &Settings, subs: usize, batch: usize, storage: Storage) -> Res<Outcome> {
    let ex = format!("bench.s1.{}", run_id());
    let queues: Vec<String> = (0..subs).map(|i| format!("{ex}.q{i}")).collect();
    let r = async {
        let meter = Meter::new();
        let pub_conn = connect().await?;
        let ch = confirm_channel(&pub_conn).await?;
        declare_fanout(&ch, &ex, storage).await?;
        let mut tasks = Vec::new();
        let mut conns = Vec::new();
        for q in &queues {
            let conn = connect().await?;
            let mut consumer = subscriber(&conn, &ex, q, storage).await?;
            conns.push(conn);
            let meter = meter.clone();
            tasks.push(tokio::spawn(async move {
                while !meter.stopped() {
                    match tokio::time::timeout(Duration::from_millis(100), consumer.next()).await {
                        Ok(Some(Ok(d))) => {
                            consumer.received(&d).await;
                            meter.add(1);
                        }
                        Ok(_) => break,
                        Err(_) => {}
                    }
                }
            }));
        }
        tasks.extend(spawn_publishers(
            &ch,
            &ex,
            "",
            Batch::new(batch, 128, storage),
            s.in_flight,
            &meter,
        ));
        let (n, el) = meter.measure(s).await;
        for t in tasks {
            let _ = t.await;
        }
        for c in conns {
            let _ = c.close(200, "bench done".into()).await;
        }
        let _ = pub_conn.close(200, "bench done".into()).await;
        Ok::<_, BoxError>(meter.outcome(n, el, "msg/s delivered"))
    }
    .await;
    cleanup(&queues, Some(&ex)).await;
    r
}

/// Consumes with manual acks; acks with `multiple` once `batch` deliveries are held or
/// no further delivery arrives within 2 ms. Adds acked deliveries to `meter`; with `hist`,
/// records latency of each delivery.
async fn work_consumer(
    mut consumer: lapin::Consumer,
    batch: usize,
    meter: Meter,
    mut hist: Option<hdrhistogram::Histogram<u64>>,
) -> Option<hdrhistogram::Histogram<u64>> {
    let mut held: Option<lapin::message::Delivery> = None;
    let mut held_n = 0u64;
    while !meter.stopped() {
        let next = tokio::time::timeout(Duration::from_millis(2), consumer.next()).await;
        match next {
            Ok(Some(Ok(d))) => {
                if let Some(h) = hist.as_mut()
                    && let Some(st) = stamp_of(&d.data)
                {
                    record_since(h, st);
                }
                held = Some(d);
                held_n += 1;
                if held_n < batch as u64 {
                    continue;
                }
            }
            Ok(_) => break,
            Err(_) => {}
        }
        if let Some(d) = held.take() {
            match d.acker.ack(BasicAckOptions { multiple: true }).await {
                Ok(_) => meter.add(held_n),
                Err(_) => meter.error(),
            }
            held_n = 0;
        }
    }
    hist
}

async fn work_consumer_on(conn: &Connection, queue: &str, prefetch: u16) -> Res<lapin::Consumer> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok(ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// S2: 2 confirmed producers, 4 consumers with prefetch = batch and one ack per batch.
pub async fn s2(s: &Settings, batch: usize, storage: Storage) -> Res<Outcome> {
    let queue = format!("bench.s2.{}", run_id());
    let r = async {
        let meter = Meter::new();
        let mut conns = Vec::new();
        let mut tasks = Vec::new();
        let admin = connect().await?;
        admin
            .create_channel()
            .await?
            .queue_declare(queue.as_str().into(), qopts(storage), FieldTable::default())
            .await?;
        conns.push(admin);
        for _ in 0..4 {
            let conn = connect().await?;
            let consumer = work_consumer_on(&conn, &queue, batch as u16).await?;
            conns.push(conn);
            tasks.push(tokio::spawn({
                let meter = meter.clone();
                async move {
                    work_consumer(consumer, batch, meter, None).await;
                }
            }));
        }
        for _ in 0..2 {
            let conn = connect().await?;
            let ch = confirm_channel(&conn).await?;
            tasks.extend(spawn_publishers(
                &ch,
                "",
                &queue,
                Batch::new(batch, 256, storage),
                s.in_flight,
                &meter,
            ));
            conns.push(conn);
        }
        let (n, el) = meter.measure(s).await;
        for t in tasks {
            let _ = t.await;
        }
        for c in conns {
            let _ = c.close(200, "bench done".into()).await;
        }
        Ok::<_, BoxError>(meter.outcome(n, el, "jobs/s acked"))
    }
    .await;
    cleanup(std::slice::from_ref(&queue), None).await;
    r
}

/// Open-loop confirmed publishing of one stamped message per send (persistent in the
/// durable table).
async fn open_loop_publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    rate_per_s: u64,
    s: &Settings,
    storage: Storage,
) -> OpenLoopStats {
    let (ch, ex, key) = (ch.clone(), exchange.to_string(), key.to_string());
    let p = props(storage);
    open_loop(rate_per_s, s.warmup, s.window, move |seq, intended| {
        let (ch, ex, key, p) = (ch.clone(), ex.clone(), key.clone(), p.clone());
        async move {
            let body = payload(128, seq, intended);
            publish_confirmed(&ch, &ex, &key, &body, 1, &p).await
        }
    })
    .await
}

fn latency_outcome(h: &hdrhistogram::Histogram<u64>, st: OpenLoopStats) -> Outcome {
    Outcome::Measured {
        main: crate::sluice_peer::percentiles_short(h),
        extra: format!(
            "sent {} in {:.1} s, failed {}; {}",
            thousands(st.sent),
            st.elapsed.as_secs_f64(),
            st.failed,
            percentiles(h)
        ),
    }
}

/// Fan-out latency to `subs` subscriber queues (100 channels per connection; see
/// [`subscriber`]); with `Storage::Durable`, a durable exchange and queues, persistent
/// messages and acking subscribers.
async fn fanout(
    s: &Settings,
    rate_per_s: u64,
    subs: usize,
    storage: Storage,
) -> Res<(hdrhistogram::Histogram<u64>, OpenLoopStats, Option<i64>)> {
    let ex = format!("bench.lat.{}", run_id());
    let queues: Vec<String> = (0..subs).map(|i| format!("{ex}.q{i}")).collect();
    let r = async {
        let pub_conn = connect().await?;
        let ch = confirm_channel(&pub_conn).await?;
        declare_fanout(&ch, &ex, storage).await?;
        let rss0 = pid().and_then(rss_bytes);
        let meter = Meter::new();
        let mut conns = Vec::new();
        let mut readers = Vec::new();
        for (i, q) in queues.iter().enumerate() {
            if i % 100 == 0 {
                conns.push(connect().await?);
            }
            let mut consumer = subscriber(conns.last().expect("conn"), &ex, q, storage).await?;
            let meter = meter.clone();
            readers.push(tokio::spawn(async move {
                let mut h = histogram();
                while !meter.stopped() {
                    match tokio::time::timeout(Duration::from_millis(100), consumer.next()).await {
                        Ok(Some(Ok(d))) => {
                            if let Some(st) = stamp_of(&d.data) {
                                record_since(&mut h, st);
                            }
                            consumer.received(&d).await;
                        }
                        Ok(_) => break,
                        Err(_) => {}
                    }
                }
                h
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mem = rss_delta(rss0, pid().and_then(rss_bytes));
        let st = open_loop_publish(&ch, &ex, "", rate_per_s, s, storage).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        meter.stop.store(true, Ordering::Relaxed);
        let mut h = histogram();
        for r in readers {
            h.add(r.await?)?;
        }
        for c in conns {
            let _ = c.close(200, "bench done".into()).await;
        }
        let _ = pub_conn.close(200, "bench done".into()).await;
        Ok::<_, BoxError>((h, st, mem))
    }
    .await;
    cleanup(&queues, Some(&ex)).await;
    r
}

/// S3 publish->deliver.
pub async fn s3_topic(s: &Settings, rate_per_s: u64, storage: Storage) -> Res<Outcome> {
    let (h, st, _) = fanout(s, rate_per_s, 1, storage).await?;
    Ok(latency_outcome(&h, st))
}

/// S4 fan-out.
pub async fn s4(s: &Settings, rate_per_s: u64, subs: usize) -> Res<Outcome> {
    let (h, st, mem) = fanout(s, rate_per_s, subs, Storage::Memory).await?;
    Ok(fanout_outcome(&h, st, mem, rate_per_s, subs, "beam.smp"))
}

/// S3 enqueue->lease: confirmed open-loop publishing to a queue (durable, persistent
/// messages in the durable table), 2 consumers with prefetch 100 and manual acks.
pub async fn s3_queue(s: &Settings, rate_per_s: u64, storage: Storage) -> Res<Outcome> {
    let queue = format!("bench.s3q.{}", run_id());
    let r = async {
        let conn = connect().await?;
        let ch = confirm_channel(&conn).await?;
        ch.queue_declare(queue.as_str().into(), qopts(storage), FieldTable::default())
            .await?;
        let meter = Meter::new();
        let mut workers = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..2 {
            let c = connect().await?;
            let consumer = work_consumer_on(&c, &queue, 100).await?;
            conns.push(c);
            let meter = meter.clone();
            workers.push(tokio::spawn(async move {
                work_consumer(consumer, 100, meter, Some(histogram())).await
            }));
        }
        let st = open_loop_publish(&ch, "", &queue, rate_per_s, s, storage).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        meter.stop.store(true, Ordering::Relaxed);
        let mut h = histogram();
        for w in workers {
            if let Some(x) = w.await? {
                h.add(x)?;
            }
        }
        for c in conns {
            let _ = c.close(200, "bench done".into()).await;
        }
        let _ = conn.close(200, "bench done".into()).await;
        Ok::<_, BoxError>(latency_outcome(&h, st))
    }
    .await;
    cleanup(std::slice::from_ref(&queue), None).await;
    r
}

async fn fill(queue: &str, n: u64, in_flight: usize) -> Res<Duration> {
    let conn = connect().await?;
    let ch = confirm_channel(&conn).await?;
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let (ch, next, queue) = (ch.clone(), next.clone(), queue.to_string());
        tasks.push(tokio::spawn(async move {
            let body = payload(128, 0, 0);
            let p = BasicProperties::default();
            loop {
                let start = next.fetch_add(1000, Ordering::Relaxed);
                if start >= n {
                    return Ok::<(), BoxError>(());
                }
                let k = (n - start).min(1000) as usize;
                publish_confirmed(&ch, "", &queue, &body, k, &p).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let el = t0.elapsed();
    let _ = conn.close(200, "bench done".into()).await;
    Ok(el)
}

/// S5 backlog: `n` x 128 B published (confirmed), beam.smp RSS growth, then drained by 4
/// consumers with prefetch 1,000 and batched acks.
pub async fn s5_backlog(s: &Settings, n: u64) -> Res<Outcome> {
    let queue = format!("bench.s5.{}", run_id());
    let r = async {
        let admin = connect().await?;
        admin
            .create_channel()
            .await?
            .queue_declare(
                queue.as_str().into(),
                qopts(Storage::Memory),
                FieldTable::default(),
            )
            .await?;
        let rss0 = pid().and_then(rss_bytes);
        let fill_time = fill(&queue, n, s.in_flight).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss1 = pid().and_then(rss_bytes);
        let meter = Meter::new();
        let t0 = Instant::now();
        let mut conns = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let c = connect().await?;
            let consumer = work_consumer_on(&c, &queue, 1000).await?;
            conns.push(c);
            let meter = meter.clone();
            tasks.push(tokio::spawn(work_consumer(consumer, 1000, meter, None)));
        }
        let drain = drained(&meter, n, t0, tasks).await;
        for c in conns {
            let _ = c.close(200, "bench done".into()).await;
        }
        let _ = admin.close(200, "bench done".into()).await;
        let item = "message (classic queue; RabbitMQ may page to disk)";
        let outcome = backlog_outcome(
            n,
            fill_time,
            drain?,
            rss_delta(rss0, rss1),
            "beam.smp",
            item,
        );
        Ok::<_, BoxError>(outcome)
    }
    .await;
    cleanup(std::slice::from_ref(&queue), None).await;
    r
}

/// S5 expiry analogue: RabbitMQ has no per-delivery lease timeout; the closest event is a
/// consumer's channel closing with `m` unacked deliveries, which requeues them all. Measures
/// the time from the close until the queue shows `m` ready messages again.
pub async fn s5_expiry(s: &Settings, m: u64) -> Res<Outcome> {
    let queue = format!("bench.s5x.{}", run_id());
    let r = async {
        let admin = connect().await?;
        let ach = admin.create_channel().await?;
        ach.queue_declare(
            queue.as_str().into(),
            qopts(Storage::Memory),
            FieldTable::default(),
        )
        .await?;
        fill(&queue, m, s.in_flight).await?;
        let conn = connect().await?;
        let ch = conn.create_channel().await?;
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut got = 0u64;
        let t0 = Instant::now();
        while got < m {
            match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
                Ok(Some(Ok(_))) => got += 1,
                _ => return Err(format!("received only {got} of {m} deliveries").into()),
            }
            if t0.elapsed() > Duration::from_secs(300) {
                return Err("delivery of the expiry set took over 300 s".into());
            }
        }
        let closed = Instant::now();
        ch.close(200, "expire leases".into()).await?;
        let q = queue.clone();
        let done = wait_until(Duration::from_millis(2), Duration::from_secs(60), || {
            let (ach, q) = (ach.clone(), q.clone());
            async move {
                matches!(ach.queue_declare(q.as_str().into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default()).await,
                    Ok(info) if info.message_count() as u64 >= m)
            }
        })
        .await;
        let elapsed = closed.elapsed();
        let _ = conn.close(200, "bench done".into()).await;
        let _ = admin.close(200, "bench done".into()).await;
        Ok::<_, BoxError>(match done {
            Some(_) => Outcome::Measured {
                main: format!(
                    "{} unacked deliveries requeued in {} ms",
                    thousands(m),
                    elapsed.as_millis()
                ),
                extra: "analogue: channel close with all deliveries unacked (no lease timeout in AMQP 0-9-1)".into(),
            },
            None => Outcome::Failed("not all deliveries requeued within 60 s".into()),
        })
    }
    .await;
    cleanup(std::slice::from_ref(&queue), None).await;
    r
}

/// Deletes every queue and exchange whose name starts with `bench.` (left behind when a
/// figure was cut off by its time limit). Names come from `rabbitmqctl`.
pub async fn sweep() -> usize {
    let list = |what: &str| {
        std::process::Command::new("rabbitmqctl")
            .args([what, "-q", "name"])
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| l.starts_with("bench."))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let queues = list("list_queues");
    let exchanges = list("list_exchanges");
    let n = queues.len() + exchanges.len();
    if n == 0 {
        return 0;
    }
    if let Ok(conn) = connect().await
        && let Ok(ch) = conn.create_channel().await
    {
        for q in &queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in &exchanges {
            let _ = ch
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "bench sweep".into()).await;
    }
    n
}
