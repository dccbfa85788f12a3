//! Reading and changing host records: listing with live state, enable and disable.

use model::agent_api::HostView;
use store::record::{decode, encode};
use store::{Compare, Op, Store, Txn};
use uuid::Uuid;

use super::error::HostsError;
use super::heartbeat;
use super::provider_tree;
use super::records::{self, HostRecord, HostState, InventoryRecord};

/// A host with its live state.
#[derive(Clone, Debug)]
pub struct HostStatus {
    /// The stored record.
    pub record: HostRecord,
    /// A small integer id, unique within the site and stable for the host's life: the
    /// store revision that created its record (Nova's service and hypervisor id
    /// before microversion 2.53).
    pub number: i64,
    /// Whether its heartbeat key exists now.
    pub up: bool,
}

impl HostStatus {
    /// `up` or `down`.
    pub fn state(&self) -> HostState {
        if self.up {
            HostState::Up
        } else {
            HostState::Down
        }
    }

    /// The admin API's view of the host.
    pub fn view(&self) -> HostView {
        let r = &self.record;
        HostView {
            id: r.id.clone(),
            hostname: r.hostname.clone(),
            zone: r.zone.clone(),
            enabled: r.enabled,
            disabled_reason: r.disabled_reason.clone(),
            state: self.state().as_str().into(),
            state_changed_at: r.state_changed_at().map(str::to_string),
            created_at: r.created_at.clone(),
            updated_at: r.updated_at.clone(),
        }
    }
}

/// Every host with its live state, sorted by host name.
pub async fn list(store: &dyn Store) -> Result<Vec<HostStatus>, HostsError> {
    let alive = heartbeat::alive_hosts(store).await?;
    let mut out = Vec::new();
    for kv in store.range(records::RECORDS_PREFIX).await?.kvs {
        let record: HostRecord = decode(&kv.key, &kv.value)?;
        let up = alive.contains(&record.id);
        out.push(HostStatus { record, number: kv.create_revision, up });
    }
    out.sort_by(|a, b| a.record.hostname.cmp(&b.record.hostname));
    Ok(out)
}

/// One host with its live state, by id.
pub async fn get(store: &dyn Store, id: &str) -> Result<HostStatus, HostsError> {
    if Uuid::parse_str(id).is_err() {
        return Err(HostsError::NotFound(id.into()));
    }
    let kv = store.get(&records::record_key(id)).await?.ok_or_else(|| HostsError::NotFound(id.into()))?;
    let record: HostRecord = decode(&kv.key, &kv.value)?;
    let up = heartbeat::is_up(store, id).await?;
    Ok(HostStatus { record, number: kv.create_revision, up })
}

/// The id of the host of a given name.
pub async fn id_by_name(store: &dyn Store, hostname: &str) -> Result<Option<String>, HostsError> {
    if !records::valid_hostname(hostname) {
        return Ok(None);
    }
    match store.get(&records::name_key(hostname)).await? {
        Some(kv) => Ok(Some(decode::<records::NameRecord>(&kv.key, &kv.value)?.host_id)),
        None => Ok(None),
    }
}

/// Longest disabled reason accepted (Nova's limit).
pub const MAX_REASON_LEN: usize = 255;

/// Enables or disables a host for scheduling, with a reason when disabling.
///
/// The host's root resource provider carries `COMPUTE_STATUS_DISABLED` while it is
/// disabled, as Nova does, so placement queries can leave it out.
pub async fn set_enabled(store: &dyn Store, id: &str, enabled: bool, reason: Option<String>) -> Result<HostStatus, HostsError> {
    if let Some(r) = &reason {
        if r.chars().count() > MAX_REASON_LEN || r.trim().is_empty() {
            return Err(HostsError::Invalid(format!("disabled_reason must be 1 to {MAX_REASON_LEN} characters")));
        }
    }
    let key = records::record_key(id);
    for _ in 0..8 {
        let kv = store.get(&key).await?.ok_or_else(|| HostsError::NotFound(id.into()))?;
        let mut record: HostRecord = decode(&kv.key, &kv.value)?;
        let reason = if enabled { None } else { reason.clone() };
        if record.enabled == enabled && record.disabled_reason == reason {
            return get(store, id).await;
        }
        record.enabled = enabled;
        record.disabled_reason = reason;
        record.updated_at = records::now_rfc3339();
        let txn = Txn::new().when(Compare::ModRevision(key.clone(), kv.mod_revision)).and_then(Op::put(key.clone(), encode(&record)));
        if store.txn(txn).await?.succeeded {
            tracing::info!(host_id = %id, hostname = %record.hostname, enabled, reason = ?record.disabled_reason, "host enabled flag changed");
            if let Err(e) = sync_providers(store, &record).await {
                tracing::warn!(host_id = %id, error = %e, "could not update the host's resource providers after enable/disable");
            }
            return get(store, id).await;
        }
    }
    Err(HostsError::Contention)
}

/// Makes the host's resource providers match its stored inventory and enabled flag.
pub async fn sync_providers(store: &dyn Store, record: &HostRecord) -> Result<(), HostsError> {
    let Some(kv) = store.get(&records::inventory_key(&record.id)).await? else {
        return Ok(());
    };
    let inv: InventoryRecord = decode(&kv.key, &kv.value)?;
    let id = Uuid::parse_str(&record.id).map_err(|e| HostsError::Invalid(e.to_string()))?;
    let tree = provider_tree::build(&id, &record.hostname, &inv.inventory, record.enabled);
    crate::placement::db::sync_provider_tree(store, &tree).await?;
    Ok(())
}

/// Removes a host: its resource providers (refused with 409 while any has
/// allocations), its heartbeat, and its record, name, inventory, desired and
/// observed state in one transaction. Its credential stops working at once.
pub async fn delete(store: &dyn Store, id: &str) -> Result<(), HostsError> {
    let host_uuid = Uuid::parse_str(id).map_err(|_| HostsError::NotFound(id.into()))?;
    let key = records::record_key(id);
    let kv = store.get(&key).await?.ok_or_else(|| HostsError::NotFound(id.into()))?;
    let record: HostRecord = decode(&kv.key, &kv.value)?;
    let tree = crate::placement::db::get_tree(store, &host_uuid).await?;
    if let Some(p) = tree.iter().find(|p| p.value.has_allocations()) {
        return Err(HostsError::Placement(crate::placement::db::DbError::ProviderInUse(p.value.uuid)));
    }
    // Leaves first: a parent with children cannot go.
    let mut order: Vec<_> = tree.iter().map(|p| (p.value.parent.is_none(), p.value.uuid)).collect();
    order.sort();
    for (_, uuid) in order {
        match crate::placement::db::delete_provider(store, &uuid).await {
            Ok(()) | Err(crate::placement::db::DbError::ProviderNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    heartbeat::stop(store, id).await?;
    // The monitor may record the end of the heartbeat meanwhile; re-read and retry.
    let mut seen = kv.mod_revision;
    for _ in 0..8 {
        let txn = Txn::new()
            .when(Compare::ModRevision(key.clone(), seen))
            .and_then(Op::get(records::alive_key(id)))
            .and_then(Op::delete(key.clone()))
            .and_then(Op::delete(records::name_key(&record.hostname)))
            .and_then(Op::delete(records::inventory_key(id)))
            .and_then(Op::delete(records::alive_key(id)))
            .and_then(Op::DeletePrefix { prefix: format!("/hosts/{id}/") });
        let resp = store.txn(txn).await?;
        if resp.succeeded {
            // A heartbeat between `stop` and the delete may have granted a new lease;
            // end it too, so that no replica's cache keeps the credential alive.
            if let Some(store::OpResult::Get(Some(alive))) = resp.results.first() {
                match store.lease_revoke(alive.lease).await {
                    Ok(()) | Err(store::StoreError::LeaseNotFound(_)) => {}
                    Err(e) if alive.lease == 0 => tracing::debug!(host_id = %id, error = %e, "heartbeat key without a lease"),
                    Err(e) => return Err(e.into()),
                }
            }
            tracing::info!(host_id = %id, hostname = %record.hostname, "host deleted");
            return Ok(());
        }
        match store.get(&key).await? {
            Some(kv) => seen = kv.mod_revision,
            None => return Ok(()),
        }
    }
    Err(HostsError::Contention)
}
