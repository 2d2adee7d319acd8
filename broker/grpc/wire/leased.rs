//! `LeaseResponse` and `ConsumeResponse` written straight from the queue's deliveries.
//!
//! Leasing is the hot path of a work queue. Going through `pb::LeasedJob` would allocate
//! five strings per job (id, lease id, queue, kind, ordering key) only to copy them into
//! the HTTP/2 buffer; here the id and lease id are formatted into the buffer itself, and
//! the other fields are copied from the delivery's shared strings.

use std::sync::Arc;

use bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use super::{
    delimited_len, headers_len, put_delimited, put_headers, put_uint64, put_uuid, uint64_len,
    uuid_len,
};
use crate::broker::domain::queue::Delivery;
use crate::pb;

/// `LeaseResponse.jobs` and `ConsumeResponse.jobs` field number.
const JOBS_TAG: u32 = 1;
/// `ConsumeResponse.errors` field number.
const ERRORS_TAG: u32 = 2;

/// `sluice.v1.LeasedJob` field numbers.
mod field {
    pub(super) const JOB_ID: u32 = 1;
    pub(super) const LEASE_ID: u32 = 2;
    pub(super) const QUEUE: u32 = 3;
    pub(super) const KIND: u32 = 4;
    pub(super) const PAYLOAD: u32 = 5;
    pub(super) const HEADERS: u32 = 6;
    pub(super) const PRIORITY: u32 = 7;
    pub(super) const ATTEMPT: u32 = 8;
    pub(super) const MAX_ATTEMPTS: u32 = 9;
    pub(super) const ENQUEUED_AT: u32 = 10;
    pub(super) const LEASE_DEADLINE: u32 = 11;
    pub(super) const ORDERING_KEY: u32 = 12;
}

fn decimal_digits(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

fn hex_digits(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).div_ceil(4).max(1)
}

/// Length of the lease id `<queue>/<seq>/<nonce hex>` (see `LeaseId`'s `Display`).
fn lease_id_len(d: &Delivery) -> usize {
    let l = &d.lease_id;
    l.queue.len() + 1 + decimal_digits(l.seq) + 1 + hex_digits(l.nonce)
}

fn put_lease_id(d: &Delivery, buf: &mut impl BufMut) {
    let l = &d.lease_id;
    buf.put_slice(l.queue.as_bytes());
    buf.put_u8(b'/');
    let mut digits = [0u8; 20];
    let n = decimal_digits(l.seq);
    let mut v = l.seq;
    for d in digits[..n].iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    buf.put_slice(&digits[..n]);
    buf.put_u8(b'/');
    let n = hex_digits(l.nonce);
    for i in (0..n).rev() {
        buf.put_u8(b"0123456789abcdef"[((l.nonce >> (4 * i)) & 0xf) as usize]);
    }
}

/// Length of `d` encoded as a `sluice.v1.LeasedJob` of `queue` (proto3: default values
/// left out, as prost does).
fn job_len(queue: &str, d: &Delivery) -> usize {
    let mut len = uuid_len(field::JOB_ID) + delimited_len(field::LEASE_ID, lease_id_len(d));
    let strings = [
        (field::QUEUE, queue.len()),
        (field::KIND, d.kind.len()),
        (field::PAYLOAD, d.payload.len()),
        (
            field::ORDERING_KEY,
            d.ordering_key.as_deref().map_or(0, str::len),
        ),
    ];
    for (tag, n) in strings {
        if n > 0 {
            len += delimited_len(tag, n);
        }
    }
    if !d.headers.is_empty() {
        len += headers_len(field::HEADERS, &d.headers);
    }
    len + uint64_len(field::PRIORITY, d.priority.into())
        + uint64_len(field::ATTEMPT, d.attempt.into())
        + uint64_len(field::MAX_ATTEMPTS, d.max_attempts.into())
        + uint64_len(field::ENQUEUED_AT, d.enqueued_at)
        + uint64_len(field::LEASE_DEADLINE, d.deadline)
}

fn put_job(queue: &str, d: &Delivery, buf: &mut impl BufMut) {
    encode_key(JOBS_TAG, WireType::LengthDelimited, buf);
    encode_varint(job_len(queue, d) as u64, buf);
    put_uuid(field::JOB_ID, &d.job_id, buf);
    encode_key(field::LEASE_ID, WireType::LengthDelimited, buf);
    encode_varint(lease_id_len(d) as u64, buf);
    put_lease_id(d, buf);
    if !queue.is_empty() {
        put_delimited(field::QUEUE, queue.as_bytes(), buf);
    }
    if !d.kind.is_empty() {
        put_delimited(field::KIND, d.kind.as_bytes(), buf);
    }
    if !d.payload.is_empty() {
        put_delimited(field::PAYLOAD, &d.payload, buf);
    }
    put_headers(field::HEADERS, &d.headers, buf);
    put_uint64(field::PRIORITY, d.priority.into(), buf);
    put_uint64(field::ATTEMPT, d.attempt.into(), buf);
    put_uint64(field::MAX_ATTEMPTS, d.max_attempts.into(), buf);
    put_uint64(field::ENQUEUED_AT, d.enqueued_at, buf);
    put_uint64(field::LEASE_DEADLINE, d.deadline, buf);
    if let Some(key) = d.ordering_key.as_deref().filter(|k| !k.is_empty()) {
        put_delimited(field::ORDERING_KEY, key.as_bytes(), buf);
    }
}

fn jobs_len(queue: &str, jobs: &[Delivery]) -> usize {
    jobs.iter()
        .map(|d| {
            let len = job_len(queue, d);
            prost::encoding::key_len(JOBS_TAG) + encoded_len_varint(len as u64) + len
        })
        .sum()
}

/// A `sluice.v1.LeaseResponse`: the leased jobs of one queue. Encode-only.
#[derive(Debug, Clone, Default)]
pub struct EncodedLeaseResponse {
    /// The queue the jobs were leased from.
    pub queue: Arc<str>,
    /// The deliveries.
    pub jobs: Vec<Delivery>,
}

impl EncodedLeaseResponse {
    fn put(&self, buf: &mut impl BufMut) {
        for d in &self.jobs {
            put_job(&self.queue, d, buf);
        }
    }

    fn wire_len(&self) -> usize {
        jobs_len(&self.queue, &self.jobs)
    }
}

encode_only!(
    EncodedLeaseResponse,
    decoded_as = "pb::LeaseResponse",
    clears = [jobs]
);

/// A `sluice.v1.ConsumeResponse`: newly leased jobs of the stream's queue and refused
/// settlements. Encode-only.
#[derive(Debug, Clone, Default)]
pub struct EncodedConsumeResponse {
    /// The stream's queue.
    pub queue: Arc<str>,
    /// The deliveries.
    pub jobs: Vec<Delivery>,
    /// Refused settlements.
    pub errors: Vec<pb::SettleError>,
}

impl EncodedConsumeResponse {
    fn put(&self, buf: &mut impl BufMut) {
        for d in &self.jobs {
            put_job(&self.queue, d, buf);
        }
        for e in &self.errors {
            prost::encoding::message::encode(ERRORS_TAG, e, buf);
        }
    }

    fn wire_len(&self) -> usize {
        jobs_len(&self.queue, &self.jobs)
            + prost::encoding::message::encoded_len_repeated(ERRORS_TAG, &self.errors)
    }
}

encode_only!(
    EncodedConsumeResponse,
    decoded_as = "pb::ConsumeResponse",
    clears = [jobs, errors]
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::domain::queue::LeaseId;
    use bytes::Bytes;
    use prost::Message;

    fn delivery(seq: u64, nonce: u64, headers: &[(&str, &str)], key: Option<&str>) -> Delivery {
        Delivery {
            job_id: uuid::Uuid::now_v7(),
            lease_id: LeaseId {
                queue: Arc::from("emails"),
                seq,
                nonce,
            },
            kind: Arc::from("welcome"),
            payload: Bytes::from_static(b"{\"to\":\"a@b\"}"),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            priority: 3,
            attempt: 1,
            max_attempts: 5,
            enqueued_at: 1_700_000_000_000,
            deadline: 1_700_000_030_000,
            ordering_key: key.map(Arc::from),
        }
    }

    fn as_pb(queue: &str, d: &Delivery) -> pb::LeasedJob {
        pb::LeasedJob {
            job_id: d.job_id.to_string(),
            lease_id: d.lease_id.to_string(),
            queue: queue.to_owned(),
            kind: d.kind.to_string(),
            payload: d.payload.clone(),
            headers: d.headers.clone(),
            priority: d.priority.into(),
            attempt: d.attempt,
            max_attempts: d.max_attempts,
            enqueued_at_unix_ms: d.enqueued_at,
            lease_deadline_unix_ms: d.deadline,
            ordering_key: d.ordering_key.as_deref().unwrap_or("").to_owned(),
        }
    }

    #[test]
    fn leased_jobs_are_what_prost_would_write() {
        let mut bare = delivery(0, 1, &[], None);
        bare.kind = Arc::from("");
        bare.payload = Bytes::new();
        bare.priority = 0;
        let jobs = vec![
            delivery(1, 0xdead_beef, &[("trace", "abc")], Some("user-1")),
            delivery(u64::MAX, u64::MAX, &[], None),
            delivery(10, 0xf, &[("a", "1"), ("b", "2")], Some("")),
            bare,
        ];
        let expected: Vec<pb::LeasedJob> = jobs.iter().map(|d| as_pb("emails", d)).collect();

        let lease = EncodedLeaseResponse {
            queue: Arc::from("emails"),
            jobs: jobs.clone(),
        };
        let bytes = lease.encode_to_vec();
        assert_eq!(bytes.len(), lease.encoded_len());
        let decoded = pb::LeaseResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.jobs, expected);
        // Byte for byte, apart from map entry order (a map with one entry has one order).
        let single = EncodedLeaseResponse {
            queue: Arc::from("emails"),
            jobs: jobs[..2].to_vec(),
        };
        let prost_bytes = pb::LeaseResponse {
            jobs: expected[..2].to_vec(),
        }
        .encode_to_vec();
        assert_eq!(single.encode_to_vec(), prost_bytes);

        let error = pb::SettleError {
            lease_id: "x/1/1".into(),
            code: 9,
            message: "stale".into(),
        };
        let consume = EncodedConsumeResponse {
            queue: Arc::from("emails"),
            jobs,
            errors: vec![error.clone()],
        };
        let bytes = consume.encode_to_vec();
        assert_eq!(bytes.len(), consume.encoded_len());
        let decoded = pb::ConsumeResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.jobs, expected);
        assert_eq!(decoded.errors, vec![error]);
    }

    #[test]
    fn digit_counts() {
        for v in [0, 1, 9, 10, 99, 100, u64::MAX] {
            assert_eq!(decimal_digits(v), v.to_string().len());
            assert_eq!(hex_digits(v), format!("{v:x}").len());
        }
    }
}
