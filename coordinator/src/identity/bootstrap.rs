//! `coordinator bootstrap`: the first domain, project, user, roles and catalog.

use std::sync::Arc;

use store::Store;

use crate::config::Config;

/// What to bootstrap.
pub struct Options {
    pub admin_password: String,
    pub admin_user: String,
    pub admin_project: String,
    pub reset_password: bool,
}

/// Creates whatever is missing; returns a summary for the operator.
pub async fn run(_store: Arc<dyn Store>, _config: &Config, _opts: &Options) -> anyhow::Result<String> {
    anyhow::bail!("bootstrap is not written yet")
}
