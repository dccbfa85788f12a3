//! `/resource_providers/{uuid}/inventories`: all at once or one class at a time.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Map, Value};

use super::providers::require;
use super::{bad_request, error, not_found, only_fields, path_uuid, Admin, Body};
use crate::error::ApiError;
use crate::placement::classes;
use crate::placement::db::{self, DbError, Inventory};
use crate::placement::microversion::Version;
use crate::state::AppState;

const FIELDS: &[&str] = &["total", "reserved", "min_unit", "max_unit", "step_size", "allocation_ratio"];

fn inventory_json(i: &Inventory) -> Value {
    json!({
        "total": i.total, "reserved": i.reserved, "min_unit": i.min_unit, "max_unit": i.max_unit,
        "step_size": i.step_size, "allocation_ratio": i.allocation_ratio,
    })
}

/// Parses one inventory object (without the class), applying Placement's defaults.
fn parse_inventory(m: &Map<String, Value>, class: &str, v: Version) -> Result<Inventory, ApiError> {
    let total = super::uint(m, "total")?;
    let mut i = Inventory::new(total);
    if let Some(x) = super::opt_uint(m, "reserved")? {
        i.reserved = x;
    }
    if let Some(x) = super::opt_uint(m, "min_unit")? {
        i.min_unit = x;
    }
    i.max_unit = super::opt_uint(m, "max_unit")?.unwrap_or(i32::MAX as u64);
    if let Some(x) = super::opt_uint(m, "step_size")? {
        i.step_size = x;
    }
    if let Some(x) = m.get("allocation_ratio") {
        i.allocation_ratio = x.as_f64().ok_or_else(|| bad_request(format!("JSON does not validate: {x} is not of type 'number'")))?;
    }
    if !v.at_least(26) && i.reserved >= i.total && i.total > 0 {
        return Err(bad_request(format!("Unable to update inventory for resource provider: reserved ({}) must be less than total ({}) for {class}", i.reserved, i.total)));
    }
    i.validate(class)?;
    Ok(i)
}

fn class_name(class: &str) -> Result<(), ApiError> {
    if classes::is_valid(class) {
        Ok(())
    } else {
        Err(bad_request(format!("Invalid resource class name {class:?}")))
    }
}

/// GET /resource_providers/{uuid}/inventories
pub async fn list(State(st): State<AppState>, _a: Admin, Path(u): Path<String>) -> Result<Json<Value>, ApiError> {
    let p = db::must_get_provider(st.store.as_ref(), &path_uuid(&u)?).await?.value;
    let inv: Map<String, Value> = p.inventories.iter().map(|(c, i)| (c.clone(), inventory_json(i))).collect();
    Ok(Json(json!({"resource_provider_generation": p.generation, "inventories": inv})))
}

/// PUT /resource_providers/{uuid}/inventories: replaces every inventory.
pub async fn put_all(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path(u): Path<String>,
    Body(b): Body,
) -> Result<Json<Value>, ApiError> {
    let uuid = path_uuid(&u)?;
    only_fields(&b, &["inventories", "resource_provider_generation"])?;
    let generation = super::uint(&b, "resource_provider_generation")?;
    let Some(Value::Object(items)) = b.get("inventories") else {
        return Err(bad_request("JSON does not validate: 'inventories' is a required property and must be an object"));
    };
    let mut new = BTreeMap::new();
    for (class, body) in items {
        class_name(class)?;
        let Value::Object(m) = body else { return Err(bad_request(format!("JSON does not validate: inventory of {class} must be an object"))) };
        only_fields(m, FIELDS)?;
        new.insert(class.clone(), parse_inventory(m, class, v)?);
    }
    db::must_get_provider(st.store.as_ref(), &uuid).await?;
    db::validate_inventories(st.store.as_ref(), &new).await?;
    let p = db::update_provider(st.store.as_ref(), &uuid, Some(generation), |p| {
        db::check_inventory_change(p, &new)?;
        p.inventories = new.clone();
        Ok(true)
    })
    .await?;
    let inv: Map<String, Value> = p.inventories.iter().map(|(c, i)| (c.clone(), inventory_json(i))).collect();
    Ok(Json(json!({"resource_provider_generation": p.generation, "inventories": inv})))
}

/// DELETE /resource_providers/{uuid}/inventories (1.5): removes every inventory not in use.
pub async fn delete_all(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path(u): Path<String>,
) -> Result<StatusCode, ApiError> {
    require(v, 5)?;
    let uuid = path_uuid(&u)?;
    db::update_provider(st.store.as_ref(), &uuid, None, |p| {
        db::check_inventory_change(p, &BTreeMap::new())?;
        p.inventories.clear();
        Ok(true)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// POST /resource_providers/{uuid}/inventories: adds one class.
pub async fn create(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path(u): Path<String>,
    Body(b): Body,
) -> Result<Response, ApiError> {
    let uuid = path_uuid(&u)?;
    let mut allowed = FIELDS.to_vec();
    allowed.extend(["resource_class", "resource_provider_generation"]);
    only_fields(&b, &allowed)?;
    let class = super::string(&b, "resource_class")?.to_string();
    class_name(&class)?;
    let generation = super::uint(&b, "resource_provider_generation")?;
    let inv = parse_inventory(&b, &class, v)?;
    db::must_get_provider(st.store.as_ref(), &uuid).await?;
    db::validate_inventories(st.store.as_ref(), &BTreeMap::from([(class.clone(), inv.clone())])).await?;
    let mut exists = false;
    let p = db::update_provider(st.store.as_ref(), &uuid, Some(generation), |p| {
        if p.inventories.contains_key(&class) {
            exists = true;
            return Ok(false);
        }
        p.inventories.insert(class.clone(), inv.clone());
        Ok(true)
    })
    .await?;
    if exists {
        return Err(error(StatusCode::CONFLICT, format!("Update conflict: inventory for {class} on resource provider {uuid} already exists"), "placement.undefined_code"));
    }
    let mut body = inventory_json(&p.inventories[&class]);
    body["resource_provider_generation"] = json!(p.generation);
    let location = format!("/resource_providers/{uuid}/inventories/{class}");
    Ok((StatusCode::CREATED, [("location", location)], Json(body)).into_response())
}

/// GET /resource_providers/{uuid}/inventories/{class}
pub async fn show(State(st): State<AppState>, _a: Admin, Path((u, class)): Path<(String, String)>) -> Result<Json<Value>, ApiError> {
    let p = db::must_get_provider(st.store.as_ref(), &path_uuid(&u)?).await?.value;
    let i = p.inventories.get(&class).ok_or_else(|| not_found(format!("No inventory of class {class} found for resource provider {u}")))?;
    let mut body = inventory_json(i);
    body["resource_provider_generation"] = json!(p.generation);
    Ok(Json(body))
}

/// PUT /resource_providers/{uuid}/inventories/{class}: creates or replaces one class.
pub async fn put_one(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Path((u, class)): Path<(String, String)>,
    Body(b): Body,
) -> Result<Json<Value>, ApiError> {
    let uuid = path_uuid(&u)?;
    class_name(&class)?;
    let mut allowed = FIELDS.to_vec();
    allowed.push("resource_provider_generation");
    only_fields(&b, &allowed)?;
    let generation = super::uint(&b, "resource_provider_generation")?;
    let inv = parse_inventory(&b, &class, v)?;
    db::must_get_provider(st.store.as_ref(), &uuid).await?;
    db::validate_inventories(st.store.as_ref(), &BTreeMap::from([(class.clone(), inv.clone())])).await?;
    let p = db::update_provider(st.store.as_ref(), &uuid, Some(generation), |p| {
        let mut new = p.inventories.clone();
        new.insert(class.clone(), inv.clone());
        db::check_inventory_change(p, &new)?;
        p.inventories = new;
        Ok(true)
    })
    .await?;
    let mut body = inventory_json(&p.inventories[&class]);
    body["resource_provider_generation"] = json!(p.generation);
    Ok(Json(body))
}

/// DELETE /resource_providers/{uuid}/inventories/{class}
pub async fn delete_one(State(st): State<AppState>, _a: Admin, Path((u, class)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    let uuid = path_uuid(&u)?;
    let mut missing = false;
    let r = db::update_provider(st.store.as_ref(), &uuid, None, |p| {
        if !p.inventories.contains_key(&class) {
            missing = true;
            return Ok(false);
        }
        let mut new = p.inventories.clone();
        new.remove(&class);
        db::check_inventory_change(p, &new)?;
        p.inventories = new;
        Ok(true)
    })
    .await;
    match r {
        Err(DbError::InventoryInUse { .. }) => {
            return Err(error(StatusCode::CONFLICT, format!("Inventory for {class} on resource provider {uuid} in use."), "placement.inventory.inuse"))
        }
        other => other?,
    };
    if missing {
        return Err(not_found(format!("No inventory of class {class} found for delete")));
    }
    Ok(StatusCode::NO_CONTENT)
}
