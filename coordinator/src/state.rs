//! What every request handler can reach.

use std::sync::Arc;

use store::Store;

use crate::config::Config;
use crate::identity::Identity;
use crate::metrics::Metrics;

/// Shared state of one coordinator replica; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub config: Arc<Config>,
    pub identity: Arc<Identity>,
    pub metrics: Arc<Metrics>,
}
