//! The host credential: `Authorization: Bearer <host_id>:<secret>` on agent API calls.
//!
//! A host may touch only its own records: every agent path carries a host id, and
//! [`HostAuth::require`] refuses any id but the caller's with 403.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use model::agent_api::HostCredential;
use store::record::decode;
use store::Store;

use super::records::{self, HostRecord};
use crate::error::{ApiError, Dialect};
use crate::state::AppState;

/// An agent whose host credential checked out.
#[derive(Clone, Debug)]
pub struct HostAuth {
    /// The caller's host.
    pub host: HostRecord,
    /// Mod-revision of the host record when it was read.
    pub record_revision: i64,
}

impl HostAuth {
    /// Refuses with 403 unless `host_id` is the caller's own host.
    pub fn require(&self, host_id: &str) -> Result<(), ApiError> {
        require_own(&self.host.id, host_id)
    }
}

/// Refuses with 403 unless `target` is the `caller`'s own host.
pub fn require_own(caller: &str, target: &str) -> Result<(), ApiError> {
    if caller == target {
        Ok(())
    } else {
        tracing::warn!(caller = %caller, target = %target, "host tried to reach another host's records");
        Err(ApiError::forbidden(Dialect::Plain, "A host may only read and write its own records."))
    }
}

fn unauthorized() -> ApiError {
    ApiError::unauthorized(Dialect::Plain, "A valid host credential (Authorization: Bearer <host_id>:<secret>) is required.")
}

/// The host credential of a request's `Authorization` header; 401 when missing or malformed.
pub fn credential(headers: &axum::http::HeaderMap) -> Result<HostCredential, ApiError> {
    let cred = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(HostCredential::from_authorization)
        .ok_or_else(unauthorized)?;
    if uuid::Uuid::parse_str(&cred.host_id).is_err() {
        return Err(unauthorized());
    }
    Ok(cred)
}

/// Checks a credential against the host record in the store (one read); 401 unless
/// the host exists and the secret matches.
pub async fn verify_in_store(store: &dyn Store, cred: &HostCredential) -> Result<HostAuth, ApiError> {
    let key = records::record_key(&cred.host_id);
    let kv = store.get(&key).await.map_err(|e| ApiError::from_store(Dialect::Plain, e))?.ok_or_else(unauthorized)?;
    let host: HostRecord = decode(&kv.key, &kv.value).map_err(|e| ApiError::from_store(Dialect::Plain, e))?;
    if !records::constant_time_eq(&records::sha256_hex(&cred.secret), &host.credential_sha256) {
        return Err(unauthorized());
    }
    Ok(HostAuth { host, record_revision: kv.mod_revision })
}

impl FromRequestParts<AppState> for HostAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let cred = credential(&parts.headers)?;
        verify_in_store(state.store.as_ref(), &cred).await
    }
}
