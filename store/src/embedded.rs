//! Embedded single-node store on a redb file, with etcd's semantics.
//!
//! Layout of the file (redb tables):
//! - `kv`: key -> row (create/mod revision, version, lease, value);
//! - `history`: revision -> every event of that revision, for watches;
//! - `meta`: the current revision and the compaction point;
//! - `leases`: lease id -> TTL; `lease_keys`: (lease, key) -> () to find a lease's keys.
//!
//! All writes go through one writer thread that takes every request waiting in
//! its queue, applies them in order to one redb write transaction (each write
//! transaction of the API gets its own revision) and commits once with an
//! fsync (group commit). Callers get their answer only after that commit, so a
//! returned write is durable. When the previous batch held several requests,
//! the writer waits up to [`COMMIT_WINDOW`] for as many to arrive before it
//! commits (measured: twice the rate with 16 concurrent writers; a lone writer
//! never waits). The same thread expires leases. Reads run on
//! redb read transactions (snapshots) in tokio's blocking pool.
//!
//! Watches subscribe to a broadcast of committed revisions before they read the
//! history table, then follow the broadcast, skipping revisions they already
//! sent and going back to the table whenever they see a gap (for instance after
//! lagging behind the broadcast). So no revision is lost or sent twice.

mod codec;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot};

use crate::{
    Compare, Event, EventKind, KeyValue, LeaseId, Op, OpResult, RangeResponse, Result, StoreError, Txn,
    TxnResponse, WatchResponse, WatchStream,
};
use codec::Row;

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const HISTORY: TableDefinition<i64, &[u8]> = TableDefinition::new("history");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
const LEASE_KEYS: TableDefinition<(i64, &str), ()> = TableDefinition::new("lease_keys");

const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// Most requests folded into one redb commit.
const MAX_BATCH: usize = 1024;
/// Most revisions a watch reads from the history table in one go.
const HISTORY_CHUNK: usize = 512;
/// Longest the writer waits for more requests once one arrived, when the
/// previous batch suggests others are about to come.
const COMMIT_WINDOW: Duration = Duration::from_micros(300);
/// How many committed revisions the live broadcast buffers per watcher.
const BROADCAST_CAPACITY: usize = 1024;
/// Longest the writer sleeps before it looks at lease deadlines again.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// How much history the embedded store keeps by default, in revisions.
pub const DEFAULT_HISTORY_REVISIONS: i64 = 100_000;
/// Automatic compaction runs when this many revisions beyond the retention piled up.
const AUTO_COMPACT_STEP: i64 = 1_000;

/// Options of [`EmbeddedStore::open_with`].
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// Keep the history of this many latest revisions for watches and compact
    /// older ones automatically (as etcd's `--auto-compaction-mode=revision`);
    /// `None` keeps everything until [`crate::Store::compact`] is called.
    pub history_revisions: Option<i64>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions { history_revisions: Some(DEFAULT_HISTORY_REVISIONS) }
    }
}

/// The embedded store: a single-node file store with the same semantics as etcd.
///
/// The file stays open (and locked) until the store is dropped.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

/// What readers and watches share with the writer thread.
struct Shared {
    db: Database,
    /// Last committed revision.
    revision: AtomicI64,
    /// Compaction point: history below it is gone.
    compacted: AtomicI64,
    /// Live leases and when they expire.
    leases: Mutex<HashMap<LeaseId, LeaseState>>,
    /// Committed revisions, in order, for live watches.
    events: broadcast::Sender<Arc<Committed>>,
}

struct Inner {
    shared: Arc<Shared>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue stops the writer after its current batch; joining it
        // releases the file before the drop returns, so the file can be reopened.
        self.requests.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct LeaseState {
    ttl: i64,
    deadline: Instant,
}

/// One committed revision and its events.
#[derive(Debug)]
struct Committed {
    revision: i64,
    events: Vec<Event>,
}

enum Request {
    Txn(Txn, oneshot::Sender<Result<TxnResponse>>),
    LeaseGrant(i64, oneshot::Sender<Result<LeaseId>>),
    LeaseRevoke(LeaseId, oneshot::Sender<Result<()>>),
    Compact(i64, oneshot::Sender<Result<()>>),
}

/// Maps any redb error to a store error.
fn db_err(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(reason) => StoreError::Corrupt { key: "(embedded store file)".into(), reason },
        other => StoreError::Unavailable(format!("Embedded store: {other}")),
    }
}

trait DbResult<T> {
    fn db(self) -> Result<T>;
}

impl<T, E: Into<redb::Error>> DbResult<T> for std::result::Result<T, E> {
    fn db(self) -> Result<T> {
        self.map_err(db_err)
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("Embedded store is shutting down".into())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file with [`EmbeddedOptions::default`]
    /// (history of the last [`DEFAULT_HISTORY_REVISIONS`] revisions).
    ///
    /// Leases found in the file get their full TTL again from now, as etcd does
    /// after a restart.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, EmbeddedOptions::default())
    }

    /// Opens (or creates) the store file with the given options.
    pub fn open_with(path: &Path, options: EmbeddedOptions) -> Result<Self> {
        if options.history_revisions.is_some_and(|n| n < 1) {
            return Err(StoreError::Invalid("history_revisions must be at least 1".into()));
        }
        let db = Database::create(path).db()?;
        let (revision, compacted, leases) = {
            let w = db.begin_write().db()?;
            let out;
            {
                let mut meta = w.open_table(META).db()?;
                w.open_table(KV).db()?;
                w.open_table(HISTORY).db()?;
                w.open_table(LEASE_KEYS).db()?;
                let leases = w.open_table(LEASES).db()?;
                let revision = match meta.get(META_REVISION).db()? {
                    Some(v) => v.value(),
                    None => 1,
                };
                meta.insert(META_REVISION, revision).db()?;
                let compacted = match meta.get(META_COMPACTED).db()? {
                    Some(v) => v.value(),
                    None => 0,
                };
                let now = Instant::now();
                let mut map = HashMap::new();
                for row in leases.iter().db()? {
                    let (id, ttl) = row.db()?;
                    let ttl = ttl.value();
                    map.insert(id.value(), LeaseState { ttl, deadline: now + Duration::from_secs(ttl.max(1) as u64) });
                }
                out = (revision, compacted, map);
            }
            w.commit().db()?;
            out
        };
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let shared = Arc::new(Shared {
            db,
            revision: AtomicI64::new(revision),
            compacted: AtomicI64::new(compacted),
            leases: Mutex::new(leases),
            events,
        });
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || Writer { shared: writer_shared, retention: options.history_revisions }.run(rx))
            .map_err(|e| StoreError::Unavailable(format!("Cannot start the embedded store's writer: {e}")))?;
        Ok(EmbeddedStore { inner: Arc::new(Inner { shared, requests: Some(tx), writer: Some(writer) }) })
    }

    async fn submit<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Request) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let queue = self.inner.requests.as_ref().ok_or_else(stopped)?;
        queue.send(make(tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| StoreError::Unavailable("Embedded store dropped the request (its batch failed or the store closed)".into()))?
    }

    async fn read<T: Send + 'static>(&self, f: impl FnOnce(&Shared) -> Result<T> + Send + 'static) -> Result<T> {
        let shared = self.inner.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| StoreError::Unavailable(format!("Embedded store read failed: {e}")))?
    }
}

fn lock_leases(shared: &Shared) -> std::sync::MutexGuard<'_, HashMap<LeaseId, LeaseState>> {
    // A panic elsewhere while holding the lock leaves the map consistent (every
    // update is a single insert or remove), so a poisoned lock is still usable.
    shared.leases.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads `key` through the given table.
fn read_row(table: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Option<Row>> {
    match table.get(key).db()? {
        Some(v) => Ok(Some(codec::decode_row(key, v.value())?)),
        None => Ok(None),
    }
}

fn compare_holds(c: &Compare, lookup: &mut impl FnMut(&str) -> Result<Option<Row>>) -> Result<bool> {
    Ok(match c {
        Compare::ModRevision(k, rev) => lookup(k)?.map_or(0, |r| r.mod_revision) == *rev,
        Compare::Version(k, v) => lookup(k)?.map_or(0, |r| r.version) == *v,
        Compare::Absent(k) => lookup(k)?.is_none(),
        Compare::Exists(k) => lookup(k)?.is_some(),
    })
}

fn is_write(op: &Op) -> bool {
    !matches!(op, Op::Get { .. })
}

#[async_trait::async_trait]
impl crate::Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_owned();
        self.read(move |s| {
            let r = s.db.begin_read().db()?;
            let kv = r.open_table(KV).db()?;
            Ok(read_row(&kv, &key)?.map(|row| row.to_kv(&key)))
        })
        .await
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        let prefix = prefix.to_owned();
        self.read(move |s| {
            let r = s.db.begin_read().db()?;
            let meta = r.open_table(META).db()?;
            let revision = meta.get(META_REVISION).db()?.map_or(1, |v| v.value());
            let kv = r.open_table(KV).db()?;
            let mut kvs = Vec::new();
            for item in kv.range::<&str>(prefix.as_str()..).db()? {
                let (k, v) = item.db()?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                kvs.push(codec::decode_row(key, v.value())?.to_kv(key));
            }
            Ok(RangeResponse { kvs, revision })
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        txn.validate()?;
        if txn.success.iter().chain(&txn.failure).any(is_write) {
            return self.submit(|reply| Request::Txn(txn, reply)).await;
        }
        // Read-only: answer from a snapshot, without the writer.
        self.read(move |s| {
            let r = s.db.begin_read().db()?;
            let meta = r.open_table(META).db()?;
            let revision = meta.get(META_REVISION).db()?.map_or(1, |v| v.value());
            let kv = r.open_table(KV).db()?;
            let mut lookup = |k: &str| read_row(&kv, k);
            let mut succeeded = true;
            for c in &txn.compares {
                if !compare_holds(c, &mut lookup)? {
                    succeeded = false;
                    break;
                }
            }
            let branch = if succeeded { &txn.success } else { &txn.failure };
            let mut results = Vec::with_capacity(branch.len());
            for op in branch {
                if let Op::Get { key } = op {
                    results.push(OpResult::Get(lookup(key)?.map(|row| row.to_kv(key))));
                }
            }
            Ok(TxnResponse { succeeded, revision, results })
        })
        .await
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream> {
        if start_revision < 0 {
            return Err(StoreError::Invalid(format!("Negative start revision {start_revision}")));
        }
        // Subscribe before looking at the revision, so nothing committed after
        // that look can be missed.
        let live = self.inner.shared.events.subscribe();
        let current = self.inner.shared.revision.load(Ordering::SeqCst);
        let next = if start_revision == 0 { current + 1 } else { start_revision };
        let compacted = self.inner.shared.compacted.load(Ordering::SeqCst);
        if next < compacted {
            return Err(StoreError::Compacted { requested: next, compacted });
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let watcher = Watcher { shared: Arc::downgrade(&self.inner.shared), prefix: prefix.to_owned(), next, live, tx };
        tokio::spawn(watcher.run());
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId> {
        if ttl_secs <= 0 {
            return Err(StoreError::Invalid(format!("Lease TTL must be positive, got {ttl_secs}")));
        }
        self.submit(|reply| Request::LeaseGrant(ttl_secs, reply)).await
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<i64> {
        let mut leases = lock_leases(&self.inner.shared);
        let now = Instant::now();
        match leases.get_mut(&lease) {
            // An expired lease is as good as gone even if the writer has not
            // deleted its keys yet: it cannot be brought back.
            Some(state) if state.deadline > now => {
                state.deadline = now + Duration::from_secs(state.ttl as u64);
                Ok(state.ttl)
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        self.submit(|reply| Request::LeaseRevoke(lease, reply)).await
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        self.submit(|reply| Request::Compact(revision, reply)).await
    }

    async fn revision(&self) -> Result<i64> {
        Ok(self.inner.shared.revision.load(Ordering::SeqCst))
    }
}

/// The single writer: group commit and lease expiry.
struct Writer {
    shared: Arc<Shared>,
    /// Revisions of history to keep; older ones are compacted automatically.
    retention: Option<i64>,
}

/// An answer held back until the batch is committed.
enum Reply {
    Txn(oneshot::Sender<Result<TxnResponse>>, Result<TxnResponse>),
    Lease(oneshot::Sender<Result<LeaseId>>, Result<LeaseId>),
    Unit(oneshot::Sender<Result<()>>, Result<()>),
}

impl Reply {
    fn send(self) {
        // A caller that went away no longer wants the answer; the write stands.
        match self {
            Reply::Txn(tx, r) => drop(tx.send(r)),
            Reply::Lease(tx, r) => drop(tx.send(r)),
            Reply::Unit(tx, r) => drop(tx.send(r)),
        }
    }
    fn fail(self, e: &StoreError) {
        let e = clone_err(e);
        match self {
            Reply::Txn(tx, _) => drop(tx.send(Err(e))),
            Reply::Lease(tx, _) => drop(tx.send(Err(e))),
            Reply::Unit(tx, _) => drop(tx.send(Err(e))),
        }
    }
}

fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Compacted { requested, compacted } => StoreError::Compacted { requested: *requested, compacted: *compacted },
        StoreError::LeaseNotFound(l) => StoreError::LeaseNotFound(*l),
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        StoreError::Invalid(s) => StoreError::Invalid(s.clone()),
        StoreError::Corrupt { key, reason } => StoreError::Corrupt { key: key.clone(), reason: reason.clone() },
    }
}

/// Lease map changes to make once the batch is committed.
enum LeaseChange {
    Add(LeaseId, i64),
    Remove(LeaseId),
}

/// Everything one batch did, to publish after the commit.
#[derive(Default)]
struct BatchOutcome {
    replies: Vec<Reply>,
    committed: Vec<Arc<Committed>>,
    lease_changes: Vec<LeaseChange>,
    revision: i64,
    compacted: i64,
}

/// One change to a key, planned before anything is written.
enum Mutation {
    Put { key: String, row: Row, old_lease: LeaseId },
    Delete { key: String, old_lease: LeaseId },
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<Request>) {
        // Size of the previous batch: how many callers are likely to come back
        // together once they get their answers.
        let mut expected = 1;
        loop {
            let wait = self.time_to_next_expiry();
            let mut batch = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(first) => {
                    batch.push(first);
                    // Callers answered by the previous commit resubmit a few
                    // microseconds apart; wait a moment for them rather than
                    // committing the first alone and making the rest wait a
                    // whole fsync. A lone caller (expected 1) never waits.
                    let until = Instant::now() + COMMIT_WINDOW;
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(mpsc::TryRecvError::Disconnected) => break,
                            Err(mpsc::TryRecvError::Empty) => {
                                let now = Instant::now();
                                if batch.len() >= expected || now >= until {
                                    break;
                                }
                                match rx.recv_timeout(until - now) {
                                    Ok(r) => batch.push(r),
                                    Err(_) => break,
                                }
                            }
                        }
                    }
                    expected = batch.len();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let expired = self.expired_leases();
            if batch.is_empty() && expired.is_empty() {
                continue;
            }
            self.process(batch, expired);
        }
    }

    fn time_to_next_expiry(&self) -> Duration {
        let now = Instant::now();
        let leases = lock_leases(&self.shared);
        leases
            .values()
            .map(|s| s.deadline.saturating_duration_since(now))
            .min()
            .map_or(EXPIRY_TICK, |d| d.min(EXPIRY_TICK))
    }

    fn expired_leases(&self) -> Vec<LeaseId> {
        let now = Instant::now();
        let leases = lock_leases(&self.shared);
        let mut ids: Vec<_> = leases.iter().filter(|(_, s)| s.deadline <= now).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids
    }

    /// Applies a batch in one redb write transaction, commits, then answers.
    fn process(&self, batch: Vec<Request>, expired: Vec<LeaseId>) {
        let mut out = BatchOutcome::default();
        let result = self.apply(batch, &expired, &mut out);
        match result {
            Ok(()) => {
                self.shared.revision.store(out.revision, Ordering::SeqCst);
                self.shared.compacted.store(out.compacted, Ordering::SeqCst);
                {
                    let mut leases = lock_leases(&self.shared);
                    for change in out.lease_changes {
                        match change {
                            LeaseChange::Add(id, ttl) => {
                                leases.insert(id, LeaseState { ttl, deadline: Instant::now() + Duration::from_secs(ttl as u64) });
                            }
                            LeaseChange::Remove(id) => {
                                leases.remove(&id);
                            }
                        }
                    }
                }
                for c in out.committed {
                    // No receivers is fine: nobody watches.
                    let _ = self.shared.events.send(c);
                }
                for r in out.replies {
                    r.send();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "embedded store commit failed");
                for r in out.replies {
                    r.fail(&e);
                }
            }
        }
    }

    fn apply(&self, batch: Vec<Request>, expired: &[LeaseId], out: &mut BatchOutcome) -> Result<()> {
        let w = self.shared.db.begin_write().db()?;
        {
            let mut t = Tables {
                kv: w.open_table(KV).db()?,
                history: w.open_table(HISTORY).db()?,
                meta: w.open_table(META).db()?,
                leases: w.open_table(LEASES).db()?,
                lease_keys: w.open_table(LEASE_KEYS).db()?,
            };
            let mut revision = t.meta.get(META_REVISION).db()?.map_or(1, |v| v.value());
            let mut compacted = t.meta.get(META_COMPACTED).db()?.map_or(0, |v| v.value());
            for &lease in expired {
                // Expiry is a revoke the writer asks of itself.
                match t.plan_revoke(lease) {
                    Ok(plan) => {
                        if t.revoke(lease, plan, revision + 1, out)? {
                            revision += 1;
                        }
                    }
                    Err(StoreError::LeaseNotFound(_)) => out.lease_changes.push(LeaseChange::Remove(lease)),
                    Err(e) => tracing::error!(lease, error = %e, "cannot expire lease"),
                }
            }
            // Per request: planning may refuse it (its caller gets the error and
            // nothing is written); a failure while writing aborts the batch.
            for req in batch {
                match req {
                    Request::Txn(txn, reply) => match t.plan_txn(&txn, revision) {
                        Ok(plan) => {
                            let resp = plan.response.clone();
                            if !plan.mutations.is_empty() {
                                t.write(plan.mutations, resp.revision, plan.events, out)?;
                                revision = resp.revision;
                            }
                            out.replies.push(Reply::Txn(reply, Ok(resp)));
                        }
                        Err(e) => out.replies.push(Reply::Txn(reply, Err(e))),
                    },
                    Request::LeaseGrant(ttl, reply) => {
                        let id = t.grant(ttl, out)?;
                        out.replies.push(Reply::Lease(reply, Ok(id)));
                    }
                    Request::LeaseRevoke(lease, reply) => match t.plan_revoke(lease) {
                        Ok(plan) => {
                            if t.revoke(lease, plan, revision + 1, out)? {
                                revision += 1;
                            }
                            out.replies.push(Reply::Unit(reply, Ok(())));
                        }
                        Err(e) => out.replies.push(Reply::Unit(reply, Err(e))),
                    },
                    Request::Compact(target, reply) => {
                        if target > revision {
                            let e = StoreError::Invalid(format!(
                                "Cannot compact to revision {target}, newer than the current revision {revision}"
                            ));
                            out.replies.push(Reply::Unit(reply, Err(e)));
                        } else {
                            if target > compacted {
                                t.compact(target)?;
                                compacted = target;
                            }
                            out.replies.push(Reply::Unit(reply, Ok(())));
                        }
                    }
                }
            }
            if let Some(keep) = self.retention {
                let target = revision - keep;
                if target >= compacted + AUTO_COMPACT_STEP {
                    t.compact(target)?;
                    compacted = target;
                }
            }
            t.meta.insert(META_REVISION, revision).db()?;
            t.meta.insert(META_COMPACTED, compacted).db()?;
            out.revision = revision;
            out.compacted = compacted;
        }
        w.commit().db()
    }
}

/// A planned transaction: its answer and the writes it needs.
struct TxnPlan {
    response: TxnResponse,
    mutations: Vec<Mutation>,
    events: Vec<Event>,
}

/// The keys a revoke deletes, and stale index entries it drops.
#[derive(Default)]
struct RevokePlan {
    keys: Vec<String>,
    stale: Vec<String>,
}

/// The open tables of one write transaction.
struct Tables<'w> {
    kv: redb::Table<'w, &'static str, &'static [u8]>,
    history: redb::Table<'w, i64, &'static [u8]>,
    meta: redb::Table<'w, &'static str, i64>,
    leases: redb::Table<'w, i64, i64>,
    lease_keys: redb::Table<'w, (i64, &'static str), ()>,
}

impl Tables<'_> {
    /// Plans one API transaction as revision `revision + 1` (if it writes),
    /// reading but writing nothing.
    fn plan_txn(&self, txn: &Txn, revision: i64) -> Result<TxnPlan> {
        let new_rev = revision + 1;
        let mut overlay: BTreeMap<String, Option<Row>> = BTreeMap::new();
        let mut succeeded = true;
        for c in &txn.compares {
            let mut lookup = |k: &str| read_row(&self.kv, k);
            if !compare_holds(c, &mut lookup)? {
                succeeded = false;
                break;
            }
        }
        let branch = if succeeded { &txn.success } else { &txn.failure };
        for op in branch {
            if let Op::Put { lease, .. } = op {
                if *lease != 0 && self.leases.get(*lease).db()?.is_none() {
                    return Err(StoreError::LeaseNotFound(*lease));
                }
            }
        }
        let mut mutations = Vec::new();
        let mut events = Vec::new();
        let mut results = Vec::with_capacity(branch.len());
        for op in branch {
            match op {
                Op::Put { key, value, lease } => {
                    let old = self.lookup(&overlay, key)?;
                    let row = Row {
                        create_revision: old.as_ref().map_or(new_rev, |r| r.create_revision),
                        mod_revision: new_rev,
                        version: old.as_ref().map_or(1, |r| r.version + 1),
                        lease: *lease,
                        value: value.clone(),
                    };
                    events.push(Event { kind: EventKind::Put, kv: row.to_kv(key) });
                    mutations.push(Mutation::Put { key: key.clone(), row: row.clone(), old_lease: old.map_or(0, |r| r.lease) });
                    overlay.insert(key.clone(), Some(row));
                    results.push(OpResult::Put);
                }
                Op::Delete { key } => {
                    let old = self.lookup(&overlay, key)?;
                    let n = match old {
                        Some(old) => {
                            self.plan_delete(key, old.lease, new_rev, &mut mutations, &mut events, &mut overlay);
                            1
                        }
                        None => 0,
                    };
                    results.push(OpResult::Delete(n));
                }
                Op::DeletePrefix { prefix } => {
                    let mut doomed = Vec::new();
                    for item in self.kv.range::<&str>(prefix.as_str()..).db()? {
                        let (k, v) = item.db()?;
                        let key = k.value();
                        if !key.starts_with(prefix.as_str()) {
                            break;
                        }
                        // Puts and deletes of one key never share a transaction,
                        // so the overlay holds only earlier deletes here.
                        if overlay.contains_key(key) {
                            continue;
                        }
                        doomed.push((key.to_owned(), codec::decode_row(key, v.value())?.lease));
                    }
                    let n = doomed.len() as i64;
                    for (key, lease) in doomed {
                        self.plan_delete(&key, lease, new_rev, &mut mutations, &mut events, &mut overlay);
                    }
                    results.push(OpResult::Delete(n));
                }
                Op::Get { key } => {
                    results.push(OpResult::Get(self.lookup(&overlay, key)?.map(|r| r.to_kv(key))));
                }
            }
        }
        let revision = if mutations.is_empty() { revision } else { new_rev };
        Ok(TxnPlan { response: TxnResponse { succeeded, revision, results }, mutations, events })
    }

    fn lookup(&self, overlay: &BTreeMap<String, Option<Row>>, key: &str) -> Result<Option<Row>> {
        match overlay.get(key) {
            Some(r) => Ok(r.clone()),
            None => read_row(&self.kv, key),
        }
    }

    fn plan_delete(
        &self,
        key: &str,
        old_lease: LeaseId,
        new_rev: i64,
        mutations: &mut Vec<Mutation>,
        events: &mut Vec<Event>,
        overlay: &mut BTreeMap<String, Option<Row>>,
    ) {
        events.push(Event {
            kind: EventKind::Delete,
            kv: KeyValue { key: key.to_owned(), value: Vec::new(), create_revision: 0, mod_revision: new_rev, version: 0, lease: 0 },
        });
        mutations.push(Mutation::Delete { key: key.to_owned(), old_lease });
        overlay.insert(key.to_owned(), None);
    }

    /// Applies planned mutations and records their events as revision `new_rev`.
    fn write(&mut self, mutations: Vec<Mutation>, new_rev: i64, events: Vec<Event>, out: &mut BatchOutcome) -> Result<()> {
        for m in mutations {
            match m {
                Mutation::Put { key, row, old_lease } => {
                    self.kv.insert(key.as_str(), codec::encode_row(&row).as_slice()).db()?;
                    if old_lease != 0 && old_lease != row.lease {
                        self.lease_keys.remove((old_lease, key.as_str())).db()?;
                    }
                    if row.lease != 0 {
                        self.lease_keys.insert((row.lease, key.as_str()), ()).db()?;
                    }
                }
                Mutation::Delete { key, old_lease } => {
                    self.kv.remove(key.as_str()).db()?;
                    if old_lease != 0 {
                        self.lease_keys.remove((old_lease, key.as_str())).db()?;
                    }
                }
            }
        }
        self.history.insert(new_rev, codec::encode_events(&events).as_slice()).db()?;
        out.committed.push(Arc::new(Committed { revision: new_rev, events }));
        Ok(())
    }

    fn grant(&mut self, ttl: i64, out: &mut BatchOutcome) -> Result<LeaseId> {
        loop {
            // Positive ids, as etcd hands out; 0 means "no lease".
            let id = (rand::random::<u64>() >> 1) as i64;
            if id == 0 || self.leases.get(id).db()?.is_some() {
                continue;
            }
            self.leases.insert(id, ttl).db()?;
            out.lease_changes.push(LeaseChange::Add(id, ttl));
            return Ok(id);
        }
    }

    /// Finds the keys attached to a lease, writing nothing.
    fn plan_revoke(&self, lease: LeaseId) -> Result<RevokePlan> {
        if self.leases.get(lease).db()?.is_none() {
            return Err(StoreError::LeaseNotFound(lease));
        }
        let mut plan = RevokePlan::default();
        for item in self.lease_keys.range((lease, "")..).db()? {
            let (k, _) = item.db()?;
            let (l, key) = k.value();
            if l != lease {
                break;
            }
            // The index disagrees with the key rows only after damage; delete
            // what is really attached to this lease and drop stale entries.
            match read_row(&self.kv, key) {
                Ok(Some(row)) if row.lease == lease => plan.keys.push(key.to_owned()),
                Ok(_) | Err(StoreError::Corrupt { .. }) => plan.stale.push(key.to_owned()),
                Err(e) => return Err(e),
            }
        }
        Ok(plan)
    }

    /// Deletes a lease and its keys (as revision `new_rev` if it had any);
    /// returns whether the revision was used.
    fn revoke(&mut self, lease: LeaseId, plan: RevokePlan, new_rev: i64, out: &mut BatchOutcome) -> Result<bool> {
        self.leases.remove(lease).db()?;
        out.lease_changes.push(LeaseChange::Remove(lease));
        for key in &plan.stale {
            self.lease_keys.remove((lease, key.as_str())).db()?;
        }
        let mut mutations = Vec::new();
        let mut events = Vec::new();
        let mut overlay = BTreeMap::new();
        for key in &plan.keys {
            self.plan_delete(key, lease, new_rev, &mut mutations, &mut events, &mut overlay);
        }
        if mutations.is_empty() {
            return Ok(false);
        }
        self.write(mutations, new_rev, events, out)?;
        Ok(true)
    }

    fn compact(&mut self, target: i64) -> Result<()> {
        let mut doomed = Vec::new();
        for item in self.history.range(..target).db()? {
            doomed.push(item.db()?.0.value());
        }
        for rev in doomed {
            self.history.remove(rev).db()?;
        }
        Ok(())
    }
}

/// The task behind one watch stream.
struct Watcher {
    shared: Weak<Shared>,
    prefix: String,
    /// First revision not yet sent.
    next: i64,
    live: broadcast::Receiver<Arc<Committed>>,
    tx: tokio::sync::mpsc::Sender<Result<WatchResponse>>,
}

impl Watcher {
    async fn run(mut self) {
        loop {
            // Catch up from the history table while it has revisions we lack.
            let Some(shared) = self.shared.upgrade() else { return };
            let current = shared.revision.load(Ordering::SeqCst);
            if self.next <= current {
                let (next, prefix) = (self.next, self.prefix.clone());
                let read = tokio::task::spawn_blocking(move || read_history(&shared, next, &prefix)).await;
                let read = match read {
                    Ok(r) => r,
                    Err(e) => Err(StoreError::Unavailable(format!("Embedded store watch failed: {e}"))),
                };
                match read {
                    Ok((events, next)) => {
                        self.next = next;
                        if !events.is_empty() && self.tx.send(Ok(WatchResponse { events })).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = self.tx.send(Err(e)).await;
                        return;
                    }
                }
                continue;
            }
            drop(shared);
            tokio::select! {
                msg = self.live.recv() => match msg {
                    Ok(c) if c.revision < self.next => {}
                    Ok(c) if c.revision == self.next => {
                        self.next += 1;
                        let events: Vec<Event> =
                            c.events.iter().filter(|e| e.kv.key.starts_with(self.prefix.as_str())).cloned().collect();
                        if !events.is_empty() && self.tx.send(Ok(WatchResponse { events })).await.is_err() {
                            return;
                        }
                    }
                    // A gap: go back to the table, which already has it.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = self.tx.closed() => return,
            }
        }
    }
}

/// Reads the events under `prefix` from revision `from` on, at most
/// [`HISTORY_CHUNK`] revisions; returns them and the first revision not read.
fn read_history(shared: &Shared, from: i64, prefix: &str) -> Result<(Vec<Event>, i64)> {
    let r = shared.db.begin_read().db()?;
    let meta = r.open_table(META).db()?;
    let compacted = meta.get(META_COMPACTED).db()?.map_or(0, |v| v.value());
    if from < compacted {
        return Err(StoreError::Compacted { requested: from, compacted });
    }
    let current = meta.get(META_REVISION).db()?.map_or(1, |v| v.value());
    let history = r.open_table(HISTORY).db()?;
    let mut events = Vec::new();
    let mut next = current + 1;
    for (n, item) in history.range(from..=current).db()?.enumerate() {
        let (rev, bytes) = item.db()?;
        let rev = rev.value();
        if n == HISTORY_CHUNK {
            next = rev;
            break;
        }
        events.extend(
            codec::decode_events(rev, bytes.value())?.into_iter().filter(|e| e.kv.key.starts_with(prefix)),
        );
    }
    Ok((events, next))
}
