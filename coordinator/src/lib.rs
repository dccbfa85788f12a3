//! The coordinator: a stateless control plane over the state store.
//!
//! Every replica serves the same APIs from the same store; nothing is kept in
//! a replica that another replica would need. `server::build` is the one place
//! that assembles a replica.

pub mod compute;
pub mod config;
pub mod error;
pub mod hosts;
pub mod identity;
pub mod metrics;
pub mod placement;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod testing;

pub use config::Config;
pub use error::{ApiError, Dialect};
pub use state::AppState;
