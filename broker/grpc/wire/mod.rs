//! Transport-side encoding shortcuts. The gRPC server trait is generated from the same
//! proto with one difference: `Subscribe` streams [`EncodedSubscribeResponse`], which holds
//! the retained messages themselves and writes each one's cached protobuf entry. On the
//! wire it is exactly a `sluice.v1.SubscribeResponse`.
//!
//! A block of messages (one publish) is encoded once, by the first subscriber that sends
//! any of it, and the bytes are kept in [`MessageBlock::wire`] for every other subscriber.
//! The cache holds each message's whole `SubscribeResponse.messages` entry (field key,
//! length, `sluice.v1.Message`) one after another in one buffer, so any run of a block's
//! messages is one contiguous slice: writing a response costs one copy per block it
//! touches, and encoding costs one allocation per block rather than a few per message.

use bytes::{BufMut, Bytes};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::broker::domain::limits::Headers;
use crate::broker::domain::topic::{BlockSlice, EncodedBlock, MessageBlock, MessageRef};
use crate::pb;

#[allow(missing_docs, unreachable_pub, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/server/sluice.v1.rs"));
}

pub use generated::broker_server;

/// Implements `prost::Message` for a response type that is only ever encoded, from its
/// inherent `put(&self, buf)` and `wire_len(&self)`; `clear` empties the listed fields.
/// Decoding skips every field: a decoder of the same wire format is the `pb` type named.
macro_rules! encode_only {
    ($ty:ty, decoded_as = $pb:literal, clears = [$($field:ident),*]) => {
        impl prost::Message for $ty {
            fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
                self.put(buf)
            }

            #[doc = concat!("Never decoded: the decoder of this wire format is `", $pb, "`.")]
            fn merge_field(
                &mut self,
                tag: u32,
                wire_type: prost::encoding::WireType,
                buf: &mut impl bytes::Buf,
                ctx: prost::encoding::DecodeContext,
            ) -> Result<(), prost::DecodeError> {
                prost::encoding::skip_field(wire_type, tag, buf, ctx)
            }

            fn encoded_len(&self) -> usize {
                self.wire_len()
            }

            fn clear(&mut self) {
                $(self.$field = Default::default();)*
            }
        }
    };
}

mod enqueued;
mod leased;
mod received;
pub(crate) use enqueued::{EncodedEnqueueResponse, EncodedEnqueueStreamResponse};
pub(crate) use leased::{EncodedConsumeResponse, EncodedLeaseResponse};
pub(crate) use received::ReceivedConsumeRequest;

/// `SubscribeResponse.messages` field number.
const MESSAGES_TAG: u32 = 1;
/// `SubscribeResponse.gaps` field number.
const GAPS_TAG: u32 = 2;

/// `sluice.v1.Message` field numbers.
mod field {
    pub(super) const TOPIC: u32 = 1;
    pub(super) const SEQUENCE: u32 = 2;
    pub(super) const KEY: u32 = 3;
    pub(super) const HEADERS: u32 = 4;
    pub(super) const PAYLOAD: u32 = 5;
    pub(super) const PUBLISH_TIME: u32 = 6;
}

/// Length of a length-delimited field holding `len` bytes.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Length of a `uint64` field (0 when it holds the default and is left out).
fn uint64_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(v)
    }
}

/// Length of a `map<string, string>` field (0 when empty and left out).
fn headers_len(tag: u32, headers: &Headers) -> usize {
    prost::encoding::hash_map::encoded_len(
        prost::encoding::string::encoded_len,
        prost::encoding::string::encoded_len,
        tag,
        headers,
    )
}

/// Writes a `map<string, string>` field (nothing when empty).
fn put_headers(tag: u32, headers: &Headers, buf: &mut impl BufMut) {
    prost::encoding::hash_map::encode(
        prost::encoding::string::encode,
        prost::encoding::string::encoded_len,
        prost::encoding::string::encode,
        prost::encoding::string::encoded_len,
        tag,
        headers,
        buf,
    );
}

/// Length of a hyphenated UUID.
const UUID_LEN: usize = 36;

/// Length of a `string` field holding a hyphenated UUID.
fn uuid_len(tag: u32) -> usize {
    delimited_len(tag, UUID_LEN)
}

/// Writes a UUID as a hyphenated `string` field, formatted into `buf` itself.
fn put_uuid(tag: u32, id: &uuid::Uuid, buf: &mut impl BufMut) {
    let mut text = uuid::Uuid::encode_buffer();
    put_delimited(tag, id.hyphenated().encode_lower(&mut text).as_bytes(), buf);
}

fn put_delimited(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.put_slice(bytes);
}

fn put_uint64(tag: u32, v: u64, buf: &mut impl BufMut) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

/// The fields every message of a block repeats (topic and publish time), encoded once per
/// block rather than once per message.
struct SharedFields {
    topic: Vec<u8>,
    publish_time: Vec<u8>,
}

impl SharedFields {
    fn of(block: &MessageBlock) -> Self {
        let mut topic = Vec::new();
        if !block.topic.is_empty() {
            put_delimited(field::TOPIC, block.topic.as_bytes(), &mut topic);
        }
        let mut publish_time = Vec::new();
        put_uint64(field::PUBLISH_TIME, block.publish_time, &mut publish_time);
        Self {
            topic,
            publish_time,
        }
    }

    /// Length of `m` encoded as a `sluice.v1.Message` (proto3: default values left out,
    /// as prost does).
    fn message_len(&self, m: MessageRef<'_>) -> usize {
        let entry = m.entry;
        let mut len = self.topic.len() + uint64_len(field::SEQUENCE, m.sequence);
        if !entry.key().is_empty() {
            len += delimited_len(field::KEY, entry.key().len());
        }
        if let Some(headers) = entry.headers() {
            len += headers_len(field::HEADERS, headers);
        }
        if !entry.payload.is_empty() {
            len += delimited_len(field::PAYLOAD, entry.payload.len());
        }
        len + self.publish_time.len()
    }

    /// Writes `m`, whose encoded length is `len`, as one `SubscribeResponse.messages`
    /// entry straight from the stored fields, in field-number order as prost does.
    fn put_entry(&self, m: MessageRef<'_>, len: usize, buf: &mut Vec<u8>) {
        encode_key(MESSAGES_TAG, WireType::LengthDelimited, buf);
        encode_varint(len as u64, buf);
        buf.extend_from_slice(&self.topic);
        put_uint64(field::SEQUENCE, m.sequence, buf);
        let entry = m.entry;
        if !entry.key().is_empty() {
            put_delimited(field::KEY, entry.key().as_bytes(), buf);
        }
        if let Some(headers) = entry.headers() {
            put_headers(field::HEADERS, headers, buf);
        }
        if !entry.payload.is_empty() {
            put_delimited(field::PAYLOAD, &entry.payload, buf);
        }
        buf.extend_from_slice(&self.publish_time);
    }
}

/// Encodes every message of `block` into one buffer.
fn encode_block(block: &MessageBlock) -> EncodedBlock {
    let shared = SharedFields::of(block);
    // `ends` first holds each message's length, computed once, then where its entry ends.
    let mut ends: Vec<usize> = block.messages().map(|m| shared.message_len(m)).collect();
    let total: usize = ends
        .iter()
        .map(|&len| delimited_len(MESSAGES_TAG, len))
        .sum();
    let mut buf = Vec::with_capacity(total);
    for (m, end) in block.messages().zip(ends.iter_mut()) {
        shared.put_entry(m, *end, &mut buf);
        *end = buf.len();
    }
    debug_assert_eq!(buf.len(), total);
    EncodedBlock {
        bytes: Bytes::from(buf),
        ends,
    }
}

/// The block's encoding, made now if no subscriber made it first. Two subscribers that
/// get here together both encode it (equal bytes, the first one kept) rather than one
/// blocking a runtime thread on the other.
fn encoded(block: &MessageBlock) -> &EncodedBlock {
    if let Some(done) = block.wire.get() {
        return done;
    }
    let _ = block.wire.set(encode_block(block));
    block
        .wire
        .get()
        .expect("set just above, by this caller or another")
}

/// A `sluice.v1.SubscribeResponse` made of runs of retained messages (written from their
/// blocks' wire caches) and gap notices. Encode-only: the server never decodes it.
#[derive(Debug, Clone, Default)]
pub struct EncodedSubscribeResponse {
    /// The messages, in delivery order.
    pub messages: Vec<BlockSlice>,
    /// Gap notices.
    pub gaps: Vec<pb::Gap>,
}

impl EncodedSubscribeResponse {
    /// A response of these messages and gaps, encoding the blocks not encoded yet.
    pub fn new(messages: Vec<BlockSlice>, gaps: Vec<pb::Gap>) -> Self {
        for slice in &messages {
            encoded(&slice.block);
        }
        Self { messages, gaps }
    }

    fn put(&self, buf: &mut impl BufMut) {
        for s in &self.messages {
            buf.put_slice(encoded(&s.block).run(s.start, s.end));
        }
        for g in &self.gaps {
            prost::encoding::message::encode(GAPS_TAG, g, buf);
        }
    }

    fn wire_len(&self) -> usize {
        let messages: usize = self
            .messages
            .iter()
            .map(|s| encoded(&s.block).run(s.start, s.end).len())
            .sum();
        messages + prost::encoding::message::encoded_len_repeated(GAPS_TAG, &self.gaps)
    }
}

encode_only!(
    EncodedSubscribeResponse,
    decoded_as = "pb::SubscribeResponse",
    clears = [messages, gaps]
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::domain::topic::BlockEntry;
    use prost::Message;
    use std::sync::Arc;

    fn entry(headers: &[(&str, &str)], key: &str) -> BlockEntry {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        BlockEntry::new(key.into(), headers, Bytes::from_static(b"payload"))
    }

    fn block(first_sequence: u64, entries: Vec<BlockEntry>) -> Arc<MessageBlock> {
        Arc::new(MessageBlock::new(
            Arc::from("t"),
            first_sequence,
            42,
            entries,
        ))
    }

    fn as_pb(m: MessageRef<'_>) -> pb::Message {
        pb::Message {
            topic: m.topic.to_string(),
            sequence: m.sequence,
            key: m.entry.key().to_owned(),
            headers: m.entry.headers().cloned().unwrap_or_default(),
            payload: m.entry.payload.clone(),
            publish_time_unix_ms: m.publish_time,
        }
    }

    fn slice(block: &Arc<MessageBlock>, start: usize, end: usize) -> BlockSlice {
        BlockSlice {
            block: block.clone(),
            start,
            end,
        }
    }

    #[test]
    fn is_a_subscribe_response_on_the_wire() {
        let first = block(
            7,
            vec![
                entry(&[("a", "b")], "k"),
                entry(&[], ""),
                entry(&[("x", "1"), ("y", "2")], "key"),
            ],
        );
        let second = block(10, vec![entry(&[], "z"), entry(&[("h", "v")], "")]);
        // The second block was encoded before (another subscriber got there first).
        encoded(&second);
        let gap = pb::Gap {
            topic: "t".into(),
            first_missing: 1,
            next_available: 5,
        };
        // A run from inside the first block, then the start of the second.
        let runs = vec![slice(&first, 1, 3), slice(&second, 0, 1)];
        let response = EncodedSubscribeResponse::new(runs.clone(), vec![gap.clone()]);
        assert!(first.wire.get().is_some());
        let bytes = response.encode_to_vec();
        assert_eq!(bytes.len(), response.encoded_len());
        let decoded = pb::SubscribeResponse::decode(bytes.as_slice()).unwrap();
        let expected: Vec<pb::Message> =
            runs.iter().flat_map(|s| s.messages().map(as_pb)).collect();
        assert_eq!(
            expected.iter().map(|m| m.sequence).collect::<Vec<_>>(),
            [8, 9, 10]
        );
        assert_eq!(decoded.messages, expected);
        assert_eq!(decoded.gaps, vec![gap]);
        // Each cached entry is exactly what prost writes for the same message.
        let cache = first.wire.get().unwrap();
        for (i, m) in first.messages().enumerate() {
            let mut alone = Vec::new();
            prost::encoding::message::encode(MESSAGES_TAG, &as_pb(m), &mut alone);
            assert_eq!(cache.run(i, i + 1), &alone[..]);
        }
    }

    #[test]
    fn cached_blocks_are_reused_by_later_responses() {
        let b = block(1, vec![entry(&[], ""), entry(&[], "")]);
        let first = EncodedSubscribeResponse::new(vec![slice(&b, 0, 2)], vec![]).encode_to_vec();
        let cached = b.wire.get().unwrap().bytes.as_ptr();
        let second = EncodedSubscribeResponse::new(vec![slice(&b, 0, 2)], vec![]).encode_to_vec();
        assert_eq!(first, second);
        assert_eq!(b.wire.get().unwrap().bytes.as_ptr(), cached);
    }
}
