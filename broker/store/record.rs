//! Record framing and the conversions between domain changes and WAL record messages.
//!
//! A segment or snapshot file is an 8-byte header ([`FILE_MAGIC`]) followed by frames:
//!
//! ```text
//! magic u32 LE | len u32 LE | crc32c(len bytes ++ payload) u32 LE | payload (len bytes)
//! ```
//!
//! The per-frame magic lets recovery tell a torn tail (no valid frame after the damage)
//! from damage in the middle of a file (a valid frame follows it).

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use uuid::Uuid;

use crate::broker::domain::queue::{
    Backoff, DeadLetter, Job, JobRecord, JobState, JobUpdate, Queue, QueuePolicy, RateLimit,
    Redriven,
};
use crate::broker::domain::schedule::Schedule;
use crate::broker::domain::schema::{SchemaHistory, SchemaTarget};
use crate::broker::domain::time::Millis;
use crate::broker::domain::topic::{BlockSlice, MessageBlock, MessageRef, Retention};

/// The generated record messages (internal; never on the wire).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub(crate) mod pb {
    include!(concat!(env!("OUT_DIR"), "/sluice.internal.rs"));
}

pub(crate) use pb::op::Op as Kind;

mod direct;
pub(crate) mod schemas;

/// First bytes of every segment and snapshot file (format version 1).
pub(crate) const FILE_MAGIC: &[u8; 8] = b"SLUICE\x01\n";
/// First bytes of every frame.
pub(crate) const FRAME_MAGIC: u32 = 0x5352_4C53;
/// Frame header bytes.
pub(crate) const FRAME_HEADER: usize = 12;
/// `Entry.at`'s field number (see `wal.proto`).
const ENTRY_AT: u32 = 1;
/// `Entry.ops`'s field number.
const ENTRY_OPS: u32 = 2;
/// Room the first op of a batch reserves: a few settlements' records fit in it.
const FIRST_OP_ROOM: usize = 256;

/// Largest frame payload accepted on read: a batch is bounded by the request size limit,
/// far below this.
pub(crate) const MAX_FRAME: usize = 1 << 30;

/// Appends one frame holding `payload` to `out`.
pub(crate) fn frame_into(out: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), payload);
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The file ends inside the frame header or payload.
    Truncated,
    /// The header or checksum is wrong.
    Corrupt(String),
}

/// Reads the frame at `at`: its payload and the offset after it.
pub(crate) fn read_frame(data: &[u8], at: usize) -> Result<(&[u8], usize), FrameError> {
    let Some(header) = data.get(at..at + FRAME_HEADER) else {
        return Err(FrameError::Truncated);
    };
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    let (magic, len, crc) = (word(0), word(4) as usize, word(8));
    if magic != FRAME_MAGIC {
        return Err(FrameError::Corrupt(format!(
            "bad frame marker {magic:#010x} (expected {FRAME_MAGIC:#010x})"
        )));
    }
    if len > MAX_FRAME {
        return Err(FrameError::Corrupt(format!(
            "frame length {len} exceeds the limit of {MAX_FRAME} bytes"
        )));
    }
    let start = at + FRAME_HEADER;
    let Some(payload) = data.get(start..start + len) else {
        return Err(FrameError::Truncated);
    };
    let actual = crc32c::crc32c_append(crc32c::crc32c(&header[4..8]), payload);
    if actual != crc {
        return Err(FrameError::Corrupt(format!(
            "checksum mismatch: stored {crc:#010x}, computed {actual:#010x} over {len} bytes"
        )));
    }
    Ok((payload, start + len))
}

/// Whether any valid frame starts after `from` (a cheap scan for the frame marker, with
/// a full check at each hit).
pub(crate) fn valid_frame_after(data: &[u8], from: usize) -> bool {
    let marker = FRAME_MAGIC.to_le_bytes();
    let mut i = from;
    while i + FRAME_HEADER <= data.len() {
        if data[i..i + 4] == marker && read_frame(data, i).is_ok() {
            return true;
        }
        i += 1;
    }
    false
}

/// The records of one change, appended atomically. A disabled batch (memory storage)
/// ignores everything, so the broker's hooks cost one branch.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// The frame being built: room for the header, then each op encoded as it is
    /// recorded (`Entry.ops`, field 2; `Entry.at` is added last, since fields may come
    /// in any order). Empty until the first op; `None` when disabled.
    frame: Option<Vec<u8>>,
}

fn id_bytes(id: &Uuid) -> Bytes {
    Bytes::copy_from_slice(id.as_bytes())
}

/// The record value of a state. The WAL has its own `State` enum rather than the API's
/// `JobState`: it is the file format, which must read back the same whatever the API
/// does (no `UNSPECIFIED`, other numbers). This match is its one mapping; the way back
/// ([`state_from_pb`]) searches it.
fn state_to_pb(state: JobState) -> pb::State {
    match state {
        JobState::Scheduled => pb::State::Scheduled,
        JobState::Pending => pb::State::Pending,
        JobState::Leased => pb::State::Leased,
        JobState::Retrying => pb::State::Retrying,
        JobState::Completed => pb::State::Completed,
        JobState::Dead => pb::State::Dead,
        JobState::Cancelled => pb::State::Cancelled,
    }
}

/// The state a record value names; `None` for a value no state maps to.
pub(crate) fn state_from_pb(value: i32) -> Option<JobState> {
    JobState::ALL
        .into_iter()
        .find(|s| state_to_pb(*s) as i32 == value)
}

/// The record form of a policy. Not the API's `QueuePolicy` (mapped in `grpc::convert`):
/// a record keeps the policy as it is, with no "unset means default" reading, and its
/// format must not follow API changes.
pub(crate) fn policy_to_pb(p: &QueuePolicy) -> pb::Policy {
    let mut out = pb::Policy {
        visibility_timeout_ms: p.visibility_timeout_ms,
        max_attempts: p.max_attempts,
        dead_letter_queue: p.dead_letter_queue.clone(),
        max_depth: p.max_depth,
        dedup_window_ms: p.dedup_window_ms,
        topic_bindings: p.topic_bindings.clone(),
        history_limit: p.history_limit,
        max_in_flight: p.max_in_flight.unwrap_or(0),
        rate_per_second: p.rate_limit.map_or(0, |r| r.per_second),
        rate_burst: p.rate_limit.map_or(0, |r| r.burst),
        ..pb::Policy::default()
    };
    match &p.backoff {
        Backoff::Schedule(d) => {
            out.schedule = true;
            out.delays_ms = d.clone();
        }
        Backoff::Exponential {
            initial_ms,
            max_ms,
            jitter,
        } => {
            out.initial_ms = *initial_ms;
            out.max_ms = *max_ms;
            out.jitter = *jitter;
        }
    }
    out
}

/// The policy a record holds.
pub(crate) fn policy_from_pb(p: pb::Policy) -> QueuePolicy {
    QueuePolicy {
        visibility_timeout_ms: p.visibility_timeout_ms,
        max_attempts: p.max_attempts.max(1),
        backoff: if p.schedule {
            Backoff::Schedule(p.delays_ms)
        } else {
            Backoff::Exponential {
                initial_ms: p.initial_ms,
                max_ms: p.max_ms,
                jitter: p.jitter,
            }
        },
        dead_letter_queue: p.dead_letter_queue,
        max_depth: p.max_depth,
        dedup_window_ms: p.dedup_window_ms,
        topic_bindings: p.topic_bindings,
        history_limit: p.history_limit,
        rate_limit: (p.rate_per_second > 0).then(|| RateLimit {
            per_second: p.rate_per_second,
            burst: p.rate_burst.max(1),
        }),
        max_in_flight: (p.max_in_flight > 0).then_some(p.max_in_flight),
    }
}

/// A policy as the bytes of its record form ([`policy_to_pb`]), for stores that keep a
/// policy outside the log (the Redis engine's queue meta).
pub(crate) fn encode_policy(p: &QueuePolicy) -> Vec<u8> {
    policy_to_pb(p).encode_to_vec()
}

/// The policy [`encode_policy`] wrote; `None` if the bytes are not a policy record.
pub(crate) fn decode_policy(bytes: &[u8]) -> Option<QueuePolicy> {
    pb::Policy::decode(bytes).ok().map(policy_from_pb)
}

/// The image of a job's record: what the record borrows is copied here, once.
fn job_image(queue: &str, job: JobRecord<'_>) -> pb::JobImage {
    pb::JobImage {
        queue: queue.to_owned(),
        id: id_bytes(&job.id),
        kind: job.kind.to_owned(),
        payload: job.payload,
        headers: job.headers.clone(),
        priority: job.priority as u32,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        idempotency_key: job.idempotency_key.map(str::to_owned),
        ordering_key: job.ordering_key.map(|k| String::from(&**k)),
        state: state_to_pb(job.state) as i32,
        enqueued_at: job.enqueued_at,
        run_at: job.run_at,
        updated_at: job.updated_at,
        finished_at: job.finished_at,
        last_error: job.last_error.map(str::to_owned),
        result: job.result.cloned(),
        dead_letter_queue: job.dead_letter_queue.map(str::to_owned),
        origin: job.origin.map(str::to_owned),
    }
}

/// Rebuilds a job from its image; `None` if the id or state is malformed.
pub(crate) fn job_from_image(image: pb::JobImage) -> Option<Job> {
    let id = Uuid::from_slice(&image.id).ok()?;
    let state = state_from_pb(image.state)?;
    let mut job = Job::restored(id, image.kind, image.payload, image.headers);
    job.priority = image.priority.min(9) as u8;
    job.attempts = image.attempts;
    job.max_attempts = image.max_attempts.max(1);
    job.idempotency_key = image.idempotency_key;
    job.ordering_key = image.ordering_key.map(Arc::from);
    job.state = state;
    job.enqueued_at = image.enqueued_at;
    job.run_at = image.run_at;
    job.updated_at = image.updated_at;
    job.finished_at = image.finished_at;
    job.last_error = image.last_error;
    job.result = image.result;
    job.dead_letter_queue = image.dead_letter_queue;
    job.origin = image.origin;
    Some(job)
}

impl Batch {
    /// A batch that records nothing (memory storage).
    pub(crate) fn disabled() -> Self {
        Self { frame: None }
    }

    /// A batch that records.
    pub(crate) fn enabled() -> Self {
        Self {
            frame: Some(Vec::new()),
        }
    }

    /// Whether changes are recorded at all.
    pub(crate) fn is_enabled(&self) -> bool {
        self.frame.is_some()
    }

    /// The frame to append the next op to, its header's room made on the first; `None`
    /// when disabled.
    fn open_frame(&mut self) -> Option<&mut Vec<u8>> {
        let frame = self.frame.as_mut()?;
        if frame.is_empty() {
            frame.reserve(FRAME_HEADER + FIRST_OP_ROOM);
            frame.resize(FRAME_HEADER, 0);
        }
        Some(frame)
    }

    pub(super) fn push(&mut self, op: Kind) {
        if let Some(frame) = self.open_frame() {
            prost::encoding::message::encode(ENTRY_OPS, &pb::Op { op: Some(op) }, frame);
        }
    }

    /// A new job in `queue` (an enqueue, or a binding's copy of a published message), as
    /// [`Queue::enqueue_recorded`] hands it over.
    pub(crate) fn new_job(&mut self, queue: &str, job: JobRecord<'_>) {
        if let Some(frame) = self.open_frame() {
            direct::push_job(frame, queue, &job);
        }
    }

    /// The state of job `seq` of queue `q` (named `queue`) after a change. The job's
    /// record is built only when this batch is logged: settlements in memory mode would
    /// otherwise build and drop one per job.
    pub(crate) fn job_state_of(&mut self, queue: &str, q: &Queue, seq: u64) {
        if self.is_enabled()
            && let Some(update) = q.job_update(seq)
        {
            self.job_update(queue, update);
        }
    }

    /// A job's state after an ack, nack, expiry, cancel or purge.
    pub(crate) fn job_state(&mut self, queue: &str, job: &Job) {
        if self.is_enabled() {
            self.job_update(queue, JobUpdate::from(job));
        }
    }

    fn job_update(&mut self, queue: &str, update: JobUpdate) {
        if let Some(frame) = self.open_frame() {
            direct::push_job_update(frame, queue, &update);
        }
    }

    /// A dead job on its way to its dead-letter queue. Recorded with the death, under the
    /// source queue's lock, so the copy is never lost even if the broker stops before it
    /// is routed.
    pub(crate) fn dead_letter(&mut self, letter: &DeadLetter) {
        if self.is_enabled() {
            self.push(Kind::Transfer(pb::Transfer {
                target: letter.target.clone(),
                id: id_bytes(&letter.job_id),
                kind: letter.kind.clone(),
                payload: letter.payload.clone(),
                headers: letter.headers.clone(),
                priority: letter.priority as u32,
                origin: Some(letter.origin.clone()),
            }));
        }
    }

    /// A dead job taken out of `from` and put back into its original queue.
    pub(crate) fn redriven(&mut self, from: &str, job: &Redriven) {
        if self.is_enabled() {
            self.job_removed(from, &job.job_id);
            self.push(Kind::Transfer(pb::Transfer {
                target: job.target.clone(),
                id: id_bytes(&job.job_id),
                kind: job.kind.clone(),
                payload: job.payload.clone(),
                headers: job.headers.clone(),
                priority: job.priority as u32,
                origin: None,
            }));
        }
    }

    /// Job `id` taken out of `queue` without a trace (a delete, or the first half of a
    /// redrive).
    pub(crate) fn job_removed(&mut self, queue: &str, id: &Uuid) {
        if self.is_enabled() {
            self.push(Kind::JobRemove(pb::JobRemove {
                queue: queue.to_owned(),
                id: id_bytes(id),
            }));
        }
    }

    /// A queue's policy and pause state (create or update).
    pub(crate) fn queue_def(&mut self, name: &str, policy: &QueuePolicy, paused: bool) {
        if self.is_enabled() {
            self.push(Kind::QueueDef(pb::QueueDef {
                name: name.to_owned(),
                policy: Some(policy_to_pb(policy)),
                paused,
            }));
        }
    }

    /// A queue deleted.
    pub(crate) fn queue_delete(&mut self, name: &str) {
        self.push(Kind::QueueDelete(pb::QueueDelete {
            name: name.to_owned(),
        }));
    }

    /// A queue paused or resumed.
    pub(crate) fn queue_paused(&mut self, name: &str, paused: bool) {
        self.push(Kind::QueuePaused(pb::QueuePaused {
            name: name.to_owned(),
            paused,
        }));
    }

    /// A topic created or its retention changed.
    pub(crate) fn topic_def(&mut self, name: &str, retention: Retention) {
        self.push(Kind::TopicDef(pb::TopicDef {
            name: name.to_owned(),
            max_messages: retention.max_messages,
            max_bytes: retention.max_bytes,
            max_age_ms: retention.max_age_ms,
            next_seq: 0,
        }));
    }

    /// A topic deleted.
    pub(crate) fn topic_delete(&mut self, name: &str) {
        self.push(Kind::TopicDelete(pb::TopicDelete {
            name: name.to_owned(),
        }));
    }

    /// Messages appended to `topic`, with the idempotency key each was published with.
    pub(crate) fn published(
        &mut self,
        topic: &str,
        block: &MessageBlock,
        keys: Vec<Option<String>>,
    ) {
        if self.is_enabled() {
            let messages = block
                .messages()
                .zip(keys.into_iter().chain(std::iter::repeat(None)))
                .map(|(m, key)| message_to_pb(m, key))
                .collect();
            self.push(Kind::Publish(pb::Publish {
                topic: topic.to_owned(),
                messages,
            }));
        }
    }

    /// Finishes the batch as one framed [`pb::Entry`]; `None` if it holds nothing.
    pub(crate) fn into_frame(self, at: Millis) -> Option<Vec<u8>> {
        let mut out = self.frame.filter(|f| !f.is_empty())?;
        if at != 0 {
            prost::encoding::uint64::encode(ENTRY_AT, &at, &mut out);
        }
        let len = ((out.len() - FRAME_HEADER) as u32).to_le_bytes();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &out[FRAME_HEADER..]);
        out[..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&len);
        out[8..12].copy_from_slice(&crc.to_le_bytes());
        Some(out)
    }
}

fn message_to_pb(m: MessageRef<'_>, idempotency_key: Option<String>) -> pb::Message {
    pb::Message {
        sequence: m.sequence,
        key: m.entry.key().to_owned(),
        headers: m.entry.headers().cloned().unwrap_or_default(),
        payload: m.entry.payload.clone(),
        publish_time: m.publish_time,
        idempotency_key,
    }
}

/// Everything a snapshot holds, captured under the journal's exclusive gate.
#[derive(Debug, Default)]
pub(crate) struct SnapshotState {
    pub(crate) queues: Vec<SnapshotQueue>,
    pub(crate) topics: Vec<SnapshotTopic>,
    /// Recurring schedules, with their progress.
    pub(crate) schedules: Vec<Schedule>,
    /// Every target's kept schema revisions.
    pub(crate) schemas: Vec<(SchemaTarget, SchemaHistory)>,
}

/// One queue's state for a snapshot.
#[derive(Debug)]
pub(crate) struct SnapshotQueue {
    pub name: String,
    pub policy: QueuePolicy,
    pub paused: bool,
    /// Live jobs in enqueue order.
    pub live: Vec<Job>,
    /// Finished jobs, oldest first.
    pub history: Vec<Job>,
    pub dedup: Vec<(String, Uuid, Millis)>,
}

/// One topic's state for a snapshot.
#[derive(Debug)]
pub(crate) struct SnapshotTopic {
    pub name: String,
    pub retention: Retention,
    pub next_seq: u64,
    /// Retained messages, as runs of their blocks.
    pub messages: Vec<BlockSlice>,
    pub dedup: Vec<(String, u64, Millis)>,
}

/// Most ops per snapshot entry, so no frame grows large.
const SNAPSHOT_OPS_PER_ENTRY: usize = 256;

/// The framed content of a snapshot file (header included): a begin marker, the state
/// in entries of bounded size, an end marker with the entry count.
pub(crate) fn snapshot_frames(base: u64, state: SnapshotState, now: Millis) -> Vec<u8> {
    let SnapshotState {
        queues,
        topics,
        schedules,
        schemas,
    } = state;
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(FILE_MAGIC);
    let mut entries = 0u64;
    let mut flush = |out: &mut Vec<u8>, ops: &mut Vec<pb::Op>| {
        if !ops.is_empty() {
            let entry = pb::Entry {
                at: now,
                ops: std::mem::take(ops),
            };
            frame_into(out, &entry.encode_to_vec());
            entries += 1;
        }
    };
    let mut ops = vec![pb::Op {
        op: Some(Kind::SnapshotBegin(pb::SnapshotBegin {
            base_segment: base,
        })),
    }];
    let op = |k: Kind| pb::Op { op: Some(k) };
    for q in queues {
        ops.push(op(Kind::QueueDef(pb::QueueDef {
            name: q.name.clone(),
            policy: Some(policy_to_pb(&q.policy)),
            paused: q.paused,
        })));
        for job in q.live.iter().chain(&q.history) {
            ops.push(op(Kind::Job(job_image(&q.name, job.record()))));
            if ops.len() >= SNAPSHOT_OPS_PER_ENTRY {
                flush(&mut out, &mut ops);
            }
        }
        for (key, id, expires) in q.dedup {
            ops.push(op(Kind::DedupKey(pb::DedupKey {
                queue: q.name.clone(),
                key,
                id: id_bytes(&id),
                expires,
            })));
            if ops.len() >= SNAPSHOT_OPS_PER_ENTRY {
                flush(&mut out, &mut ops);
            }
        }
    }
    for s in &schedules {
        ops.push(op(super::schedule_record::schedule_def_op(s)));
        if ops.len() >= SNAPSHOT_OPS_PER_ENTRY {
            flush(&mut out, &mut ops);
        }
    }
    for t in topics {
        let def = |next_seq: u64| {
            op(Kind::TopicDef(pb::TopicDef {
                name: t.name.clone(),
                max_messages: t.retention.max_messages,
                max_bytes: t.retention.max_bytes,
                max_age_ms: t.retention.max_age_ms,
                next_seq,
            }))
        };
        ops.push(def(0));
        let mut messages = t.messages.iter().flat_map(|s| s.messages()).peekable();
        while messages.peek().is_some() {
            let chunk = messages
                .by_ref()
                .take(SNAPSHOT_OPS_PER_ENTRY)
                .map(|m| message_to_pb(m, None))
                .collect();
            ops.push(op(Kind::Publish(pb::Publish {
                topic: t.name.clone(),
                messages: chunk,
            })));
            flush(&mut out, &mut ops);
        }
        // After the messages: it only matters when every message was evicted.
        ops.push(def(t.next_seq));
        for (key, sequence, expires) in t.dedup {
            ops.push(op(Kind::TopicDedupKey(pb::TopicDedupKey {
                topic: t.name.clone(),
                key,
                sequence,
                expires,
            })));
            if ops.len() >= SNAPSHOT_OPS_PER_ENTRY {
                flush(&mut out, &mut ops);
            }
        }
    }
    ops.extend(schemas::snapshot_ops(&schemas).into_iter().map(op));
    flush(&mut out, &mut ops);
    let end = pb::Entry {
        at: now,
        ops: vec![op(Kind::SnapshotEnd(pb::SnapshotEnd { entries }))],
    };
    frame_into(&mut out, &end.encode_to_vec());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::domain::limits::Headers;

    #[test]
    fn frames_round_trip_and_damage_is_detected() {
        let mut data = Vec::new();
        frame_into(&mut data, b"hello");
        frame_into(&mut data, b"world!");
        let (p, next) = read_frame(&data, 0).unwrap();
        assert_eq!(p, b"hello");
        let (p, end) = read_frame(&data, next).unwrap();
        assert_eq!((p, end), (&b"world!"[..], data.len()));
        assert!(valid_frame_after(&data, 1));
        assert!(!valid_frame_after(&data, next + 1));

        let mut bad = data.clone();
        bad[FRAME_HEADER + 1] ^= 0x40;
        assert!(
            matches!(read_frame(&bad, 0), Err(FrameError::Corrupt(m)) if m.contains("checksum"))
        );
        assert_eq!(
            read_frame(&data[..next + 3], next),
            Err(FrameError::Truncated)
        );
        assert_eq!(
            read_frame(&data[..data.len() - 1], next),
            Err(FrameError::Truncated)
        );
    }

    #[test]
    fn every_record_state_maps_to_a_domain_state_and_back() {
        let records: Vec<pb::State> = (0..)
            .map_while(|value| pb::State::try_from(value).ok())
            .collect();
        assert_eq!(records.len(), JobState::ALL.len());
        for record in records {
            let state = state_from_pb(record as i32).expect("every record state is known");
            assert_eq!(state_to_pb(state), record);
        }
        let past_the_last = JobState::ALL.len() as i32;
        assert_eq!(state_from_pb(past_the_last), None);
    }

    #[test]
    fn policies_and_jobs_survive_encoding() {
        let mut policy = QueuePolicy::default_for("q");
        policy.backoff = Backoff::Schedule(vec![1, 5, 30]);
        policy.topic_bindings = vec!["user.*".into()];
        assert_eq!(policy_from_pb(policy_to_pb(&policy)), policy);
        policy.rate_limit = Some(RateLimit {
            per_second: 10,
            burst: 25,
        });
        policy.max_in_flight = Some(3);
        assert_eq!(policy_from_pb(policy_to_pb(&policy)), policy);
        // A record written before the limits existed has none.
        let old = pb::Policy {
            max_in_flight: 0,
            rate_per_second: 0,
            rate_burst: 0,
            ..policy_to_pb(&policy)
        };
        let loaded = policy_from_pb(old);
        assert_eq!((loaded.rate_limit, loaded.max_in_flight), (None, None));

        let mut job = Job::restored(
            Uuid::now_v7(),
            "email".into(),
            Bytes::from_static(b"body"),
            Headers::from([("a".into(), "b".into())]),
        );
        job.ordering_key = Some(Arc::from("k"));
        job.state = JobState::Retrying;
        job.attempts = 2;
        job.last_error = Some("boom".into());
        job.origin = Some("payments".into());
        let back = job_from_image(job_image("q", job.record())).unwrap();
        assert_eq!(back.origin.as_deref(), Some("payments"));
        assert_eq!(back.id, job.id);
        assert_eq!(back.payload, job.payload);
        assert_eq!(back.headers, job.headers);
        assert_eq!(back.ordering_key.as_deref(), Some("k"));
        assert_eq!(back.state, JobState::Retrying);
        assert_eq!(back.last_error.as_deref(), Some("boom"));
    }
}
