//! On-disk encodings of the embedded store's rows.
//!
//! Every decoder checks lengths and returns [`StoreError::Corrupt`] on bad
//! bytes instead of panicking: a damaged file must not take the process down.

use crate::{Event, EventKind, KeyValue, StoreError};

/// Size of the fixed header of a key row: create, mod, version, lease.
const HEADER: usize = 32;

/// The stored state of one key (the key itself is the table key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Row {
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
    pub value: Vec<u8>,
}

impl Row {
    /// The public view of this row under `key`.
    pub fn to_kv(&self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

/// Encodes a key row: four little-endian i64 then the value.
pub(crate) fn encode_row(row: &Row) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + row.value.len());
    for n in [row.create_revision, row.mod_revision, row.version, row.lease] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&row.value);
    out
}

/// Decodes a key row written by [`encode_row`].
pub(crate) fn decode_row(key: &str, bytes: &[u8]) -> Result<Row, StoreError> {
    let mut r = Reader { key, bytes };
    Ok(Row {
        create_revision: r.i64()?,
        mod_revision: r.i64()?,
        version: r.i64()?,
        lease: r.i64()?,
        value: r.rest().to_vec(),
    })
}

/// Encodes the events of one revision as a history row.
pub(crate) fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        out.push(match e.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        write_bytes(&mut out, e.kv.key.as_bytes());
        for n in [e.kv.create_revision, e.kv.mod_revision, e.kv.version, e.kv.lease] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        write_bytes(&mut out, &e.kv.value);
    }
    out
}

/// Decodes a history row written by [`encode_events`]; `revision` names it in errors.
pub(crate) fn decode_events(revision: i64, bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
    let label = format!("history revision {revision}");
    let mut r = Reader { key: &label, bytes };
    let n = r.u32()? as usize;
    // Each event takes at least 41 bytes; refuse counts the row cannot hold.
    if n > bytes.len() / 41 {
        return Err(r.corrupt("event count larger than the row"));
    }
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = match r.u8()? {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            other => return Err(r.corrupt(&format!("unknown event kind {other}"))),
        };
        let key = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| r.corrupt("key is not UTF-8"))?;
        let create_revision = r.i64()?;
        let mod_revision = r.i64()?;
        let version = r.i64()?;
        let lease = r.i64()?;
        let value = r.bytes()?.to_vec();
        events.push(Event { kind, kv: KeyValue { key, value, create_revision, mod_revision, version, lease } });
    }
    if !r.bytes.is_empty() {
        return Err(r.corrupt("trailing bytes"));
    }
    Ok(events)
}

fn write_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A bounds-checked cursor over a row.
struct Reader<'a> {
    key: &'a str,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn corrupt(&self, reason: &str) -> StoreError {
        StoreError::Corrupt { key: self.key.to_owned(), reason: reason.to_owned() }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.bytes.len() < n {
            return Err(self.corrupt("row is truncated"));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self) -> Result<i64, StoreError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_round_trips() {
        let row = Row { create_revision: 2, mod_revision: 5, version: 3, lease: 77, value: b"hello".to_vec() };
        assert_eq!(decode_row("k", &encode_row(&row)).unwrap(), row);
    }

    #[test]
    fn truncated_row_is_corrupt_not_a_panic() {
        let bytes = encode_row(&Row { create_revision: 1, mod_revision: 1, version: 1, lease: 0, value: vec![] });
        for n in 0..bytes.len() {
            assert!(matches!(decode_row("k", &bytes[..n]), Err(StoreError::Corrupt { .. })));
        }
    }

    #[test]
    fn events_round_trip_and_damage_is_corrupt() {
        let events = vec![
            Event {
                kind: EventKind::Put,
                kv: KeyValue { key: "/a".into(), value: b"1".to_vec(), create_revision: 2, mod_revision: 3, version: 2, lease: 0 },
            },
            Event {
                kind: EventKind::Delete,
                kv: KeyValue { key: "/b".into(), value: vec![], create_revision: 0, mod_revision: 3, version: 0, lease: 0 },
            },
        ];
        let bytes = encode_events(&events);
        assert_eq!(decode_events(3, &bytes).unwrap(), events);
        for n in 0..bytes.len() {
            assert!(decode_events(3, &bytes[..n]).is_err(), "prefix of {n} bytes decoded");
        }
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert!(matches!(decode_events(3, &bad), Err(StoreError::Corrupt { .. })));
        let mut huge = bytes;
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_events(3, &huge), Err(StoreError::Corrupt { .. })));
    }
}
