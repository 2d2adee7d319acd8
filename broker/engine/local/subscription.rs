//! Subscriptions: a stream per subscription that follows every matching topic's log by
//! sequence number, reading when the transport asks for the next batch.
//!
//! Publishers never wait for subscribers: they append to the log, and the streams are
//! woken once the messages are durable under the fsync policy (see
//! [`SharedTopic::durable_seq`]): a subscriber reads only up to there, so it never sees a
//! message that a crash could take back, nor a sequence that could name another message
//! after a restart.
//! There is no reader task or channel in between: reading happens in the task that sends
//! the batches, so a publish costs the subscriber one task wake-up, not two, and whatever
//! was published while the transport was busy is read as one batch.
//! A reader that is slower than retention finds its cursor below the oldest retained
//! message and reports a gap (or ends with DATA_LOSS), so nothing is lost silently.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::names::Pattern;
use crate::broker::domain::observe::Observer;
use crate::broker::domain::time::{Millis, now_ms};
use crate::broker::domain::topic::BlockSlice;
use crate::broker::engine::local::{Inner, SharedTopic};
use crate::broker::sync::lock;

/// Where a subscription starts in topics that exist when it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// After the newest message.
    #[default]
    Latest,
    /// At the oldest retained message.
    Earliest,
    /// At this sequence in every topic.
    Sequence(u64),
    /// At the first message published at or after this time.
    Time(Millis),
}

/// What a subscription does when it fell behind retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GapPolicy {
    /// Report the gap and go on.
    #[default]
    Notify,
    /// End with DATA_LOSS.
    EndStream,
}

/// A subscription request, already parsed.
#[derive(Debug, Clone)]
pub struct SubscribeSpec {
    /// Topic pattern.
    pub pattern: Pattern,
    /// Start in existing topics.
    pub start: Start,
    /// Per-topic next sequence, overriding `start`.
    pub resume_from: HashMap<String, u64>,
    /// Gap policy.
    pub on_gap: GapPolicy,
    /// Most messages per batch (1..=1000).
    pub max_batch: usize,
}

/// Messages missed to retention in one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapNotice {
    /// Topic.
    pub topic: Arc<str>,
    /// First sequence not delivered.
    pub first_missing: u64,
    /// Where delivery goes on.
    pub next_available: u64,
}

/// One batch handed to the subscriber.
#[derive(Debug, Default)]
pub struct SubscriptionBatch {
    /// Gaps that happened before these messages.
    pub gaps: Vec<GapNotice>,
    /// Messages in sequence order per topic, as runs of the blocks that hold them.
    pub messages: Vec<BlockSlice>,
}

/// The part of a subscription that publishers and topic creation reach.
pub(crate) struct SubscriberShared {
    pub(crate) id: u64,
    pub(crate) pattern: Pattern,
    /// The task polling the subscription; woken by publishes to matching topics and by
    /// topic creation and deletion.
    waker: AtomicWaker,
    /// Topics created after the subscription opened, not yet picked up by the reader.
    pub(crate) new_topics: Mutex<Vec<Arc<SharedTopic>>>,
}

impl SubscriberShared {
    /// Wakes the subscription's stream. Call after the change it must see is visible
    /// (the topic's `durable_seq` stored, the new topic pushed, `deleted` set): the stream
    /// registers its waker before it looks, so either it sees the change or it is woken.
    pub(crate) fn wake(&self) {
        self.waker.wake();
    }
}

/// An open subscription: a stream of batches, ending when the broker shuts down or with
/// an error (DATA_LOSS under [`GapPolicy::EndStream`]). Dropping it closes the subscription.
pub struct Subscription {
    registration: Registration,
    cursors: Vec<Cursor>,
    spec: SubscribeSpec,
    /// Which cursor the next read starts at (rotates so one busy topic cannot starve
    /// others).
    rotate: usize,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Set once the stream has ended (shutdown or an error was returned).
    ended: bool,
    /// When it opened: older messages are replays, whose age is not delivery latency.
    opened_at: Millis,
}

impl futures::Stream for Subscription {
    type Item = Result<SubscriptionBatch, BrokerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended || this.shutdown.as_mut().poll(cx).is_ready() {
            this.ended = true;
            return Poll::Ready(None);
        }
        // Register before looking, so a publish that lands after the look wakes us.
        this.registration.shared.waker.register(cx.waker());
        match this.read() {
            None => Poll::Pending,
            Some(Err(e)) => {
                this.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Some(Ok(batch)) => {
                // Publish-to-deliver is measured when the transport takes the batch.
                if let Some(observer) = this.registration.inner.observer.get() {
                    report_delivery(observer.as_ref(), &batch, this.opened_at, now_ms());
                }
                Poll::Ready(Some(Ok(batch)))
            }
        }
    }
}

impl Subscription {
    /// Ends the subscription when `token` is cancelled instead of at shutdown; `token`
    /// must be a child of the broker's shutdown token (e.g. one a tokens reload cancels
    /// when it revokes the subscriber's token).
    pub fn ending_on(mut self, token: CancellationToken) -> Self {
        self.shutdown = Box::pin(token.cancelled_owned());
        self
    }

    /// Reads what is available (up to `max_batch` messages) from every matching topic;
    /// `None` when there is nothing new.
    fn read(&mut self) -> Option<Result<SubscriptionBatch, BrokerError>> {
        let shared = &self.registration.shared;
        for slot in lock(&shared.new_topics).drain(..) {
            // A topic created after the subscription opened is read from its start.
            let next = self
                .spec
                .resume_from
                .get(&*slot.name)
                .copied()
                .unwrap_or(1)
                .max(1);
            self.cursors.push(Cursor { slot, next });
        }
        self.cursors
            .retain(|c| !c.slot.deleted.load(Ordering::Acquire));

        let mut batch = SubscriptionBatch::default();
        let mut count = 0;
        let n = self.cursors.len();
        for k in 0..n {
            let cursor = &mut self.cursors[(self.rotate + k) % n];
            let durable = cursor.slot.durable_seq.load(Ordering::Acquire);
            if durable <= cursor.next {
                continue;
            }
            let room = self.spec.max_batch - count;
            let read = lock(&cursor.slot.topic).read_before(cursor.next, room, durable);
            if let Some((first_missing, next_available)) = read.gap {
                cursor.slot.gaps.fetch_add(1, Ordering::Relaxed);
                if self.spec.on_gap == GapPolicy::EndStream {
                    return Some(Err(BrokerError::DataLoss(format!(
                        "subscription fell behind retention on topic {:?}: sequences {first_missing}..{} are gone (next available {next_available})",
                        cursor.slot.name,
                        next_available - 1
                    ))));
                }
                batch.gaps.push(GapNotice {
                    topic: cursor.slot.name.clone(),
                    first_missing,
                    next_available,
                });
            }
            count += read.slices.iter().map(BlockSlice::len).sum::<usize>();
            cursor.next = read.next;
            if batch.messages.is_empty() {
                batch.messages = read.slices;
            } else {
                batch.messages.extend(read.slices);
            }
            if count >= self.spec.max_batch {
                break;
            }
        }
        self.rotate = self.rotate.wrapping_add(1);
        if batch.messages.is_empty() && batch.gaps.is_empty() {
            None
        } else {
            Some(Ok(batch))
        }
    }
}

/// Reports a batch's publish-to-deliver latencies of live messages (published after the
/// subscription opened), one call per run of the same topic.
fn report_delivery(
    observer: &dyn Observer,
    batch: &SubscriptionBatch,
    opened_at: Millis,
    now: Millis,
) {
    for run in batch
        .messages
        .chunk_by(|a, b| Arc::ptr_eq(&a.block.topic, &b.block.topic))
    {
        let mut latencies = run
            .iter()
            .filter(|s| s.block.publish_time >= opened_at)
            .flat_map(|s| {
                let latency = Duration::from_millis(now.saturating_sub(s.block.publish_time));
                std::iter::repeat_n(latency, s.len())
            })
            .peekable();
        if latencies.peek().is_some() {
            observer.messages_delivered(&run[0].block.topic, &mut latencies);
        }
    }
}

struct Cursor {
    slot: Arc<SharedTopic>,
    next: u64,
}

/// Removes the subscription from the registry and its topics when the stream is dropped.
struct Registration {
    inner: Arc<Inner>,
    shared: Arc<SubscriberShared>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut registry = lock(&self.inner.registry);
        registry.subscriptions.retain(|s| s.id != self.shared.id);
        for entry in self.inner.topics.iter() {
            if self.shared.pattern.matches(entry.key()) {
                lock(&entry.value().subscribers).retain(|s| s.id != self.shared.id);
            }
        }
    }
}

pub(crate) fn open(
    inner: Arc<Inner>,
    id: u64,
    spec: SubscribeSpec,
) -> Result<Subscription, BrokerError> {
    let max = inner.config.limits.max_subscriptions;
    let shared = Arc::new(SubscriberShared {
        id,
        pattern: spec.pattern.clone(),
        waker: AtomicWaker::new(),
        new_topics: Mutex::new(Vec::new()),
    });
    let mut cursors = Vec::new();
    {
        let mut registry = lock(&inner.registry);
        if registry.subscriptions.len() >= max {
            return Err(BrokerError::ResourceExhausted(format!(
                "cannot subscribe to {:?}: the broker holds the maximum of {max} subscriptions",
                spec.pattern.as_str()
            )));
        }
        registry.subscriptions.push(shared.clone());
        for entry in inner.topics.iter() {
            if !spec.pattern.matches(entry.key()) {
                continue;
            }
            let slot = entry.value().clone();
            // Attach before reading the start position, so no publish in between is
            // missed: the reader follows the log by sequence, the wake-up only hurries it.
            lock(&slot.subscribers).push(shared.clone());
            let next = {
                let topic = lock(&slot.topic);
                // "Latest" and "earliest" count only durable messages: a start position
                // names a sequence that no crash can give to another message.
                let durable = slot.durable_seq.load(Ordering::Acquire);
                match spec.resume_from.get(&*slot.name) {
                    Some(seq) => (*seq).max(1),
                    None => match spec.start {
                        Start::Latest => durable,
                        Start::Earliest => topic.first_seq().min(durable),
                        Start::Sequence(seq) => seq.max(1),
                        Start::Time(t) => topic.seq_at_time(t),
                    },
                }
            };
            cursors.push(Cursor { slot, next });
        }
    }
    let shutdown = Box::pin(inner.shutdown.clone().cancelled_owned());
    Ok(Subscription {
        registration: Registration { inner, shared },
        cursors,
        spec,
        rotate: 0,
        shutdown,
        ended: false,
        opened_at: now_ms(),
    })
}
