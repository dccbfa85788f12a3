//! Helpers for the cross-crate tests: start etcd, coordinators and agents, run the openstack CLI.
