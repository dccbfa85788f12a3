//! A rust-vmm based virtual machine monitor: one process per VM, direct
//! kernel boot, serial console, virtio-mmio block, net and rng devices, a
//! unix-socket control API, snapshots.
//!
//! Layout follows Firecracker: [`vstate`] (KVM, VM, vCPUs, memory),
//! [`devices`], [`builder`] (the one place that assembles a VM),
//! [`machine`] (the running VM and its event loop) and [`api`].

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod machine;
pub mod seccomp;
pub mod snapshot;
pub mod state_file;
pub mod timing;
pub mod vstate;

/// Path of the freestanding test guest built by build.rs.
pub const TEST_GUEST: &str = env!("VMM_TEST_GUEST");
/// Path of the hostile test guest (same source, built with -DHOSTILE).
pub const TEST_GUEST_HOSTILE: &str = env!("VMM_TEST_GUEST_HOSTILE");
/// Path of the test guest with a PVH note and 32-bit entry (built with -DPVH).
pub const TEST_GUEST_PVH: &str = env!("VMM_TEST_GUEST_PVH");
