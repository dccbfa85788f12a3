//! NUMA fit filter.

use super::{Filter, HostView};
use crate::scheduler::fit::{fit_numa, Taken};
use crate::scheduler::request::RequestSpec;

/// Passes a host when each requested guest NUMA node can have a host NUMA
/// node (a provider with `HW_NUMA_ROOT`) of its own with room for all of that
/// node's dedicated CPUs (PCPU), shared CPUs (VCPU), memory (MEMORY_MB) and
/// hugepages (CUSTOM_HUGEPAGES_*). A request without NUMA nodes passes.
pub struct NumaFilter;

impl Filter for NumaFilter {
    fn name(&self) -> &'static str {
        "NUMATopologyFilter"
    }
    fn implied_by_fit(&self) -> bool {
        true
    }
    fn passes(&self, host: &HostView<'_>, req: &RequestSpec) -> bool {
        fit_numa(host.tree, req, &mut Taken::default()).is_some()
    }
}
