//! The dataplane: a logical network model compiled to a per-host pipeline of
//! match/action tables, executed by our own userspace datapath.

pub mod compiler;
pub mod conntrack;
pub mod dhcp;
pub mod flow;
pub mod mac;
pub mod model;
pub mod packet;
pub mod pipeline;
