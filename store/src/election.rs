//! Leader election over leases and compare-and-swap (to be written).
