//! Reading and writing wire messages.
//!
//! Readers accept MessagePack (the default, and what `Content-Type` absent
//! means) or JSON; writers always produce MessagePack maps with named fields.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Content type of a message body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// `application/msgpack` (also `application/x-msgpack`, or no header).
    MsgPack,
    /// `application/json`.
    Json,
}

impl ContentType {
    /// MIME type written in the `Content-Type` header.
    pub const MSGPACK_MIME: &'static str = "application/msgpack";
    /// MIME type of JSON.
    pub const JSON_MIME: &'static str = "application/json";

    /// Parses a `Content-Type` header value; `None` (header absent) is MessagePack.
    pub fn from_header(value: Option<&str>) -> Result<Self, DecodeError> {
        let Some(value) = value else { return Ok(ContentType::MsgPack) };
        let mime = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match mime.as_str() {
            "" | "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
                Ok(ContentType::MsgPack)
            }
            "application/json" => Ok(ContentType::Json),
            _ => Err(DecodeError(format!(
                "unsupported Content-Type `{value}`: send application/msgpack or application/json"
            ))),
        }
    }
}

/// A body that could not be read as the expected message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Decodes a message body according to its `Content-Type` header value.
pub fn decode<T: DeserializeOwned>(content_type: Option<&str>, body: &[u8]) -> Result<T, DecodeError> {
    match ContentType::from_header(content_type)? {
        ContentType::MsgPack => {
            rmp_serde::from_slice(body).map_err(|e| DecodeError(format!("invalid MessagePack message: {e}")))
        }
        ContentType::Json => {
            serde_json::from_slice(body).map_err(|e| DecodeError(format!("invalid JSON message: {e}")))
        }
    }
}

/// Encodes a message as MessagePack with named fields.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own types to a Vec cannot fail: no I/O, string keys only.
    rmp_serde::to_vec_named(value).expect("wire types always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InferRequest, Input};

    fn request() -> InferRequest {
        InferRequest {
            v: 1,
            id: "01J0000000000000000000000A".into(),
            model: "echo".into(),
            adapter: None,
            input: Input::Completion { prompt: "hello".into() },
            params: Default::default(),
            stream: false,
            cache: Default::default(),
            tenant: None,
            metadata: Default::default(),
        }
    }

    #[test]
    fn msgpack_is_a_map_with_names() {
        let bytes = encode(&request());
        // fixmap marker, then the first key "v"
        assert_eq!(bytes[0] & 0xf0, 0x80);
        let back: InferRequest = decode(None, &bytes).unwrap();
        assert_eq!(back, request());
    }

    #[test]
    fn json_is_accepted_by_content_type() {
        let json = serde_json::to_vec(&request()).unwrap();
        let back: InferRequest = decode(Some("application/json; charset=utf-8"), &json).unwrap();
        assert_eq!(back, request());
        // JSON sent as msgpack is an error, not a panic
        assert!(decode::<InferRequest>(None, &json).is_err());
    }

    #[test]
    fn unknown_content_type_says_what_to_send() {
        let err = decode::<InferRequest>(Some("text/plain"), b"hi").unwrap_err();
        assert!(err.0.contains("application/msgpack"), "{err}");
    }

    #[test]
    fn wrong_shapes_are_errors() {
        for body in [&b""[..], b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1v\x01"] {
            assert!(decode::<InferRequest>(None, body).is_err());
        }
        let missing = br#"{"id":"a","input":{"type":"completion","prompt":"x"}}"#;
        let err = decode::<InferRequest>(Some("application/json"), missing).unwrap_err();
        assert!(err.0.contains("model"), "{err}");
        let typo = br#"{"id":"a","model":"m","input":{"type":"completion","prompt":"x"},"params":{"max_token":3}}"#;
        let err = decode::<InferRequest>(Some("application/json"), typo).unwrap_err();
        assert!(err.0.contains("max_token"), "{err}");
    }
}
