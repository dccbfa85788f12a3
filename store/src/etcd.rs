//! etcd backend over the v3 gRPC API (works with etcd 3.4).
//!
//! Watches survive a broken gRPC stream (etcd restarted, connection reset):
//! the stream re-creates the etcd watch from the revision after the last one
//! it delivered, so the consumer sees neither a gap nor a duplicate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::proto::PbTxnOpResponse;
use etcd_client::{
    Client, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions, TxnOp, WatchOptions,
};
use tonic::Code;

use crate::{
    Compare, Event, EventKind, KeyValue, LeaseId, Op, OpResult, RangeResponse, Result, StoreError, Txn, TxnResponse,
    WatchResponse, WatchStream,
};

/// Longest a single request may take before the store reports etcd unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before re-creating a broken watch, doubled up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// The etcd store: a client of one etcd cluster. Cheap to share behind an `Arc`.
pub struct EtcdStore {
    client: Client,
    /// TTLs of the leases this client granted, so a keep-alive answers in one round trip.
    ttls: Arc<Mutex<HashMap<LeaseId, i64>>>,
}

impl EtcdStore {
    /// Connects to an etcd cluster and checks that it answers.
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("No etcd endpoints given".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(3), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let client = timed(Client::connect(endpoints, Some(options))).await?;
        let store = EtcdStore { client, ttls: Arc::default() };
        crate::Store::revision(&store).await?;
        Ok(store)
    }

    /// The underlying etcd-client handle, for what the trait does not cover.
    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

/// Runs an etcd request with [`REQUEST_TIMEOUT`], mapping its errors.
async fn timed<T>(f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(map_err),
        Err(_) => Err(StoreError::Unavailable(format!("etcd did not answer within {} s", REQUEST_TIMEOUT.as_secs()))),
    }
}

/// Maps etcd-client errors: anything about reaching etcd is `Unavailable`.
fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => map_status(&s),
        E::InvalidArgs(m) => StoreError::Invalid(m),
        E::InvalidUri(e) => StoreError::Invalid(format!("Bad etcd endpoint: {e}")),
        E::Utf8Error(e) => StoreError::Corrupt { key: "(etcd response)".into(), reason: e.to_string() },
        E::LeaseKeepAliveError(m) if m.contains("lease not found") => StoreError::LeaseNotFound(0),
        other => StoreError::Unavailable(format!("etcd: {other}")),
    }
}

fn map_status(s: &tonic::Status) -> StoreError {
    let msg = s.message();
    if msg.contains("requested lease not found") {
        return StoreError::LeaseNotFound(0);
    }
    if msg.contains("required revision has been compacted") {
        return StoreError::Compacted { requested: 0, compacted: 0 };
    }
    match s.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StoreError::Invalid(format!("etcd: {msg}")),
        Code::NotFound => StoreError::LeaseNotFound(0),
        _ => StoreError::Unavailable(format!("etcd: {msg} ({:?})", s.code())),
    }
}

/// Names the lease in a `LeaseNotFound` that etcd reported without it.
fn for_lease(e: StoreError, lease: LeaseId) -> StoreError {
    match e {
        StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease),
        other => other,
    }
}

fn corrupt(what: &str, reason: &str) -> StoreError {
    StoreError::Corrupt { key: what.to_owned(), reason: reason.to_owned() }
}

fn to_kv(kv: &etcd_client::proto::PbKeyValue) -> Result<KeyValue> {
    let key = String::from_utf8(kv.key.clone()).map_err(|_| corrupt(&String::from_utf8_lossy(&kv.key), "key is not UTF-8"))?;
    Ok(KeyValue {
        key,
        value: kv.value.clone(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    })
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    h.map(|h| h.revision()).ok_or_else(|| corrupt("(etcd response)", "response without a header"))
}

fn to_etcd_op(op: &Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => TxnOp::put(key.as_str(), value.clone(), Some(PutOptions::new().with_lease(*lease))),
        Op::Delete { key } => TxnOp::delete(key.as_str(), None),
        Op::DeletePrefix { prefix } => TxnOp::delete(prefix.as_str(), Some(DeleteOptions::new().with_prefix())),
        Op::Get { key } => TxnOp::get(key.as_str(), None),
    }
}

fn to_etcd_compare(c: &Compare) -> etcd_client::Compare {
    match c {
        Compare::ModRevision(k, rev) => etcd_client::Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev),
        Compare::Version(k, v) => etcd_client::Compare::version(k.as_str(), CompareOp::Equal, *v),
        Compare::Absent(k) => etcd_client::Compare::version(k.as_str(), CompareOp::Equal, 0),
        Compare::Exists(k) => etcd_client::Compare::version(k.as_str(), CompareOp::Greater, 0),
    }
}

fn to_event(e: &etcd_client::Event) -> Result<Event> {
    let kv = e.kv().ok_or_else(|| corrupt("(etcd watch)", "event without a key"))?;
    let kind = match e.event_type() {
        EventType::Put => EventKind::Put,
        EventType::Delete => EventKind::Delete,
    };
    Ok(Event { kind, kv: to_kv(&kv.0)? })
}

#[async_trait::async_trait]
impl crate::Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        if key.is_empty() {
            return Err(StoreError::Invalid("Empty key".into()));
        }
        let resp = timed(self.client.kv_client().get(key, None)).await?;
        resp.kvs().first().map(|kv| to_kv(&kv.0)).transpose()
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        let options = GetOptions::new().with_prefix().with_sort(etcd_client::SortTarget::Key, etcd_client::SortOrder::Ascend);
        let resp = timed(self.client.kv_client().get(prefix, Some(options))).await?;
        let revision = header_revision(resp.header())?;
        let kvs = resp.kvs().iter().map(|kv| to_kv(&kv.0)).collect::<Result<Vec<_>>>()?;
        Ok(RangeResponse { kvs, revision })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        txn.validate()?;
        let first_lease = txn.success.iter().chain(&txn.failure).find_map(|op| match op {
            Op::Put { lease, .. } if *lease != 0 => Some(*lease),
            _ => None,
        });
        let request = etcd_client::Txn::new()
            .when(txn.compares.iter().map(to_etcd_compare).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(to_etcd_op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(to_etcd_op).collect::<Vec<_>>());
        let resp = timed(self.client.kv_client().txn(request))
            .await
            .map_err(|e| for_lease(e, first_lease.unwrap_or(0)))?;
        let revision = header_revision(resp.header())?;
        let succeeded = resp.succeeded();
        let branch = if succeeded { &txn.success } else { &txn.failure };
        let raw = &resp.0.responses;
        if raw.len() != branch.len() {
            return Err(corrupt("(etcd txn)", &format!("{} results for {} operations", raw.len(), branch.len())));
        }
        let mut results = Vec::with_capacity(raw.len());
        for r in raw {
            results.push(match &r.response {
                Some(PbTxnOpResponse::ResponsePut(_)) => OpResult::Put,
                Some(PbTxnOpResponse::ResponseDeleteRange(d)) => OpResult::Delete(d.deleted),
                Some(PbTxnOpResponse::ResponseRange(g)) => OpResult::Get(g.kvs.first().map(to_kv).transpose()?),
                _ => return Err(corrupt("(etcd txn)", "unexpected operation result")),
            });
        }
        Ok(TxnResponse { succeeded, revision, results })
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream> {
        if start_revision < 0 {
            return Err(StoreError::Invalid(format!("Negative start revision {start_revision}")));
        }
        if start_revision > 0 {
            // etcd reports a compacted start only on the stream, after
            // "created"; a read at that revision tells it before we start.
            let probe = GetOptions::new().with_revision(start_revision).with_count_only();
            match timed(self.client.kv_client().get("\0", Some(probe))).await {
                Ok(_) => {}
                Err(StoreError::Compacted { .. }) => {
                    let compacted = self.compaction_point(start_revision).await;
                    return Err(StoreError::Compacted { requested: start_revision, compacted });
                }
                // A future revision is fine to watch from.
                Err(StoreError::Invalid(m)) if m.contains("future revision") => {}
                Err(e) => return Err(e),
            }
        }
        let mut watch = EtcdWatch { client: self.client.clone(), prefix: prefix.to_owned(), next: start_revision };
        let stream = watch.establish().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(watch.run(stream, tx));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseId> {
        if ttl_secs <= 0 {
            return Err(StoreError::Invalid(format!("Lease TTL must be positive, got {ttl_secs}")));
        }
        let resp = timed(self.client.lease_client().grant(ttl_secs, None)).await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Unavailable(format!("etcd refused the lease: {}", resp.error())));
        }
        self.ttls.lock().unwrap_or_else(|p| p.into_inner()).insert(resp.id(), resp.ttl());
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<i64> {
        let mut client = self.client.lease_client();
        // etcd-client sends one renewal and waits for its answer; dropping the
        // keeper closes the stream again.
        if let Err(e) = timed(client.keep_alive(lease)).await.map_err(|e| for_lease(e, lease)) {
            if matches!(e, StoreError::LeaseNotFound(_)) {
                self.ttls.lock().unwrap_or_else(|p| p.into_inner()).remove(&lease);
            }
            return Err(e);
        }
        let known = self.ttls.lock().unwrap_or_else(|p| p.into_inner()).get(&lease).copied();
        match known {
            Some(ttl) => Ok(ttl),
            None => {
                let resp = timed(client.time_to_live(lease, None)).await.map_err(|e| for_lease(e, lease))?;
                if resp.ttl() <= 0 {
                    return Err(StoreError::LeaseNotFound(lease));
                }
                // A lease granted by another client: remember its TTL so later renewals
                // cost one round trip, as for our own leases.
                self.ttls.lock().unwrap_or_else(|p| p.into_inner()).insert(lease, resp.granted_ttl());
                Ok(resp.granted_ttl())
            }
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        let r = timed(self.client.lease_client().revoke(lease)).await.map_err(|e| for_lease(e, lease));
        self.ttls.lock().unwrap_or_else(|p| p.into_inner()).remove(&lease);
        r.map(|_| ())
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        match timed(self.client.kv_client().compact(revision, None)).await {
            Ok(_) => Ok(()),
            // Compacting to an already compacted revision is a no-op, as in the embedded store.
            Err(StoreError::Compacted { .. }) => Ok(()),
            Err(StoreError::Invalid(m)) if m.contains("future revision") => Err(StoreError::Invalid(format!(
                "Cannot compact to revision {revision}, newer than the current revision"
            ))),
            Err(e) => Err(e),
        }
    }

    async fn revision(&self) -> Result<i64> {
        let resp = timed(self.client.kv_client().get("\0", Some(GetOptions::new().with_count_only()))).await?;
        header_revision(resp.header())
    }
}

impl EtcdStore {
    /// Finds etcd's compaction point, which etcd tells only to a watch that
    /// starts below it. Returns 0 if it cannot tell.
    async fn compaction_point(&self, below: i64) -> i64 {
        let options = WatchOptions::new().with_start_revision(below);
        let Ok(mut ws) = timed(self.client.watch_client().watch("\0", Some(options))).await else { return 0 };
        for _ in 0..2 {
            match tokio::time::timeout(REQUEST_TIMEOUT, ws.message()).await {
                Ok(Ok(Some(resp))) if resp.compact_revision() > 0 => return resp.compact_revision(),
                Ok(Ok(Some(_))) => continue,
                _ => return 0,
            }
        }
        0
    }
}

/// The state behind one watch stream: what to watch and where to resume.
struct EtcdWatch {
    client: Client,
    prefix: String,
    /// First revision not yet delivered (0 until etcd tells the start of a "from now" watch).
    next: i64,
}

impl EtcdWatch {
    /// Creates the etcd watch from `next` and waits for etcd to confirm it.
    async fn establish(&mut self) -> Result<etcd_client::WatchStream> {
        let mut options = WatchOptions::new().with_prefix().with_progress_notify();
        if self.next > 0 {
            options = options.with_start_revision(self.next);
        }
        let mut ws = timed(self.client.watch_client().watch(self.prefix.as_str(), Some(options))).await?;
        let first = timed(ws.message()).await?;
        let Some(resp) = first else {
            return Err(StoreError::Unavailable("etcd closed the watch stream".into()));
        };
        if resp.compact_revision() > 0 {
            return Err(StoreError::Compacted { requested: self.next, compacted: resp.compact_revision() });
        }
        if resp.canceled() || !resp.created() {
            return Err(StoreError::Unavailable(format!("etcd refused the watch: {}", resp.cancel_reason())));
        }
        if self.next == 0 {
            self.next = header_revision(resp.header())? + 1;
        }
        Ok(ws)
    }

    /// Forwards events to `tx`, re-creating the etcd watch whenever its stream breaks.
    async fn run(mut self, mut ws: etcd_client::WatchStream, tx: tokio::sync::mpsc::Sender<Result<WatchResponse>>) {
        loop {
            let msg = tokio::select! {
                m = ws.message() => m,
                _ = tx.closed() => return,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) | Err(_) => {
                    match self.reestablish(&tx).await {
                        Some(Ok(new)) => ws = new,
                        Some(Err(e)) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                        None => return,
                    }
                    continue;
                }
            };
            if resp.compact_revision() > 0 {
                let e = StoreError::Compacted { requested: self.next, compacted: resp.compact_revision() };
                let _ = tx.send(Err(e)).await;
                return;
            }
            if resp.canceled() {
                let e = StoreError::Unavailable(format!("etcd cancelled the watch: {}", resp.cancel_reason()));
                let _ = tx.send(Err(e)).await;
                return;
            }
            let mut events = Vec::with_capacity(resp.events().len());
            for e in resp.events() {
                match to_event(e) {
                    // Skip what an earlier incarnation of the watch already delivered.
                    Ok(ev) if ev.kv.mod_revision < self.next => {}
                    Ok(ev) => events.push(ev),
                    Err(err) => {
                        let _ = tx.send(Err(err)).await;
                        return;
                    }
                }
            }
            if let Some(last) = events.last() {
                self.next = last.kv.mod_revision + 1;
                if tx.send(Ok(WatchResponse { events })).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Retries [`establish`](Self::establish) until it works, the history is
    /// compacted, or nobody listens any more (`None`).
    async fn reestablish(
        &mut self,
        tx: &tokio::sync::mpsc::Sender<Result<WatchResponse>>,
    ) -> Option<Result<etcd_client::WatchStream>> {
        let mut pause = FIRST_RETRY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = tx.closed() => return None,
            }
            let attempt = tokio::select! {
                r = self.establish() => r,
                _ = tx.closed() => return None,
            };
            match attempt {
                Ok(ws) => return Some(Ok(ws)),
                Err(e @ StoreError::Compacted { .. }) => return Some(Err(e)),
                Err(e) => {
                    tracing::debug!(error = %e, next = self.next, "etcd watch still broken; retrying");
                    pause = (pause * 2).min(MAX_RETRY);
                }
            }
        }
    }
}
