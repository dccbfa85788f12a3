//! Capacity filter.

use super::{Filter, HostView};
use crate::scheduler::fit::{fit_resources, Taken};
use crate::scheduler::request::RequestSpec;

/// Passes a host when each requested tree-wide class (VCPU, MEMORY_MB,
/// DISK_GB, ...) fits on one provider of its tree: the amount obeys the
/// inventory's min_unit, max_unit and step_size, and usage plus the amount
/// stays within `(total - reserved) * allocation_ratio`.
pub struct CapacityFilter;

impl Filter for CapacityFilter {
    fn name(&self) -> &'static str {
        "CapacityFilter"
    }
    fn implied_by_fit(&self) -> bool {
        true
    }
    fn passes(&self, host: &HostView<'_>, req: &RequestSpec) -> bool {
        fit_resources(host.tree, req, &mut Taken::default())
    }
}
