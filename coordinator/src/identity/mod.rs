//! Identity: Keystone v3 (tokens, domains, projects, users, groups, roles,
//! role assignments, application credentials, catalog) and policy.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::Router;
use store::Store;

use crate::config::Config;
use crate::error::{ApiError, Dialect};
use crate::server::Shutdown;
use crate::state::AppState;

/// The caller of a request, as proven by a valid token.
#[derive(Clone, Debug)]
pub struct Auth {
    pub user_id: String,
    pub user_name: String,
    pub user_domain_id: String,
    /// Set for a project-scoped token.
    pub project_id: Option<String>,
    pub project_domain_id: Option<String>,
    /// Set for a domain-scoped token.
    pub domain_id: Option<String>,
    /// Role names on the scope.
    pub roles: Vec<String>,
    /// Set when the token came from an application credential.
    pub app_cred_id: Option<String>,
    /// The token itself.
    pub token: String,
}

impl Auth {
    /// Whether the caller holds `role` on its scope.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
    /// Whether the caller is a cloud administrator (admin role on any scope).
    pub fn is_admin(&self) -> bool {
        self.has_role("admin")
    }
}

/// Token keys, policy and login throttling of one replica.
pub struct Identity {
    #[allow(dead_code)]
    store: Arc<dyn Store>,
    #[allow(dead_code)]
    config: Arc<Config>,
}

impl Identity {
    /// Loads the token keys from the store (creating the first ones if there are none).
    pub async fn new(store: Arc<dyn Store>, config: Arc<Config>) -> Result<Identity, store::StoreError> {
        Ok(Identity { store, config })
    }

    /// Validates a token and returns who it belongs to.
    pub async fn validate(&self, _token: &str) -> Result<Auth, ApiError> {
        Err(ApiError::unauthorized(Dialect::Keystone, "The request you have made requires authentication."))
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get("x-auth-token")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized(Dialect::Keystone, "The request you have made requires authentication."))?;
        state.identity.validate(token).await
    }
}

/// Keystone's routes (`/`, `/v3/...`).
pub fn routes() -> Router<AppState> {
    Router::new()
}

/// Keeps this replica's copy of the token keys in step with the store.
pub fn spawn_key_refresh(_state: AppState, _shutdown: Arc<Shutdown>) {}

pub mod bootstrap;
pub mod tokens;
