//! `/resource_classes` (1.2; idempotent PUT from 1.7).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::providers::require;
use super::{bad_request, error, link, not_found, only_fields, Admin, Body};
use crate::error::ApiError;
use crate::placement::classes;
use crate::placement::db;
use crate::placement::microversion::Version;
use crate::state::AppState;

fn class_json(name: &str) -> Value {
    json!({"name": name, "links": [link("self", format!("/resource_classes/{name}"))]})
}

/// GET /resource_classes
pub async fn list(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>) -> Result<Json<Value>, ApiError> {
    require(v, 2)?;
    let names = db::list_resource_classes(st.store.as_ref()).await?;
    Ok(Json(json!({"resource_classes": names.iter().map(|n| class_json(n)).collect::<Vec<_>>()})))
}

/// POST /resource_classes
pub async fn create(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Body(b): Body) -> Result<Response, ApiError> {
    require(v, 2)?;
    only_fields(&b, &["name"])?;
    let name = super::string(&b, "name")?;
    if !classes::is_valid_custom(name) {
        return Err(bad_request(format!("JSON does not validate: {name:?} does not match '^CUSTOM_[A-Z0-9_]+$'")));
    }
    if !db::create_resource_class(st.store.as_ref(), name).await? {
        return Err(error(StatusCode::CONFLICT, format!("Conflicting resource class already exists: {name}"), "placement.duplicate_name"));
    }
    Ok((StatusCode::CREATED, [("location", format!("/resource_classes/{name}"))]).into_response())
}

/// GET /resource_classes/{name}
pub async fn show(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    require(v, 2)?;
    if !db::resource_class_exists(st.store.as_ref(), &name).await? {
        return Err(not_found(format!("No such resource class {name}.")));
    }
    Ok(Json(class_json(&name)))
}

/// PUT /resource_classes/{name}: from 1.7 creates the class if missing (201) or
/// confirms it (204); before 1.7 it renamed a custom class, which this service
/// refuses as classes are referred to by name in every inventory.
pub async fn put(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Path(name): Path<String>) -> Result<Response, ApiError> {
    require(v, 2)?;
    if !v.at_least(7) {
        return Err(bad_request("Renaming a resource class is not supported; use microversion 1.7 or later to create one with PUT."));
    }
    if classes::is_standard(&name) {
        return Err(bad_request(format!("Cannot update standard resource class {name}")));
    }
    if !classes::is_valid_custom(&name) {
        return Err(bad_request(format!("Invalid resource class name {name:?}: must match '^CUSTOM_[A-Z0-9_]+$'")));
    }
    let created = db::create_resource_class(st.store.as_ref(), &name).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::NO_CONTENT };
    Ok((status, [("location", format!("/resource_classes/{name}"))]).into_response())
}

/// DELETE /resource_classes/{name}
pub async fn delete(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    require(v, 2)?;
    if classes::is_standard(&name) {
        return Err(bad_request(format!("Cannot delete standard resource class {name}")));
    }
    if !db::delete_resource_class(st.store.as_ref(), &name).await? {
        return Err(not_found(format!("No such resource class {name}.")));
    }
    Ok(StatusCode::NO_CONTENT)
}
