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
///
/// # Panics
/// If `T` does not serialize to a JSON object (a programming error in `T`, not
/// bad data); [`try_encode`] reports that as an error instead.
pub fn encode<T: Record>(value: &T) -> Vec<u8> {
    match try_encode(value) {
        Ok(bytes) => bytes,
        Err(e) => panic!("{e}"),
    }
}

/// Encodes a record as `{"v": VERSION, ...fields}`, refusing types that do not
/// serialize to a JSON object.
pub fn try_encode<T: Record>(value: &T) -> Result<Vec<u8>, StoreError> {
    let invalid = |reason: String| StoreError::Invalid(format!("Cannot encode a record: {reason}"));
    let mut v = serde_json::to_value(value).map_err(|e| invalid(e.to_string()))?;
    match &mut v {
        serde_json::Value::Object(map) => {
            map.insert("v".into(), T::VERSION.into());
        }
        _ => return Err(invalid("it is not a JSON object".into())),
    }
    serde_json::to_vec(&v).map_err(|e| invalid(e.to_string()))
}

/// Decodes a record, refusing versions outside `MIN_VERSION..=VERSION`.
pub fn decode<T: Record>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { key: key.into(), reason };
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let version = match v.get("v").and_then(|x| x.as_u64()) {
        Some(n) => n,
        None => return Err(corrupt("no schema version \"v\"".into())),
    };
    if version < u64::from(T::MIN_VERSION) || version > u64::from(T::VERSION) {
        return Err(corrupt(format!(
            "schema version {version} not supported (this build reads {}..={})",
            T::MIN_VERSION,
            T::VERSION
        )));
    }
    serde_json::from_value(v).map_err(|e| corrupt(e.to_string()))
}
