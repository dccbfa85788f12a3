//! Nova's `os-aggregates`: host aggregates do not exist in this cloud yet, so the list
//! is empty (which is what `openstack hypervisor show` asks it for).

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::require_admin;
use crate::error::ApiError;
use crate::identity::Auth;
use crate::state::AppState;

/// `os-aggregates` routes.
pub fn routes() -> Router<AppState> {
    Router::new().route("/os-aggregates", get(list))
}

async fn list(auth: Auth) -> Result<Json<Value>, ApiError> {
    require_admin(&auth)?;
    Ok(Json(json!({ "aggregates": [] })))
}
