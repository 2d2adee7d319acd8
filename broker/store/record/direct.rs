//! The two records written once per job (a new job's image, a job's state after a
//! settlement), encoded straight from the broker's state into the batch's frame.
//!
//! Building their `pb` messages first would allocate (the queue's and the kind's names,
//! the id, a copy of the headers) only to encode and drop them: at batch 100 that was
//! about a tenth of the durable broker's CPU. These functions write the fields prost
//! writes for [`pb::JobImage`] and [`pb::JobUpdate`] (defaults left out, optional fields
//! present when set), so the log reads back with the generated messages unchanged; the
//! tests decode what they write and compare it with prost's own encoding.
//!
//! [`pb::JobImage`]: super::pb::JobImage
//! [`pb::JobUpdate`]: super::pb::JobUpdate

use prost::encoding::{WireType, encode_varint, encoded_len_varint, key_len};

use crate::broker::domain::limits::Headers;
use crate::broker::domain::queue::{JobRecord, JobUpdate};

use super::{ENTRY_OPS, state_to_pb};

/// `Op.job`.
const OP_JOB: u32 = 4;
/// `Op.job_update`.
const OP_JOB_UPDATE: u32 = 5;

/// Where fields go: the frame, or a count of the bytes they take (a nested message's
/// length comes before it).
trait Sink {
    fn put(&mut self, bytes: &[u8]);
    fn varint(&mut self, value: u64);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    fn varint(&mut self, value: u64) {
        encode_varint(value, self);
    }
}

/// Counts instead of writing.
struct Len(usize);

impl Sink for Len {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }

    fn varint(&mut self, value: u64) {
        self.0 += encoded_len_varint(value);
    }
}

fn key(s: &mut impl Sink, tag: u32, wire: WireType) {
    s.varint(u64::from(tag << 3 | wire as u32));
}

/// A proto3 integer field: left out when 0, as prost does.
fn uint(s: &mut impl Sink, tag: u32, value: u64) {
    if value != 0 {
        opt_uint(s, tag, Some(value));
    }
}

/// An `optional` integer field: present whenever set, 0 included.
fn opt_uint(s: &mut impl Sink, tag: u32, value: Option<u64>) {
    if let Some(value) = value {
        key(s, tag, WireType::Varint);
        s.varint(value);
    }
}

/// A proto3 string or bytes field: left out when empty.
fn bytes(s: &mut impl Sink, tag: u32, value: &[u8]) {
    if !value.is_empty() {
        opt_bytes(s, tag, Some(value));
    }
}

/// An `optional` string or bytes field: present whenever set, empty included.
fn opt_bytes(s: &mut impl Sink, tag: u32, value: Option<&[u8]>) {
    if let Some(value) = value {
        key(s, tag, WireType::LengthDelimited);
        s.varint(value.len() as u64);
        s.put(value);
    }
}

/// A `map<string, string>` field: one entry message (key 1, value 2) per pair.
fn headers(s: &mut impl Sink, tag: u32, headers: &Headers) {
    for (k, v) in headers {
        let mut len = Len(0);
        bytes(&mut len, 1, k.as_bytes());
        bytes(&mut len, 2, v.as_bytes());
        key(s, tag, WireType::LengthDelimited);
        s.varint(len.0 as u64);
        bytes(s, 1, k.as_bytes());
        bytes(s, 2, v.as_bytes());
    }
}

/// The fields of `JobImage` (see `wal.proto`).
fn job_image(s: &mut impl Sink, queue: &str, job: &JobRecord<'_>) {
    bytes(s, 1, queue.as_bytes());
    bytes(s, 2, job.id.as_bytes());
    bytes(s, 3, job.kind.as_bytes());
    bytes(s, 4, &job.payload);
    headers(s, 5, job.headers);
    uint(s, 6, u64::from(job.priority));
    uint(s, 7, u64::from(job.attempts));
    uint(s, 8, u64::from(job.max_attempts));
    opt_bytes(s, 9, job.idempotency_key.map(str::as_bytes));
    opt_bytes(s, 10, job.ordering_key.map(|k| k.as_bytes()));
    uint(s, 11, state_to_pb(job.state) as u64);
    uint(s, 12, job.enqueued_at);
    uint(s, 13, job.run_at);
    uint(s, 14, job.updated_at);
    opt_uint(s, 15, job.finished_at);
    opt_bytes(s, 16, job.last_error.map(str::as_bytes));
    opt_bytes(s, 17, job.result.map(|r| &r[..]));
    opt_bytes(s, 18, job.dead_letter_queue.map(str::as_bytes));
    opt_bytes(s, 19, job.origin.map(str::as_bytes));
}

/// The fields of `JobUpdate` (see `wal.proto`).
fn job_update(s: &mut impl Sink, queue: &str, update: &JobUpdate) {
    bytes(s, 1, queue.as_bytes());
    bytes(s, 2, update.id.as_bytes());
    uint(s, 3, state_to_pb(update.state) as u64);
    uint(s, 4, u64::from(update.attempts));
    uint(s, 5, update.run_at);
    opt_bytes(s, 6, update.last_error.as_deref().map(str::as_bytes));
    opt_bytes(s, 7, update.result.as_deref());
    opt_bytes(s, 8, update.dead_letter_queue.as_deref().map(str::as_bytes));
}

/// Appends one `Entry.ops` element whose oneof is field `kind`, a message of `len` bytes
/// that `write` writes.
fn op(out: &mut Vec<u8>, kind: u32, len: usize, write: impl FnOnce(&mut Vec<u8>)) {
    let op_len = key_len(kind) + encoded_len_varint(len as u64) + len;
    out.reserve(key_len(ENTRY_OPS) + encoded_len_varint(op_len as u64) + op_len);
    key(out, ENTRY_OPS, WireType::LengthDelimited);
    out.varint(op_len as u64);
    key(out, kind, WireType::LengthDelimited);
    out.varint(len as u64);
    write(out);
}

/// Appends `Op { job: JobImage }` for a new job of `queue`.
pub(super) fn push_job(out: &mut Vec<u8>, queue: &str, job: &JobRecord<'_>) {
    let mut len = Len(0);
    job_image(&mut len, queue, job);
    op(out, OP_JOB, len.0, |out| job_image(out, queue, job));
}

/// Appends `Op { job_update: JobUpdate }` for a job of `queue`.
pub(super) fn push_job_update(out: &mut Vec<u8>, queue: &str, update: &JobUpdate) {
    let mut len = Len(0);
    job_update(&mut len, queue, update);
    op(out, OP_JOB_UPDATE, len.0, |out| {
        job_update(out, queue, update)
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use prost::Message as _;
    use uuid::Uuid;

    use super::super::{Batch, FRAME_HEADER, Kind, job_image, pb, read_frame, state_to_pb};
    use crate::broker::domain::limits::Headers;
    use crate::broker::domain::queue::{Job, JobState, JobUpdate};

    /// Jobs covering every field set and unset, empty values that are set, and every
    /// state.
    fn jobs() -> Vec<Job> {
        let mut jobs = Vec::new();
        for (i, state) in JobState::ALL.into_iter().enumerate() {
            let headers: Headers = (0..i)
                .map(|h| (format!("h{h}"), "v".repeat(h)))
                .chain((i == 3).then(|| (String::new(), "empty key".into())))
                .collect();
            let payload = Bytes::from(vec![i as u8; i * 100]);
            let kind = if i == 2 {
                String::new()
            } else {
                format!("kind{i}")
            };
            let mut job = Job::restored(Uuid::now_v7(), kind, payload, headers);
            job.state = state;
            job.priority = (i % 10) as u8;
            job.attempts = i as u32;
            job.max_attempts = 1 + i as u32 * 1000;
            job.enqueued_at = (i as u64) << 40;
            job.run_at = i as u64 * 7;
            job.updated_at = u64::MAX - i as u64;
            if i % 2 == 1 {
                job.idempotency_key = Some(if i == 1 { String::new() } else { "idem".into() });
                job.ordering_key = Some(Arc::from("order"));
                job.finished_at = Some(0);
                job.last_error = Some(String::new());
                job.result = Some(Bytes::new());
                job.dead_letter_queue = Some("dlq".into());
                job.origin = Some("from".into());
            } else if i > 0 {
                job.finished_at = Some(i as u64);
                job.last_error = Some("boom ".repeat(i * 40));
                job.result = Some(Bytes::from_static(b"result"));
            }
            jobs.push(job);
        }
        jobs
    }

    fn update_pb(queue: &str, u: JobUpdate) -> pb::JobUpdate {
        pb::JobUpdate {
            queue: queue.to_owned(),
            id: Bytes::copy_from_slice(u.id.as_bytes()),
            state: state_to_pb(u.state) as i32,
            attempts: u.attempts,
            run_at: u.run_at,
            last_error: u.last_error,
            result: u.result,
            dead_letter_queue: u.dead_letter_queue,
        }
    }

    #[test]
    fn direct_records_are_the_bytes_prost_writes_and_read_back_the_same() {
        for (queue, at) in [
            ("q", 0),
            ("", 1),
            ("a-much-longer-queue-name.with.dots", u64::MAX),
        ] {
            let jobs = jobs();
            let mut batch = Batch::enabled();
            let mut expected = Vec::new();
            for job in &jobs {
                batch.new_job(queue, job.record());
                batch.job_state(queue, job);
                expected.push(pb::Op {
                    op: Some(Kind::Job(job_image(queue, job.record()))),
                });
                expected.push(pb::Op {
                    op: Some(Kind::JobUpdate(update_pb(queue, JobUpdate::from(job)))),
                });
            }
            let frame = batch.into_frame(at).expect("the batch holds ops");
            let (payload, end) = read_frame(&frame, 0).expect("a valid frame");
            assert_eq!(end, frame.len());

            let entry = pb::Entry::decode(payload).expect("an Entry");
            let prost = pb::Entry { at, ops: expected };
            assert_eq!(entry, prost, "queue {queue:?}");

            // Byte for byte as prost writes the ops (`at`, field 1, is written last here).
            let ops = pb::Entry { at: 0, ..prost }.encode_to_vec();
            assert_eq!(&frame[FRAME_HEADER..FRAME_HEADER + ops.len()], &ops[..]);
        }
    }

    #[test]
    fn a_batch_with_no_ops_has_no_frame() {
        assert_eq!(Batch::enabled().into_frame(5), None);
        assert_eq!(Batch::disabled().into_frame(5), None);
        let mut disabled = Batch::disabled();
        let job = &jobs()[1];
        disabled.new_job("q", job.record());
        disabled.job_state("q", job);
        assert_eq!(disabled.into_frame(5), None);
    }
}
