//! Versioned records: every value in the store is JSON with a schema version `"v"`.
//!
//! A reader accepts the versions it knows and refuses newer ones with a clear
//! error, which is what lets a mixed-version fleet run during a rolling upgrade.

use serde::{de::DeserializeOwned, Serialize};

use crate::StoreError;

/// A type stored as a versioned record.
pub trait Record: Serialize + DeserializeOwned {
    /// Schema version written by this build.
    const VERSION: u32;
    /// Oldest schema version this build still reads.
    const MIN_VERSION: u32 = 1;
}

/// Encodes a record as `{"v": VERSION, ...fields}`.
pub fn encode<T: Record>(value: &T) -> Vec<u8> {
    let mut v = serde_json::to_value(value).expect("records serialize to JSON objects");
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("v".into(), T::VERSION.into());
    }
    serde_json::to_vec(&v).expect("JSON values serialize")
}

/// Decodes a record, refusing versions outside `MIN_VERSION..=VERSION`.
pub fn decode<T: Record>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { key: key.into(), reason: e.to_string() })?;
    let version = v.get("v").and_then(|x| x.as_u64()).unwrap_or(0) as u32;
    if version < T::MIN_VERSION || version > T::VERSION {
        return Err(StoreError::Corrupt {
            key: key.into(),
            reason: format!(
                "schema version {version} not supported (this build reads {}..={})",
                T::MIN_VERSION,
                T::VERSION
            ),
        });
    }
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt { key: key.into(), reason: e.to_string() })
}
