//! Required and forbidden traits filter.

use super::{Filter, HostView};
use crate::scheduler::request::RequestSpec;

/// Passes a host when every required trait is on some provider of its tree
/// and no provider of its tree has a forbidden trait.
pub struct TraitsFilter;

impl Filter for TraitsFilter {
    fn name(&self) -> &'static str {
        "TraitsFilter"
    }
    fn passes(&self, host: &HostView<'_>, req: &RequestSpec) -> bool {
        let has = |t: &String| host.tree.iter().any(|p| p.value.traits.contains(t));
        req.required_traits.iter().all(has) && !req.forbidden_traits.iter().any(has)
    }
}
