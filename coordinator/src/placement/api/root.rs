//! `GET /placement/`: version discovery (no token needed).

use axum::Json;
use serde_json::{json, Value};

use crate::placement::microversion::{MAX, MIN};

/// The one major version and its microversion range.
pub async fn versions() -> Json<Value> {
    Json(json!({"versions": [{
        "id": "v1.0",
        "max_version": MAX.to_string(),
        "min_version": MIN.to_string(),
        "status": "CURRENT",
        "links": [{"rel": "self", "href": ""}],
    }]}))
}
