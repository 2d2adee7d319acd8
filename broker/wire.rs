//! Transport-side encoding shortcuts. The gRPC server trait is generated from the same
//! proto with one difference: `Subscribe` streams [`EncodedSubscribeResponse`], which holds
//! the retained messages themselves and writes each one's cached protobuf entry. On the
//! wire it is exactly a `sluice.v1.SubscribeResponse`.
//!
//! A message is encoded once, by the first subscriber that sends it, and the bytes are
//! kept in [`StoredMessage::wire`] for every other subscriber. The cache holds the whole
//! `SubscribeResponse.messages` entry (field key, length, `sluice.v1.Message`), so writing
//! a response is one copy per message; and the messages of one response that were not
//! encoded yet are encoded together into one buffer, each cache a slice of it, so
//! encoding costs one allocation per response rather than a few per message.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::broker::limits::Headers;
use crate::broker::topic::StoredMessage;
use crate::pb;

#[allow(missing_docs, clippy::all)]
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
pub use enqueued::{EncodedEnqueueResponse, EncodedEnqueueStreamResponse};
pub use leased::{EncodedConsumeResponse, EncodedLeaseResponse};
pub use received::{ReceivedAck, ReceivedConsumeRequest};

/// `SubscribeResponse.messages` field number.
const MESSAGES_TAG: u32 = 1;
/// `SubscribeResponse.gaps` field number.
const GAPS_TAG: u32 = 2;

/// `sluice.v1.Message` field numbers.
mod field {
    pub const TOPIC: u32 = 1;
    pub const SEQUENCE: u32 = 2;
    pub const KEY: u32 = 3;
    pub const HEADERS: u32 = 4;
    pub const PAYLOAD: u32 = 5;
    pub const PUBLISH_TIME: u32 = 6;
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

/// Length of `m` encoded as a `sluice.v1.Message` (proto3: default values left out, as
/// prost does).
fn message_len(m: &StoredMessage) -> usize {
    let mut len = 0;
    if !m.topic.is_empty() {
        len += delimited_len(field::TOPIC, m.topic.len());
    }
    len += uint64_len(field::SEQUENCE, m.sequence);
    if !m.key.is_empty() {
        len += delimited_len(field::KEY, m.key.len());
    }
    if !m.headers.is_empty() {
        len += headers_len(field::HEADERS, &m.headers);
    }
    if !m.payload.is_empty() {
        len += delimited_len(field::PAYLOAD, m.payload.len());
    }
    len + uint64_len(field::PUBLISH_TIME, m.publish_time)
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

/// Writes `m` as one `SubscribeResponse.messages` entry straight from the stored fields
/// (no intermediate `pb::Message`, whose topic and headers would be copied first).
fn put_entry(m: &StoredMessage, buf: &mut impl BufMut) {
    encode_key(MESSAGES_TAG, WireType::LengthDelimited, buf);
    encode_varint(message_len(m) as u64, buf);
    if !m.topic.is_empty() {
        put_delimited(field::TOPIC, m.topic.as_bytes(), buf);
    }
    put_uint64(field::SEQUENCE, m.sequence, buf);
    if !m.key.is_empty() {
        put_delimited(field::KEY, m.key.as_bytes(), buf);
    }
    put_headers(field::HEADERS, &m.headers, buf);
    if !m.payload.is_empty() {
        put_delimited(field::PAYLOAD, &m.payload, buf);
    }
    put_uint64(field::PUBLISH_TIME, m.publish_time, buf);
}

fn entry_len(m: &StoredMessage) -> usize {
    delimited_len(MESSAGES_TAG, message_len(m))
}

/// Fills the wire cache of every message that has none, all of them in one buffer.
/// Another subscriber may fill some of the same caches meanwhile; its bytes are equal, and
/// whichever lands first is kept.
pub fn encode_missing(messages: &[Arc<StoredMessage>]) {
    let mut pending = Vec::new();
    let mut total = 0;
    for m in messages.iter().filter(|m| m.wire.get().is_none()) {
        let len = entry_len(m);
        total += len;
        pending.push((m, len));
    }
    if pending.is_empty() {
        return;
    }
    let mut buf = BytesMut::with_capacity(total);
    for (m, _) in &pending {
        put_entry(m, &mut buf);
    }
    debug_assert_eq!(buf.len(), total);
    let buf = buf.freeze();
    let mut start = 0;
    for (m, len) in pending {
        let _ = m.wire.set(buf.slice(start..start + len));
        start += len;
    }
}

/// The message's cached entry, encoded alone if no batch encoded it first.
fn entry(m: &StoredMessage) -> &Bytes {
    m.wire.get_or_init(|| {
        let mut buf = BytesMut::with_capacity(entry_len(m));
        put_entry(m, &mut buf);
        buf.freeze()
    })
}

/// A `sluice.v1.SubscribeResponse` made of retained messages (written from their wire
/// caches) and gap notices. Encode-only: the server never decodes it.
#[derive(Debug, Clone, Default)]
pub struct EncodedSubscribeResponse {
    /// The messages, in delivery order.
    pub messages: Vec<Arc<StoredMessage>>,
    /// Gap notices.
    pub gaps: Vec<pb::Gap>,
}

impl EncodedSubscribeResponse {
    /// A response of these messages and gaps, encoding the messages not encoded yet.
    pub fn new(messages: Vec<Arc<StoredMessage>>, gaps: Vec<pb::Gap>) -> Self {
        encode_missing(&messages);
        Self { messages, gaps }
    }
}

impl EncodedSubscribeResponse {
    fn put(&self, buf: &mut impl BufMut) {
        for m in &self.messages {
            buf.put_slice(entry(m));
        }
        for g in &self.gaps {
            prost::encoding::message::encode(GAPS_TAG, g, buf);
        }
    }

    fn wire_len(&self) -> usize {
        let messages: usize = self.messages.iter().map(|m| entry(m).len()).sum();
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
    use prost::Message;
    use std::sync::OnceLock;

    fn stored(sequence: u64, headers: &[(&str, &str)], key: &str) -> Arc<StoredMessage> {
        Arc::new(StoredMessage {
            topic: Arc::from("t"),
            sequence,
            key: key.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            payload: Bytes::from_static(b"payload"),
            publish_time: 42,
            wire: OnceLock::new(),
        })
    }

    fn as_pb(m: &StoredMessage) -> pb::Message {
        pb::Message {
            topic: m.topic.to_string(),
            sequence: m.sequence,
            key: m.key.clone(),
            headers: m.headers.clone(),
            payload: m.payload.clone(),
            publish_time_unix_ms: m.publish_time,
        }
    }

    #[test]
    fn is_a_subscribe_response_on_the_wire() {
        let messages = vec![
            stored(7, &[("a", "b")], "k"),
            stored(8, &[], ""),
            stored(9, &[("x", "1"), ("y", "2")], "key"),
        ];
        // One cache is filled alone first (another subscriber got there before).
        let _ = entry(&messages[1]);
        let gap = pb::Gap {
            topic: "t".into(),
            first_missing: 1,
            next_available: 5,
        };
        let encoded = EncodedSubscribeResponse::new(messages.clone(), vec![gap.clone()]);
        assert!(messages.iter().all(|m| m.wire.get().is_some()));
        let bytes = encoded.encode_to_vec();
        assert_eq!(bytes.len(), encoded.encoded_len());
        let decoded = pb::SubscribeResponse::decode(bytes.as_slice()).unwrap();
        let expected: Vec<pb::Message> = messages.iter().map(|m| as_pb(m)).collect();
        assert_eq!(decoded.messages, expected);
        assert_eq!(decoded.gaps, vec![gap]);
        // Each cached entry is exactly what prost writes for the same message.
        for (m, pb_message) in messages.iter().zip(&expected) {
            let mut alone = Vec::new();
            prost::encoding::message::encode(MESSAGES_TAG, pb_message, &mut alone);
            assert_eq!(m.wire.get().unwrap().len(), alone.len());
        }
    }

    #[test]
    fn cached_entries_are_reused_by_later_responses() {
        let messages = vec![stored(1, &[], ""), stored(2, &[], "")];
        let first = EncodedSubscribeResponse::new(messages.clone(), vec![]).encode_to_vec();
        let cached = messages[0].wire.get().unwrap().as_ptr();
        let second = EncodedSubscribeResponse::new(messages.clone(), vec![]).encode_to_vec();
        assert_eq!(first, second);
        assert_eq!(messages[0].wire.get().unwrap().as_ptr(), cached);
    }
}
