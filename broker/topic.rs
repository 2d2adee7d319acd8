//! A topic's ordered, bounded retention log.
//!
//! Like [`crate::broker::queue`], a `Topic` is plain data driven with an explicit `now`;
//! subscriptions read from it by sequence number, so a slow reader never holds up an
//! appender: it only finds, later, that the messages it had not read were evicted.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::broker::dedup::DedupWindow;
use crate::broker::error::BrokerError;
use crate::broker::limits::Headers;
use crate::broker::rate::RateMeter;
use crate::broker::time::Millis;

/// How long a publish idempotency key is remembered.
pub const PUBLISH_DEDUP_WINDOW_MS: u64 = 120_000;

/// Retention limits; the oldest messages go first when any is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most retained messages.
    pub max_messages: u64,
    /// Most retained payload bytes.
    pub max_bytes: u64,
    /// Oldest retained age, ms.
    pub max_age_ms: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_messages: 100_000,
            max_bytes: 64 * 1024 * 1024,
            max_age_ms: 24 * 3600 * 1000,
        }
    }
}

/// A message to append, already validated.
#[derive(Debug, Clone, Default)]
pub struct NewMessage {
    /// Body.
    pub payload: Bytes,
    /// Headers.
    pub headers: Headers,
    /// Application key.
    pub key: String,
    /// Dedup key.
    pub idempotency_key: Option<String>,
}

/// A retained message. Shared by every subscriber that reads it.
#[derive(Debug)]
pub struct StoredMessage {
    /// Topic name.
    pub topic: Arc<str>,
    /// Sequence in the topic, from 1.
    pub sequence: u64,
    /// Application key.
    pub key: String,
    /// Headers.
    pub headers: Headers,
    /// Body.
    pub payload: Bytes,
    /// Append time (non-decreasing within the topic).
    pub publish_time: Millis,
    /// The message as the transport encodes it, filled by the first subscriber that sends
    /// it and reused by every other one (opaque to the domain; see
    /// [`crate::broker::wire`]).
    pub wire: OnceLock<Bytes>,
}

/// The outcome of one appended message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Its sequence (the original one for a duplicate).
    pub sequence: u64,
    /// Whether the idempotency key matched an earlier message.
    pub duplicate: bool,
}

/// What a reader gets from [`Topic::read`].
#[derive(Debug, Default)]
pub struct ReadBatch {
    /// Set when the reader's cursor fell below the oldest retained message:
    /// (first missing, next available).
    pub gap: Option<(u64, u64)>,
    /// Messages from the cursor (or from the next available one after a gap).
    pub messages: Vec<Arc<StoredMessage>>,
    /// Where the reader goes on from.
    pub next: u64,
}

/// One topic's log. See the module docs.
#[derive(Debug)]
pub struct Topic {
    name: Arc<str>,
    retention: Retention,
    log: VecDeque<Arc<StoredMessage>>,
    /// Sequence of `log[0]`, or the next sequence when the log is empty.
    first_seq: u64,
    bytes: u64,
    last_time: Millis,
    dedup: DedupWindow<u64>,
    publish_rate: RateMeter,
    published: u64,
}

impl Topic {
    /// An empty topic.
    pub fn new(name: &str, retention: Retention) -> Self {
        Self {
            name: Arc::from(name),
            retention,
            log: VecDeque::new(),
            first_seq: 1,
            bytes: 0,
            last_time: 0,
            dedup: DedupWindow::default(),
            publish_rate: RateMeter::default(),
            published: 0,
        }
    }

    /// The topic's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Retention limits.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Changes retention and applies it at once.
    pub fn set_retention(&mut self, retention: Retention, now: Millis) {
        self.retention = retention;
        self.enforce_retention(now);
    }

    /// The next sequence to be assigned.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.log.len() as u64
    }

    /// Oldest retained sequence (the next one when empty).
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// How many of these idempotency keys are new (not remembered, not repeated).
    pub fn count_new(&mut self, now: Millis, keys: impl Iterator<Item = Option<String>>) -> u64 {
        self.dedup.prune(now);
        let mut seen = std::collections::HashSet::new();
        keys.filter(|k| match k {
            Some(k) => !self.dedup.contains(k) && seen.insert(k.clone()),
            None => true,
        })
        .count() as u64
    }

    /// Appends messages in order. Returns each one's outcome and the newly stored messages.
    pub fn append(
        &mut self,
        now: Millis,
        messages: Vec<NewMessage>,
    ) -> (Vec<Appended>, Vec<Arc<StoredMessage>>) {
        self.dedup.prune(now);
        let time = now.max(self.last_time);
        self.last_time = time;
        let mut results = Vec::with_capacity(messages.len());
        let mut stored = Vec::with_capacity(messages.len());
        for m in messages {
            if let Some(key) = &m.idempotency_key
                && let Some(sequence) = self.dedup.get(key)
            {
                results.push(Appended {
                    sequence,
                    duplicate: true,
                });
                continue;
            }
            let sequence = self.next_seq();
            if let Some(key) = m.idempotency_key {
                let expires = now + PUBLISH_DEDUP_WINDOW_MS;
                self.dedup.insert(key, sequence, expires);
            }
            let msg = Arc::new(StoredMessage {
                topic: self.name.clone(),
                sequence,
                key: m.key,
                headers: m.headers,
                payload: m.payload,
                publish_time: time,
                wire: OnceLock::new(),
            });
            self.bytes += msg.payload.len() as u64;
            self.log.push_back(msg.clone());
            stored.push(msg);
            results.push(Appended {
                sequence,
                duplicate: false,
            });
        }
        self.published += stored.len() as u64;
        self.publish_rate.record(now, stored.len() as u64);
        self.enforce_retention(now);
        (results, stored)
    }

    /// Evicts what retention no longer allows (count, bytes, age).
    pub fn enforce_retention(&mut self, now: Millis) {
        let min_time = now.saturating_sub(self.retention.max_age_ms);
        while let Some(front) = self.log.front() {
            let over = self.log.len() as u64 > self.retention.max_messages
                || self.bytes > self.retention.max_bytes
                || front.publish_time < min_time;
            if !over {
                break;
            }
            self.bytes -= front.payload.len() as u64;
            self.log.pop_front();
            self.first_seq += 1;
        }
    }

    /// Reads up to `max` messages from sequence `from`. A cursor below the oldest retained
    /// message reports a gap and reads on from the oldest one.
    pub fn read(&self, from: u64, max: usize) -> ReadBatch {
        let mut gap = None;
        let mut start = from;
        if from < self.first_seq {
            gap = Some((from, self.first_seq));
            start = self.first_seq;
        }
        let offset = (start - self.first_seq) as usize;
        let messages: Vec<_> = self.log.iter().skip(offset).take(max).cloned().collect();
        let next = start + messages.len() as u64;
        ReadBatch {
            gap,
            messages,
            next,
        }
    }

    /// The sequence of the first retained message published at or after `time`
    /// (binary search: publish times are non-decreasing).
    pub fn seq_at_time(&self, time: Millis) -> u64 {
        let idx = self.log.partition_point(|m| m.publish_time < time);
        self.first_seq + idx as u64
    }

    /// Remembered publish idempotency keys: (key, sequence, expiry), for snapshots.
    pub fn dedup_entries(&self) -> Vec<(String, u64, Millis)> {
        self.dedup
            .entries()
            .map(|(k, seq, expires)| (k.to_owned(), seq, expires))
            .collect()
    }

    /// Recovery: remembers a publish idempotency key until `expires`, in any order.
    pub fn restore_dedup(&mut self, key: String, sequence: u64, expires: Millis) {
        self.dedup.insert(key, sequence, expires);
    }

    /// Recovery: re-appends a message from the write-ahead log with its original sequence
    /// and time, applying retention as of its publish time as [`Topic::append`] did. A
    /// sequence already below the next one is a repeat and changes nothing; one above it
    /// (its predecessors were evicted before a snapshot) restarts the log there.
    pub fn restore_message(&mut self, message: StoredMessage, idempotency_key: Option<String>) {
        let sequence = message.sequence;
        if sequence < self.next_seq() {
            return;
        }
        if sequence > self.next_seq() {
            self.log.clear();
            self.bytes = 0;
            self.first_seq = sequence;
        }
        let time = message.publish_time;
        if let Some(key) = idempotency_key {
            self.restore_dedup(key, sequence, time + PUBLISH_DEDUP_WINDOW_MS);
        }
        self.last_time = self.last_time.max(time);
        self.bytes += message.payload.len() as u64;
        self.log.push_back(Arc::new(StoredMessage {
            topic: self.name.clone(),
            ..message
        }));
        self.enforce_retention(time);
    }

    /// Recovery: moves an empty log's next sequence up to `next` (every earlier message
    /// was evicted), so sequences are never reused.
    pub fn restore_next_seq(&mut self, next: u64) {
        if self.log.is_empty() && next > self.first_seq {
            self.first_seq = next;
        }
    }

    /// Retained message count and payload bytes.
    pub fn retained(&self) -> (u64, u64) {
        (self.log.len() as u64, self.bytes)
    }

    /// Messages published since start, and per second over the last 10 s.
    pub fn published(&self, now: Millis) -> (u64, f64) {
        (self.published, self.publish_rate.per_second(now))
    }
}

/// Checks retention values given by a user (zero means "default" and is resolved before).
pub fn validate_retention(r: &Retention) -> Result<(), BrokerError> {
    if r.max_messages == 0 || r.max_bytes == 0 || r.max_age_ms == 0 {
        return Err(BrokerError::invalid(
            "retention",
            "every limit must be at least 1",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_700_000_000_000;

    fn msg(payload: &'static str) -> NewMessage {
        NewMessage {
            payload: Bytes::from_static(payload.as_bytes()),
            ..NewMessage::default()
        }
    }

    #[test]
    fn sequences_start_at_one_and_reads_resume() {
        let mut t = Topic::new("t", Retention::default());
        let (results, stored) = t.append(T0, vec![msg("a"), msg("b"), msg("c")]);
        assert_eq!(
            results.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(stored.len(), 3);
        let batch = t.read(2, 10);
        assert_eq!(batch.gap, None);
        assert_eq!(batch.messages.len(), 2);
        assert_eq!(batch.next, 4);
        assert!(t.read(4, 10).messages.is_empty());
    }

    #[test]
    fn retention_evicts_oldest_and_readers_see_a_gap() {
        let retention = Retention {
            max_messages: 2,
            ..Retention::default()
        };
        let mut t = Topic::new("t", retention);
        t.append(T0, vec![msg("1"), msg("2"), msg("3"), msg("4")]);
        assert_eq!(t.first_seq(), 3);
        let batch = t.read(1, 10);
        assert_eq!(batch.gap, Some((1, 3)));
        assert_eq!(batch.messages[0].sequence, 3);
        assert_eq!(batch.next, 5);
    }

    #[test]
    fn retention_by_bytes_and_age() {
        let retention = Retention {
            max_messages: 100,
            max_bytes: 5,
            max_age_ms: 1_000,
        };
        let mut t = Topic::new("t", retention);
        t.append(T0, vec![msg("aaa"), msg("bbb")]);
        assert_eq!(t.retained(), (1, 3));
        t.append(T0 + 500, vec![msg("c")]);
        t.enforce_retention(T0 + 1_001);
        assert_eq!(t.retained(), (1, 1));
        assert_eq!(t.first_seq(), 3);
    }

    #[test]
    fn restored_messages_keep_sequences_retention_and_dedup() {
        let retention = Retention {
            max_messages: 2,
            ..Retention::default()
        };
        let mut t = Topic::new("t", retention);
        let stored = |sequence: u64, payload: &'static str| StoredMessage {
            topic: Arc::from("other"),
            sequence,
            key: String::new(),
            headers: Headers::new(),
            payload: Bytes::from_static(payload.as_bytes()),
            publish_time: T0 + sequence,
            wire: OnceLock::new(),
        };
        t.restore_message(stored(5, "a"), Some("k".into()));
        t.restore_message(stored(6, "b"), None);
        t.restore_message(stored(6, "b"), None);
        t.restore_message(stored(7, "c"), None);
        assert_eq!((t.first_seq(), t.next_seq()), (6, 8));
        assert_eq!(&*t.read(6, 10).messages[0].topic, "t");
        // The key is remembered with its original sequence even after eviction.
        let (r, _) = t.append(
            T0 + 10,
            vec![NewMessage {
                idempotency_key: Some("k".into()),
                ..msg("again")
            }],
        );
        assert_eq!(
            r[0],
            Appended {
                sequence: 5,
                duplicate: true
            }
        );

        let mut empty = Topic::new("e", Retention::default());
        empty.restore_next_seq(42);
        let (r, _) = empty.append(T0, vec![msg("x")]);
        assert_eq!(r[0].sequence, 42);
    }

    #[test]
    fn publish_dedup_and_time_lookup() {
        let mut t = Topic::new("t", Retention::default());
        let keyed = NewMessage {
            idempotency_key: Some("k".into()),
            ..msg("x")
        };
        let (r, _) = t.append(T0, vec![keyed.clone(), keyed.clone()]);
        assert_eq!(
            r[1],
            Appended {
                sequence: 1,
                duplicate: true
            }
        );
        t.append(T0 + 10, vec![msg("y")]);
        assert_eq!(t.seq_at_time(T0 + 5), 2);
        assert_eq!(t.seq_at_time(T0 + 11), 3);
        let (r, _) = t.append(T0 + PUBLISH_DEDUP_WINDOW_MS, vec![keyed]);
        assert!(!r[0].duplicate);
    }

    #[test]
    fn dedup_keys_restored_out_of_expiry_order_expire_on_time() {
        // A snapshot lists its keys in map order, so a later expiry can come first.
        let mut t = Topic::new("t", Retention::default());
        t.restore_dedup("late".into(), 1, T0 + 2_000);
        t.restore_dedup("early".into(), 2, T0 + 1_000);
        let keyed = |k: &str| NewMessage {
            idempotency_key: Some(k.into()),
            ..msg("x")
        };
        let (r, _) = t.append(T0 + 1_500, vec![keyed("early"), keyed("late")]);
        assert!(
            !r[0].duplicate,
            "the window of \"early\" ended at T0 + 1,000"
        );
        assert!(r[1].duplicate);
    }
}
