//! Nova's `os-hypervisors`: every enrolled host is one hypervisor.
//!
//! Sizes come from the host's reported inventory and usage from its root resource
//! provider's allocations in placement. Ids are the host's small integer before 2.53
//! and its uuid from 2.53; 2.33 adds `limit`/`marker` paging; 2.53 adds
//! `hypervisor_hostname_pattern` (and retires `/{pattern}/search`).

use std::collections::HashMap;

use axum::extract::{Extension, Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use model::inventory::HostInventory;
use serde::Deserialize;
use serde_json::{json, Value};
use store::record::decode;

use super::microversion::Microversion;
use super::require_admin;
use crate::error::{ApiError, Dialect};
use crate::hosts::records::{self, InventoryRecord};
use crate::hosts::registry::{self, HostStatus};
use crate::identity::Auth;
use crate::placement::db;
use crate::state::AppState;

/// What the hypervisor type is reported as.
pub const HYPERVISOR_TYPE: &str = "KVM";

/// `os-hypervisors` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/os-hypervisors", get(list))
        .route("/os-hypervisors/detail", get(detail))
        .route("/os-hypervisors/statistics", get(statistics))
        .route("/os-hypervisors/{id}", get(show))
        .route("/os-hypervisors/{id}/uptime", get(uptime))
        .route("/os-hypervisors/{pattern}/search", get(search))
}

/// A host with what the hypervisor views need.
struct Hypervisor {
    host: HostStatus,
    inventory: Option<HostInventory>,
    provider: Option<db::Provider>,
}

impl Hypervisor {
    fn id(&self, version: Microversion) -> Value {
        if version.at_least(53) {
            json!(self.host.record.id)
        } else {
            json!(self.host.number)
        }
    }

    fn status(&self) -> &'static str {
        if self.host.record.enabled {
            "enabled"
        } else {
            "disabled"
        }
    }

    fn summary(&self, version: Microversion) -> Value {
        json!({
            "id": self.id(version),
            "hypervisor_hostname": self.host.record.hostname,
            "state": self.host.state().as_str(),
            "status": self.status(),
        })
    }

    /// (total, used) of a class on the root provider.
    fn amounts(&self, class: &str) -> (u64, u64) {
        match &self.provider {
            Some(p) => (p.inventories.get(class).map_or(0, |i| i.total), p.used(class)),
            None => (0, 0),
        }
    }

    fn detail(&self, version: Microversion) -> Value {
        let r = &self.host.record;
        let inv = self.inventory.as_ref();
        let (vcpus, vcpus_used) = self.amounts("VCPU");
        let (memory_mb, memory_used) = self.amounts("MEMORY_MB");
        let (local_gb, local_used) = self.amounts("DISK_GB");
        let cpu_info = json!({
            "arch": std::env::consts::ARCH,
            "model": inv.and_then(|i| i.cpu_model.clone()),
            "vendor": Value::Null,
            "topology": {
                "cells": inv.map_or(0, |i| i.numa_nodes.len()),
                "cpus": inv.map_or(0, |i| i.cpu_count()),
            },
            "features": inv.map(|i| i.cpu_traits.iter().map(|t| t.trim_start_matches("HW_CPU_X86_").to_ascii_lowercase()).collect::<Vec<_>>()).unwrap_or_default(),
        });
        let mut v = self.summary(version);
        let extra = json!({
            "host_ip": inv.and_then(|i| i.host_ip.clone()),
            "hypervisor_type": HYPERVISOR_TYPE,
            "hypervisor_version": hypervisor_version(),
            "service": {
                "host": r.hostname,
                "id": if version.at_least(53) { json!(r.id) } else { json!(self.host.number) },
                "disabled_reason": r.disabled_reason,
            },
            "cpu_info": if version.at_least(28) { cpu_info } else { Value::String(cpu_info.to_string()) },
            "vcpus": vcpus,
            "vcpus_used": vcpus_used,
            "memory_mb": memory_mb,
            "memory_mb_used": memory_used,
            "free_ram_mb": memory_mb as i64 - memory_used as i64,
            "local_gb": local_gb,
            "local_gb_used": local_used,
            "free_disk_gb": local_gb as i64 - local_used as i64,
            "disk_available_least": inv.and_then(|i| i.instance_pool.as_ref()).map(|p| p.free_gb),
            "current_workload": 0,
            "running_vms": self.provider.as_ref().map_or(0, |p| p.consumers),
        });
        if let (Value::Object(a), Value::Object(b)) = (&mut v, extra) {
            a.extend(b);
        }
        v
    }
}

/// This build's version as Nova encodes versions (major * 1000000 + minor * 1000 + patch).
fn hypervisor_version() -> u64 {
    let mut parts = env!("CARGO_PKG_VERSION").split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (a, b, c) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    a * 1_000_000 + b * 1000 + c
}

async fn load(state: &AppState, hosts: Vec<HostStatus>) -> Result<Vec<Hypervisor>, ApiError> {
    let store = state.store.as_ref();
    let store_err = |e| ApiError::from_store(Dialect::Nova, e);
    let mut inventories: HashMap<String, HostInventory> = HashMap::new();
    for kv in store.range("/hosts/inventory/").await.map_err(store_err)?.kvs {
        let rec: InventoryRecord = decode(&kv.key, &kv.value).map_err(store_err)?;
        if let Some(id) = kv.key.strip_prefix("/hosts/inventory/") {
            inventories.insert(id.to_string(), rec.inventory);
        }
    }
    let mut out = Vec::with_capacity(hosts.len());
    for host in hosts {
        let provider = match uuid::Uuid::parse_str(&host.record.id) {
            Ok(u) => db::get_provider(store, &u).await.map_err(|e| match e {
                db::DbError::Store(e) => store_err(e),
                e => ApiError::internal(Dialect::Nova, e.to_string()),
            })?,
            Err(_) => None,
        };
        let inventory = inventories.remove(&host.record.id);
        out.push(Hypervisor { host, inventory, provider: provider.map(|p| p.value) });
    }
    Ok(out)
}

/// Query of the hypervisor lists.
#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    limit: Option<String>,
    marker: Option<String>,
    hypervisor_hostname_pattern: Option<String>,
    with_servers: Option<String>,
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::bad_request(Dialect::Nova, m)
}

/// Hosts selected by the query (pattern, marker, limit), honouring the version.
async fn select(state: &AppState, version: Microversion, q: &ListQuery) -> Result<(Vec<Hypervisor>, Option<String>), ApiError> {
    if !version.at_least(33) && (q.limit.is_some() || q.marker.is_some()) {
        return Err(bad("limit and marker need microversion 2.33 or later"));
    }
    if !version.at_least(53) && (q.hypervisor_hostname_pattern.is_some() || q.with_servers.is_some()) {
        return Err(bad("hypervisor_hostname_pattern and with_servers need microversion 2.53 or later"));
    }
    if q.with_servers.as_deref().is_some_and(|w| !matches!(w.to_ascii_lowercase().as_str(), "false" | "0" | "no" | "off")) {
        return Err(bad("with_servers is not supported by this cloud yet"));
    }
    let limit = match &q.limit {
        Some(l) => Some(l.parse::<usize>().map_err(|_| bad("limit must be a non-negative integer"))?),
        None => None,
    };
    let mut hosts = registry::list(state.store.as_ref()).await.map_err(|e| e.to_api(Dialect::Nova))?;
    hosts.sort_by_key(|h| h.number);
    if let Some(p) = &q.hypervisor_hostname_pattern {
        hosts.retain(|h| h.record.hostname.contains(p.as_str()));
        if hosts.is_empty() {
            return Err(ApiError::not_found(Dialect::Nova, format!("No hypervisor matching '{p}' could be found.")));
        }
    }
    if let Some(m) = &q.marker {
        let pos = hosts
            .iter()
            .position(|h| if version.at_least(53) { h.record.id == *m } else { h.number.to_string() == *m })
            .ok_or_else(|| bad(format!("marker [{m}] not found")))?;
        hosts.drain(..=pos);
    }
    let mut next = None;
    if let Some(l) = limit {
        if hosts.len() > l {
            hosts.truncate(l);
        }
        if hosts.len() == l && l > 0 {
            let last = hosts.last().unwrap();
            next = Some(if version.at_least(53) { last.record.id.clone() } else { last.number.to_string() });
        }
    }
    Ok((load(state, hosts).await?, next))
}

fn with_links(state: &AppState, key: &str, list: Vec<Value>, path: &str, next: Option<String>, limit: &Option<String>) -> Value {
    let mut v = json!({ key: list });
    if let Some(marker) = next {
        let limit = limit.clone().unwrap_or_default();
        v[format!("{key}_links")] =
            json!([{"rel": "next", "href": format!("{}/compute/v2.1{path}?limit={limit}&marker={marker}", state.config.public_url)}]);
    }
    v
}

async fn list(
    State(state): State<AppState>,
    Extension(version): Extension<Microversion>,
    auth: Auth,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&auth)?;
    let Query(q) = query.map_err(|e| bad(e.body_text()))?;
    let (hs, next) = select(&state, version, &q).await?;
    let list = hs.iter().map(|h| h.summary(version)).collect();
    Ok(Json(with_links(&state, "hypervisors", list, "/os-hypervisors", next, &q.limit)))
}

async fn detail(
    State(state): State<AppState>,
    Extension(version): Extension<Microversion>,
    auth: Auth,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&auth)?;
    let Query(q) = query.map_err(|e| bad(e.body_text()))?;
    let (hs, next) = select(&state, version, &q).await?;
    let list = hs.iter().map(|h| h.detail(version)).collect();
    Ok(Json(with_links(&state, "hypervisors", list, "/os-hypervisors/detail", next, &q.limit)))
}

/// The host a hypervisor id names at `version` (a uuid from 2.53, the small integer before).
async fn find(state: &AppState, version: Microversion, id: &str) -> Result<HostStatus, ApiError> {
    let not_found = || ApiError::not_found(Dialect::Nova, format!("Hypervisor with ID {id} could not be found."));
    let host_id = if version.at_least(53) {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(bad(format!("Invalid uuid {id}")));
        }
        id.to_string()
    } else {
        let number: i64 = id.parse().map_err(|_| not_found())?;
        let hosts = registry::list(state.store.as_ref()).await.map_err(|e| e.to_api(Dialect::Nova))?;
        hosts.into_iter().find(|h| h.number == number).ok_or_else(not_found)?.record.id
    };
    registry::get(state.store.as_ref(), &host_id).await.map_err(|_| not_found())
}

async fn show(
    State(state): State<AppState>,
    Extension(version): Extension<Microversion>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&auth)?;
    let host = find(&state, version, &id).await?;
    let h = load(&state, vec![host]).await?;
    Ok(Json(json!({ "hypervisor": h[0].detail(version) })))
}

/// `uptime(1)`'s line for a host's last report, e.g.
/// ` 08:32:11 up 93 days, 18:25,  2 users,  load average: 0.20, 0.16, 0.11`.
pub fn uptime_line(load: &model::agent_api::HostLoad, at: time::OffsetDateTime) -> String {
    let up = load.uptime_secs;
    let (days, hours, mins) = (up / 86400, up % 86400 / 3600, up % 3600 / 60);
    let mut s = format!(" {:02}:{:02}:{:02} up ", at.hour(), at.minute(), at.second());
    if days > 0 {
        s.push_str(&format!("{days} day{}, ", if days == 1 { "" } else { "s" }));
    }
    if hours > 0 {
        s.push_str(&format!("{hours:2}:{mins:02}, "));
    } else {
        s.push_str(&format!("{mins} min, "));
    }
    let [a, b, c] = load.load_average;
    s.push_str(&format!(" {} user{},  load average: {a:.2}, {b:.2}, {c:.2}", load.users, if load.users == 1 { "" } else { "s" }));
    s
}

/// `GET /os-hypervisors/{id}/uptime`: the host's uptime and load average as of its
/// agent's last inventory report (the time in the line is the report's, UTC; the agent
/// reports again when its inventory changes and on every restart). 501, as Nova
/// answers for drivers without uptime, until the host reported them.
async fn uptime(
    State(state): State<AppState>,
    Extension(version): Extension<Microversion>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&auth)?;
    let host = find(&state, version, &id).await?;
    let store_err = |e| ApiError::from_store(Dialect::Nova, e);
    let report = match state.store.get(&records::inventory_key(&host.record.id)).await.map_err(store_err)? {
        Some(kv) => Some(decode::<InventoryRecord>(&kv.key, &kv.value).map_err(store_err)?),
        None => None,
    };
    let line = report.as_ref().and_then(|r| {
        let at = time::OffsetDateTime::parse(&r.reported_at, &time::format_description::well_known::Rfc3339).ok()?;
        Some(uptime_line(r.load.as_ref()?, at.to_offset(time::UtcOffset::UTC)))
    });
    let Some(line) = line else {
        return Err(ApiError::new(
            Dialect::Nova,
            axum::http::StatusCode::NOT_IMPLEMENTED,
            format!("Host {} has not reported its uptime yet.", host.record.hostname),
        ));
    };
    let h = Hypervisor { host, inventory: None, provider: None };
    let mut v = h.summary(version);
    v["uptime"] = json!(line);
    Ok(Json(json!({ "hypervisor": v })))
}

async fn search(
    State(state): State<AppState>,
    Extension(version): Extension<Microversion>,
    auth: Auth,
    Path(pattern): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&auth)?;
    if version.at_least(53) {
        return Err(ApiError::not_found(Dialect::Nova, "Use hypervisor_hostname_pattern from microversion 2.53 on."));
    }
    let hosts = registry::list(state.store.as_ref()).await.map_err(|e| e.to_api(Dialect::Nova))?;
    let list: Vec<Value> = hosts
        .into_iter()
        .filter(|h| h.record.hostname.contains(pattern.as_str()))
        .map(|h| json!({"id": h.number, "hypervisor_hostname": h.record.hostname, "state": h.state().as_str(), "status": if h.record.enabled { "enabled" } else { "disabled" }}))
        .collect();
    if list.is_empty() {
        return Err(ApiError::not_found(Dialect::Nova, format!("No hypervisor matching '{pattern}' could be found.")));
    }
    Ok(Json(json!({ "hypervisors": list })))
}

async fn statistics(State(state): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
    require_admin(&auth)?;
    let hosts = registry::list(state.store.as_ref()).await.map_err(|e| e.to_api(Dialect::Nova))?;
    let hs = load(&state, hosts).await?;
    const FIELDS: [&str; 11] = [
        "vcpus",
        "vcpus_used",
        "memory_mb",
        "memory_mb_used",
        "free_ram_mb",
        "local_gb",
        "local_gb_used",
        "free_disk_gb",
        "disk_available_least",
        "current_workload",
        "running_vms",
    ];
    let mut stats = json!({ "count": hs.len() });
    for k in FIELDS {
        let total: i64 = hs.iter().map(|h| h.detail(Microversion(1))[k].as_i64().unwrap_or(0)).sum();
        stats[k] = json!(total);
    }
    Ok(Json(json!({ "hypervisor_statistics": stats })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_lines_read_like_uptime() {
        let at = time::OffsetDateTime::from_unix_timestamp(8 * 3600 + 32 * 60 + 11).unwrap();
        let load = |uptime_secs, users| model::agent_api::HostLoad { uptime_secs, load_average: [0.2, 0.16, 0.11], users };
        assert_eq!(uptime_line(&load(93 * 86400 + 18 * 3600 + 25 * 60, 2), at), " 08:32:11 up 93 days, 18:25,  2 users,  load average: 0.20, 0.16, 0.11");
        assert_eq!(uptime_line(&load(86400 + 300, 1), at), " 08:32:11 up 1 day, 5 min,  1 user,  load average: 0.20, 0.16, 0.11");
        assert_eq!(uptime_line(&load(2 * 3600 + 33 * 60, 0), at), " 08:32:11 up  2:33,  0 users,  load average: 0.20, 0.16, 0.11");
    }
}
