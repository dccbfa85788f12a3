//! Server group filter.

use super::{Filter, HostView};
use crate::scheduler::request::{GroupPolicy, RequestSpec};

/// Affinity: once the group has members, passes only the host they run on.
/// Anti-affinity: passes only hosts where no member runs. No group: passes.
pub struct ServerGroupFilter;

impl Filter for ServerGroupFilter {
    fn name(&self) -> &'static str {
        "ServerGroupFilter"
    }
    fn passes(&self, host: &HostView<'_>, req: &RequestSpec) -> bool {
        let Some(group) = &req.server_group else { return true };
        let here = group.member_hosts.contains(&host.host());
        match group.policy {
            GroupPolicy::Affinity => group.member_hosts.is_empty() || here,
            GroupPolicy::AntiAffinity => !here,
        }
    }
}
