//! Handlers of the agent API (`/agent/v1`).
//!
//! - `POST /enrol`: join token -> host id and secret (no other credential needed)
//! - `GET /hosts/{id}`: the host's own record
//! - `POST /hosts/{id}/heartbeat`: keep the host's lease alive
//! - `PUT /hosts/{id}/inventory`: report what the host has (kept and synced to placement)
//! - `GET /hosts/{id}/desired?after=<rev>&timeout=<secs>`: long-poll of the desired state
//! - `GET /hosts/{id}/observed`, `PUT|GET|DELETE /hosts/{id}/observed/{kind}/{name}`
//!
//! Every path with a host id requires that host's credential ([`HostAuth`]).

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use model::agent_api::{
    DesiredRecord, DesiredState, EnrolRequest, EnrolResponse, HeartbeatResponse, HostCredential, InventoryAccepted, InventoryReport,
    ObservedRecord, ObservedReport,
};
use model::inventory::HostInventory;
use serde::Deserialize;
use store::record::{decode, encode};
use store::{Compare, Op, StoreError, Txn};
use uuid::Uuid;

use super::auth::{self, HostAuth};
use super::error::HostsError;
use super::records::{self, InventoryRecord, ObservedValue};
use super::{enrol, heartbeat, provider_tree, registry};
use crate::error::{ApiError, Dialect};
use crate::state::AppState;

/// Longest a desired-state long-poll waits, in seconds.
pub const MAX_WAIT_SECS: u64 = 55;
/// Wait of a desired-state long-poll when the agent does not say, in seconds.
pub const DEFAULT_WAIT_SECS: u64 = 25;

/// The agent API's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/enrol", post(enrol_host))
        .route("/hosts/{id}", get(own_host))
        .route("/hosts/{id}/heartbeat", post(beat))
        .route("/hosts/{id}/inventory", put(report_inventory).get(read_inventory))
        .route("/hosts/{id}/desired", get(desired))
        .route("/hosts/{id}/observed", get(list_observed))
        .route("/hosts/{id}/observed/{kind}/{name}", put(put_observed).get(get_observed).delete(delete_observed))
}

fn json_body<T>(body: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|e| ApiError::bad_request(Dialect::Plain, format!("Malformed request body: {}", e.body_text())))
}

fn store_err(e: StoreError) -> ApiError {
    ApiError::from_store(Dialect::Plain, e)
}

async fn enrol_host(
    State(state): State<AppState>,
    body: Result<Json<EnrolRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<EnrolResponse>), ApiError> {
    let req = json_body(body)?;
    let resp = enrol::enrol(state.store.as_ref(), &req, state.config.hosts.heartbeat_ttl_secs).await?;
    Ok((StatusCode::CREATED, Json(resp)))
}

async fn own_host(State(state): State<AppState>, auth: HostAuth, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    auth.require(&id)?;
    let host = registry::get(state.store.as_ref(), &id).await?;
    Ok(Json(serde_json::json!({ "host": host.view() })))
}

async fn beat(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<HeartbeatResponse>, ApiError> {
    let cred = auth::credential(&headers)?;
    Ok(Json(serve_heartbeat(&state, &cred, &id).await?))
}

/// A heartbeat of host `id` by the caller with credential `cred`.
///
/// Fast path (one store round trip): the secret matches the replica's cached
/// credential hash and the cached lease is kept alive. Otherwise (unknown to the
/// cache, mismatch, lease gone, cache not following the store) the slow path checks
/// the credential against the stored record and re-grants the lease if it is gone.
pub async fn serve_heartbeat(state: &AppState, cred: &HostCredential, id: &str) -> Result<HeartbeatResponse, ApiError> {
    let ttl = state.config.hosts.heartbeat_ttl_secs;
    let store = state.store.as_ref();
    if let Some(cached) = state.hosts.verify(&cred.host_id, &cred.secret) {
        auth::require_own(&cached.record.id, id)?;
        if heartbeat::keep_alive(store, cached.lease).await.map_err(store_err)? {
            state.hosts.beat(id);
            return Ok(HeartbeatResponse { ttl_secs: ttl, renewed: false, enabled: cached.record.enabled });
        }
        state.hosts.forget_lease(id, cached.lease);
    }
    let auth = auth::verify_in_store(store, cred).await?;
    auth.require(id)?;
    let beat = heartbeat::heartbeat(store, id, ttl).await.map_err(store_err)?;
    if let Some(revision) = beat.revision {
        state.hosts.learned_lease(id, beat.lease, revision);
    }
    state.hosts.beat(id);
    if beat.renewed {
        tracing::info!(host_id = %id, hostname = %auth.host.hostname, "heartbeat lease granted");
    }
    Ok(HeartbeatResponse { ttl_secs: ttl, renewed: beat.renewed, enabled: auth.host.enabled })
}

/// Refuses inventories too large or malformed to be a real host's.
fn validate_inventory(inv: &HostInventory) -> Result<(), HostsError> {
    let bad = |m: String| Err(HostsError::Invalid(m));
    if inv.numa_nodes.len() > 256 {
        return bad(format!("{} NUMA nodes is more than 256", inv.numa_nodes.len()));
    }
    if inv.cpu_count() > 65536 {
        return bad("more than 65536 CPUs".into());
    }
    if inv.sriov_pfs.len() > 1024 {
        return bad("more than 1024 SR-IOV PFs".into());
    }
    if inv.cpu_traits.len() > 1024 {
        return bad("more than 1024 CPU traits".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for n in &inv.numa_nodes {
        if !seen.insert(n.id) {
            return bad(format!("NUMA node {} appears twice", n.id));
        }
        for p in &n.hugepages {
            if p.size_kb == 0 || p.free > p.total {
                return bad(format!("hugepages of node {} are inconsistent", n.id));
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for pf in &inv.sriov_pfs {
        if !records::valid_segment(&pf.interface) || !seen.insert(&pf.interface) {
            return bad(format!("SR-IOV interface name '{}' is invalid or repeated", pf.interface));
        }
        if pf.num_vfs > pf.total_vfs {
            return bad(format!("{} has more VFs ({}) than it supports ({})", pf.interface, pf.num_vfs, pf.total_vfs));
        }
    }
    for t in &inv.cpu_traits {
        if !crate::placement::traits::is_well_formed(t) {
            return bad(format!("'{t}' is not a trait name"));
        }
    }
    Ok(())
}

async fn report_inventory(
    State(state): State<AppState>,
    auth: HostAuth,
    Path(id): Path<String>,
    body: Result<Json<InventoryReport>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<InventoryAccepted>, ApiError> {
    auth.require(&id)?;
    let report = json_body(body)?;
    validate_inventory(&report.inventory)?;
    let store = state.store.as_ref();
    let host_uuid = Uuid::parse_str(&id).map_err(|_| ApiError::not_found(Dialect::Plain, "No such host."))?;
    let tree = provider_tree::build(&host_uuid, &auth.host.hostname, &report.inventory, auth.host.enabled);
    // Placement first: if it refuses (say, an inventory below what is allocated), the
    // report is refused as a whole and the previous one stays.
    crate::placement::db::sync_provider_tree(store, &tree).await.map_err(HostsError::from)?;
    let key = records::inventory_key(&id);
    let record = InventoryRecord { inventory: report.inventory, load: report.load, reported_at: records::now_rfc3339() };
    for _ in 0..8 {
        let seen = store.get(&key).await.map_err(store_err)?.map_or(0, |kv| kv.mod_revision);
        let txn = Txn::new()
            .when(Compare::ModRevision(key.clone(), seen))
            .when(Compare::Exists(records::record_key(&id)))
            .and_then(Op::put(key.clone(), encode(&record)));
        let resp = store.txn(txn).await.map_err(store_err)?;
        if resp.succeeded {
            let providers = tree.flatten().iter().map(|(p, _)| p.uuid.to_string()).collect();
            tracing::info!(host_id = %id, cpus = record.inventory.cpu_count(), memory_mb = record.inventory.memory_mb, "inventory reported");
            return Ok(Json(InventoryAccepted { revision: resp.revision, providers }));
        }
    }
    Err(HostsError::Contention.into())
}

async fn read_inventory(State(state): State<AppState>, auth: HostAuth, Path(id): Path<String>) -> Result<Json<InventoryRecord>, ApiError> {
    auth.require(&id)?;
    let kv = state
        .store
        .get(&records::inventory_key(&id))
        .await
        .map_err(store_err)?
        .ok_or_else(|| ApiError::not_found(Dialect::Plain, "The host has not reported an inventory yet."))?;
    Ok(Json(decode(&kv.key, &kv.value).map_err(store_err)?))
}

/// Query of the desired-state long-poll.
#[derive(Debug, Deserialize)]
struct DesiredQuery {
    /// Revision the agent has seen; wait for a change after it.
    after: Option<i64>,
    /// Longest wait in seconds.
    timeout: Option<u64>,
}

async fn snapshot(state: &AppState, id: &str) -> Result<DesiredState, ApiError> {
    let prefix = records::desired_prefix(id);
    let range = state.store.range(&prefix).await.map_err(store_err)?;
    let mut records = Vec::with_capacity(range.kvs.len());
    for kv in range.kvs {
        let rest = &kv.key[prefix.len()..];
        let Some((kind, name)) = rest.split_once('/') else {
            tracing::warn!(key = %kv.key, "desired-state key without kind/name skipped");
            continue;
        };
        let spec = serde_json::from_slice(&kv.value)
            .map_err(|e| store_err(StoreError::Corrupt { key: kv.key.clone(), reason: e.to_string() }))?;
        records.push(DesiredRecord { kind: kind.into(), name: name.into(), revision: kv.mod_revision, spec });
    }
    Ok(DesiredState { revision: range.revision, changed: true, records })
}

async fn desired(
    State(state): State<AppState>,
    auth: HostAuth,
    Path(id): Path<String>,
    query: Result<Query<DesiredQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DesiredState>, ApiError> {
    auth.require(&id)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(Dialect::Plain, e.body_text()))?;
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request(Dialect::Plain, "'after' must not be negative."));
    }
    if after == 0 {
        return Ok(Json(snapshot(&state, &id).await?));
    }
    let wait = Duration::from_secs(q.timeout.unwrap_or(DEFAULT_WAIT_SECS).min(MAX_WAIT_SECS));
    let mut stream = match state.store.watch(&records::desired_prefix(&id), after + 1).await {
        Ok(s) => s,
        // The agent is too far behind: give it the whole state again.
        Err(StoreError::Compacted { .. }) => return Ok(Json(snapshot(&state, &id).await?)),
        Err(e) => return Err(store_err(e)),
    };
    let no_change = || Json(DesiredState { revision: after, changed: false, records: vec![] });
    // The replica shutting down ends the wait at once with the "no change" answer, so
    // a long poll never holds up the drain; the agent simply polls again (elsewhere).
    let mut stopping = state.shutdown.subscribe();
    let next = tokio::select! {
        next = tokio::time::timeout(wait, stream.next()) => next,
        _ = stopping.wait_for(|stop| *stop) => return Ok(no_change()),
    };
    match next {
        Err(_) => Ok(no_change()),
        Ok(Some(Ok(_))) | Ok(Some(Err(StoreError::Compacted { .. }))) => Ok(Json(snapshot(&state, &id).await?)),
        Ok(Some(Err(e))) => Err(store_err(e)),
        Ok(None) => Err(ApiError::unavailable(Dialect::Plain, "The store ended the watch; try again.")),
    }
}

fn check_segments(kind: &str, name: &str) -> Result<(), ApiError> {
    if records::valid_segment(kind) && records::valid_segment(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(Dialect::Plain, "Kind and name must be 1 to 128 characters of letters, digits, '.', '-' and '_'."))
    }
}

async fn put_observed(
    State(state): State<AppState>,
    auth: HostAuth,
    Path((id, kind, name)): Path<(String, String, String)>,
    body: Result<Json<ObservedReport>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ObservedRecord>, ApiError> {
    auth.require(&id)?;
    check_segments(&kind, &name)?;
    let report = json_body(body)?;
    let store = state.store.as_ref();
    let key = records::observed_key(&id, &kind, &name);
    let value = ObservedValue { status: report.status, reported_at: records::now_rfc3339() };
    for _ in 0..8 {
        let seen = store.get(&key).await.map_err(store_err)?.map_or(0, |kv| kv.mod_revision);
        let txn = Txn::new()
            .when(Compare::ModRevision(key.clone(), seen))
            .when(Compare::Exists(records::record_key(&id)))
            .and_then(Op::put(key.clone(), encode(&value)));
        if store.txn(txn).await.map_err(store_err)?.succeeded {
            return Ok(Json(ObservedRecord { kind, name, status: value.status, reported_at: value.reported_at }));
        }
    }
    Err(HostsError::Contention.into())
}

async fn get_observed(
    State(state): State<AppState>,
    auth: HostAuth,
    Path((id, kind, name)): Path<(String, String, String)>,
) -> Result<Json<ObservedRecord>, ApiError> {
    auth.require(&id)?;
    check_segments(&kind, &name)?;
    let kv = state
        .store
        .get(&records::observed_key(&id, &kind, &name))
        .await
        .map_err(store_err)?
        .ok_or_else(|| ApiError::not_found(Dialect::Plain, format!("No observed {kind} named {name}.")))?;
    let v: ObservedValue = decode(&kv.key, &kv.value).map_err(store_err)?;
    Ok(Json(ObservedRecord { kind, name, status: v.status, reported_at: v.reported_at }))
}

async fn list_observed(State(state): State<AppState>, auth: HostAuth, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    auth.require(&id)?;
    let prefix = records::observed_prefix(&id);
    let mut out = Vec::new();
    for kv in state.store.range(&prefix).await.map_err(store_err)?.kvs {
        let Some((kind, name)) = kv.key[prefix.len()..].split_once('/') else { continue };
        let v: ObservedValue = decode(&kv.key, &kv.value).map_err(store_err)?;
        out.push(ObservedRecord { kind: kind.into(), name: name.into(), status: v.status, reported_at: v.reported_at });
    }
    Ok(Json(serde_json::json!({ "observed": out })))
}

async fn delete_observed(
    State(state): State<AppState>,
    auth: HostAuth,
    Path((id, kind, name)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    auth.require(&id)?;
    check_segments(&kind, &name)?;
    let key = records::observed_key(&id, &kind, &name);
    let Some(kv) = state.store.get(&key).await.map_err(store_err)? else {
        return Err(ApiError::not_found(Dialect::Plain, format!("No observed {kind} named {name}.")));
    };
    let txn = Txn::new().when(Compare::ModRevision(key.clone(), kv.mod_revision)).and_then(Op::delete(key));
    if state.store.txn(txn).await.map_err(store_err)?.succeeded {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::conflict(Dialect::Plain, "The record changed meanwhile; try again."))
    }
}
