//! Heartbeats: one store lease per host, with the host's `alive` key attached.
//!
//! A heartbeat keeps the lease alive; when the lease has expired (the host was
//! down) a new one is granted and the key written again, guarded by a compare on
//! the key so that two replicas serving heartbeats of the same host at once end up
//! with one lease. A host is up exactly while its key exists.

use std::collections::HashSet;

use store::record::encode;
use store::{Compare, LeaseId, Store, StoreError, Txn, Op};

use super::records::{self, AliveRecord};

/// What a heartbeat did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    /// True when a new lease was granted (the host was down, or had never heartbeated).
    pub renewed: bool,
    /// The lease of the host's heartbeat key now.
    pub lease: LeaseId,
    /// Store revision of the heartbeat key's write, when this call wrote it.
    pub revision: Option<i64>,
}

/// The fast path: keeps `lease` (the host's lease as the replica's cache knows it)
/// alive with one store round trip. `Ok(false)` when the lease is gone, in which case
/// the caller takes the slow path ([`heartbeat`]).
pub async fn keep_alive(store: &dyn Store, lease: LeaseId) -> Result<bool, StoreError> {
    match store.lease_keep_alive(lease).await {
        Ok(_) => Ok(true),
        Err(StoreError::LeaseNotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The slow path: reads the host's heartbeat key and keeps its lease alive, or grants
/// a new lease and writes the key again.
pub async fn heartbeat(store: &dyn Store, host_id: &str, ttl_secs: i64) -> Result<Beat, StoreError> {
    let key = records::alive_key(host_id);
    for _ in 0..4 {
        let current = store.get(&key).await?;
        if let Some(kv) = &current {
            if keep_alive(store, kv.lease).await? {
                return Ok(Beat { renewed: false, lease: kv.lease, revision: None });
            }
        }
        let lease = store.lease_grant(ttl_secs).await?;
        let seen = current.as_ref().map_or(0, |kv| kv.mod_revision);
        let value = encode(&AliveRecord { since: records::now_rfc3339() });
        let txn = Txn::new().when(Compare::ModRevision(key.clone(), seen)).and_then(Op::put_with_lease(key.clone(), value, lease));
        let resp = store.txn(txn).await?;
        if resp.succeeded {
            return Ok(Beat { renewed: true, lease, revision: Some(resp.revision) });
        }
        // Another replica won the race; drop our lease and keep theirs alive.
        if let Err(e) = store.lease_revoke(lease).await {
            tracing::debug!(lease, error = %e, "revoking a lease that lost the race");
        }
    }
    Err(StoreError::Unavailable(format!("heartbeat of host {host_id} kept racing with other writers")))
}

/// Ends a host's heartbeat now (the host shows as down at once).
pub async fn stop(store: &dyn Store, host_id: &str) -> Result<(), StoreError> {
    if let Some(kv) = store.get(&records::alive_key(host_id)).await? {
        match store.lease_revoke(kv.lease).await {
            Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Ids of the hosts that are up now.
pub async fn alive_hosts(store: &dyn Store) -> Result<HashSet<String>, StoreError> {
    Ok(store
        .range(records::ALIVE_PREFIX)
        .await?
        .kvs
        .into_iter()
        .filter_map(|kv| kv.key.strip_prefix(records::ALIVE_PREFIX).map(str::to_string))
        .collect())
}

/// Whether one host is up now.
pub async fn is_up(store: &dyn Store, host_id: &str) -> Result<bool, StoreError> {
    Ok(store.get(&records::alive_key(host_id)).await?.is_some())
}
