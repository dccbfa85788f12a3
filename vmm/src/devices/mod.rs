//! Emulated devices: the legacy ones on port I/O and virtio over MMIO.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
