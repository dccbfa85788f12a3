//! `/traits` (1.6).

use std::collections::BTreeSet;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::providers::require;
use super::{bad_request, not_found, single, Admin, QueryPairs};
use crate::error::ApiError;
use crate::placement::db;
use crate::placement::microversion::Version;
use crate::placement::traits;
use crate::state::AppState;

/// GET /traits?name=in:A,B|startswith:P&associated=true|false
pub async fn list(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Query(q): Query<QueryPairs>,
) -> Result<Json<Value>, ApiError> {
    require(v, 6)?;
    for (k, _) in &q {
        if k != "name" && k != "associated" {
            return Err(bad_request(format!("Invalid query string parameters: Additional properties are not allowed ('{k}' was unexpected)")));
        }
    }
    let mut names = db::list_traits(st.store.as_ref()).await?;
    if let Some(f) = single(&q, "name")? {
        if let Some(list) = f.strip_prefix("in:") {
            let wanted: BTreeSet<&str> = list.split(',').collect();
            names.retain(|n| wanted.contains(n.as_str()));
        } else if let Some(prefix) = f.strip_prefix("startswith:") {
            names.retain(|n| n.starts_with(prefix));
        } else {
            return Err(bad_request(format!("Badly formatted name parameter. Expected name query string parameter in form: ?name=[in|startswith]:[name1,name2|prefix]. Got: \"{f}\"")));
        }
    }
    if let Some(a) = single(&q, "associated")? {
        let want = match a {
            "true" => true,
            "false" => false,
            _ => return Err(bad_request(format!("The query parameter \"associated\" only accepts \"true\" or \"false\", not {a:?}"))),
        };
        let (providers, _) = db::list_providers(st.store.as_ref()).await?;
        let used: BTreeSet<&String> = providers.iter().flat_map(|p| p.value.traits.iter()).collect();
        names.retain(|n| used.contains(n) == want);
    }
    Ok(Json(json!({"traits": names})))
}

/// GET /traits/{name}: 204 if it exists.
pub async fn show(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    require(v, 6)?;
    if db::trait_exists(st.store.as_ref(), &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(format!("No such trait(s): {name}")))
    }
}

/// PUT /traits/{name}: creates a custom trait (201) or confirms it (204).
pub async fn put(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Path(name): Path<String>) -> Result<Response, ApiError> {
    require(v, 6)?;
    if !traits::is_valid_custom(&name) {
        return Err(bad_request(format!("The trait is invalid. A valid trait must be no longer than 255 characters, start with the prefix \"CUSTOM_\" and use following characters: \"A\"-\"Z\", \"0\"-\"9\" and \"_\" ({name})")));
    }
    let created = db::create_trait(st.store.as_ref(), &name).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::NO_CONTENT };
    Ok((status, [("location", format!("/traits/{name}"))]).into_response())
}

/// DELETE /traits/{name}: custom traits no provider carries.
pub async fn delete(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    require(v, 6)?;
    if traits::is_standard(&name) {
        return Err(bad_request(format!("Cannot delete standard trait {name}.")));
    }
    if !db::delete_trait(st.store.as_ref(), &name).await? {
        return Err(not_found(format!("No such trait(s): {name}")));
    }
    Ok(StatusCode::NO_CONTENT)
}
