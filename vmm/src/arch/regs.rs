//! Long-mode entry state for the boot vCPU: GDT, identity page tables,
//! segment and control registers, FPU and local APIC set-up.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::vstate::memory::GuestMemoryMmap;

/// Errors setting up registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing tables into guest memory failed.
    #[error("Cannot write boot tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// A vCPU ioctl failed.
    #[error("vCPU ioctl {0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Packs a GDT entry from flags, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    // KVM takes the limit in bytes: with page granularity, scale it.
    let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let limit = if (entry >> 55) & 1 == 1 { (raw << 12) | 0xfff } else { raw };
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
    }
}

/// Writes the GDT, an empty IDT and 4 GiB of identity-mapped 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, e) in boot_gdt().iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))?;
    }
    for (i, e) in pvh_gdt().iter().enumerate() {
        mem.write_obj(*e, GuestAddress(PVH_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    let pds = IDENTITY_MAPPED >> 30;
    for p in 0..pds {
        mem.write_obj((PDE_START + p * 0x1000) | 0x03, GuestAddress(PDPTE_START + p * 8))?;
    }
    for i in 0..(IDENTITY_MAPPED >> 21) {
        // Present, writable, 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}

fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ]
}

fn pvh_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xc09b, 0, 0xfffff), // flat 32-bit code
        gdt_entry(0xc093, 0, 0xfffff), // flat data
        gdt_entry(0x008b, 0, 0x67),    // TSS
    ]
}

/// Puts the vCPU in 32-bit protected mode with paging off and flat
/// segments, as the PVH boot protocol expects.
pub fn setup_sregs_pvh(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| RegsError::Ioctl("KVM_GET_SREGS", e))?;
    let gdt = pvh_gdt();
    let data = segment_from_gdt(gdt[2], 2);
    sregs.gdt.base = PVH_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = segment_from_gdt(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    sregs.cr0 = (sregs.cr0 & !X86_CR0_PG) | X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(|e| RegsError::Ioctl("KVM_SET_SREGS", e))
}

/// PVH general registers: the entry point, and %ebx pointing at the start info.
pub fn setup_regs_pvh(vcpu: &VcpuFd, entry: u64, start_info: u64) -> Result<(), RegsError> {
    let regs = kvm_regs { rflags: 0x2, rip: entry, rbx: start_info, ..Default::default() };
    vcpu.set_regs(&regs).map_err(|e| RegsError::Ioctl("KVM_SET_REGS", e))
}

/// Puts the vCPU in 64-bit mode with paging on, as the Linux 64-bit boot protocol expects.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| RegsError::Ioctl("KVM_GET_SREGS", e))?;
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(|e| RegsError::Ioctl("KVM_SET_SREGS", e))
}

/// Sets the general registers: entry point, boot stack, zero page in %rsi.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| RegsError::Ioctl("KVM_SET_REGS", e))
}

/// Initial FPU control words.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Ioctl("KVM_SET_FPU", e))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}
fn set_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

/// LINT0 to ExtINT and LINT1 to NMI, so the PIC's interrupts reach the BSP.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut l = vcpu.get_lapic().map_err(|e| RegsError::Ioctl("KVM_GET_LAPIC", e))?;
    let lvt0 = get_reg(&l, APIC_LVT0);
    set_reg(&mut l, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = get_reg(&l, APIC_LVT1);
    set_reg(&mut l, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
    vcpu.set_lapic(&l).map_err(|e| RegsError::Ioctl("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_the_segments_linux_expects() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code.l, code.db, code.present, code.type_, code.selector), (1, 0, 1, 0xb, 8));
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.db, data.g, data.type_, data.limit), (1, 1, 3, 0xffff_ffff), "page-granular limit in bytes");
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
        let pvh = pvh_gdt();
        let code32 = segment_from_gdt(pvh[1], 1);
        assert_eq!((code32.l, code32.db, code32.g, code32.type_, code32.limit), (0, 1, 1, 0xb, 0xffff_ffff));
        let tss = segment_from_gdt(pvh[3], 3);
        assert_eq!((tss.type_, tss.s, tss.limit, tss.present), (0xb, 0, 0x67, 1));
    }
}
