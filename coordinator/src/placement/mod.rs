//! Placement API (resource providers, inventories, traits, allocations,
//! allocation candidates, usages, reshaper), compatible with osc-placement,
//! microversions 1.0 to 1.39.

use axum::routing::{get, post};
use axum::Router;

use crate::state::AppState;

pub mod api;
pub mod classes;
pub mod db;
pub mod microversion;
pub mod traits;

/// `GET /placement/` (with the slash keystoneauth adds to the catalog URL),
/// which a router nested at `/placement` cannot match; merged at the top level.
pub fn root_routes() -> Router<AppState> {
    Router::new().route("/placement/", get(api::root::versions)).layer(axum::middleware::from_fn(microversion::negotiate))
}

/// Placement's routes, nested under `/placement`.
pub fn routes() -> Router<AppState> {
    use api::*;
    Router::new()
        .route("/", get(root::versions))
        .route("/resource_providers", get(providers::list).post(providers::create))
        .route("/resource_providers/{uuid}", get(providers::show).put(providers::update).delete(providers::delete))
        .route("/resource_providers/{uuid}/aggregates", get(providers::get_aggregates).put(providers::put_aggregates))
        .route(
            "/resource_providers/{uuid}/traits",
            get(providers::get_traits).put(providers::put_traits).delete(providers::delete_traits),
        )
        .route(
            "/resource_providers/{uuid}/inventories",
            get(inventories::list).put(inventories::put_all).post(inventories::create).delete(inventories::delete_all),
        )
        .route(
            "/resource_providers/{uuid}/inventories/{class}",
            get(inventories::show).put(inventories::put_one).delete(inventories::delete_one),
        )
        .route("/resource_providers/{uuid}/allocations", get(allocations::for_provider))
        .route("/resource_providers/{uuid}/usages", get(usages::for_provider))
        .route("/resource_classes", get(classes::list).post(classes::create))
        .route("/resource_classes/{name}", get(classes::show).put(classes::put).delete(classes::delete))
        .route("/traits", get(traits::list))
        .route("/traits/{name}", get(traits::show).put(traits::put).delete(traits::delete))
        .route("/allocations", post(allocations::post))
        .route("/allocations/{consumer}", get(allocations::show).put(allocations::put).delete(allocations::delete))
        .route("/allocation_candidates", get(candidates::list))
        .route("/usages", get(usages::totals))
        .route("/reshaper", post(reshaper::reshape))
        .layer(axum::middleware::from_fn(microversion::negotiate))
}
