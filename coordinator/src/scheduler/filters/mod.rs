//! Filters: each decides, from the cached provider tree and the host's
//! status, whether a host can take a request at all. One filter per file, with
//! its rule in its doc comment.

use std::sync::Arc;

use super::cache::CachedProvider;
use super::request::RequestSpec;
use super::HostStatus;

pub mod availability_zone;
pub mod capacity;
pub mod host_state;
pub mod numa;
pub mod server_group;
pub mod sriov;
pub mod traits;

/// What a filter looks at: one host.
pub struct HostView<'a> {
    /// The host's providers, root first.
    pub tree: &'a [CachedProvider],
    /// What the hosts module knows of the host (`None`: unknown host).
    pub status: Option<&'a HostStatus>,
}

impl HostView<'_> {
    /// The host's root provider uuid.
    pub fn host(&self) -> uuid::Uuid {
        self.tree[0].value.uuid
    }
}

/// One rule a host must pass.
pub trait Filter: Send + Sync {
    /// Short name for logs and the "no valid host" message.
    fn name(&self) -> &'static str;
    /// Whether the host passes.
    fn passes(&self, host: &HostView<'_>, req: &RequestSpec) -> bool;
    /// Whether every host the whole request fits into ([`super::fit`])
    /// passes this filter. The scheduler then runs it only on hosts the
    /// request does not fit, to say which rule turned them down.
    fn implied_by_fit(&self) -> bool {
        false
    }
}

/// The filters in the order they run (cheap ones first).
pub fn default_filters() -> Vec<Arc<dyn Filter>> {
    vec![
        Arc::new(host_state::HostStateFilter),
        Arc::new(availability_zone::AvailabilityZoneFilter),
        Arc::new(server_group::ServerGroupFilter),
        Arc::new(traits::TraitsFilter),
        Arc::new(capacity::CapacityFilter),
        Arc::new(numa::NumaFilter),
        Arc::new(sriov::SriovFilter),
    ]
}
