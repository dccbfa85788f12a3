//! Handlers of the host admin API (`/edge/v1`), for cloud administrators (Keystone token
//! with the admin role).
//!
//! - `POST /join-tokens`: create a one-use join token
//! - `GET /hosts`, `GET /hosts/{id}`: hosts with their live state
//! - `PUT /hosts/{id}`: enable or disable a host (with a reason)
//! - `DELETE /hosts/{id}`: remove a host that runs nothing (its resource providers too)

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use model::agent_api::{HostUpdate, JoinTokenCreated, JoinTokenRequest};

use super::{join_tokens, registry};
use crate::error::{ApiError, Dialect};
use crate::identity::Auth;
use crate::state::AppState;

/// The admin API's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/join-tokens", post(create_join_token))
        .route("/hosts", get(list_hosts))
        .route("/hosts/{id}", get(show_host).put(update_host).delete(delete_host))
}

fn require_admin(auth: &Auth) -> Result<(), ApiError> {
    if auth.is_admin() {
        Ok(())
    } else {
        Err(ApiError::forbidden(Dialect::Plain, "Only cloud administrators may manage hosts."))
    }
}

async fn create_join_token(
    State(state): State<AppState>,
    auth: Auth,
    body: Result<Json<JoinTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<JoinTokenCreated>), ApiError> {
    require_admin(&auth)?;
    let Json(req) = body.map_err(|e| ApiError::bad_request(Dialect::Plain, format!("Malformed request body: {}", e.body_text())))?;
    let ttl = req.ttl_secs.unwrap_or(state.config.hosts.join_token_ttl_secs);
    let created = join_tokens::create(state.store.as_ref(), ttl, req.host).await?;
    tracing::info!(user = %auth.user_name, host = ?created.host, expires_at = %created.expires_at, "join token created");
    Ok((StatusCode::CREATED, Json(created)))
}

async fn list_hosts(State(state): State<AppState>, auth: Auth) -> Result<impl IntoResponse, ApiError> {
    require_admin(&auth)?;
    let hosts = registry::list(state.store.as_ref()).await?;
    Ok(Json(serde_json::json!({ "hosts": hosts.iter().map(|h| h.view()).collect::<Vec<_>>() })))
}

async fn show_host(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    require_admin(&auth)?;
    let host = registry::get(state.store.as_ref(), &id).await?;
    Ok(Json(serde_json::json!({ "host": host.view() })))
}

async fn update_host(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: Result<Json<HostUpdate>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    require_admin(&auth)?;
    let Json(req) = body.map_err(|e| ApiError::bad_request(Dialect::Plain, format!("Malformed request body: {}", e.body_text())))?;
    registry::get(state.store.as_ref(), &id).await?;
    let host = registry::set_enabled(state.store.as_ref(), &id, req.enabled, req.disabled_reason).await?;
    Ok(Json(serde_json::json!({ "host": host.view() })))
}

async fn delete_host(State(state): State<AppState>, auth: Auth, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    require_admin(&auth)?;
    registry::delete(state.store.as_ref(), &id).await?;
    tracing::info!(user = %auth.user_name, host_id = %id, "host deleted by an administrator");
    Ok(StatusCode::NO_CONTENT)
}
