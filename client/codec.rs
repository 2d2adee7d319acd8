//! Payload codecs: how typed values become message and job payloads.

use bytes::Bytes;

use crate::client::error::ClientError;

/// Header naming the payload encoding.
pub const CONTENT_TYPE: &str = "content-type";

/// Encodes and decodes payloads of type `T`.
pub trait Codec<T>: Send + Sync + 'static {
    /// The `content-type` header value written with encoded payloads.
    fn content_type(&self) -> &'static str;
    /// Encodes a value.
    fn encode(&self, value: &T) -> Result<Bytes, ClientError>;
    /// Decodes a payload; `context` names it in errors.
    fn decode(&self, payload: &Bytes, context: &str) -> Result<T, ClientError>;
}

/// JSON through serde (`application/json`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T: serde::Serialize + serde::de::DeserializeOwned> Codec<T> for Json {
    fn content_type(&self) -> &'static str {
        "application/json"
    }

    fn encode(&self, value: &T) -> Result<Bytes, ClientError> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| ClientError::Encode(e.to_string()))
    }

    fn decode(&self, payload: &Bytes, context: &str) -> Result<T, ClientError> {
        serde_json::from_slice(payload).map_err(|e| ClientError::Decode {
            context: context.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// Protocol Buffers through prost (`application/protobuf`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Protobuf;

impl<T: prost::Message + Default> Codec<T> for Protobuf {
    fn content_type(&self) -> &'static str {
        "application/protobuf"
    }

    fn encode(&self, value: &T) -> Result<Bytes, ClientError> {
        Ok(Bytes::from(value.encode_to_vec()))
    }

    fn decode(&self, payload: &Bytes, context: &str) -> Result<T, ClientError> {
        T::decode(payload.clone()).map_err(|e| ClientError::Decode {
            context: context.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// Raw bytes, unchanged (`application/octet-stream`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec<Bytes> for Raw {
    fn content_type(&self) -> &'static str {
        "application/octet-stream"
    }

    fn encode(&self, value: &Bytes) -> Result<Bytes, ClientError> {
        Ok(value.clone())
    }

    fn decode(&self, payload: &Bytes, _context: &str) -> Result<Bytes, ClientError> {
        Ok(payload.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Event {
        id: u32,
    }

    #[test]
    fn json_round_trips_and_names_the_context_on_error() {
        let bytes = Codec::<Event>::encode(&Json, &Event { id: 7 }).unwrap();
        assert_eq!(&bytes[..], br#"{"id":7}"#);
        let back: Event = Json.decode(&bytes, "t#1").unwrap();
        assert_eq!(back, Event { id: 7 });
        let err = Codec::<Event>::decode(&Json, &Bytes::from_static(b"nope"), "t#2").unwrap_err();
        assert!(err.to_string().contains("t#2"), "{err}");
    }

    #[test]
    fn protobuf_round_trips() {
        let value = crate::pb::Gap {
            topic: "t".into(),
            first_missing: 1,
            next_available: 5,
        };
        let bytes = Protobuf.encode(&value).unwrap();
        let back: crate::pb::Gap = Protobuf.decode(&bytes, "x").unwrap();
        assert_eq!(back, value);
    }
}
