//! x86_64 specifics: memory layout, boot protocols (Linux 64-bit, PVH),
//! CPU state, MP and ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod pvh;
pub mod regs;
