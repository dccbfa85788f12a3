//! Usages: of one provider, and (1.9) of a project or user.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::providers::require;
use super::{bad_request, path_uuid, single, Admin, QueryPairs};
use crate::error::ApiError;
use crate::placement::db;
use crate::placement::microversion::Version;
use crate::state::AppState;

/// GET /resource_providers/{uuid}/usages
pub async fn for_provider(State(st): State<AppState>, _a: Admin, Path(u): Path<String>) -> Result<Json<Value>, ApiError> {
    let p = db::must_get_provider(st.store.as_ref(), &path_uuid(&u)?).await?.value;
    Ok(Json(json!({"resource_provider_generation": p.generation, "usages": p.usages()})))
}

/// GET /usages?project_id=P[&user_id=U][&consumer_type=T] (1.9; grouped by consumer type from 1.38)
pub async fn totals(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Query(q): Query<QueryPairs>,
) -> Result<Json<Value>, ApiError> {
    require(v, 9)?;
    for (k, _) in &q {
        let ok = k == "project_id" || k == "user_id" || (k == "consumer_type" && v.at_least(38));
        if !ok {
            return Err(bad_request(format!("Invalid query string parameters: Additional properties are not allowed ('{k}' was unexpected)")));
        }
    }
    let project = single(&q, "project_id")?.ok_or_else(|| bad_request("Invalid query string parameters: 'project_id' is a required property"))?;
    let user = single(&q, "user_id")?;
    let ctype = single(&q, "consumer_type")?;
    let consumers = db::list_consumers(st.store.as_ref()).await?;
    let mut flat: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_type: BTreeMap<String, (BTreeMap<String, u64>, u64)> = BTreeMap::new();
    for c in consumers.iter().filter(|c| c.project_id == project && user.is_none_or(|u| c.user_id == u)) {
        let t = c.consumer_type.clone().unwrap_or_else(|| "unknown".into());
        if let Some(want) = ctype {
            if want != "all" && want != t && !(want == "unknown" && c.consumer_type.is_none()) {
                continue;
            }
        }
        let entry = by_type.entry(t).or_default();
        entry.1 += 1;
        for res in c.allocations.values() {
            for (class, n) in res {
                *flat.entry(class.clone()).or_default() += n;
                *entry.0.entry(class.clone()).or_default() += n;
            }
        }
    }
    if !v.at_least(38) {
        return Ok(Json(json!({"usages": flat})));
    }
    let mut out = serde_json::Map::new();
    if ctype == Some("all") {
        let count: u64 = by_type.values().map(|(_, n)| n).sum();
        let mut m = json!(flat);
        m["consumer_count"] = json!(count);
        out.insert("all".into(), m);
    } else {
        for (t, (res, count)) in by_type {
            let mut m = json!(res);
            m["consumer_count"] = json!(count);
            out.insert(t, m);
        }
    }
    Ok(Json(json!({"usages": out})))
}
