//! Availability zone filter.

use super::{Filter, HostView};
use crate::scheduler::request::RequestSpec;

/// When the request names an availability zone, passes only hosts in that
/// zone; a request without a zone passes every host.
pub struct AvailabilityZoneFilter;

impl Filter for AvailabilityZoneFilter {
    fn name(&self) -> &'static str {
        "AvailabilityZoneFilter"
    }
    fn passes(&self, host: &HostView<'_>, req: &RequestSpec) -> bool {
        match &req.availability_zone {
            None => true,
            Some(az) => host.status.and_then(|s| s.availability_zone.as_deref()) == Some(az.as_str()),
        }
    }
}
