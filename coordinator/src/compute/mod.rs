//! The compute API (Nova v2.1 dialect), served under `/compute`.
//!
//! So far: version discovery (`/compute/`, `/compute/v2.1/`), `os-services` (hosts as
//! `nova-compute` services, enable/disable with a reason), `os-hypervisors` (with
//! uptime) and an empty `os-aggregates`.
//! Microversions are negotiated per request ([`microversion`]).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::{ApiError, Dialect};
use crate::identity::Auth;
use crate::state::AppState;

pub mod aggregates;
pub mod hypervisors;
pub mod microversion;
pub mod services;

/// The compute API's routes, nested under `/compute`.
pub fn routes() -> Router<AppState> {
    let v21 = Router::new()
        .route("/", get(version_v21))
        .merge(services::routes())
        .merge(hypervisors::routes())
        .merge(aggregates::routes())
        .layer(axum::middleware::from_fn(microversion::layer));
    Router::new()
        .route("/", get(versions))
        .route("/v2.1/", get(version_v21))
        .nest("/v2.1", v21)
        .fallback(not_found)
}

async fn not_found() -> ApiError {
    ApiError::not_found(Dialect::Nova, "The resource could not be found.")
}

/// Refuses non-admins with Nova's 403 (os-services and os-hypervisors are admin APIs).
pub fn require_admin(auth: &Auth) -> Result<(), ApiError> {
    if auth.is_admin() {
        Ok(())
    } else {
        Err(ApiError::forbidden(Dialect::Nova, "Policy doesn't allow this operation to be performed."))
    }
}

/// A time of a record (RFC 3339) in Nova's format (`2024-01-02T03:04:05.000000`, UTC).
pub fn nova_time(rfc3339: &str) -> Value {
    use time::format_description::well_known::Rfc3339;
    let Ok(t) = time::OffsetDateTime::parse(rfc3339, &Rfc3339) else { return Value::Null };
    let t = t.to_offset(time::UtcOffset::UTC);
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]");
    t.format(&fmt).map(Value::String).unwrap_or(Value::Null)
}

fn version_doc(state: &AppState) -> Value {
    json!({
        "id": "v2.1",
        "status": "CURRENT",
        "version": microversion::MAX.to_string(),
        "min_version": microversion::MIN.to_string(),
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{}/compute/v2.1/", state.config.public_url)}],
    })
}

async fn versions(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "versions": [version_doc(&state)] }))
}

async fn version_v21(State(state): State<AppState>) -> Json<Value> {
    let mut doc = version_doc(&state);
    doc["media-types"] = json!([{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}]);
    doc["links"].as_array_mut().expect("links is a list").push(json!({"rel": "describedby", "type": "text/html", "href": "https://docs.openstack.org/"}));
    Json(json!({ "version": doc }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_novas_format() {
        assert_eq!(nova_time("2024-05-06T07:08:09.123Z"), json!("2024-05-06T07:08:09.123000"));
        assert_eq!(nova_time("2024-05-06T09:08:09+02:00"), json!("2024-05-06T07:08:09.000000"));
        assert_eq!(nova_time("garbage"), Value::Null);
    }
}
