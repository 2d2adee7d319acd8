//! Topic bindings on Redis: every message published to a topic that a queue's
//! `topic_bindings` pattern matches becomes a job on that queue, as the in-process
//! engine's publish makes it (kind = the topic, the message's payload and headers plus
//! `x-sluice-topic-sequence`, priority 0, the queue's max attempts, no idempotency or
//! ordering key).
//!
//! A topic and a queue are two slots, so a publish cannot enqueue atomically as the
//! in-process engine does. Instead [`pump_bindings`] copies after the fact: per bound
//! topic it reads the messages after the binding's cursor (kept in the queue's slot, see
//! `queue/binding.rs`), then one script on the queue's slot enqueues them and moves the
//! cursor only if it still is what was read. Each message thus becomes one job however
//! many nodes pump at once and wherever a node stops; a pump that loses the race reads
//! the new cursor and goes on from there.
//!
//! # Where a binding starts
//!
//! As in the in-process engine, a binding takes the messages published after it was
//! made. The first pump that sees a pattern (the engine pumps right after a policy
//! change) starts it: each topic it matches that exists then gets a cursor at its next
//! sequence. A topic with no cursor under a started pattern was created after the
//! binding, so its messages are pumped from sequence 1; so are those of a topic deleted
//! and created again (its epoch changed). A topic created in the same moment as the
//! binding started may be taken from its start.
//!
//! # Differences from the in-process engine
//!
//! * Jobs arrive after the publish returns (on the engine's publish wake-up or periodic
//!   sweep), not atomically with it; a full queue does not refuse the publish: the pump
//!   takes what fits and the rest waits in the topic (while retention keeps it).
//! * Messages retention drops before they are pumped are skipped: counted in the queue's
//!   `trimmed` binding counter ([`QueueStore::bind_state`]) and logged as a warning.
//! * A binding removed and added again between two pumps keeps its cursor (it takes the
//!   messages published while it was removed); nodes that pump with different pattern
//!   lists for one queue (a policy change in flight) may copy a message twice.

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::names::Pattern;
use crate::broker::engine::local::HEADER_TOPIC_SEQUENCE;

use super::queue::QueueStore;
use super::queue::binding::{BoundMessage, Pumped, cursor, parse_cursor};
use super::topic::{TopicRead, TopicStore};

/// Messages read from a topic per script call.
const BATCH: usize = 100;

/// Copies the messages of every topic that one of `patterns` (the queue's
/// `topic_bindings`) matches into `queue` as jobs, from each binding's cursor on; starts
/// new patterns, and forgets removed patterns and the cursors of topics no pattern
/// matches any more. Returns how many jobs it enqueued. NotFound if the queue does not
/// exist (and has bindings to start).
pub(crate) async fn pump_bindings(
    queues: &QueueStore,
    topics: &TopicStore,
    queue: &str,
    patterns: &[Pattern],
) -> Result<u64, BrokerError> {
    let state = queues.bind_state(queue).await?;
    if patterns.is_empty() && state == Default::default() {
        return Ok(0);
    }
    let bound = |topic: &str| patterns.iter().any(|p| p.matches(topic));
    let names = topics.names().await?;
    let new: Vec<&str> = patterns
        .iter()
        .map(Pattern::as_str)
        .filter(|p| !state.started.contains(*p))
        .collect();
    let mut drop: Vec<String> = state
        .started
        .iter()
        .filter(|p| !patterns.iter().any(|q| q.as_str() == p.as_str()))
        .map(|p| format!("p:{p}"))
        .collect();
    drop.extend(
        state
            .cursors
            .keys()
            .filter(|t| !bound(t))
            .map(|t| format!("c:{t}")),
    );
    let mut expected = state.cursors;
    if !new.is_empty() || !drop.is_empty() {
        let mut starts = Vec::new();
        for topic in &names {
            let starts_here = patterns
                .iter()
                .any(|p| new.contains(&p.as_str()) && p.matches(topic));
            if !starts_here || expected.contains_key(topic) {
                continue;
            }
            match topics.read(topic, u64::MAX, 0).await {
                Ok(r) => starts.push((topic.clone(), cursor(&r.epoch, r.next_seq))),
                Err(BrokerError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        queues.bind_sync(queue, &starts, &new, &drop).await?;
        // A start cursor is set only where there was none: if another pump set one
        // first, the compare-and-set below fails and reads it.
        expected.extend(starts);
    }
    let mut total = 0;
    for topic in names.iter().filter(|t| bound(t)) {
        total += pump_topic(queues, topics, queue, topic, expected.remove(topic)).await?;
    }
    Ok(total)
}

/// Pumps one topic from the cursor `expected` (as stored; `None` = from its start) until
/// it is caught up or the queue is full.
async fn pump_topic(
    queues: &QueueStore,
    topics: &TopicStore,
    queue: &str,
    topic: &str,
    mut expected: Option<String>,
) -> Result<u64, BrokerError> {
    let mut total = 0;
    loop {
        let (epoch, from) = match expected.as_deref().and_then(parse_cursor) {
            Some((epoch, seq)) => (Some(epoch.to_owned()), seq),
            None => (None, 1),
        };
        let Some(mut batch) = read_batch(topics, topic, from).await? else {
            return Ok(total);
        };
        if from != 1 && epoch.as_deref() != Some(batch.epoch.as_str()) {
            // Deleted and created again since the cursor was set: all of this
            // incarnation came after the binding.
            let Some(again) = read_batch(topics, topic, 1).await? else {
                return Ok(total);
            };
            batch = again;
        }
        let trimmed = batch.gap.map_or(0, |(missing, next)| next - missing);
        let messages: Vec<BoundMessage> = batch
            .slices
            .iter()
            .flat_map(|s| s.messages())
            .map(|m| {
                let mut headers = m.entry.headers().cloned().unwrap_or_default();
                headers.insert(HEADER_TOPIC_SEQUENCE.into(), m.sequence.to_string());
                BoundMessage {
                    sequence: m.sequence,
                    payload: m.entry.payload.clone(),
                    headers,
                }
            })
            .collect();
        if messages.is_empty() && trimmed == 0 {
            return Ok(total);
        }
        let pumped = queues
            .bind_pump(
                queue,
                topic,
                expected.as_deref(),
                &batch.epoch,
                batch.next,
                trimmed,
                &messages,
            )
            .await?;
        match pumped {
            Pumped::Moved => expected = queues.bind_cursor(queue, topic).await?,
            Pumped::Taken { taken, full } => {
                total += taken;
                if trimmed > 0 {
                    tracing::warn!(
                        "topic binding {topic:?} -> queue {queue:?}: {trimmed} messages \
                         (from sequence {}) left the topic by retention before they were \
                         copied; skipped",
                        batch.gap.map_or(0, |(missing, _)| missing)
                    );
                }
                if full {
                    return Ok(total);
                }
                expected = Some(cursor(&batch.epoch, batch.next));
                if messages.len() < BATCH {
                    return Ok(total);
                }
            }
        }
    }
}

/// Reads a batch from `from`; `None` if the topic is gone.
async fn read_batch(
    topics: &TopicStore,
    topic: &str,
    from: u64,
) -> Result<Option<TopicRead>, BrokerError> {
    match topics.read(topic, from, BATCH).await {
        Ok(r) => Ok(Some(r)),
        Err(BrokerError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}
