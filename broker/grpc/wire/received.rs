//! `ConsumeRequest` as the server decodes it.
//!
//! A Consume stream acks every job it receives, so a `String` per acked lease id was one
//! allocation and copy per job. Here the lease id is decoded as `bytes`, which protobuf
//! writes exactly as a `string` (both are length-delimited), so it stays a slice of the
//! received buffer; it is checked as UTF-8 when parsed.

use bytes::Bytes;

use crate::pb;

/// A `sluice.v1.ConsumeRequest`. Field for field the generated `pb::ConsumeRequest`,
/// except that acks are [`ReceivedAck`]s.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReceivedConsumeRequest {
    /// First request only: the queue to consume.
    #[prost(string, tag = "1")]
    pub queue: String,
    /// First request only: the worker's name.
    #[prost(string, tag = "2")]
    pub consumer: String,
    /// First request only: lease duration.
    #[prost(uint64, tag = "3")]
    pub visibility_timeout_ms: u64,
    /// More credit.
    #[prost(uint32, tag = "4")]
    pub credits: u32,
    /// Jobs done.
    #[prost(message, repeated, tag = "5")]
    pub acks: Vec<ReceivedAck>,
    /// Jobs failed.
    #[prost(message, repeated, tag = "6")]
    pub nacks: Vec<pb::NackRequest>,
    /// Leases to extend.
    #[prost(message, repeated, tag = "7")]
    pub extends: Vec<pb::ExtendLeaseRequest>,
    /// Stop pushing jobs.
    #[prost(bool, tag = "8")]
    pub stop: bool,
}

/// A `sluice.v1.LeaseAck` whose lease id is kept as received.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReceivedAck {
    /// The lease id's UTF-8 bytes (a `string` on the wire).
    #[prost(bytes = "bytes", tag = "1")]
    pub lease_id: Bytes,
    /// Optional result.
    #[prost(bytes = "bytes", tag = "2")]
    pub result: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn decodes_what_a_client_encodes() {
        let sent = pb::ConsumeRequest {
            queue: "emails".into(),
            consumer: "w1".into(),
            visibility_timeout_ms: 30_000,
            credits: 7,
            acks: vec![
                pb::LeaseAck {
                    lease_id: "emails/12/ff".into(),
                    result: Bytes::from_static(b"ok"),
                },
                pb::LeaseAck {
                    lease_id: "emails/13/1".into(),
                    result: Bytes::new(),
                },
            ],
            nacks: vec![pb::NackRequest {
                lease_id: "emails/14/2".into(),
                error: "boom".into(),
                retry_delay_ms: 5,
                dead_letter: true,
            }],
            extends: vec![pb::ExtendLeaseRequest {
                lease_id: "emails/15/3".into(),
                visibility_timeout_ms: 1_000,
            }],
            stop: true,
        };
        let bytes = Bytes::from(sent.encode_to_vec());
        let received = ReceivedConsumeRequest::decode(bytes.clone()).unwrap();
        assert_eq!(received.queue, sent.queue);
        assert_eq!(received.consumer, sent.consumer);
        assert_eq!(received.visibility_timeout_ms, sent.visibility_timeout_ms);
        assert_eq!(received.credits, sent.credits);
        let acks: Vec<(&[u8], &[u8])> = received
            .acks
            .iter()
            .map(|a| (&a.lease_id[..], &a.result[..]))
            .collect();
        assert_eq!(
            acks,
            vec![
                (&b"emails/12/ff"[..], &b"ok"[..]),
                (&b"emails/13/1"[..], &b""[..])
            ]
        );
        assert_eq!(received.nacks, sent.nacks);
        assert_eq!(received.extends, sent.extends);
        assert!(received.stop);
        // Decoded from `Bytes`, a lease id is a view into the received buffer.
        let start = bytes.as_ptr() as usize;
        let id = received.acks[0].lease_id.as_ptr() as usize;
        assert!(id >= start && id < start + bytes.len());
        // And the same bytes read back as the generated request.
        assert_eq!(
            pb::ConsumeRequest::decode(received.encode_to_vec().as_slice()).unwrap(),
            sent
        );
    }
}
