//! Nova's `os-services`: every enrolled host is one `nova-compute` service.
//!
//! - `GET /os-services?host=&binary=`
//! - 2.53 and later: `PUT /os-services/{uuid}` with `{"status": "enabled"|"disabled",
//!   "disabled_reason": ...}`
//! - before 2.53: `PUT /os-services/{enable,disable,disable-log-reason}` with
//!   `{"host", "binary"[, "disabled_reason"]}`
//!
//! The state is `up` while the host's heartbeat lease lives; `updated_at` is the time
//! of the host's last heartbeat ([`updated_at`]). Forcing a service down is
//! not offered: a host's state always follows its heartbeat.

use axum::extract::{Extension, Path, Query, State};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::microversion::Microversion;
use super::{nova_time, require_admin};
use crate::error::{ApiError, Dialect};
use crate::hosts::registry::{self, HostStatus};
use crate::identity::Auth;
use crate::state::AppState;

/// The binary every host's service is reported as.
pub const BINARY: &str = "nova-compute";

/// `os-services` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/os-services", axum::routing::get(list))
        .route("/os-services/{id}", axum::routing::put(update))
}

/// `updated_at` of a host's service: the time of its last heartbeat, as Nova shows a
/// service's last report. No store write per heartbeat records it; the replica knows it
/// (see [`crate::hosts::cache::last_heartbeat`]): exact for heartbeats this replica
/// served, otherwise, for an up host, no earlier than one TTL ago (its live lease proves
/// a heartbeat since) and no earlier than its lease's grant; for a down host, the time
/// the monitor saw it go down minus the TTL; null if it never heartbeated.
pub fn updated_at(state: &AppState, h: &HostStatus) -> Value {
    let t = state.hosts.last_heartbeat(&h.record, h.up, state.config.hosts.heartbeat_ttl_secs);
    t.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()).map_or(Value::Null, |t| nova_time(&t))
}

/// One service as Nova shows it at `version`, last updated at `updated_at`.
pub fn view(h: &HostStatus, version: Microversion, updated_at: Value) -> Value {
    let r = &h.record;
    let mut v = json!({
        "id": if version.at_least(53) { json!(r.id) } else { json!(h.number) },
        "binary": BINARY,
        "host": r.hostname,
        "zone": r.zone,
        "status": if r.enabled { "enabled" } else { "disabled" },
        "state": h.state().as_str(),
        "updated_at": updated_at,
        "disabled_reason": r.disabled_reason,
    });
    if version.at_least(11) {
        v["forced_down"] = json!(false);
    }
    v
}

/// Filters of the service list.
#[derive(Debug, Deserialize)]
struct ListQuery {
    host: Option<String>,
    binary: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    Extension(version): Extension<Microversion>,
    auth: Auth,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&auth)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(Dialect::Nova, e.body_text()))?;
    let hosts = registry::list(state.store.as_ref()).await.map_err(|e| e.to_api(Dialect::Nova))?;
    let services: Vec<Value> = hosts
        .iter()
        .filter(|h| q.host.as_deref().is_none_or(|n| n == h.record.hostname))
        .filter(|_| q.binary.as_deref().is_none_or(|b| b == BINARY))
        .map(|h| view(h, version, updated_at(&state, h)))
        .collect();
    Ok(Json(json!({ "services": services })))
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::bad_request(Dialect::Nova, m)
}

fn reason_of(body: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match body.get("disabled_reason") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= registry::MAX_REASON_LEN => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("disabled_reason must be a string of 1 to {} characters", registry::MAX_REASON_LEN))),
    }
}

async fn update(
    State(state): State<AppState>,
    Extension(version): Extension<Microversion>,
    auth: Auth,
    Path(id): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&auth)?;
    let Json(body) = body.map_err(|e| bad(format!("Malformed request body: {}", e.body_text())))?;
    let Value::Object(body) = body else { return Err(bad("The request body must be a JSON object.")) };
    let store = state.store.as_ref();
    if version.at_least(53) {
        if uuid::Uuid::parse_str(&id).is_err() {
            return Err(bad(format!("Invalid uuid {id}")));
        }
        if body.is_empty() {
            return Err(bad("Nothing to update: give status, disabled_reason or forced_down."));
        }
        for k in body.keys() {
            if !matches!(k.as_str(), "status" | "disabled_reason" | "forced_down") {
                return Err(bad(format!("Additional properties are not allowed ('{k}' was unexpected)")));
            }
        }
        if body.get("forced_down").is_some_and(|v| v != &Value::Bool(false)) {
            return Err(bad("Forcing a service down is not supported: a host's state follows its heartbeat lease."));
        }
        let reason = reason_of(&body)?;
        let current = registry::get(store, &id).await.map_err(|_| ApiError::not_found(Dialect::Nova, format!("Service {id} could not be found.")))?;
        let enabled = match body.get("status") {
            Some(Value::String(s)) if s == "enabled" => true,
            Some(Value::String(s)) if s == "disabled" => false,
            Some(_) => return Err(bad("status must be 'enabled' or 'disabled'")),
            None => current.record.enabled,
        };
        if reason.is_some() && enabled {
            return Err(bad("Specifying 'disabled_reason' with status 'enabled' is invalid."));
        }
        let reason = if enabled { None } else { reason.or(current.record.disabled_reason.clone()) };
        let h = registry::set_enabled(store, &id, enabled, reason).await.map_err(|e| e.to_api(Dialect::Nova))?;
        tracing::info!(user = %auth.user_name, host = %h.record.hostname, enabled, "compute service updated");
        return Ok(Json(json!({ "service": view(&h, version, updated_at(&state, &h)) })));
    }

    // Before 2.53 the path names an action and the body names the host.
    let action = id.as_str();
    if !matches!(action, "enable" | "disable" | "disable-log-reason" | "force-down") {
        return Err(ApiError::not_found(Dialect::Nova, "Unknown action"));
    }
    let host = match body.get("host") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(bad("'host' is a required property")),
    };
    let binary = match body.get("binary") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(bad("'binary' is a required property")),
    };
    let not_found = || ApiError::not_found(Dialect::Nova, format!("Service {binary} on host {host} could not be found."));
    if binary != BINARY {
        return Err(not_found());
    }
    let host_id = registry::id_by_name(store, &host).await.map_err(|e| e.to_api(Dialect::Nova))?.ok_or_else(not_found)?;
    let (enabled, reason) = match action {
        "enable" => (true, None),
        "disable" => (false, None),
        "disable-log-reason" => match reason_of(&body)? {
            Some(r) => (false, Some(r)),
            None => return Err(bad("'disabled_reason' is a required property")),
        },
        _ => {
            if !version.at_least(11) {
                return Err(ApiError::not_found(Dialect::Nova, "Unknown action"));
            }
            return Err(bad("Forcing a service down is not supported: a host's state follows its heartbeat lease."));
        }
    };
    let h = registry::set_enabled(store, &host_id, enabled, reason).await.map_err(|e| e.to_api(Dialect::Nova))?;
    tracing::info!(user = %auth.user_name, host = %h.record.hostname, enabled, "compute service updated");
    let mut service = json!({ "host": h.record.hostname, "binary": BINARY, "status": if enabled { "enabled" } else { "disabled" } });
    if action == "disable-log-reason" {
        service["disabled_reason"] = json!(h.record.disabled_reason);
    }
    Ok(Json(json!({ "service": service })))
}
