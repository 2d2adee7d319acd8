//! Transport-side encoding shortcuts. The gRPC server trait is generated from the same
//! proto with one difference: `Subscribe` streams [`EncodedSubscribeResponse`], whose
//! messages are protobuf bytes encoded once per retained message and shared by every
//! subscriber. On the wire it is exactly a `sluice.v1.SubscribeResponse`.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{
    DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len,
};
use prost::{DecodeError, Message};

use crate::pb;

#[allow(missing_docs, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/server/sluice.v1.rs"));
}

pub use generated::broker_server;

/// `SubscribeResponse.messages` field number.
const MESSAGES_TAG: u32 = 1;
/// `SubscribeResponse.gaps` field number.
const GAPS_TAG: u32 = 2;

/// A `sluice.v1.SubscribeResponse` whose messages are already encoded `sluice.v1.Message`s.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedSubscribeResponse {
    /// Each one an encoded `sluice.v1.Message`.
    pub messages: Vec<Bytes>,
    /// Gap notices.
    pub gaps: Vec<pb::Gap>,
}

impl Message for EncodedSubscribeResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for m in &self.messages {
            encode_key(MESSAGES_TAG, WireType::LengthDelimited, buf);
            encode_varint(m.len() as u64, buf);
            buf.put_slice(m);
        }
        for g in &self.gaps {
            prost::encoding::message::encode(GAPS_TAG, g, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            MESSAGES_TAG => {
                let mut m = Bytes::new();
                prost::encoding::bytes::merge(wire_type, &mut m, buf, ctx)?;
                self.messages.push(m);
                Ok(())
            }
            GAPS_TAG => {
                prost::encoding::message::merge_repeated(wire_type, &mut self.gaps, buf, ctx)
            }
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let messages: usize = self
            .messages
            .iter()
            .map(|m| key_len(MESSAGES_TAG) + encoded_len_varint(m.len() as u64) + m.len())
            .sum();
        messages + prost::encoding::message::encoded_len_repeated(GAPS_TAG, &self.gaps)
    }

    fn clear(&mut self) {
        self.messages.clear();
        self.gaps.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_subscribe_response_on_the_wire() {
        let message = pb::Message {
            topic: "t".into(),
            sequence: 7,
            key: "k".into(),
            headers: [("a".to_string(), "b".to_string())].into(),
            payload: Bytes::from_static(b"payload"),
            publish_time_unix_ms: 42,
        };
        let gap = pb::Gap {
            topic: "t".into(),
            first_missing: 1,
            next_available: 5,
        };
        let encoded = EncodedSubscribeResponse {
            messages: vec![Bytes::from(message.encode_to_vec()); 2],
            gaps: vec![gap.clone()],
        };
        let bytes = encoded.encode_to_vec();
        assert_eq!(bytes.len(), encoded.encoded_len());
        let decoded = pb::SubscribeResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.messages, vec![message.clone(), message]);
        assert_eq!(decoded.gaps, vec![gap]);
        assert_eq!(
            EncodedSubscribeResponse::decode(bytes.as_slice()).unwrap(),
            encoded
        );
    }
}
