//! The KVM VM: memory slots, in-kernel interrupt controllers and PIT, the
//! dirty-page log, and the VM-wide state a snapshot saves.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::kvm::KvmContext;
use super::memory::GuestMemoryMmap;
use crate::arch::layout;

/// Errors creating or driving the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM_CREATE_VM failed.
    #[error("Cannot create the VM: {0}")]
    Create(kvm_ioctls::Error),
    /// A VM ioctl failed.
    #[error("VM ioctl {0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    /// A memory region has no host address.
    #[error("Guest memory region has no host address")]
    HostAddress,
}

/// One KVM memory slot.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// Slot number.
    pub slot: u32,
    /// Guest physical start.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Host virtual address.
    pub host_addr: u64,
}

/// The VM file descriptor and what was registered with it.
pub struct Vm {
    /// The VM fd.
    pub fd: VmFd,
    slots: Vec<Slot>,
    dirty_log: bool,
}

/// VM-wide device state of the in-kernel irqchip, PIT and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

fn ioctl<T>(name: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|e| VmError::Ioctl(name, e))
}

impl Vm {
    /// Creates the VM with its TSS, irqchip and PIT.
    pub fn new(kvm: &KvmContext) -> Result<Self, VmError> {
        let vm = Self::create(kvm)?;
        vm.create_irqchip()?;
        Ok(vm)
    }

    /// Creates the bare VM (and its TSS); memory slots and the irqchip
    /// may follow in either order, but both before any vCPU.
    pub fn create(kvm: &KvmContext) -> Result<Self, VmError> {
        let fd = kvm.kvm.create_vm().map_err(VmError::Create)?;
        ioctl("KVM_SET_TSS_ADDR", fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize))?;
        Ok(Vm { fd, slots: Vec::new(), dirty_log: false })
    }

    /// Creates the in-kernel PIC, IOAPIC, local APICs and PIT.
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        ioctl("KVM_CREATE_IRQCHIP", self.fd.create_irq_chip())?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        ioctl("KVM_CREATE_PIT2", self.fd.create_pit2(pit))?;
        Ok(())
    }

    /// Registers every region of `mem` as a memory slot.
    pub fn register_memory(&mut self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (i, r) in mem.iter().enumerate() {
            let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).map_err(|_| VmError::HostAddress)?;
            self.slots.push(Slot {
                slot: i as u32,
                guest_addr: r.start_addr().0,
                size: r.len(),
                host_addr: host as u64,
            });
        }
        self.apply_slots()
    }

    fn apply_slots(&self) -> Result<(), VmError> {
        for s in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: s.slot,
                flags: if self.dirty_log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: s.guest_addr,
                memory_size: s.size,
                userspace_addr: s.host_addr,
            };
            // SAFETY: host_addr..host_addr+size is a live mapping owned by the
            // guest memory object, which outlives the VM (both are held by the
            // VMM until the process exits).
            ioctl("KVM_SET_USER_MEMORY_REGION", unsafe { self.fd.set_user_memory_region(region) })?;
        }
        Ok(())
    }

    /// The memory slots.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Turns KVM's dirty-page logging on or off for every slot.
    pub fn set_dirty_log(&mut self, on: bool) -> Result<(), VmError> {
        self.dirty_log = on;
        self.apply_slots()
    }

    /// Whether dirty-page logging is on.
    pub fn dirty_log_enabled(&self) -> bool {
        self.dirty_log
    }

    /// Fetches and clears the dirty bitmap of one slot (one bit per 4 KiB page).
    pub fn dirty_bitmap(&self, slot: &Slot) -> Result<Vec<u64>, VmError> {
        ioctl("KVM_GET_DIRTY_LOG", self.fd.get_dirty_log(slot.slot, slot.size as usize))
    }

    /// Reads the in-kernel irqchip, PIT and clock.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            ioctl("KVM_GET_IRQCHIP", self.fd.get_irqchip(&mut c))?;
            Ok(c)
        };
        let mut clock = ioctl("KVM_GET_CLOCK", self.fd.get_clock())?;
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: ioctl("KVM_GET_PIT2", self.fd.get_pit2())?,
            clock,
        })
    }

    /// Writes back what `save_state` read.
    pub fn restore_state(&self, s: &VmState) -> Result<(), VmError> {
        ioctl("KVM_SET_IRQCHIP", self.fd.set_irqchip(&s.pic_master))?;
        ioctl("KVM_SET_IRQCHIP", self.fd.set_irqchip(&s.pic_slave))?;
        ioctl("KVM_SET_IRQCHIP", self.fd.set_irqchip(&s.ioapic))?;
        ioctl("KVM_SET_PIT2", self.fd.set_pit2(&s.pit))?;
        ioctl("KVM_SET_CLOCK", self.fd.set_clock(&s.clock))?;
        Ok(())
    }
}
