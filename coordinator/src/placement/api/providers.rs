//! `/resource_providers`: list, create, show, update, delete; a provider's
//! aggregates and traits.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use uuid::Uuid;

use super::query::{self, AggregateRule, TraitRule};
use super::{bad_request, link, only_fields, parse_uuid, path_uuid, single, Admin, Body, QueryPairs};
use crate::error::ApiError;
use crate::placement::db::{self, Provider};
use crate::placement::microversion::Version;
use crate::state::AppState;

/// The JSON of one provider at microversion `v`.
pub fn provider_json(p: &Provider, v: Version) -> Value {
    let base = format!("/resource_providers/{}", p.uuid);
    let mut links = vec![link("self", base.clone()), link("inventories", format!("{base}/inventories")), link("usages", format!("{base}/usages"))];
    if v.at_least(1) {
        links.push(link("aggregates", format!("{base}/aggregates")));
    }
    if v.at_least(6) {
        links.push(link("traits", format!("{base}/traits")));
    }
    if v.at_least(11) {
        links.push(link("allocations", format!("{base}/allocations")));
    }
    let mut out = json!({"uuid": p.uuid, "name": p.name, "generation": p.generation, "links": links});
    if v.at_least(14) {
        out["parent_provider_uuid"] = json!(p.parent);
        out["root_provider_uuid"] = json!(p.root);
    }
    out
}

/// GET /resource_providers
pub async fn list(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Query(q): Query<QueryPairs>,
) -> Result<Json<Value>, ApiError> {
    let mut allowed = vec!["name", "uuid"];
    if v.at_least(3) {
        allowed.push("member_of");
    }
    if v.at_least(4) {
        allowed.push("resources");
    }
    if v.at_least(14) {
        allowed.push("in_tree");
    }
    if v.at_least(18) {
        allowed.push("required");
    }
    for (k, _) in &q {
        if !allowed.contains(&k.as_str()) {
            return Err(bad_request(format!("Invalid query string parameters: Additional properties are not allowed ('{k}' was unexpected)")));
        }
    }
    let name = single(&q, "name")?;
    let uuid = single(&q, "uuid")?.map(|u| parse_uuid(u, "uuid")).transpose()?;
    let resources = single(&q, "resources")?.map(query::resources).transpose()?;
    let in_tree = single(&q, "in_tree")?.map(|u| parse_uuid(u, "in_tree")).transpose()?;
    let mut traits = TraitRule::default();
    for (k, val) in &q {
        if k == "required" {
            query::required(&mut traits, val, v)?;
        }
    }
    if !v.at_least(39) && q.iter().filter(|(k, _)| k == "required").count() > 1 {
        single(&q, "required")?;
    }
    let mut aggs = AggregateRule::default();
    if !v.at_least(24) {
        single(&q, "member_of")?;
    }
    for (k, val) in &q {
        if k == "member_of" {
            query::member_of(&mut aggs, val, v)?;
        }
    }
    db::check_traits_exist(st.store.as_ref(), &traits.names()).await?;
    if let Some(r) = &resources {
        for class in r.keys() {
            if !db::resource_class_exists(st.store.as_ref(), class).await? {
                return Err(bad_request(format!("Invalid resource class in resources parameter: {class}")));
            }
        }
    }
    let (all, _) = db::list_providers(st.store.as_ref()).await?;
    let tree_root = match in_tree {
        Some(u) => match all.iter().find(|p| p.value.uuid == u) {
            Some(p) => Some(p.value.root),
            None => return Ok(Json(json!({"resource_providers": []}))),
        },
        None => None,
    };
    let list: Vec<Value> = all
        .iter()
        .map(|p| &p.value)
        .filter(|p| name.is_none_or(|n| p.name == n))
        .filter(|p| uuid.is_none_or(|u| p.uuid == u))
        .filter(|p| tree_root.is_none_or(|r| p.root == r))
        .filter(|p| traits.matches(&p.traits))
        .filter(|p| aggs.matches(&p.aggregates))
        .filter(|p| resources.as_ref().is_none_or(|r| r.iter().all(|(c, n)| query::has_room(p, c, *n))))
        .map(|p| provider_json(p, v))
        .collect();
    Ok(Json(json!({"resource_providers": list})))
}

/// POST /resource_providers
pub async fn create(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Body(b): Body) -> Result<Response, ApiError> {
    let mut allowed = vec!["name", "uuid"];
    if v.at_least(14) {
        allowed.push("parent_provider_uuid");
    }
    only_fields(&b, &allowed)?;
    let name = super::string(&b, "name")?;
    if name.is_empty() || name.len() > 200 {
        return Err(bad_request("JSON does not validate: 'name' must be 1 to 200 characters"));
    }
    let uuid = match b.get("uuid") {
        None => None,
        Some(Value::String(s)) => Some(parse_uuid(s, "uuid")?),
        Some(other) => return Err(bad_request(format!("JSON does not validate: {other} is not a uuid"))),
    };
    let parent = match b.get("parent_provider_uuid") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_uuid(s, "parent_provider_uuid")?),
        Some(other) => return Err(bad_request(format!("JSON does not validate: {other} is not a uuid"))),
    };
    let p = db::create_provider(st.store.as_ref(), uuid, name, parent).await?;
    let location = format!("/resource_providers/{}", p.uuid);
    if v.at_least(20) {
        Ok((StatusCode::OK, [("location", location)], Json(provider_json(&p, v))).into_response())
    } else {
        Ok((StatusCode::CREATED, [("location", location)]).into_response())
    }
}

/// GET /resource_providers/{uuid}
pub async fn show(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Path(u): Path<String>) -> Result<Json<Value>, ApiError> {
    let p = db::must_get_provider(st.store.as_ref(), &path_uuid(&u)?).await?;
    Ok(Json(provider_json(&p.value, v)))
}

/// PUT /resource_providers/{uuid}: rename, and (1.14) set the parent; (1.37) re-parent.
pub async fn update(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path(u): Path<String>,
    Body(b): Body,
) -> Result<Json<Value>, ApiError> {
    let uuid = path_uuid(&u)?;
    let mut allowed = vec!["name"];
    if v.at_least(14) {
        allowed.push("parent_provider_uuid");
    }
    only_fields(&b, &allowed)?;
    let name = super::string(&b, "name")?;
    let parent = match b.get("parent_provider_uuid") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(s)) => Some(Some(parse_uuid(s, "parent_provider_uuid")?)),
        Some(other) => return Err(bad_request(format!("JSON does not validate: {other} is not a uuid"))),
    };
    let current = db::must_get_provider(st.store.as_ref(), &uuid).await?.value;
    if let Some(new_parent) = parent {
        if new_parent != current.parent && !v.at_least(37) {
            // Before 1.37 a parent may be set once, on a provider that has none.
            if current.parent.is_some() || new_parent.is_none() {
                return Err(bad_request("Re-parenting a provider is not allowed before microversion 1.37."));
            }
        }
    }
    let p = db::rename_provider(st.store.as_ref(), &uuid, name, parent).await?;
    Ok(Json(provider_json(&p, v)))
}

/// DELETE /resource_providers/{uuid}
pub async fn delete(State(st): State<AppState>, _a: Admin, Path(u): Path<String>) -> Result<StatusCode, ApiError> {
    db::delete_provider(st.store.as_ref(), &path_uuid(&u)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// GET /resource_providers/{uuid}/aggregates (1.1; generation from 1.19)
pub async fn get_aggregates(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path(u): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require(v, 1)?;
    let p = db::must_get_provider(st.store.as_ref(), &path_uuid(&u)?).await?.value;
    Ok(Json(aggregates_json(&p, v)))
}

fn aggregates_json(p: &Provider, v: Version) -> Value {
    let mut out = json!({"aggregates": p.aggregates});
    if v.at_least(19) {
        out["resource_provider_generation"] = json!(p.generation);
    }
    out
}

/// PUT /resource_providers/{uuid}/aggregates: a list (before 1.19) or
/// `{"aggregates": [...], "resource_provider_generation": G}`.
pub async fn put_aggregates(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path(u): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    require(v, 1)?;
    let uuid = path_uuid(&u)?;
    let body: Value = serde_json::from_slice(&body).map_err(|e| bad_request(format!("Malformed JSON: {e}")))?;
    let (list, generation) = if v.at_least(19) {
        let Value::Object(m) = &body else { return Err(bad_request("JSON does not validate: body must be an object")) };
        only_fields(m, &["aggregates", "resource_provider_generation"])?;
        (m.get("aggregates").cloned().unwrap_or(Value::Null), Some(super::uint(m, "resource_provider_generation")?))
    } else {
        (body, None)
    };
    let Value::Array(items) = list else { return Err(bad_request("JSON does not validate: 'aggregates' must be a list of uuids")) };
    let mut aggs = BTreeSet::new();
    for i in items {
        let s = i.as_str().ok_or_else(|| bad_request("JSON does not validate: aggregates must be uuids"))?;
        if !aggs.insert(parse_uuid(s, "aggregate")?) {
            return Err(bad_request(format!("JSON does not validate: aggregate {s} appears twice")));
        }
    }
    let p = db::update_provider(st.store.as_ref(), &uuid, generation, |p| {
        let changed = p.aggregates != aggs;
        p.aggregates = aggs.clone();
        Ok(changed || generation.is_some())
    })
    .await?;
    Ok(Json(aggregates_json(&p, v)))
}

/// GET /resource_providers/{uuid}/traits (1.6)
pub async fn get_traits(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path(u): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require(v, 6)?;
    let p = db::must_get_provider(st.store.as_ref(), &path_uuid(&u)?).await?.value;
    Ok(Json(json!({"traits": p.traits, "resource_provider_generation": p.generation})))
}

/// PUT /resource_providers/{uuid}/traits (1.6): replaces the provider's traits.
pub async fn put_traits(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path(u): Path<String>,
    Body(b): Body,
) -> Result<Json<Value>, ApiError> {
    require(v, 6)?;
    let uuid = path_uuid(&u)?;
    only_fields(&b, &["traits", "resource_provider_generation"])?;
    let generation = super::uint(&b, "resource_provider_generation")?;
    let Some(Value::Array(items)) = b.get("traits") else {
        return Err(bad_request("JSON does not validate: 'traits' is a required property and must be a list"));
    };
    let mut traits = BTreeSet::new();
    for t in items {
        let s = t.as_str().ok_or_else(|| bad_request("JSON does not validate: traits must be strings"))?;
        if !traits.insert(s.to_string()) {
            return Err(bad_request(format!("JSON does not validate: trait {s} appears twice")));
        }
    }
    db::must_get_provider(st.store.as_ref(), &uuid).await?;
    db::check_traits_exist(st.store.as_ref(), &traits).await?;
    let p = db::update_provider(st.store.as_ref(), &uuid, Some(generation), |p| {
        p.traits = traits.clone();
        Ok(true)
    })
    .await?;
    Ok(Json(json!({"traits": p.traits, "resource_provider_generation": p.generation})))
}

/// DELETE /resource_providers/{uuid}/traits (1.6)
pub async fn delete_traits(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path(u): Path<String>,
) -> Result<StatusCode, ApiError> {
    require(v, 6)?;
    db::update_provider(st.store.as_ref(), &path_uuid(&u)?, None, |p| {
        let changed = !p.traits.is_empty();
        p.traits.clear();
        Ok(changed)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// 404 for a route that does not exist at this microversion (as Placement answers).
pub fn require(v: Version, minor: u16) -> Result<(), ApiError> {
    if v.at_least(minor) {
        Ok(())
    } else {
        Err(super::not_found("The resource could not be found."))
    }
}

/// `{class: amount}` from a JSON object of non-negative integers.
pub fn amounts(v: &Value, what: &str) -> Result<BTreeMap<String, u64>, ApiError> {
    let Value::Object(m) = v else { return Err(bad_request(format!("JSON does not validate: '{what}' must be an object"))) };
    let mut out = BTreeMap::new();
    for (k, n) in m {
        let n = n.as_u64().ok_or_else(|| bad_request(format!("JSON does not validate: {n} is not a non-negative integer ('{k}')")))?;
        out.insert(k.clone(), n);
    }
    Ok(out)
}

/// A uuid-keyed map, for bodies keyed by provider or consumer.
pub fn uuid_key(k: &str) -> Result<Uuid, ApiError> {
    parse_uuid(k, "uuid")
}
