//! Identity: Keystone v3 (tokens, domains, projects, users, groups, roles,
//! role assignments, application credentials, catalog) and policy.
//!
//! Tokens are Fernet tokens whose payload names the user, the scope and the
//! roles on it, so any replica validates any token from memory. Whatever would
//! change a token's meaning (a revoked token, a removed role, a disabled user
//! or project, a changed password) writes a revocation event to the store that
//! every replica mirrors through a watch.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use store::record::{decode, encode};
use store::{EventKind, Op, Store};

use crate::config::Config;
use crate::error::{ApiError, Dialect};
use crate::server::Shutdown;
use crate::state::AppState;

pub mod app_creds;
pub mod assignments;
pub mod auth_api;
pub mod bootstrap;
pub mod catalog;
pub mod db;
pub mod model;
pub mod password;
pub mod policy;
pub mod resources;
pub mod tokens;

use model::{keys, Revocation};
use policy::{Creds, Policy};
use tokens::{TokenBook, TokenError, TokenPayload};

const D: Dialect = Dialect::Keystone;

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
    /// What the token says.
    pub payload: TokenPayload,
}

impl Auth {
    /// Whether the caller holds `role` on its scope.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
    /// Whether the caller is a cloud administrator (admin role on its scope).
    pub fn is_admin(&self) -> bool {
        self.has_role("admin")
    }
    /// The caller as policy sees it.
    pub fn creds(&self) -> Creds<'_> {
        Creds {
            user_id: &self.user_id,
            project_id: self.project_id.as_deref(),
            project_domain_id: self.project_domain_id.as_deref(),
            domain_id: self.domain_id.as_deref(),
            roles: &self.roles,
        }
    }

    fn from_payload(token: &str, p: TokenPayload) -> Auth {
        Auth {
            user_id: p.u.clone(),
            user_name: p.un.clone(),
            user_domain_id: p.ud.clone(),
            project_id: p.p.clone(),
            project_domain_id: p.pd.clone(),
            domain_id: p.d.clone(),
            roles: p.r.iter().map(|(_, n)| n.clone()).collect(),
            app_cred_id: p.c.clone(),
            token: token.to_string(),
            payload: p,
        }
    }
}

/// Token keys, revocations, policy and password checking of one replica.
pub struct Identity {
    pub store: Arc<dyn Store>,
    pub config: Arc<Config>,
    pub policy: Policy,
    pub tokens: TokenBook,
    /// Store revision the in-memory mirror was loaded at.
    loaded_rev: i64,
    /// A hash to verify against when the user does not exist, so that the
    /// answer takes as long as for a real user.
    dummy_hash: String,
}

/// Errors starting identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
}

impl Identity {
    /// Loads the token keys (creating the first one if there is none), the
    /// revocation events and the policy.
    pub async fn new(store: Arc<dyn Store>, config: Arc<Config>) -> Result<Identity, IdentityError> {
        let policy = Policy::load(config.identity.policy_file.as_deref())?;
        let (tokens, loaded_rev) = TokenBook::load(store.as_ref()).await?;
        let dummy_hash = password::hash_blocking(uuid::Uuid::new_v4().to_string()).await;
        Ok(Identity { store, config, policy, tokens, loaded_rev, dummy_hash })
    }

    /// Validates a token and returns who it belongs to.
    pub async fn validate(&self, token: &str) -> Result<Auth, ApiError> {
        let result = match self.tokens.validate(token) {
            Err(TokenError::Invalid) => {
                // Perhaps signed with a key this replica has not seen yet.
                match self.tokens.reload_keys(self.store.as_ref()).await {
                    Ok(true) => self.tokens.validate(token),
                    _ => Err(TokenError::Invalid),
                }
            }
            other => other,
        };
        match result {
            Ok(p) => Ok(Auth::from_payload(token, p)),
            Err(e) => Err(ApiError::unauthorized(D, format!("The request you have made requires authentication. {e}."))),
        }
    }

    /// Refuses with 403 unless policy allows `action` on `target`.
    pub fn enforce(&self, auth: &Auth, action: &str, target: &[(&str, &str)]) -> Result<(), ApiError> {
        if self.policy.allows(action, &auth.creds(), target) {
            Ok(())
        } else {
            Err(ApiError::forbidden(D, format!("You are not authorized to perform the requested action: {action}.")))
        }
    }

    /// Records a revocation event in the store (expiring once every token it
    /// could match has expired) and in this replica's mirror at once.
    pub async fn revoke(&self, mut r: Revocation) -> Result<(), ApiError> {
        r.issued_before = tokens::now();
        let ttl = self.config.identity.token_ttl_secs as i64 + 60;
        let lease = self.store.lease_grant(ttl).await.map_err(|e| ApiError::from_store(D, e))?;
        let key = keys::revoked(&uuid::Uuid::new_v4().simple().to_string());
        self.store
            .txn(store::Txn::new().and_then(Op::put_with_lease(key.clone(), encode(&r), lease)))
            .await
            .map_err(|e| ApiError::from_store(D, e))?;
        self.tokens.add_revocation(key, r);
        Ok(())
    }

    /// The hash to burn time on when a login names an unknown user.
    pub fn dummy_hash(&self) -> &str {
        &self.dummy_hash
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get("x-auth-token")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized(D, "The request you have made requires authentication."))?;
        state.metrics.tokens_validated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        state.identity.validate(token).await
    }
}

/// Keystone's routes (`/`, `/v3/...`).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(versions))
        .route("/v3", get(version))
        .route("/v3/", get(version))
        .merge(auth_api::routes())
        .merge(resources::routes())
        .merge(assignments::routes())
        .merge(app_creds::routes())
        .merge(catalog::routes())
}

fn version_doc(base: &str) -> Value {
    json!({
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{base}/v3/")}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}]
    })
}

async fn versions(axum::extract::State(state): axum::extract::State<AppState>) -> (StatusCode, Json<Value>) {
    (StatusCode::MULTIPLE_CHOICES, Json(json!({"versions": {"values": [version_doc(&state.config.public_url)]}})))
}

async fn version(axum::extract::State(state): axum::extract::State<AppState>) -> Json<Value> {
    Json(json!({"version": version_doc(&state.config.public_url)}))
}

/// Parses a JSON request body into `T`, answering 400 in Keystone's shape.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(D, "The request body is empty; a JSON object is required."));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(D, format!("Invalid input for a field or the request body: {e}.")))
}

/// Maps a storage error to an API error.
pub fn db_err(e: db::DbError) -> ApiError {
    match e {
        db::DbError::Conflict(m) => ApiError::conflict(D, m),
        db::DbError::Concurrent => ApiError::conflict(D, "The resource was changed by another request; try again."),
        db::DbError::Store(e) => ApiError::from_store(D, e),
    }
}

/// Maps a store error to an API error.
pub fn store_err(e: store::StoreError) -> ApiError {
    ApiError::from_store(D, e)
}

/// A new id in Keystone's style (32 hex digits).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Checks a name: non-empty, at most 255 characters, no control characters.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.len() > 255 || name.chars().any(|c| c.is_control()) {
        return Err(ApiError::bad_request(D, format!("Invalid {what} name: it must be 1 to 255 printable characters.")));
    }
    Ok(())
}

/// Keeps this replica's token keys and revocation events in step with the store.
pub fn spawn_key_refresh(state: AppState, shutdown: Arc<Shutdown>) {
    tokio::spawn(async move {
        let identity = state.identity.clone();
        let mut from = identity.loaded_rev + 1;
        let mut stop = shutdown.subscribe();
        loop {
            match mirror(&identity, from, &mut stop).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "identity watch broke; reloading");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    if *stop.borrow() {
                        return;
                    }
                    // Start over from a fresh read, so nothing is missed.
                    match reload(&identity).await {
                        Ok(rev) => from = rev + 1,
                        Err(e) => tracing::warn!(error = %e, "identity reload failed"),
                    }
                }
            }
        }
    });
}

async fn reload(identity: &Identity) -> Result<i64, store::StoreError> {
    identity.tokens.reload_keys(identity.store.as_ref()).await?;
    let revs = identity.store.range(keys::REVOKED).await?;
    for kv in &revs.kvs {
        identity.tokens.add_revocation(kv.key.clone(), decode(&kv.key, &kv.value)?);
    }
    Ok(revs.revision)
}

async fn mirror(identity: &Identity, from: i64, stop: &mut tokio::sync::watch::Receiver<bool>) -> Result<(), store::StoreError> {
    use futures::StreamExt;
    let mut watch = identity.store.watch(keys::ROOT, from).await?;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            item = watch.next() => {
                let Some(resp) = item else { return Err(store::StoreError::Unavailable("watch ended".into())) };
                for ev in resp?.events {
                    if ev.kv.key == keys::TOKEN_KEYS && ev.kind == EventKind::Put {
                        let k: model::TokenKeys = decode(&ev.kv.key, &ev.kv.value)?;
                        identity.tokens.set_keys(k.keys)?;
                    } else if ev.kv.key.starts_with(keys::REVOKED) {
                        match ev.kind {
                            EventKind::Put => identity.tokens.add_revocation(ev.kv.key.clone(), decode(&ev.kv.key, &ev.kv.value)?),
                            EventKind::Delete => identity.tokens.remove_revocation(&ev.kv.key),
                        }
                    }
                }
            }
        }
    }
}
