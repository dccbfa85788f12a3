//! SR-IOV filter.

use super::{Filter, HostView};
use crate::scheduler::fit::{fit_sriov, Taken};
use crate::scheduler::request::RequestSpec;

/// Passes a host when, for each SR-IOV request, one provider of its tree
/// carries the physnet's trait (`CUSTOM_PHYSNET_<NAME>`) and has that many
/// free `SRIOV_NET_VF`. A request without SR-IOV passes.
pub struct SriovFilter;

impl Filter for SriovFilter {
    fn name(&self) -> &'static str {
        "PciPassthroughFilter"
    }
    fn implied_by_fit(&self) -> bool {
        true
    }
    fn passes(&self, host: &HostView<'_>, req: &RequestSpec) -> bool {
        fit_sriov(host.tree, req, &mut Taken::default()).is_some()
    }
}
