//! Placement API (resource providers, inventories, traits, allocations,
//! allocation candidates, usages), compatible with osc-placement.

use axum::Router;

use crate::state::AppState;

pub mod classes;
pub mod db;
pub mod traits;

/// Placement's routes, nested under `/placement`.
pub fn routes() -> Router<AppState> {
    Router::new()
}
