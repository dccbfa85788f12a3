//! `POST /reshaper` (1.30): move inventory and the allocations against it in one step.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use serde_json::Value;

use super::allocations::parse_consumer;
use super::providers::require;
use super::{bad_request, only_fields, parse_uuid, Admin, Body};
use crate::error::ApiError;
use crate::placement::db::{self, Inventory};
use crate::placement::microversion::Version;
use crate::state::AppState;

/// POST /reshaper
pub async fn reshape(State(st): State<AppState>, _a: Admin, Extension(v): Extension<Version>, Body(b): Body) -> Result<StatusCode, ApiError> {
    require(v, 30)?;
    only_fields(&b, &["inventories", "allocations"])?;
    let (Some(Value::Object(invs)), Some(Value::Object(allocs))) = (b.get("inventories"), b.get("allocations")) else {
        return Err(bad_request("JSON does not validate: 'inventories' and 'allocations' are required objects"));
    };
    let mut inventories = BTreeMap::new();
    for (rp, body) in invs {
        let rp = parse_uuid(rp, "resource provider uuid")?;
        let Value::Object(m) = body else { return Err(bad_request("JSON does not validate: inventories entries must be objects")) };
        only_fields(m, &["inventories", "resource_provider_generation"])?;
        let generation = super::uint(m, "resource_provider_generation")?;
        let Some(Value::Object(items)) = m.get("inventories") else { return Err(bad_request("JSON does not validate: 'inventories' must be an object")) };
        let mut new = BTreeMap::new();
        for (class, i) in items {
            let i: Inventory = serde_json::from_value(i.clone()).map_err(|e| bad_request(format!("JSON does not validate: {e}")))?;
            new.insert(class.clone(), i);
        }
        db::validate_inventories(st.store.as_ref(), &new).await?;
        inventories.insert(rp, (generation, new));
    }
    let mut reqs = Vec::new();
    for (c, body) in allocs {
        let Value::Object(m) = body else { return Err(bad_request("JSON does not validate: allocations entries must be objects")) };
        reqs.push(parse_consumer(parse_uuid(c, "consumer uuid")?, m, v, false, true)?);
    }
    db::reshape(st.store.as_ref(), &inventories, &reqs).await?;
    Ok(StatusCode::NO_CONTENT)
}
