//! The state store: one trait with two backends of the same semantics.
//!
//! - [`etcd::EtcdStore`]: etcd v3 API (works with etcd 3.4).
//! - [`embedded::EmbeddedStore`]: a single-node file store for one-box sites.
//!
//! Semantics both give (see `tests/conformance.rs`):
//! - one global revision, bumped once per write transaction;
//! - get and prefix range reads;
//! - transactions whose compares look at mod-revision, version or absence;
//! - watch from a revision with no gap and no duplicate, and
//!   [`StoreError::Compacted`] when that revision was compacted away;
//!   events of one revision always arrive together in one [`WatchResponse`];
//! - leases with a TTL whose keys vanish when the lease expires.

#![warn(missing_docs)]

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

pub mod election;
pub mod embedded;
pub mod etcd;
pub mod record;
pub mod testing;

/// A lease identifier. Zero means "no lease".
pub type LeaseId = i64;

/// A key with its value and bookkeeping, as etcd reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value (empty in a delete event).
    pub value: Vec<u8>,
    /// Revision of the write that created this key (since its last deletion).
    pub create_revision: i64,
    /// Revision of the last write to this key.
    pub mod_revision: i64,
    /// Number of writes since creation (1 after the first put).
    pub version: i64,
    /// Lease the key is attached to, 0 for none.
    pub lease: LeaseId,
}

/// A condition of a transaction.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key's mod-revision equals the given one (0 means the key is absent).
    ModRevision(String, i64),
    /// The key's version equals the given one (0 means the key is absent).
    Version(String, i64),
    /// The key does not exist.
    Absent(String),
    /// The key exists.
    Exists(String),
}

/// One operation of a transaction.
#[derive(Clone, Debug)]
pub enum Op {
    /// Writes `value` at `key`, attached to `lease` (0 for none).
    Put {
        /// The key written.
        key: String,
        /// The new value.
        value: Vec<u8>,
        /// Lease the key is attached to, 0 for none.
        lease: LeaseId,
    },
    /// Deletes one key.
    Delete {
        /// The key deleted.
        key: String,
    },
    /// Deletes every key starting with `prefix`.
    DeletePrefix {
        /// The prefix; "" means every key.
        prefix: String,
    },
    /// Reads one key (seeing earlier writes of the same transaction).
    Get {
        /// The key read.
        key: String,
    },
}

impl Op {
    /// A put without a lease.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put { key: key.into(), value: value.into(), lease: 0 }
    }
    /// A put attached to a lease.
    pub fn put_with_lease(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: LeaseId) -> Op {
        Op::Put { key: key.into(), value: value.into(), lease }
    }
    /// A single-key delete.
    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }
    /// A delete of every key starting with `prefix` (all keys for "").
    pub fn delete_prefix(prefix: impl Into<String>) -> Op {
        Op::DeletePrefix { prefix: prefix.into() }
    }
    /// A single-key read inside a transaction.
    pub fn get(key: impl Into<String>) -> Op {
        Op::Get { key: key.into() }
    }
}

/// A compare-and-swap transaction: if every compare holds, run `success`, else `failure`.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    /// Conditions that must all hold for `success` to run.
    pub compares: Vec<Compare>,
    /// Operations run when every compare holds.
    pub success: Vec<Op>,
    /// Operations run otherwise.
    pub failure: Vec<Op>,
}

impl Txn {
    /// An empty transaction (no compares: it always succeeds).
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a condition.
    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }
    /// Adds an operation to run when the compares hold.
    pub fn and_then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }
    /// Adds an operation to run when a compare fails.
    pub fn or_else(mut self, op: Op) -> Self {
        self.failure.push(op);
        self
    }

    /// Checks what etcd refuses before running anything: empty keys, more than
    /// [`MAX_TXN_OPS`] compares or operations per branch, a key put twice or both
    /// put and deleted in one branch. Both backends call it, so both refuse alike.
    pub fn validate(&self) -> Result<()> {
        let most = self.compares.len().max(self.success.len()).max(self.failure.len());
        if most > MAX_TXN_OPS {
            return Err(StoreError::Invalid(format!("Too many operations in a transaction ({most} > {MAX_TXN_OPS})")));
        }
        for c in &self.compares {
            let (Compare::ModRevision(k, _) | Compare::Version(k, _) | Compare::Absent(k) | Compare::Exists(k)) = c;
            if k.is_empty() {
                return Err(StoreError::Invalid("Empty key in a compare".into()));
            }
        }
        for branch in [&self.success, &self.failure] {
            let mut puts = std::collections::HashSet::new();
            for op in branch {
                match op {
                    Op::Put { key, .. } => {
                        if key.is_empty() {
                            return Err(StoreError::Invalid("Empty key in a put".into()));
                        }
                        if !puts.insert(key.as_str()) {
                            return Err(StoreError::Invalid(format!("Key {key} is put twice in one transaction")));
                        }
                    }
                    Op::Delete { key } | Op::Get { key } if key.is_empty() => {
                        return Err(StoreError::Invalid("Empty key in a transaction".into()))
                    }
                    _ => {}
                }
            }
            for op in branch {
                let clash = match op {
                    Op::Delete { key } => puts.contains(key.as_str()),
                    Op::DeletePrefix { prefix } => puts.iter().any(|k| k.starts_with(prefix.as_str())),
                    _ => false,
                };
                if clash {
                    return Err(StoreError::Invalid("A key is put and deleted in one transaction".into()));
                }
            }
        }
        Ok(())
    }
}

/// Most compares, and most operations per branch, of one transaction
/// (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// The result of one operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// A put was done.
    Put,
    /// Number of keys deleted.
    Delete(i64),
    /// The key read, if it exists.
    Get(Option<KeyValue>),
}

/// What a transaction did.
#[derive(Clone, Debug)]
pub struct TxnResponse {
    /// Whether the compares held (and `success` ran).
    pub succeeded: bool,
    /// Store revision after the transaction.
    pub revision: i64,
    /// One result per operation of the branch that ran.
    pub results: Vec<OpResult>,
}

/// A prefix read and the revision it was taken at.
#[derive(Clone, Debug)]
pub struct RangeResponse {
    /// The keys found, sorted by key.
    pub kvs: Vec<KeyValue>,
    /// Store revision the read was taken at.
    pub revision: i64,
}

/// Kind of a watch event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A key was created or changed.
    Put,
    /// A key was deleted (also by lease expiry or revoke).
    Delete,
}

/// One change seen by a watch. For a delete, `kv.value` is empty and
/// `kv.mod_revision` is the revision of the delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The key after the change.
    pub kv: KeyValue,
}

/// All events of one or more whole revisions, in revision order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchResponse {
    /// The events, in revision order and, within a revision, in operation order.
    pub events: Vec<Event>,
}

/// A stream of watch responses; it ends only on error or when dropped.
pub type WatchStream = Pin<Box<dyn Stream<Item = std::result::Result<WatchResponse, StoreError>> + Send>>;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested revision is older than the compaction point.
    #[error("Revision {requested} was compacted; oldest available is {compacted}")]
    Compacted {
        /// The revision asked for.
        requested: i64,
        /// The oldest revision still available (0 if the backend cannot tell).
        compacted: i64,
    },
    /// The lease does not exist (never granted, expired or revoked).
    #[error("Lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    /// The store cannot be reached or failed to write; the request may be retried.
    #[error("Store unavailable: {0}")]
    Unavailable(String),
    /// The request is malformed and would never succeed.
    #[error("Invalid request to the store: {0}")]
    Invalid(String),
    /// Stored data could not be decoded.
    #[error("Corrupt record at {key}: {reason}")]
    Corrupt {
        /// Where the bad data is.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Shorthand for store results.
pub type Result<T> = std::result::Result<T, StoreError>;

/// The state store. Cheap to clone behind an `Arc`; all methods are safe to call concurrently.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Reads every key starting with `prefix`, sorted by key.
    async fn range(&self, prefix: &str) -> Result<RangeResponse>;
    /// Runs a transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse>;
    /// Streams changes to keys under `prefix` from `start_revision` (inclusive) on.
    /// `start_revision` 0 means "from the next write".
    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream>;
    /// Creates a lease that expires `ttl_secs` seconds from now unless kept alive.
    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId>;
    /// Renews a lease to its full TTL; returns the TTL.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<i64>;
    /// Ends a lease now, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<()>;
    /// Forgets history older than `revision`.
    async fn compact(&self, revision: i64) -> Result<()>;
    /// The current global revision.
    async fn revision(&self) -> Result<i64>;

    /// Unconditional put; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64> {
        Ok(self.txn(Txn::new().and_then(Op::put(key, value))).await?.revision)
    }
    /// Unconditional delete; returns whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool> {
        let r = self.txn(Txn::new().and_then(Op::delete(key))).await?;
        Ok(matches!(r.results.first(), Some(OpResult::Delete(n)) if *n > 0))
    }
}
