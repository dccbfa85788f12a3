//! Host state filter.

use super::{Filter, HostView};
use crate::scheduler::request::RequestSpec;

/// Passes a host only if the hosts module reports it up (its heartbeat lease
/// is alive) and enabled (not disabled by an operator). An unknown host fails.
pub struct HostStateFilter;

impl Filter for HostStateFilter {
    fn name(&self) -> &'static str {
        "HostStateFilter"
    }
    fn passes(&self, host: &HostView<'_>, _req: &RequestSpec) -> bool {
        host.status.is_some_and(|s| s.up && s.enabled)
    }
}
