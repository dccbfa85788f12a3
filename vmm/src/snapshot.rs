//! Snapshots of a paused VM: `snapshot.json` (versioned: config, vCPU, VM
//! and device state) beside `memory.bin` (guest RAM, zero pages left as holes).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{MachineConfig, MemoryBackend, VmConfig};
use crate::devices::i8042::I8042Snapshot;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::MmioSnapshot;
use crate::machine::{RunState, Vmm};
use crate::vstate::memory::{self, GuestMemoryMmap, GuestRegionMmap};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// Format version written by this build; readers refuse others.
pub const SNAPSHOT_VERSION: u32 = 1;
/// State file name inside a snapshot directory.
pub const STATE_FILE: &str = "snapshot.json";
/// Memory file name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";

/// Errors taking or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM is running.
    #[error("The VM must be paused to take a snapshot")]
    NotPaused,
    /// Filesystem trouble.
    #[error("Snapshot I/O on {0}: {1}")]
    Io(String, std::io::Error),
    /// Reading device or vCPU state failed.
    #[error("Cannot save state: {0}")]
    State(String),
    /// The VM has a device whose state lives outside the VMM.
    #[error("Cannot snapshot device {0}: its queues are served by an external vhost-user backend")]
    ExternalBackend(String),
    /// The file is not a snapshot this build reads.
    #[error("Invalid snapshot: {0}")]
    Format(String),
}

/// One virtio device's saved state.
#[derive(Clone, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// Device id.
    pub id: String,
    /// MMIO base.
    pub addr: u64,
    /// Transport and device state.
    pub mmio: MmioSnapshot,
}

/// A memory region inside `memory.bin`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct MemoryRegionSnapshot {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset in memory.bin.
    pub file_offset: u64,
}

/// Everything but guest RAM.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// The VM's configuration.
    pub config: VmConfig,
    /// Irqchip, PIT, clock.
    pub vm: VmState,
    /// Each vCPU.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// Keyboard controller.
    pub i8042: I8042Snapshot,
    /// virtio devices in bus order.
    pub virtio: Vec<DeviceSnapshot>,
    /// Layout of memory.bin.
    pub memory: Vec<MemoryRegionSnapshot>,
}

fn io(path: &Path, e: std::io::Error) -> SnapshotError {
    SnapshotError::Io(path.display().to_string(), e)
}

/// Writes a snapshot of the paused VM into `dir` (created if missing).
pub fn create(vmm: &Vmm, dir: &Path) -> Result<(), SnapshotError> {
    if vmm.state() != RunState::Paused {
        return Err(SnapshotError::NotPaused);
    }
    if let Some(s) = vmm.virtio.iter().find(|s| s.transport.lock().unwrap().device().external_backend()) {
        return Err(SnapshotError::ExternalBackend(s.id.clone()));
    }
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let vcpus = vmm
        .vcpus
        .iter()
        .map(|v| v.save_state().map_err(|e| SnapshotError::State(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let vm = vmm.vm.save_state().map_err(|e| SnapshotError::State(e.to_string()))?;
    let virtio = vmm
        .virtio
        .iter()
        .map(|s| DeviceSnapshot { id: s.id.clone(), addr: s.addr, mmio: s.transport.lock().unwrap().snapshot() })
        .collect();
    let memory = write_memory(&vmm.mem, &dir.join(MEMORY_FILE))?;
    let snap = Snapshot {
        version: SNAPSHOT_VERSION,
        config: vmm.config.clone(),
        vm,
        vcpus,
        serial: vmm.serial.lock().unwrap().snapshot(),
        i8042: vmm.i8042.lock().unwrap().snapshot(),
        virtio,
        memory,
    };
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let json = serde_json::to_vec(&snap).map_err(|e| SnapshotError::State(e.to_string()))?;
    std::fs::write(&tmp, json).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(|e| io(dir, e))?;
    Ok(())
}

fn write_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<Vec<MemoryRegionSnapshot>, SnapshotError> {
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(path).map_err(|e| io(path, e))?;
    let mut out = Vec::new();
    let mut offset = 0u64;
    let mut page = vec![0u8; 4096];
    for r in mem.iter() {
        let start = r.start_addr().0;
        let size = r.len();
        out.push(MemoryRegionSnapshot { guest_addr: start, size, file_offset: offset });
        let mut pos = 0;
        while pos < size {
            mem.read_slice(&mut page, GuestAddress(start + pos)).map_err(|e| SnapshotError::State(e.to_string()))?;
            if page.iter().any(|b| *b != 0) {
                f.seek(SeekFrom::Start(offset + pos)).map_err(|e| io(path, e))?;
                f.write_all(&page).map_err(|e| io(path, e))?;
            }
            pos += 4096;
        }
        offset += size;
    }
    f.set_len(offset).map_err(|e| io(path, e))?;
    Ok(out)
}

/// Reads `dir/snapshot.json` and checks its version.
pub fn load(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let p = dir.join(STATE_FILE);
    let bytes = std::fs::read(&p).map_err(|e| io(&p, e))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Format(e.to_string()))?;
    let ver = v.get("version").and_then(|x| x.as_u64()).ok_or_else(|| SnapshotError::Format("no version field".into()))?;
    if ver != u64::from(SNAPSHOT_VERSION) {
        return Err(SnapshotError::Format(format!("version {ver}; this build reads version {SNAPSHOT_VERSION}")));
    }
    serde_json::from_value(v).map_err(|e| SnapshotError::Format(e.to_string()))
}

/// Guest memory for a restore: anonymous memory maps memory.bin privately
/// (pages load on first touch); other backends read it in.
pub fn restore_memory(cfg: &MachineConfig, snap: &Snapshot, dir: &Path) -> Result<GuestMemoryMmap, String> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(|e| format!("Cannot open {}: {e}", path.display()))?;
    if cfg.memory_backend == MemoryBackend::Anonymous {
        let mut regions = Vec::new();
        for m in &snap.memory {
            let f = file.try_clone().map_err(|e| e.to_string())?;
            let len = m.size as usize;
            let region = MmapRegionBuilder::new_with_bitmap(len, <AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(len))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::new(f, m.file_offset))
                .build()
                .map_err(|e| format!("Cannot map {}: {e}", path.display()))?;
            regions.push(GuestRegionMmap::new(region, GuestAddress(m.guest_addr)).ok_or("Region overflows")?);
        }
        return GuestMemoryMmap::from_regions(regions).map_err(|e| e.to_string());
    }
    let mem = memory::create(cfg).map_err(|e| e.to_string())?;
    let mut f = file;
    for m in &snap.memory {
        f.seek(SeekFrom::Start(m.file_offset)).map_err(|e| e.to_string())?;
        mem.read_exact_volatile_from(GuestAddress(m.guest_addr), &mut f, m.size as usize)
            .map_err(|e| format!("Cannot read {}: {e}", path.display()))?;
    }
    Ok(mem)
}
