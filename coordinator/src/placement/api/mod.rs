//! Placement's HTTP handlers, one file per resource.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde_json::{json, Value};

use super::db::DbError;
use crate::error::{ApiError, Dialect};
use crate::identity::Auth;
use crate::state::AppState;

pub mod allocations;
pub mod candidates;
pub mod classes;
pub mod inventories;
pub mod providers;
pub mod query;
pub mod reshaper;
pub mod root;
pub mod traits;
pub mod usages;

/// A Placement error with its status, message and Placement code.
pub fn error(status: StatusCode, message: impl Into<String>, code: &'static str) -> ApiError {
    ApiError::new(Dialect::Placement, status, message).with_code(code)
}

/// 400 with Placement's generic code.
pub fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(Dialect::Placement, message)
}

/// 404 with Placement's generic code.
pub fn not_found(message: impl Into<String>) -> ApiError {
    ApiError::not_found(Dialect::Placement, message)
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        use StatusCode as S;
        let msg = e.to_string();
        match e {
            DbError::ProviderNotFound(_) => error(S::NOT_FOUND, msg, "placement.undefined_code"),
            DbError::ParentNotFound(_) => error(S::BAD_REQUEST, msg, "placement.undefined_code"),
            DbError::DuplicateName(_) => error(S::CONFLICT, msg, "placement.duplicate_name"),
            DbError::DuplicateUuid(_) => error(S::CONFLICT, msg, "placement.duplicate_name"),
            DbError::ProviderGeneration(_) | DbError::ConsumerGeneration { .. } | DbError::Contention => {
                error(S::CONFLICT, msg, "placement.concurrent_update")
            }
            DbError::InvalidResourceClass(_) | DbError::UnknownResourceClass(_) | DbError::InvalidTrait(_) | DbError::UnknownTrait(_) => {
                error(S::BAD_REQUEST, msg, "placement.undefined_code")
            }
            DbError::InvalidInventory { .. } | DbError::InvalidTree(_) | DbError::InvalidAllocation(_) => {
                error(S::BAD_REQUEST, msg, "placement.undefined_code")
            }
            DbError::Standard(_) => error(S::BAD_REQUEST, msg, "placement.undefined_code"),
            DbError::InventoryInUse { .. } => error(S::CONFLICT, msg, "placement.inventory.inuse"),
            DbError::Capacity { .. } | DbError::NoInventory { .. } | DbError::BadAmount { .. } => {
                error(S::CONFLICT, msg, "placement.undefined_code")
            }
            DbError::ProviderInUse(_) => error(S::CONFLICT, msg, "placement.resource_provider.inuse"),
            DbError::ProviderHasChildren(_) => error(S::CONFLICT, msg, "placement.resource_provider.cannot_delete_parent"),
            DbError::ClassInUse(_) | DbError::TraitInUse(_) => error(S::CONFLICT, msg, "placement.undefined_code"),
            DbError::Store(e) => ApiError::from_store(Dialect::Placement, e),
        }
    }
}

/// The caller, who must be an administrator (Placement's default policy).
pub struct Admin(pub Auth);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let auth = Auth::from_request_parts(parts, state).await.map_err(|e| {
            let mut e = e;
            e.dialect = Dialect::Placement;
            e
        })?;
        if !auth.is_admin() {
            return Err(error(StatusCode::FORBIDDEN, "Policy does not allow this action: admin required.", "placement.undefined_code"));
        }
        Ok(Admin(auth))
    }
}

/// A JSON body that must be an object; anything else is a 400 in Placement's shape.
pub struct Body(pub serde_json::Map<String, Value>);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| bad_request(format!("Malformed request body: {e}")))?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => Ok(Body(m)),
            Ok(_) => Err(bad_request("JSON body must be an object")),
            Err(e) => Err(bad_request(format!("Malformed JSON: {e}"))),
        }
    }
}

/// Rejects fields outside `allowed`.
pub fn only_fields(body: &serde_json::Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    for k in body.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(bad_request(format!("JSON does not validate: Additional properties are not allowed ('{k}' was unexpected)")));
        }
    }
    Ok(())
}

/// A required non-negative integer field.
pub fn uint(body: &serde_json::Map<String, Value>, field: &str) -> Result<u64, ApiError> {
    opt_uint(body, field)?.ok_or_else(|| bad_request(format!("JSON does not validate: '{field}' is a required property")))
}

/// An optional non-negative integer field.
pub fn opt_uint(body: &serde_json::Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match body.get(field) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad_request(format!("JSON does not validate: {v} is not a non-negative integer ('{field}')"))),
    }
}

/// A required string field.
pub fn string<'a>(body: &'a serde_json::Map<String, Value>, field: &str) -> Result<&'a str, ApiError> {
    match body.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(bad_request(format!("JSON does not validate: {v} is not of type 'string' ('{field}')"))),
        None => Err(bad_request(format!("JSON does not validate: '{field}' is a required property"))),
    }
}

/// Parses a uuid from a path or body, 400 if malformed.
pub fn parse_uuid(s: &str, what: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(s).map_err(|_| bad_request(format!("Malformed {what}: {s:?} is not a uuid")))
}

/// Parses a uuid from a URL path; a malformed one names nothing, so 404.
pub fn path_uuid(s: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(s).map_err(|_| not_found(format!("No resource provider with uuid {s} found")))
}

/// `{"rel": rel, "href": href}`.
pub fn link(rel: &str, href: String) -> Value {
    json!({"rel": rel, "href": href})
}

/// Query string pairs in order.
pub type QueryPairs = Vec<(String, String)>;

/// The single value of a query key; 400 when it is repeated.
pub fn single<'a>(q: &'a QueryPairs, key: &str) -> Result<Option<&'a str>, ApiError> {
    let mut it = q.iter().filter(|(k, _)| k == key);
    let first = it.next().map(|(_, v)| v.as_str());
    if it.next().is_some() {
        return Err(error(StatusCode::BAD_REQUEST, format!("Query parameter {key:?} may be given only once"), "placement.query.duplicate_key"));
    }
    Ok(first)
}
