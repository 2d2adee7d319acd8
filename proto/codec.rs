//! The gRPC codec of every Sluice RPC, client and server: prost's wire format, with each
//! message's space in the output buffer reserved once before it is written.
//!
//! prost writes a message field by field, and tonic's output buffer grows by doubling,
//! copying what it already holds each time; a batch of a hundred jobs or messages
//! (tens of KiB) was copied two or three times on its way out. Reserving the encoded
//! length first makes that one allocation and no copy. Decoding is prost's as is.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{EncodeBuf, Encoder};

/// A [`tonic::codec::Codec`] for prost messages that reserves each message's encoded
/// length before writing it.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ReservingEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ReservingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// Encodes a prost message into space reserved for its whole length.
#[derive(Debug, Clone)]
pub struct ReservingEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for ReservingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        // What `Message::encode_to_vec` does after sizing its vector: `encode` would only
        // compute the length again to check room that was just reserved.
        item.encode_raw(buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Buf, Bytes, BytesMut};
    use http_body_util::BodyExt as _;
    use tonic::codec::{Codec as _, CompressionEncoding, EncodeBody};

    /// What the codec writes is what prost writes, framed as gRPC: the reserve changes
    /// where the bytes go, not what they are.
    #[tokio::test]
    async fn encodes_what_prost_encodes() {
        let request = crate::pb::PublishRequest {
            topic: "orders".into(),
            messages: (0..100u8)
                .map(|i| crate::pb::PublishMessage {
                    payload: Bytes::from(vec![i; 300]),
                    key: format!("k{i}"),
                    ..Default::default()
                })
                .collect(),
        };
        let mut codec = Codec::<crate::pb::PublishRequest, crate::pb::PublishRequest>::default();
        let source = futures::stream::iter([Ok(request.clone())]);
        let body =
            EncodeBody::new_client(codec.encoder(), source, None::<CompressionEncoding>, None);
        let mut framed = BytesMut::new();
        let mut body = std::pin::pin!(body);
        while let Some(frame) = body.frame().await {
            framed.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(framed.get_u8(), 0, "uncompressed");
        let len = framed.get_u32() as usize;
        assert_eq!(len, framed.len());
        assert_eq!(framed.as_ref(), request.encode_to_vec().as_slice());
    }
}
