//! Where things live in the guest's physical address space (x86_64).

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;
/// GDT for the PVH entry (flat 32-bit segments).
pub const PVH_GDT_START: u64 = 0x540;
/// Interrupt descriptor table (empty; the guest installs its own).
pub const IDT_START: u64 = 0x520;
/// Linux boot parameters ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer handed to the kernel.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the identity page tables.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (4 GiB identity-mapped with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; the MP table goes here.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels load at 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the hole below 4 GiB that holds device MMIO.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of that hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First legacy IRQ handed to virtio devices (4 is COM1, 1 the keyboard).
pub const VIRTIO_IRQ_START: u32 = 5;
/// Last IRQ usable by devices (IOAPIC pins 0..=23).
pub const IRQ_MAX: u32 = 23;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Identity-mapped bytes (reaches the MMIO hole).
pub const IDENTITY_MAPPED: u64 = 4 << 30;
/// COM1 I/O port base and IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
/// IRQ line of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;
/// IRQ line of the i8042 keyboard.
pub const I8042_IRQ: u32 = 1;
/// KVM's TSS needs three pages somewhere the guest does not use.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Guest RAM ranges for `mem_size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }
}
