//! The live dashboard: one self-contained page (inline CSS and JS, canvas charts, no
//! external resources) fed by server-sent events.
//!
//! One sampler task per HTTP server takes the broker's stats every sample interval,
//! keeps a bounded history of totals for the charts, and publishes the newest frame on a
//! `watch` channel. Every open page reads that channel, so the cost of a sample does not
//! grow with the number of viewers, and a slow viewer only ever misses stale frames.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;

use crate::broker::domain::time::Millis;
use crate::broker::engine::{Broker, StatsSnapshot};
use crate::broker::ops::{AppState, HttpOptions};
use crate::broker::sync::lock;

/// The page served at `/`.
pub const PAGE: &str = include_str!("dashboard.html");

/// Most worker rows in a frame: the busiest and most recently seen first.
const MAX_WORKERS: usize = 200;
/// Workers idle for longer than this (and holding no lease) are left out of frames.
const WORKER_IDLE_MS: u64 = 10 * 60 * 1000;

/// One queue's row.
#[derive(Debug, Clone, Serialize)]
pub struct QueueView {
    /// Name.
    pub name: String,
    /// Visible jobs.
    pub pending: u64,
    /// Jobs waiting for their first run time.
    pub scheduled: u64,
    /// Leased jobs.
    pub leased: u64,
    /// Jobs waiting for a retry.
    pub retrying: u64,
    /// Live jobs (the sum of the four above).
    pub depth: u64,
    /// Enqueued since start.
    pub enqueued: u64,
    /// Acked since start.
    pub completed: u64,
    /// Failed deliveries since start.
    pub failed: u64,
    /// Dead-lettered since start.
    pub dead: u64,
    /// Cancelled or purged since start.
    pub cancelled: u64,
    /// Age of the oldest visible job, ms.
    pub oldest_pending_age_ms: u64,
    /// Enqueues per second over the last 10 s.
    pub enqueue_rate: f64,
    /// Acks per second over the last 10 s.
    pub ack_rate: f64,
    /// Active consumers.
    pub consumers: u32,
    /// Leasing paused.
    pub paused: bool,
}

/// One topic's row.
#[derive(Debug, Clone, Serialize)]
pub struct TopicView {
    /// Name.
    pub name: String,
    /// Oldest retained sequence (0 if empty).
    pub first_sequence: u64,
    /// Newest sequence.
    pub last_sequence: u64,
    /// Retained messages.
    pub retained_messages: u64,
    /// Retained payload bytes.
    pub retained_bytes: u64,
    /// Open matching subscriptions.
    pub subscribers: u32,
    /// Gaps reported to subscribers since start.
    pub gaps: u64,
    /// Published since start.
    pub published: u64,
    /// Publishes per second over the last 10 s.
    pub publish_rate: f64,
}

/// One worker's row.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    /// The queue it leases from.
    pub queue: String,
    /// Its consumer name.
    pub name: String,
    /// Its peer address at its last lease.
    pub address: String,
    /// Leases it holds.
    pub leases_held: u32,
    /// Its last call, unix ms.
    pub last_seen_unix_ms: u64,
    /// Jobs it acked.
    pub done: u64,
    /// Deliveries it failed.
    pub failed: u64,
}

/// Whole-broker totals and throughput at one moment: one point of the charts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// When, unix ms.
    pub t: Millis,
    /// Visible jobs, all queues.
    pub pending: u64,
    /// Scheduled jobs, all queues.
    pub scheduled: u64,
    /// Leased jobs, all queues.
    pub leased: u64,
    /// Retrying jobs, all queues.
    pub retrying: u64,
    /// Jobs enqueued per second since the previous sample.
    pub enqueued_per_s: f64,
    /// Jobs acked per second since the previous sample.
    pub acked_per_s: f64,
    /// Deliveries failed per second since the previous sample.
    pub failed_per_s: f64,
    /// Messages published per second since the previous sample.
    pub published_per_s: f64,
}

/// What an open page receives once per sample.
#[derive(Debug, Clone, Serialize)]
pub struct Frame {
    /// When the stats were taken, unix ms.
    pub taken_at_unix_ms: Millis,
    /// The sample interval, ms (the charts' x step).
    pub interval_ms: u64,
    /// Queues by name.
    pub queues: Vec<QueueView>,
    /// Topics by name.
    pub topics: Vec<TopicView>,
    /// Workers, most recently seen first.
    pub workers: Vec<WorkerView>,
    /// The chart point of this frame.
    pub sample: Sample,
}

/// Counter totals of one snapshot, for throughput between samples.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    at: Millis,
    enqueued: u64,
    completed: u64,
    failed: u64,
    published: u64,
}

impl Totals {
    fn of(s: &StatsSnapshot) -> Self {
        let mut t = Self {
            at: s.taken_at,
            ..Self::default()
        };
        for (_, c) in &s.queues {
            t.enqueued += c.enqueued;
            t.completed += c.completed;
            t.failed += c.failed;
        }
        t.published = s.topics.iter().map(|c| c.published).sum();
        t
    }
}

fn queue_views(s: &StatsSnapshot) -> Vec<QueueView> {
    s.queues
        .iter()
        .map(|(name, c)| QueueView {
            name: name.clone(),
            pending: c.pending,
            scheduled: c.scheduled,
            leased: c.leased,
            retrying: c.retrying,
            depth: c.pending + c.scheduled + c.leased + c.retrying,
            enqueued: c.enqueued,
            completed: c.completed,
            failed: c.failed,
            dead: c.dead,
            cancelled: c.cancelled,
            oldest_pending_age_ms: c.oldest_pending_age_ms,
            enqueue_rate: c.enqueue_rate,
            ack_rate: c.ack_rate,
            consumers: c.consumers,
            paused: c.paused,
        })
        .collect()
}

fn topic_views(s: &StatsSnapshot) -> Vec<TopicView> {
    s.topics
        .iter()
        .map(|t| TopicView {
            name: t.name.clone(),
            first_sequence: t.first_sequence,
            last_sequence: t.last_sequence,
            retained_messages: t.retained_messages,
            retained_bytes: t.retained_bytes,
            subscribers: t.subscribers,
            gaps: t.gaps,
            published: t.published,
            publish_rate: t.publish_rate,
        })
        .collect()
}

fn worker_views(broker: &Broker, queues: &[QueueView], now: Millis) -> Vec<WorkerView> {
    let mut out: Vec<WorkerView> = queues
        .iter()
        .filter_map(|q| broker.list_consumers(&q.name).ok().map(|c| (q, c)))
        .flat_map(|(q, consumers)| {
            consumers
                .into_iter()
                .filter(|(_, c)| c.leases_held > 0 || c.last_seen + WORKER_IDLE_MS > now)
                .map(|(name, c)| WorkerView {
                    queue: q.name.clone(),
                    name: name.to_string(),
                    address: c.address,
                    leases_held: c.leases_held,
                    last_seen_unix_ms: c.last_seen,
                    done: c.done,
                    failed: c.failed,
                })
        })
        .collect();
    out.sort_by(|a, b| {
        b.last_seen_unix_ms
            .cmp(&a.last_seen_unix_ms)
            .then_with(|| a.queue.cmp(&b.queue))
            .then_with(|| a.name.cmp(&b.name))
    });
    out.truncate(MAX_WORKERS);
    out
}

/// Per-second rate of a counter between two totals; a counter that went down (its queue
/// was deleted) counts as no progress rather than negative throughput.
fn per_second(now: u64, before: u64, elapsed_ms: u64) -> f64 {
    if elapsed_ms == 0 {
        return 0.0;
    }
    now.saturating_sub(before) as f64 * 1000.0 / elapsed_ms as f64
}

fn sample(queues: &[QueueView], totals: Totals, previous: Option<Totals>) -> Sample {
    let mut s = Sample {
        t: totals.at,
        ..Sample::default()
    };
    for q in queues {
        s.pending += q.pending;
        s.scheduled += q.scheduled;
        s.leased += q.leased;
        s.retrying += q.retrying;
    }
    if let Some(p) = previous {
        let dt = totals.at.saturating_sub(p.at);
        s.enqueued_per_s = per_second(totals.enqueued, p.enqueued, dt);
        s.acked_per_s = per_second(totals.completed, p.completed, dt);
        s.failed_per_s = per_second(totals.failed, p.failed, dt);
        s.published_per_s = per_second(totals.published, p.published, dt);
    }
    s
}

/// Takes one frame of the broker's state.
fn take_frame(broker: &Broker, interval_ms: u64, previous: Option<Totals>) -> (Frame, Totals) {
    let stats = broker.stats(&[], &[]);
    let totals = Totals::of(&stats);
    let queues = queue_views(&stats);
    let frame = Frame {
        taken_at_unix_ms: stats.taken_at,
        interval_ms,
        workers: worker_views(broker, &queues, stats.taken_at),
        topics: topic_views(&stats),
        sample: sample(&queues, totals, previous),
        queues,
    };
    (frame, totals)
}

struct Shared {
    history: Mutex<VecDeque<Sample>>,
    capacity: usize,
}

/// The dashboard's sampling task and its outputs. Cloning shares them.
#[derive(Clone)]
pub(crate) struct Sampler {
    shared: Arc<Shared>,
    frames: watch::Receiver<Arc<str>>,
}

impl Sampler {
    /// Takes a first frame now and starts sampling every `options.sample_interval`
    /// until `stop` is cancelled.
    pub(crate) fn start(broker: Broker, options: &HttpOptions, stop: CancellationToken) -> Self {
        let interval = options.sample_interval.max(Duration::from_millis(50));
        let interval_ms = interval.as_millis() as u64;
        let shared = Arc::new(Shared {
            history: Mutex::new(VecDeque::with_capacity(options.history.min(4096))),
            capacity: options.history.max(1),
        });
        let (first, mut totals) = take_frame(&broker, interval_ms, None);
        let (tx, rx) = watch::channel(encode(&first));
        let sampler = Self {
            shared: shared.clone(),
            frames: rx,
        };
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick completes at once; the first frame was taken above.
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let (frame, now) = take_frame(&broker, interval_ms, Some(totals));
                totals = now;
                {
                    let mut history = lock(&shared.history);
                    if history.len() == shared.capacity {
                        history.pop_front();
                    }
                    history.push_back(frame.sample.clone());
                }
                // Nobody may be watching; the frame is still kept for the next viewer.
                tx.send_replace(encode(&frame));
            }
        });
        sampler
    }

    fn latest(&self) -> Arc<str> {
        self.frames.borrow().clone()
    }

    fn history_json(&self) -> String {
        let history = lock(&self.shared.history);
        serde_json::to_string(&*history).expect("samples serialise")
    }
}

fn encode(frame: &Frame) -> Arc<str> {
    Arc::from(serde_json::to_string(frame).expect("frames serialise"))
}

fn json(body: impl Into<axum::body::Body>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.into(),
    )
        .into_response()
}

/// `GET /api/stats`: the newest frame.
pub(super) async fn latest(State(state): State<AppState>) -> Response {
    json(state.sampler.latest().to_string())
}

/// `GET /api/history`: the kept samples, oldest first.
pub(super) async fn history(State(state): State<AppState>) -> Response {
    json(state.sampler.history_json())
}

/// `GET /api/events`: the newest frame at once, then every new one, as `stats` events,
/// until the client leaves or the server stops.
pub(super) async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let shutdown = state.stop.clone().cancelled_owned();
    let stream = WatchStream::new(state.sampler.frames.clone())
        .map(|frame| Ok(Event::default().event("stats").data(&*frame)))
        .take_until(shutdown);
    Sse::new(stream).keep_alive(KeepAlive::default())
}
