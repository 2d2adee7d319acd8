//! A topic's ordered, bounded retention log.
//!
//! Like [`crate::broker::domain::queue`], a `Topic` is plain data driven with an explicit `now`;
//! subscriptions read from it by sequence number, so a slow reader never holds up an
//! appender: it only finds, later, that the messages it had not read were evicted.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::broker::domain::dedup::DedupWindow;
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::{
    Headers, MAX_RETENTION_AGE_MS, MAX_RETENTION_BYTES, MAX_RETENTION_MESSAGES, check_count,
    check_duration_ms,
};
use crate::broker::domain::rate::RateMeter;
use crate::broker::domain::time::Millis;

/// How long a publish idempotency key is remembered.
pub(crate) const PUBLISH_DEDUP_WINDOW_MS: u64 = 120_000;

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

/// The messages one publish appended: consecutive sequences from `first_sequence`, one
/// publish time. A block is the unit of storage and sharing, as a record batch is in
/// Kafka: appending, retaining, reading and sending a publish of a hundred messages costs
/// one allocation and one reference count, not a hundred.
#[derive(Debug)]
pub struct MessageBlock {
    /// Topic name.
    pub topic: Arc<str>,
    /// Sequence of `entries[0]`.
    pub first_sequence: u64,
    /// Append time of every message in the block (non-decreasing within the topic).
    pub publish_time: Millis,
    /// The messages, in sequence order.
    pub entries: Vec<BlockEntry>,
    /// Sum of the messages' payload lengths.
    pub payload_bytes: u64,
    /// The block as the transport encodes it, filled by the first subscriber that sends
    /// any of it and reused by every other one (opaque to the domain; see
    /// [`crate::broker::grpc::wire`]).
    pub wire: OnceLock<EncodedBlock>,
}

impl MessageBlock {
    /// A block of `entries` from `first_sequence`, all published at `publish_time`, not
    /// encoded yet.
    pub fn new(
        topic: Arc<str>,
        first_sequence: u64,
        publish_time: Millis,
        entries: Vec<BlockEntry>,
    ) -> Self {
        let payload_bytes = entries.iter().map(|e| e.payload.len() as u64).sum();
        Self {
            topic,
            first_sequence,
            publish_time,
            entries,
            payload_bytes,
            wire: OnceLock::new(),
        }
    }

    /// The sequence after the block's last message.
    pub fn end_sequence(&self) -> u64 {
        self.first_sequence + self.entries.len() as u64
    }

    /// Every message of the block, in sequence order.
    pub fn messages(&self) -> impl Iterator<Item = MessageRef<'_>> {
        self.run(0, self.entries.len())
    }

    /// Messages `start..end` of the block.
    fn run(&self, start: usize, end: usize) -> impl Iterator<Item = MessageRef<'_>> {
        self.entries[start..end]
            .iter()
            .zip(self.first_sequence + start as u64..)
            .map(move |(entry, sequence)| MessageRef {
                topic: &self.topic,
                sequence,
                publish_time: self.publish_time,
                entry,
            })
    }
}

/// What one message of a block holds besides its sequence and time. Most messages have
/// no key and no headers, so those live behind one optional box: an entry is 40 bytes
/// rather than 104, which is what retention keeps and evicts per message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockEntry {
    /// Body.
    pub payload: Bytes,
    extras: Option<Box<(String, Headers)>>,
}

impl BlockEntry {
    /// An entry; the key and headers take no room when both are empty.
    pub fn new(key: String, headers: Headers, payload: Bytes) -> Self {
        let extras = (!key.is_empty() || !headers.is_empty()).then(|| Box::new((key, headers)));
        Self { payload, extras }
    }

    /// Application key (empty when none).
    pub fn key(&self) -> &str {
        self.extras.as_ref().map_or("", |e| e.0.as_str())
    }

    /// Headers, if any were given.
    pub fn headers(&self) -> Option<&Headers> {
        self.extras.as_ref().map(|e| &e.1).filter(|h| !h.is_empty())
    }
}

/// A transport's encoding of a whole block: every message's bytes one after another, and
/// where each one ends, so any run of the block's messages is one slice of `bytes`.
#[derive(Debug)]
pub struct EncodedBlock {
    /// The messages' encodings, in order.
    pub bytes: Bytes,
    /// `ends[i]` is the offset just past message `i`.
    pub ends: Vec<usize>,
}

impl EncodedBlock {
    /// The bytes of messages `start..end` (a non-empty run).
    pub fn run(&self, start: usize, end: usize) -> &[u8] {
        let from = if start == 0 { 0 } else { self.ends[start - 1] };
        &self.bytes[from..self.ends[end - 1]]
    }
}

/// A run of a block's messages (indices `start..end`), as a reader is handed them.
#[derive(Debug, Clone)]
pub struct BlockSlice {
    /// The block, shared with the log and every other reader.
    pub block: Arc<MessageBlock>,
    /// Index of the first message in the run.
    pub start: usize,
    /// Index past the last message in the run.
    pub end: usize,
}

impl BlockSlice {
    /// How many messages the run holds.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the run holds no message.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Sequence of the run's first message.
    pub fn first_sequence(&self) -> u64 {
        self.block.first_sequence + self.start as u64
    }

    /// The run's messages, in sequence order.
    pub fn messages(&self) -> impl Iterator<Item = MessageRef<'_>> {
        self.block.run(self.start, self.end)
    }
}

/// One retained message, borrowed from its block.
#[derive(Debug, Clone, Copy)]
pub struct MessageRef<'a> {
    /// Topic name.
    pub topic: &'a Arc<str>,
    /// Sequence in the topic, from 1.
    pub sequence: u64,
    /// Append time.
    pub publish_time: Millis,
    /// Key, headers and payload.
    pub entry: &'a BlockEntry,
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
    /// Messages from the cursor (or from the next available one after a gap), as runs of
    /// the blocks that hold them.
    pub slices: Vec<BlockSlice>,
    /// Where the reader goes on from.
    pub next: u64,
}

/// One topic's log. See the module docs.
#[derive(Debug)]
pub struct Topic {
    name: Arc<str>,
    retention: Retention,
    /// Contiguous blocks: each one starts at the sequence where the one before it ends.
    log: VecDeque<Arc<MessageBlock>>,
    /// Oldest retained sequence: inside `log[0]` (whose earlier messages were evicted),
    /// or `next_seq` when the log is empty.
    first_seq: u64,
    /// The next sequence to be assigned: where the last block ends.
    next_seq: u64,
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
            next_seq: 1,
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
        self.next_seq
    }

    /// Oldest retained sequence (the next one when empty).
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// How many of these idempotency keys are new (not remembered, not repeated).
    pub fn count_new(&mut self, now: Millis, keys: impl Iterator<Item = Option<String>>) -> u64 {
        self.dedup.count_new(now, keys)
    }

    /// Appends messages in order, as one block. Returns each one's outcome and the block
    /// of the newly stored ones (`None` when every message was a duplicate).
    pub fn append(
        &mut self,
        now: Millis,
        messages: Vec<NewMessage>,
    ) -> (Vec<Appended>, Option<Arc<MessageBlock>>) {
        self.dedup.prune(now);
        let time = now.max(self.last_time);
        self.last_time = time;
        let first_sequence = self.next_seq;
        let mut results = Vec::with_capacity(messages.len());
        let mut entries = Vec::with_capacity(messages.len());
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
            let sequence = first_sequence + entries.len() as u64;
            if let Some(key) = m.idempotency_key {
                let expires = now.saturating_add(PUBLISH_DEDUP_WINDOW_MS);
                self.dedup.insert(key, sequence, expires);
            }
            entries.push(BlockEntry::new(m.key, m.headers, m.payload));
            results.push(Appended {
                sequence,
                duplicate: false,
            });
        }
        if entries.is_empty() {
            return (results, None);
        }
        let block = Arc::new(MessageBlock::new(
            self.name.clone(),
            first_sequence,
            time,
            entries,
        ));
        self.push_block(block.clone());
        self.published += block.entries.len() as u64;
        self.publish_rate.record(now, block.entries.len() as u64);
        self.enforce_retention(now);
        (results, Some(block))
    }

    /// Puts a block (starting at `next_seq`) at the end of the log.
    fn push_block(&mut self, block: Arc<MessageBlock>) {
        debug_assert_eq!(block.first_sequence, self.next_seq);
        if self.log.is_empty() {
            self.first_seq = block.first_sequence;
        }
        self.next_seq = block.end_sequence();
        self.bytes += block.payload_bytes;
        self.log.push_back(block);
    }

    /// Evicts what retention no longer allows (count, bytes, age), oldest message first.
    /// A block leaves the log with its last message; until then, readers start after the
    /// evicted part.
    pub fn enforce_retention(&mut self, now: Millis) {
        let r = self.retention;
        let min_time = now.saturating_sub(r.max_age_ms);
        while let Some(front) = self.log.front() {
            let count = self.next_seq - self.first_seq;
            let over =
                count > r.max_messages || self.bytes > r.max_bytes || front.publish_time < min_time;
            if !over {
                break;
            }
            // A whole block whose every message would go one by one goes at once, without
            // touching its (long unread, likely uncached) entries.
            let len = front.entries.len() as u64;
            if self.first_seq == front.first_sequence
                && (front.publish_time < min_time
                    || count - len >= r.max_messages
                    || self.bytes - front.payload_bytes > r.max_bytes)
            {
                self.bytes -= front.payload_bytes;
                self.first_seq += len;
                self.log.pop_front();
                continue;
            }
            let index = (self.first_seq - front.first_sequence) as usize;
            self.bytes -= front.entries[index].payload.len() as u64;
            self.first_seq += 1;
            if self.first_seq == front.end_sequence() {
                self.log.pop_front();
            }
        }
    }

    /// Reads up to `max` messages from sequence `from`. A cursor below the oldest retained
    /// message reports a gap and reads on from the oldest one.
    pub fn read(&self, from: u64, max: usize) -> ReadBatch {
        self.read_before(from, max, u64::MAX)
    }

    /// [`Topic::read`] of the messages before sequence `end` only (the durable end of the
    /// log, for subscribers). A gap is reported only once `end` reaches past it: its
    /// "next available" sequence must name a message that is there to stay.
    pub fn read_before(&self, from: u64, max: usize, end: u64) -> ReadBatch {
        let end = end.min(self.next_seq);
        let mut gap = None;
        let mut next = from;
        if from < self.first_seq {
            if end < self.first_seq {
                return ReadBatch {
                    next: from,
                    ..ReadBatch::default()
                };
            }
            gap = Some((from, self.first_seq));
            next = self.first_seq;
        }
        let mut slices = Vec::new();
        let mut room = usize::try_from(end.saturating_sub(next)).map_or(max, |left| left.min(max));
        let mut i = self.log.partition_point(|b| b.end_sequence() <= next);
        while room > 0
            && let Some(block) = self.log.get(i)
        {
            let start = (next - block.first_sequence) as usize;
            let end = start + (block.entries.len() - start).min(room);
            slices.push(BlockSlice {
                block: block.clone(),
                start,
                end,
            });
            room -= end - start;
            next += (end - start) as u64;
            i += 1;
        }
        ReadBatch { gap, slices, next }
    }

    /// The sequence of the first retained message published at or after `time`
    /// (binary search: publish times are non-decreasing).
    pub fn seq_at_time(&self, time: Millis) -> u64 {
        let idx = self.log.partition_point(|b| b.publish_time < time);
        match self.log.get(idx) {
            Some(block) => block.first_sequence.max(self.first_seq),
            None => self.next_seq,
        }
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
    /// (its predecessors were evicted before a snapshot) restarts the log there. Messages
    /// that follow on with the same time join the last block, so a restored log is made of
    /// about the blocks the publishes made.
    pub fn restore_message(
        &mut self,
        sequence: u64,
        publish_time: Millis,
        entry: BlockEntry,
        idempotency_key: Option<String>,
    ) {
        if sequence < self.next_seq {
            return;
        }
        if sequence > self.next_seq {
            self.log.clear();
            self.bytes = 0;
            self.first_seq = sequence;
            self.next_seq = sequence;
        }
        if let Some(key) = idempotency_key {
            self.restore_dedup(
                key,
                sequence,
                publish_time.saturating_add(PUBLISH_DEDUP_WINDOW_MS),
            );
        }
        self.last_time = self.last_time.max(publish_time);
        // Recovery owns the topic: no reader shares its blocks yet.
        let joined = match self.log.back_mut().and_then(Arc::get_mut) {
            Some(last) if last.publish_time == publish_time => {
                let len = entry.payload.len() as u64;
                last.payload_bytes += len;
                last.entries.push(entry);
                self.bytes += len;
                self.next_seq += 1;
                None
            }
            _ => Some(entry),
        };
        if let Some(entry) = joined {
            let name = self.name.clone();
            self.push_block(Arc::new(MessageBlock::new(
                name,
                sequence,
                publish_time,
                vec![entry],
            )));
        }
        self.enforce_retention(publish_time);
    }

    /// Recovery: moves an empty log's next sequence up to `next` (every earlier message
    /// was evicted), so sequences are never reused.
    pub fn restore_next_seq(&mut self, next: u64) {
        if self.log.is_empty() && next > self.next_seq {
            self.first_seq = next;
            self.next_seq = next;
        }
    }

    /// Retained message count and payload bytes.
    pub fn retained(&self) -> (u64, u64) {
        (self.next_seq - self.first_seq, self.bytes)
    }

    /// Messages published since start, and per second over the last 10 s.
    pub fn published(&self, now: Millis) -> (u64, f64) {
        (self.published, self.publish_rate.per_second(now))
    }
}

/// Checks retention values given by a user (zero means "default" and is resolved before).
pub(crate) fn validate_retention(r: &Retention) -> Result<(), BrokerError> {
    if r.max_messages == 0 || r.max_bytes == 0 || r.max_age_ms == 0 {
        return Err(BrokerError::invalid(
            "retention",
            "every limit must be at least 1",
        ));
    }
    check_count(
        "retention.max_messages",
        r.max_messages,
        MAX_RETENTION_MESSAGES,
    )?;
    if r.max_bytes > MAX_RETENTION_BYTES {
        return Err(BrokerError::over_limit(
            "retention.max_bytes",
            r.max_bytes,
            MAX_RETENTION_BYTES,
            "bytes",
        ));
    }
    check_duration_ms("retention.max_age_ms", r.max_age_ms, MAX_RETENTION_AGE_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_700_000_000_000;

    /// Every sequence a read handed out, in order.
    fn sequences(batch: &ReadBatch) -> Vec<u64> {
        batch
            .slices
            .iter()
            .flat_map(|s| s.messages().map(|m| m.sequence))
            .collect()
    }

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
        assert_eq!(stored.unwrap().entries.len(), 3);
        let batch = t.read(2, 10);
        assert_eq!(batch.gap, None);
        assert_eq!(sequences(&batch), [2, 3]);
        assert_eq!(batch.next, 4);
        assert!(t.read(4, 10).slices.is_empty());
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
        assert_eq!(sequences(&batch), [3, 4]);
        assert_eq!(batch.next, 5);
    }

    #[test]
    fn a_publish_is_one_block_and_reads_cross_blocks() {
        let mut t = Topic::new("t", Retention::default());
        let (_, first) = t.append(T0, vec![msg("a"), msg("b"), msg("c")]);
        let (_, second) = t.append(T0 + 1, vec![msg("d"), msg("e")]);
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!((first.first_sequence, second.first_sequence), (1, 4));
        // A read starting inside one block runs on into the next, up to `max`.
        let batch = t.read(2, 3);
        assert_eq!(sequences(&batch), [2, 3, 4]);
        assert_eq!(batch.next, 5);
        assert_eq!(batch.slices.len(), 2);
        assert!(Arc::ptr_eq(&batch.slices[0].block, &first));
        assert_eq!((batch.slices[0].start, batch.slices[0].end), (1, 3));
        assert!(Arc::ptr_eq(&batch.slices[1].block, &second));
        assert_eq!((batch.slices[1].start, batch.slices[1].end), (0, 1));
        let payloads: Vec<&[u8]> = batch
            .slices
            .iter()
            .flat_map(|s| s.messages().map(|m| &m.entry.payload[..]))
            .collect();
        assert_eq!(payloads, [&b"b"[..], b"c", b"d"]);
        // "Everything from here" (how a snapshot reads) is not an overflow.
        assert_eq!(sequences(&t.read(2, usize::MAX)), [2, 3, 4, 5]);
        // A cursor past the end reads nothing and stays where it is.
        let ahead = t.read(9, 10);
        assert!(ahead.slices.is_empty());
        assert_eq!(ahead.next, 9);
    }

    #[test]
    fn retention_evicts_messages_from_inside_a_block() {
        let retention = Retention {
            max_messages: 3,
            ..Retention::default()
        };
        let mut t = Topic::new("t", retention);
        t.append(T0, vec![msg("1"), msg("2")]);
        t.append(T0 + 1, vec![msg("3"), msg("4")]);
        // Message 1 is gone, message 2 of the same block is still there.
        assert_eq!((t.first_seq(), t.next_seq()), (2, 5));
        assert_eq!(t.retained(), (3, 3));
        let batch = t.read(1, 10);
        assert_eq!(batch.gap, Some((1, 2)));
        assert_eq!(sequences(&batch), [2, 3, 4]);
        assert_eq!(
            t.seq_at_time(T0),
            2,
            "the block's first message was evicted"
        );
        // The block leaves the log with its last message.
        t.append(T0 + 2, vec![msg("5")]);
        assert_eq!(t.log.len(), 2);
        assert_eq!(sequences(&t.read(1, 10)), [3, 4, 5]);
        // A duplicate-only publish stores no block.
        let keyed = NewMessage {
            idempotency_key: Some("k".into()),
            ..msg("6")
        };
        let (_, block) = t.append(T0 + 3, vec![keyed.clone()]);
        assert!(block.is_some());
        let (r, block) = t.append(T0 + 3, vec![keyed]);
        assert!(block.is_none());
        assert!(r[0].duplicate);
    }

    /// The log as a plain per-message list, evicting one message at a time: what the
    /// block log must be indistinguishable from.
    #[derive(Default)]
    struct ModelLog {
        /// (sequence, publish time, payload length)
        messages: VecDeque<(u64, Millis, u64)>,
        next: u64,
        first: u64,
    }

    impl ModelLog {
        fn enforce(&mut self, r: Retention, now: Millis) {
            let min_time = now.saturating_sub(r.max_age_ms);
            while let Some(&(seq, time, _)) = self.messages.front() {
                let bytes: u64 = self.messages.iter().map(|m| m.2).sum();
                if self.messages.len() as u64 > r.max_messages
                    || bytes > r.max_bytes
                    || time < min_time
                {
                    self.messages.pop_front();
                    self.first = seq + 1;
                } else {
                    break;
                }
            }
        }

        fn retained(&self) -> (u64, u64) {
            let bytes = self.messages.iter().map(|m| m.2).sum();
            (self.messages.len() as u64, bytes)
        }
    }

    #[test]
    fn block_log_matches_a_per_message_model() {
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut retention = Retention {
                max_messages: rng.u64(1..20),
                max_bytes: rng.u64(1..40),
                max_age_ms: rng.u64(1..30),
            };
            let mut t = Topic::new("t", retention);
            let mut model = ModelLog {
                next: 1,
                first: 1,
                ..ModelLog::default()
            };
            let mut now = T0;
            for step in 0..300 {
                now += rng.u64(0..4);
                match rng.u32(0..10) {
                    0 => {
                        retention.max_messages = rng.u64(1..20);
                        retention.max_bytes = rng.u64(1..40);
                        t.set_retention(retention, now);
                        model.enforce(retention, now);
                    }
                    1 => {
                        t.enforce_retention(now);
                        model.enforce(retention, now);
                    }
                    _ => {
                        let lens: Vec<usize> =
                            (0..rng.usize(1..8)).map(|_| rng.usize(0..6)).collect();
                        let batch = lens
                            .iter()
                            .map(|&n| NewMessage {
                                payload: Bytes::from(vec![b'x'; n]),
                                ..NewMessage::default()
                            })
                            .collect();
                        let (results, _) = t.append(now, batch);
                        for (r, n) in results.iter().zip(&lens) {
                            assert_eq!(r.sequence, model.next, "seed {seed} step {step}");
                            if model.messages.is_empty() {
                                model.first = model.next;
                            }
                            model.messages.push_back((model.next, now, *n as u64));
                            model.next += 1;
                        }
                        model.enforce(retention, now);
                    }
                }
                let at = format!("seed {seed} step {step}");
                assert_eq!(t.retained(), model.retained(), "{at}");
                assert_eq!(t.next_seq(), model.next, "{at}");
                if model.messages.is_empty() {
                    assert_eq!(t.first_seq(), model.next, "{at}");
                } else {
                    assert_eq!(t.first_seq(), model.messages[0].0, "{at}");
                }
                let from = rng.u64(model.first.saturating_sub(3).max(1)..model.next + 2);
                let max = if rng.u32(0..8) == 0 {
                    usize::MAX
                } else {
                    rng.usize(1..12)
                };
                let read = t.read(from, max);
                let expected: Vec<u64> = model
                    .messages
                    .iter()
                    .map(|m| m.0)
                    .filter(|&seq| seq >= from)
                    .take(max)
                    .collect();
                assert_eq!(sequences(&read), expected, "{at}: read({from}, {max})");
                assert_eq!(read.gap.is_some(), from < t.first_seq(), "{at}");
                // Up to a durable end: the same messages below it, and a gap only once
                // the end reaches where the reader goes on.
                let end = rng.u64(model.first.saturating_sub(3).max(1)..model.next + 2);
                let durable = t.read_before(from, max, end);
                let below: Vec<u64> = expected.iter().copied().filter(|&s| s < end).collect();
                let at = format!("{at}: read_before({from}, {max}, {end})");
                let first = t.first_seq();
                let held_back = from < first && end < first;
                let start = if held_back { from } else { from.max(first) };
                assert_eq!(sequences(&durable), below, "{at}");
                assert_eq!(durable.gap.is_some(), from < first && !held_back, "{at}");
                assert_eq!(durable.next, start + below.len() as u64, "{at}");
                let time = now.saturating_sub(rng.u64(0..40));
                let expected_seq = model
                    .messages
                    .iter()
                    .find(|m| m.1 >= time)
                    .map_or(model.next, |m| m.0);
                assert_eq!(t.seq_at_time(time), expected_seq, "{at}: seq_at_time");
            }
        }
    }

    #[test]
    fn restored_messages_regroup_into_blocks_by_time() {
        let mut t = Topic::new("t", Retention::default());
        let entry = || BlockEntry::new(String::new(), Headers::new(), Bytes::from_static(b"x"));
        for seq in 1..=3 {
            t.restore_message(seq, T0, entry(), None);
        }
        t.restore_message(4, T0 + 1, entry(), None);
        assert_eq!(t.log.len(), 2);
        assert_eq!(t.log[0].entries.len(), 3);
        assert_eq!(sequences(&t.read(1, 10)), [1, 2, 3, 4]);
        assert_eq!(t.seq_at_time(T0 + 1), 4);
        assert_eq!(t.seq_at_time(T0 + 2), 5);
    }

    #[test]
    fn entries_box_only_a_key_or_headers() {
        assert_eq!(std::mem::size_of::<BlockEntry>(), 40);
        let plain = BlockEntry::new(String::new(), Headers::new(), Bytes::from_static(b"p"));
        assert_eq!((plain.key(), plain.headers()), ("", None));
        let headers: Headers = [("a".to_string(), "b".to_string())].into();
        let full = BlockEntry::new("k".into(), headers.clone(), Bytes::new());
        assert_eq!((full.key(), full.headers()), ("k", Some(&headers)));
        let keyed = BlockEntry::new("k".into(), Headers::new(), Bytes::new());
        assert_eq!((keyed.key(), keyed.headers()), ("k", None));
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
        let entry = |payload: &'static str| {
            BlockEntry::new(
                String::new(),
                Headers::new(),
                Bytes::from_static(payload.as_bytes()),
            )
        };
        t.restore_message(5, T0 + 5, entry("a"), Some("k".into()));
        t.restore_message(6, T0 + 6, entry("b"), None);
        t.restore_message(6, T0 + 6, entry("b"), None);
        t.restore_message(7, T0 + 7, entry("c"), None);
        assert_eq!((t.first_seq(), t.next_seq()), (6, 8));
        let read = t.read(6, 10);
        assert_eq!(sequences(&read), [6, 7]);
        assert_eq!(&*read.slices[0].block.topic, "t");
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
