//! JSON encoding of stored documents, with the `format_version` check every reader applies.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The only document format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// A document stored in etcd under a `format_version`.
pub trait Document: Serialize + DeserializeOwned {
    /// What to call it in errors ("cluster data", "keeper info").
    const KIND: &'static str;

    /// Consistency checks beyond the JSON shape; a document failing them is not acted on.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Why stored bytes were not accepted as a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not JSON.
    #[error("{kind} is not valid JSON: {detail}")]
    NotJson {
        /// The document kind.
        kind: &'static str,
        /// The parser's message.
        detail: String,
    },
    /// `format_version` is missing or not one this build understands.
    #[error("{kind} has format_version {found}, this build reads only {FORMAT_VERSION}")]
    UnknownVersion {
        /// The document kind.
        kind: &'static str,
        /// What the document said, or "none".
        found: String,
    },
    /// The JSON does not have the document's shape.
    #[error("{kind} is malformed: {detail}")]
    Malformed {
        /// The document kind.
        kind: &'static str,
        /// The deserialiser's message.
        detail: String,
    },
    /// The document parsed but is inconsistent.
    #[error("{kind} is invalid: {detail}")]
    Invalid {
        /// The document kind.
        kind: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// Parses stored bytes, checking the format version before anything else.
pub fn decode<T: Document>(bytes: &[u8]) -> Result<T, DecodeError> {
    let kind = T::KIND;
    let value: Value = serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson {
        kind,
        detail: e.to_string(),
    })?;
    match value.get("format_version") {
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(FORMAT_VERSION)) => {}
        Some(other) => {
            return Err(DecodeError::UnknownVersion {
                kind,
                found: other.to_string(),
            });
        }
        None => {
            return Err(DecodeError::UnknownVersion {
                kind,
                found: "none".into(),
            });
        }
    }
    let doc: T = serde_json::from_value(value).map_err(|e| DecodeError::Malformed {
        kind,
        detail: e.to_string(),
    })?;
    doc.check()
        .map_err(|detail| DecodeError::Invalid { kind, detail })?;
    Ok(doc)
}

/// Compact JSON, as stored.
pub fn encode<T: Serialize>(doc: &T) -> Vec<u8> {
    // Serialising plain structs with string map keys cannot fail.
    serde_json::to_vec(doc).unwrap_or_default()
}

/// Indented JSON, for people.
pub fn encode_pretty<T: Serialize>(doc: &T) -> String {
    serde_json::to_string_pretty(doc).unwrap_or_default()
}

impl Document for crate::ClusterData {
    const KIND: &'static str = "cluster data";

    fn check(&self) -> Result<(), String> {
        self.spec.validate().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterData, ClusterSpec, KeeperInfo, ProxyInfo, SentinelInfo};
    use std::time::UNIX_EPOCH;

    #[test]
    fn rejects_garbage_without_panicking() {
        for bytes in [
            &b""[..],
            b"nul",
            b"\xff\xfe",
            b"[1,2",
            b"{\"format_version\":1",
        ] {
            let err = decode::<ClusterData>(bytes).unwrap_err();
            assert!(matches!(err, DecodeError::NotJson { .. }), "{err}");
        }
    }

    #[test]
    fn rejects_unknown_or_missing_format_version() {
        let err = decode::<ClusterData>(br#"{"uid":"x"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cluster data has format_version none, this build reads only 1"
        );
        let err = decode::<SentinelInfo>(br#"{"format_version":2,"uid":"s"}"#).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownVersion { ref found, .. } if found == "2"));
        let err = decode::<SentinelInfo>(br#"{"format_version":"1","uid":"s"}"#).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownVersion { .. }));
        let err = decode::<SentinelInfo>(br#"[1]"#).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownVersion { .. }));
    }

    #[test]
    fn rejects_wrong_shapes() {
        let err = decode::<ProxyInfo>(br#"{"format_version":1,"uid":5}"#).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
        let err = decode::<KeeperInfo>(br#"{"format_version":1}"#).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
    }

    #[test]
    fn rejects_cluster_data_with_an_invalid_spec() {
        let mut cd = ClusterData::new("u", ClusterSpec::default(), UNIX_EPOCH);
        cd.spec.max_standbys = 0;
        let err = decode::<ClusterData>(&encode(&cd)).unwrap_err();
        assert!(matches!(err, DecodeError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("max_standbys"), "{err}");
    }
}
