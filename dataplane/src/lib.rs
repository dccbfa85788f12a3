//! The dataplane.
