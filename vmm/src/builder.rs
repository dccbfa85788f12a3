//! The one place that assembles a VM: memory, KVM VM and vCPUs, legacy and
//! virtio devices, kernel load or snapshot restore.

use std::path::Path;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::BootEntry;
use crate::arch::{acpi, boot, cpuid, layout, mptable, pvh, regs};
use crate::config::{parse_mac, VmConfig};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleLog, SerialDevice};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, HDR_LEN};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::tap::Tap;
use crate::devices::virtio::vhost_user_net::VhostUserNet;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::machine::{DeferredIoevent, VirtioSlot, Vmm};
use crate::snapshot::Snapshot;
use crate::vstate::kvm::KvmContext;
use crate::vstate::memory::{self, GuestMemoryMmap};
use crate::vstate::vcpu::{Vcpu, VcpuRunner};
use crate::vstate::vm::Vm;

/// Errors assembling the VM; each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is inconsistent.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// KVM is not usable.
    #[error(transparent)]
    Kvm(#[from] crate::vstate::kvm::KvmError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The VM could not be created.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// A vCPU could not be created.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Boot tables could not be written.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The PVH start info could not be written.
    #[error(transparent)]
    Pvh(#[from] pvh::PvhError),
    /// A device backend could not be opened.
    #[error("Device {0}: {1}")]
    Device(String, String),
    /// An eventfd or irqfd could not be created or registered.
    #[error("Cannot wire interrupts or notifications: {0}")]
    Wiring(String),
    /// Too many devices for the IRQ lines.
    #[error("Too many devices: no IRQ line left")]
    NoIrq,
    /// No kernel given and no snapshot to restore.
    #[error("Nothing to boot: the config has no [boot] section")]
    NoKernel,
    /// The snapshot does not fit this VMM or configuration.
    #[error("Cannot restore snapshot: {0}")]
    Restore(String),
}

/// Builds a VM from `cfg` and boots its kernel, or restores `snapshot`
/// (memory from `snapshot_dir`). vCPUs start paused when `paused`.
///
/// Returns the VM, whose [`Vmm::run`] is for another thread, and vCPU 0's
/// loop, for the calling thread: it is on a CPU already, and a new thread
/// could wait milliseconds for one on a busy host.
///
/// The order is chosen for time to first guest instruction: the memory
/// slot goes in before the irqchip (see below), and the queue ioeventfds
/// (one SRCU grace period each) are registered by the event loop after the
/// vCPUs run; until then a queue notification reaches the device through
/// an MMIO exit, which does the same.
pub fn build(
    cfg: VmConfig,
    snapshot: Option<(&Snapshot, &Path)>,
    paused: bool,
) -> Result<(Vmm, VcpuRunner), BuildError> {
    crate::timing::mark(&crate::timing::BUILD_START);
    cfg.validate()?;
    let kvm = KvmContext::new()?;
    let mem = match snapshot {
        Some((snap, dir)) => Arc::new(crate::snapshot::restore_memory(&cfg.machine, snap, dir).map_err(BuildError::Restore)?),
        None => Arc::new(memory::create(&cfg.machine)?),
    };
    // The VM first: its memory slot is the VM's first SRCU grace period,
    // which the kernel does not delay (registered after the irqchip's, it
    // waited for a timer tick or two).
    let n = cfg.machine.vcpus;
    let mut vm = Vm::create(&kvm)?;
    vm.register_memory(&mem)?;
    vm.create_irqchip()?;
    let mut vcpus = Vec::new();
    for id in 0..n {
        vcpus.push(Vcpu::new(&vm.fd, id, &cpuid::for_vcpu(&kvm.supported_cpuid, id, n))?);
    }
    crate::timing::mark(&crate::timing::VM_READY);
    let parts = assemble(&cfg, snapshot, &mem)?;
    crate::timing::mark(&crate::timing::GUEST_LOADED);
    let Parts { pio, mmio, serial, i8042, virtio, irqfds, ioevents, entry, exit_evt, reset_evt } = parts;
    for (gsi, e) in &irqfds {
        vm.fd.register_irqfd(e, *gsi).map_err(|e| BuildError::Wiring(format!("irqfd for IRQ {gsi}: {e}")))?;
    }

    match (snapshot, entry) {
        (None, Some(entry)) => {
            for v in &vcpus {
                v.configure_boot(entry)?;
            }
        }
        (Some((snap, _)), _) => {
            if snap.vcpus.len() != vcpus.len() {
                return Err(BuildError::Restore(format!(
                    "The snapshot has {} vCPUs, the config {}",
                    snap.vcpus.len(),
                    vcpus.len()
                )));
            }
            vm.restore_state(&snap.vm)?;
            for (v, s) in vcpus.iter().zip(&snap.vcpus) {
                v.restore(s)?;
            }
        }
        (None, None) => return Err(BuildError::NoKernel),
    }

    let started = Vmm::start(cfg, kvm, vm, mem, vcpus, pio, mmio, serial, i8042, virtio, exit_evt, reset_evt, paused, ioevents)
        .map_err(|e| BuildError::Wiring(e.to_string()))?;
    crate::timing::mark(&crate::timing::VCPUS_STARTED);
    Ok(started)
}

/// Devices, buses and boot state, ready to be joined with the VM.
struct Parts {
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    virtio: Vec<VirtioSlot>,
    /// Interrupt eventfds to register as irqfds, by GSI.
    irqfds: Vec<(u32, EventFd)>,
    /// Queue notification eventfds to register as ioeventfds: (eventfd, address, queue, device).
    ioevents: Vec<DeferredIoevent>,
    /// How vCPU 0 enters the kernel (None when restoring).
    entry: Option<BootEntry>,
    exit_evt: EventFd,
    reset_evt: EventFd,
}

/// Devices, kernel and boot tables: everything that needs guest memory but
/// not the KVM VM.
fn assemble(cfg: &VmConfig, snapshot: Option<(&Snapshot, &Path)>, mem: &Arc<GuestMemoryMmap>) -> Result<Parts, BuildError> {
    let wiring = |e: std::io::Error| BuildError::Wiring(e.to_string());
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(wiring)?;
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(wiring)?;
    let mut irqfds: Vec<(u32, EventFd)> = Vec::new();
    let mut irqfd = |gsi: u32| -> Result<EventFd, BuildError> {
        let e = EventFd::new(libc::EFD_NONBLOCK).map_err(wiring)?;
        irqfds.push((gsi, e.try_clone().map_err(wiring)?));
        Ok(e)
    };

    // Legacy devices on port I/O.
    let mut pio = Bus::new();
    let console = match snapshot {
        Some(_) => ConsoleLog::append(cfg.serial.log.as_deref(), cfg.serial.max_bytes, cfg.serial.stdout),
        None => ConsoleLog::new(cfg.serial.log.as_deref(), cfg.serial.max_bytes, cfg.serial.stdout),
    }
    .map_err(|e| BuildError::Device("serial".into(), e.to_string()))?;
    let serial_irq = irqfd(layout::SERIAL_IRQ)?;
    let serial = match snapshot {
        Some((s, _)) => SerialDevice::restore(serial_irq, console, &s.serial).map_err(BuildError::Restore)?,
        None => SerialDevice::new(serial_irq, console),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone() as Arc<Mutex<dyn BusDevice>>, u64::from(layout::SERIAL_PORT), 8)
        .map_err(|e| BuildError::Wiring(e.to_string()))?;
    let i8042 = I8042::new(reset_evt.try_clone().map_err(wiring)?, irqfd(layout::I8042_IRQ)?);
    let i8042 = Arc::new(Mutex::new(i8042));
    if let Some((s, _)) = snapshot {
        i8042.lock().unwrap().restore(&s.i8042);
    }
    pio.insert(i8042.clone() as Arc<Mutex<dyn BusDevice>>, u64::from(layout::I8042_DATA_PORT), 5)
        .map_err(|e| BuildError::Wiring(e.to_string()))?;

    // virtio devices, one MMIO window and IRQ each, in config order.
    let mut mmio = Bus::new();
    let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    for b in &cfg.block {
        let d = Block::new(&b.id, &b.path, b.read_only, b.rate_limit).map_err(|e| BuildError::Device(b.id.clone(), e.to_string()))?;
        devices.push((b.id.clone(), Box::new(d)));
    }
    for (i, n) in cfg.net.iter().enumerate() {
        let mac = match &n.mac {
            Some(m) => parse_mac(m).map_err(|e| BuildError::Device(n.id.clone(), e))?,
            None => [0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(i as u8)],
        };
        let dev: Box<dyn VirtioDevice> = match (&n.tap, &n.vhost_user_socket) {
            (Some(tap), _) => {
                let t = Tap::open(tap, HDR_LEN as i32).map_err(|e| BuildError::Device(n.id.clone(), e.to_string()))?;
                Box::new(Net::new(t, mac, n.rate_limit))
            }
            (None, Some(sock)) => {
                let d = VhostUserNet::connect(sock, mac).map_err(|e| BuildError::Device(n.id.clone(), e.to_string()))?;
                Box::new(d)
            }
            (None, None) => return Err(BuildError::Device(n.id.clone(), "No backend".into())),
        };
        devices.push((n.id.clone(), dev));
    }
    if let Some(r) = &cfg.rng {
        devices.push(("rng".into(), Box::new(Rng::new(r.rate_limit))));
    }
    if let Some(v) = &cfg.vsock {
        let d = Vsock::new(v.guest_cid, &v.uds_path).map_err(|e| BuildError::Device("vsock".into(), e.to_string()))?;
        devices.push(("vsock".into(), Box::new(d)));
    }
    let mut virtio = Vec::new();
    let mut ioevents = Vec::new();
    for (i, (id, dev)) in devices.into_iter().enumerate() {
        let irq = layout::VIRTIO_IRQ_START + i as u32;
        if irq > layout::IRQ_MAX {
            return Err(BuildError::NoIrq);
        }
        let addr = layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE;
        let t = MmioTransport::new(id.clone(), dev, mem.clone(), irqfd(irq)?).map_err(wiring)?;
        for (q, evt) in t.queue_evts().iter().enumerate() {
            ioevents.push((evt.try_clone().map_err(wiring)?, addr + 0x50, q as u32, id.clone()));
        }
        let t = Arc::new(Mutex::new(t));
        mmio.insert(t.clone() as Arc<Mutex<dyn BusDevice>>, addr, layout::VIRTIO_MMIO_SIZE)
            .map_err(|e| BuildError::Wiring(e.to_string()))?;
        virtio.push(VirtioSlot { id, addr, irq, transport: t });
    }

    let entry = match snapshot {
        None => {
            let bootcfg = cfg.boot.as_ref().ok_or(BuildError::NoKernel)?;
            let kernel = boot::load_kernel(mem, &bootcfg.kernel)?;
            let initrd = match &bootcfg.initrd {
                Some(p) => Some(boot::load_initrd(mem, p, kernel.end)?),
                None => None,
            };
            let list: Vec<(u64, u32)> = virtio.iter().map(|v| (v.addr, v.irq)).collect();
            let cmdline = boot::build_cmdline(&bootcfg.cmdline, &list)?;
            let rsdp = acpi::setup(mem, cfg.machine.vcpus)?;
            boot::write_boot_params(mem, &kernel, &cmdline, initrd, Some(rsdp))?;
            regs::write_boot_tables(mem)?;
            mptable::setup(mem, cfg.machine.vcpus)?;
            match kernel.pvh_entry {
                Some(entry) => Some(BootEntry::Pvh { entry, start_info: pvh::setup(mem, initrd, rsdp)? }),
                None => Some(BootEntry::Linux64(kernel.entry)),
            }
        }
        Some((snap, _)) => {
            if snap.virtio.len() != virtio.len() {
                return Err(BuildError::Restore("The snapshot's device list differs from the config".into()));
            }
            for (slot, s) in virtio.iter().zip(&snap.virtio) {
                if slot.id != s.id || slot.addr != s.addr {
                    return Err(BuildError::Restore(format!("Device {} is not where the snapshot had {}", slot.id, s.id)));
                }
                slot.transport.lock().unwrap().restore(&s.mmio).map_err(BuildError::Restore)?;
            }
            None
        }
    };
    Ok(Parts { pio, mmio, serial, i8042, virtio, irqfds, ioevents, entry, exit_evt, reset_evt })
}
