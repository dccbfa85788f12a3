//! API errors in the shape each OpenStack service uses.
//!
//! A handler returns `Result<_, ApiError>`; the error carries the status, a
//! message for the user and the dialect of the service that raised it, so a
//! Keystone error looks like Keystone's, a Placement error like Placement's.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Which service's error shape to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// `{"error": {"code", "title", "message"}}`
    Keystone,
    /// `{"errors": [{"status", "title", "detail", "code"}]}`
    Placement,
    /// `{"itemNotFound": {"code", "message"}}` and friends
    Nova,
    /// `{"NeutronError": {"type", "message", "detail"}}`
    Neutron,
    /// Plain `{"error": {"code", "message"}}` for our own endpoints.
    Plain,
}

/// An error returned to an API client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub dialect: Dialect,
    /// Placement's machine-readable error code, when it has one.
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(dialect: Dialect, status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), dialect, code: None }
    }
    pub fn bad_request(d: Dialect, m: impl Into<String>) -> Self {
        Self::new(d, StatusCode::BAD_REQUEST, m)
    }
    pub fn unauthorized(d: Dialect, m: impl Into<String>) -> Self {
        Self::new(d, StatusCode::UNAUTHORIZED, m)
    }
    pub fn forbidden(d: Dialect, m: impl Into<String>) -> Self {
        Self::new(d, StatusCode::FORBIDDEN, m)
    }
    pub fn not_found(d: Dialect, m: impl Into<String>) -> Self {
        Self::new(d, StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(d: Dialect, m: impl Into<String>) -> Self {
        Self::new(d, StatusCode::CONFLICT, m)
    }
    pub fn internal(d: Dialect, m: impl Into<String>) -> Self {
        Self::new(d, StatusCode::INTERNAL_SERVER_ERROR, m)
    }
    pub fn unavailable(d: Dialect, m: impl Into<String>) -> Self {
        Self::new(d, StatusCode::SERVICE_UNAVAILABLE, m)
    }
    /// Attaches a Placement error code such as `placement.concurrent_update`.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    /// Maps a store failure to a 503 (unavailable) or 500 in the given dialect.
    pub fn from_store(d: Dialect, e: store::StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        match e {
            store::StoreError::Unavailable(_) => Self::unavailable(d, "The state store is unavailable, try again later."),
            _ => Self::internal(d, "An unexpected error prevented the server from fulfilling your request."),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

fn title(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Error")
}

fn nova_key(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "itemNotFound",
        405 => "badMethod",
        409 => "conflictingRequest",
        413 => "overLimit",
        415 => "badMediaType",
        429 => "overLimit",
        501 => "notImplemented",
        503 => "serviceUnavailable",
        _ => "computeFault",
    }
}

fn neutron_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BadRequest",
        401 => "NotAuthorized",
        403 => "PolicyNotAuthorized",
        404 => "NotFound",
        409 => "Conflict",
        413 => "OverQuota",
        503 => "ServiceUnavailable",
        _ => "NeutronError",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.status.as_u16();
        let body = match self.dialect {
            Dialect::Keystone => json!({"error": {"code": code, "title": title(self.status), "message": self.message}}),
            Dialect::Placement => json!({"errors": [{
                "status": code,
                "title": title(self.status),
                "detail": self.message,
                "code": self.code.unwrap_or("placement.undefined_code"),
            }]}),
            Dialect::Nova => json!({nova_key(self.status): {"code": code, "message": self.message}}),
            Dialect::Neutron => json!({"NeutronError": {"type": neutron_type(self.status), "message": self.message, "detail": ""}}),
            Dialect::Plain => json!({"error": {"code": code, "message": self.message}}),
        };
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED && self.dialect == Dialect::Keystone {
            resp.headers_mut().insert("WWW-Authenticate", "Keystone uri=\"/v3\"".parse().unwrap());
        }
        resp
    }
}
