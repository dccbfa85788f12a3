//! The dataplane: a logical network model compiled to a per-host pipeline of
//! match/action tables, executed by our own userspace datapath.
//!
//! [`model`] is the input, [`compiler`] turns it into a [`pipeline`] for one
//! host, [`engine`] runs it on [`ports`] with [`conntrack`], and [`control`]
//! is the API the agent calls.

pub mod compiler;
pub mod conntrack;
pub mod control;
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod dhcp;
pub mod engine;
pub mod flow;
pub mod mac;
pub mod metadata;
pub mod model;
pub mod packet;
pub mod pipeline;
pub mod ovs;
pub mod ports;
pub mod vhost_user;
