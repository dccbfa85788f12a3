//! `/allocations/{consumer}`, `POST /allocations` (1.13) and
//! `/resource_providers/{uuid}/allocations`.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::providers::{amounts, require};
use super::{bad_request, not_found, parse_uuid, path_uuid, Admin, Body};
use crate::error::ApiError;
use crate::placement::db::{self, ConsumerAllocations, ConsumerGeneration};
use crate::placement::microversion::Version;
use crate::state::AppState;

/// Project and user recorded for consumers written before 1.8 without them.
const INCOMPLETE: &str = "00000000-0000-0000-0000-000000000000";

/// Parses one consumer's allocations from a PUT/POST/reshaper body.
/// `list_form`: the pre-1.12 PUT format (a list of provider/resources pairs).
pub fn parse_consumer(consumer: Uuid, m: &Map<String, Value>, v: Version, list_form: bool, allow_empty: bool) -> Result<ConsumerAllocations, ApiError> {
    let mut allowed = vec!["allocations"];
    if v.at_least(8) {
        allowed.extend(["project_id", "user_id"]);
    } else {
        allowed.extend(["project_id", "user_id"]);
    }
    if v.at_least(28) {
        allowed.push("consumer_generation");
    }
    if v.at_least(38) {
        allowed.push("consumer_type");
    }
    super::only_fields(m, &allowed)?;
    let mut allocations: BTreeMap<Uuid, BTreeMap<String, u64>> = BTreeMap::new();
    match m.get("allocations") {
        Some(Value::Array(items)) if list_form => {
            for item in items {
                let rp = item
                    .get("resource_provider")
                    .and_then(|r| r.get("uuid"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad_request("JSON does not validate: each allocation needs resource_provider.uuid"))?;
                let res = amounts(item.get("resources").unwrap_or(&Value::Null), "resources")?;
                allocations.entry(parse_uuid(rp, "resource provider uuid")?).or_default().extend(res);
            }
        }
        Some(Value::Object(items)) if !list_form => {
            for (rp, body) in items {
                let res = amounts(body.get("resources").unwrap_or(&Value::Null), "resources")?;
                allocations.insert(parse_uuid(rp, "resource provider uuid")?, res);
            }
        }
        _ => return Err(bad_request("JSON does not validate: 'allocations' is missing or of the wrong type")),
    }
    for (rp, res) in &allocations {
        if res.is_empty() {
            return Err(bad_request(format!("JSON does not validate: no resources for provider {rp}")));
        }
        if let Some((class, _)) = res.iter().find(|(_, n)| **n == 0) {
            return Err(bad_request(format!("JSON does not validate: 0 is less than the minimum of 1 ({class})")));
        }
    }
    if allocations.is_empty() && !allow_empty {
        return Err(bad_request("JSON does not validate: allocations must not be empty"));
    }
    let id = |field: &str| -> Result<String, ApiError> {
        match m.get(field) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 255 => Ok(s.clone()),
            Some(other) => Err(bad_request(format!("JSON does not validate: {other} is not a valid {field}"))),
            None if v.at_least(8) => Err(bad_request(format!("JSON does not validate: '{field}' is a required property"))),
            None => Ok(INCOMPLETE.to_string()),
        }
    };
    let generation = if v.at_least(28) {
        match m.get("consumer_generation") {
            Some(Value::Null) => ConsumerGeneration::New,
            Some(g) => ConsumerGeneration::Is(g.as_u64().ok_or_else(|| bad_request(format!("JSON does not validate: {g} is not a valid consumer_generation")))?),
            None => return Err(bad_request("JSON does not validate: 'consumer_generation' is a required property")),
        }
    } else {
        ConsumerGeneration::Any
    };
    let consumer_type = if v.at_least(38) {
        match m.get("consumer_type") {
            Some(Value::String(s)) if crate::placement::classes::is_upper_identifier(s) => Some(s.clone()),
            Some(other) => return Err(bad_request(format!("JSON does not validate: {other} does not match '^[A-Z0-9_]+$'"))),
            None => return Err(bad_request("JSON does not validate: 'consumer_type' is a required property")),
        }
    } else {
        None
    };
    Ok(ConsumerAllocations { consumer, project_id: id("project_id")?, user_id: id("user_id")?, consumer_type, generation, allocations })
}

/// GET /allocations/{consumer}
pub async fn show(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Path(c): Path<String>) -> Result<Json<Value>, ApiError> {
    let consumer = parse_uuid(&c, "consumer uuid")?;
    let Some(rec) = db::get_consumer(st.store.as_ref(), &consumer).await? else {
        return Ok(Json(json!({"allocations": {}})));
    };
    let c = rec.value;
    let mut allocs = Map::new();
    for (rp, res) in &c.allocations {
        let generation = db::get_provider(st.store.as_ref(), rp).await?.map(|p| p.value.generation);
        allocs.insert(rp.to_string(), json!({"generation": generation, "resources": res}));
    }
    let mut out = json!({"allocations": allocs});
    if v.at_least(12) {
        out["project_id"] = json!(c.project_id);
        out["user_id"] = json!(c.user_id);
    }
    if v.at_least(28) {
        out["consumer_generation"] = json!(c.generation);
    }
    if v.at_least(38) {
        out["consumer_type"] = json!(c.consumer_type.as_deref().unwrap_or("UNKNOWN"));
    }
    Ok(Json(out))
}

/// PUT /allocations/{consumer}: replaces the consumer's allocations.
pub async fn put(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path(c): Path<String>,
    Body(b): Body,
) -> Result<StatusCode, ApiError> {
    let consumer = parse_uuid(&c, "consumer uuid")?;
    let req = parse_consumer(consumer, &b, v, !v.at_least(12), v.at_least(28))?;
    db::replace_allocations(st.store.as_ref(), &[req]).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// POST /allocations (1.13): replaces the allocations of several consumers at once.
pub async fn post(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Body(b): Body) -> Result<StatusCode, ApiError> {
    require(v, 13)?;
    let mut reqs = Vec::with_capacity(b.len());
    for (c, body) in &b {
        let consumer = parse_uuid(c, "consumer uuid")?;
        let Value::Object(m) = body else { return Err(bad_request(format!("JSON does not validate: consumer {c} must be an object"))) };
        reqs.push(parse_consumer(consumer, m, v, false, true)?);
    }
    if reqs.is_empty() {
        return Err(bad_request("JSON does not validate: at least one consumer is required"));
    }
    db::replace_allocations(st.store.as_ref(), &reqs).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// DELETE /allocations/{consumer}
pub async fn delete(State(st): State<AppState>, _a: Admin, Path(c): Path<String>) -> Result<StatusCode, ApiError> {
    let consumer = parse_uuid(&c, "consumer uuid")?;
    if !db::delete_allocations(st.store.as_ref(), &consumer).await? {
        return Err(not_found(format!("No allocations for consumer '{consumer}'")));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// GET /resource_providers/{uuid}/allocations
pub async fn for_provider(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path(u): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let p = db::must_get_provider(st.store.as_ref(), &path_uuid(&u)?).await?.value;
    let mut allocs = Map::new();
    for (c, res) in &db::provider_allocations(st.store.as_ref(), &p).await? {
        let mut entry = json!({"resources": res});
        if v.at_least(28) {
            if let Some(rec) = db::get_consumer(st.store.as_ref(), c).await? {
                entry["consumer_generation"] = json!(rec.value.generation);
            }
        }
        allocs.insert(c.to_string(), entry);
    }
    Ok(Json(json!({"resource_provider_generation": p.generation, "allocations": allocs})))
}
