//! `EnqueueResponse` written straight from the queue's results.
//!
//! Every enqueued job gets its id back as a hyphenated UUID. Going through
//! `pb::EnqueueResult` would allocate a `String` per job only to copy it into the HTTP/2
//! buffer; here the id is formatted into the buffer itself.

use bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use super::{put_uint64, put_uuid, uint64_len, uuid_len};
use crate::broker::domain::queue::Enqueued;
use crate::pb;

/// `EnqueueResponse.results` field number.
const RESULTS_TAG: u32 = 1;

/// `sluice.v1.EnqueueResult` field numbers.
mod field {
    pub(super) const JOB_ID: u32 = 1;
    pub(super) const DUPLICATE: u32 = 2;
}

/// Length of `r` encoded as a `sluice.v1.EnqueueResult`.
fn result_len(r: &Enqueued) -> usize {
    uuid_len(field::JOB_ID) + uint64_len(field::DUPLICATE, r.duplicate.into())
}

/// A `sluice.v1.EnqueueResponse`: one result per request job, in request order.
/// Encode-only.
#[derive(Debug, Clone, Default)]
pub struct EncodedEnqueueResponse {
    /// The results.
    pub results: Vec<Enqueued>,
}

impl EncodedEnqueueResponse {
    fn put(&self, buf: &mut impl BufMut) {
        Self::put_results(&self.results, buf)
    }

    fn wire_len(&self) -> usize {
        Self::results_len(&self.results)
    }

    fn put_results(results: &[Enqueued], buf: &mut impl BufMut) {
        for r in results {
            encode_key(RESULTS_TAG, WireType::LengthDelimited, buf);
            encode_varint(result_len(r) as u64, buf);
            put_uuid(field::JOB_ID, &r.id, buf);
            // A bool is a varint 1 on the wire, and left out when false.
            put_uint64(field::DUPLICATE, r.duplicate.into(), buf);
        }
    }

    fn results_len(results: &[Enqueued]) -> usize {
        results
            .iter()
            .map(|r| {
                let len = result_len(r);
                key_len(RESULTS_TAG) + encoded_len_varint(len as u64) + len
            })
            .sum()
    }
}

encode_only!(
    EncodedEnqueueResponse,
    decoded_as = "pb::EnqueueResponse",
    clears = [results]
);

/// `EnqueueStreamResponse.refused` field number (its `results` are those of
/// `EnqueueResponse`, under the same number).
const REFUSED_TAG: u32 = 2;

/// A `sluice.v1.EnqueueStreamResponse`: the results of one request, or why it was
/// refused. Encode-only.
#[derive(Debug, Clone, Default)]
pub struct EncodedEnqueueStreamResponse {
    /// The results (none when refused).
    pub results: Vec<Enqueued>,
    /// Why the request was refused.
    pub refused: Option<pb::Refusal>,
}

impl EncodedEnqueueStreamResponse {
    fn put(&self, buf: &mut impl BufMut) {
        EncodedEnqueueResponse::put_results(&self.results, buf);
        if let Some(refused) = &self.refused {
            prost::encoding::message::encode(REFUSED_TAG, refused, buf);
        }
    }

    fn wire_len(&self) -> usize {
        EncodedEnqueueResponse::results_len(&self.results)
            + self
                .refused
                .as_ref()
                .map_or(0, |r| prost::encoding::message::encoded_len(REFUSED_TAG, r))
    }
}

encode_only!(
    EncodedEnqueueStreamResponse,
    decoded_as = "pb::EnqueueStreamResponse",
    clears = [results, refused]
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use prost::Message;

    #[test]
    fn is_what_prost_would_write() {
        let results = vec![
            Enqueued {
                id: uuid::Uuid::now_v7(),
                duplicate: false,
            },
            Enqueued {
                id: uuid::Uuid::now_v7(),
                duplicate: true,
            },
        ];
        let encoded = EncodedEnqueueResponse {
            results: results.clone(),
        };
        let prost_bytes = pb::EnqueueResponse {
            results: results
                .iter()
                .map(|r| pb::EnqueueResult {
                    job_id: r.id.to_string(),
                    duplicate: r.duplicate,
                })
                .collect(),
        }
        .encode_to_vec();
        let bytes = encoded.encode_to_vec();
        assert_eq!(bytes.len(), encoded.encoded_len());
        assert_eq!(bytes, prost_bytes);
        assert!(EncodedEnqueueResponse::default().encode_to_vec().is_empty());

        let answered = EncodedEnqueueStreamResponse {
            results: results.clone(),
            refused: None,
        };
        assert_eq!(answered.encode_to_vec(), prost_bytes);
        let refusal = pb::Refusal {
            code: 3,
            message: "jobs[0].priority is 10, above the limit of 9".into(),
        };
        let refused = EncodedEnqueueStreamResponse {
            results: Vec::new(),
            refused: Some(refusal.clone()),
        };
        let bytes = refused.encode_to_vec();
        assert_eq!(bytes.len(), refused.encoded_len());
        let decoded = pb::EnqueueStreamResponse::decode(bytes.as_slice()).unwrap();
        assert!(decoded.results.is_empty());
        assert_eq!(decoded.refused, Some(refusal));
    }
}
