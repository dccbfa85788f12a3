//! The PVH boot protocol: the kernel starts in 32-bit protected mode with
//! paging off at the entry its `XEN_ELFNOTE_PHYS32_ENTRY` note names, with
//! %ebx pointing at an `hvm_start_info` that gives the command line, the
//! memory map, the initrd (as module 0) and the ACPI RSDP.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{CMDLINE_START, EBDA_START, HIMEM_START};
use crate::vstate::memory::GuestMemoryMmap;

/// `hvm_start_info` lives here (below the zero page).
pub const START_INFO: u64 = 0x6000;
/// The initrd's module list entry.
const MODLIST: u64 = 0x6100;
/// The memory map.
const MEMMAP: u64 = 0x6200;
/// Most memory map entries that fit before the zero page at 0x7000.
const MEMMAP_MAX: usize = (0x7000 - MEMMAP as usize) / 24;
/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Errors writing the start info.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// Guest memory has more regions than the map can hold.
    #[error("Too many memory regions for the PVH memory map")]
    TooManyRegions,
    /// Guest memory write failed.
    #[error("Cannot write the PVH start info: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The memory map as (address, size, type): RAM below the EBDA, the EBDA
/// and BIOS area (where the MP and ACPI tables live) reserved, RAM above.
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM), (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)];
    for r in mem.iter() {
        let start = r.start_addr().0.max(HIMEM_START);
        let end = r.last_addr().0 + 1;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// The bytes of `hvm_start_info` (version 1, 56 bytes).
pub fn start_info(cmdline: u64, rsdp: u64, memmap: u64, entries: u32, modules: u32, modlist: u64) -> [u8; 56] {
    let mut b = [0u8; 56];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b[12..16].copy_from_slice(&modules.to_le_bytes());
    b[16..24].copy_from_slice(&modlist.to_le_bytes());
    b[24..32].copy_from_slice(&cmdline.to_le_bytes());
    b[32..40].copy_from_slice(&rsdp.to_le_bytes());
    b[40..48].copy_from_slice(&memmap.to_le_bytes());
    b[48..52].copy_from_slice(&entries.to_le_bytes());
    b
}

/// Writes the start info, memory map and module list; the command line is
/// already at [`CMDLINE_START`]. Returns the start info's address for %ebx.
pub fn setup(mem: &GuestMemoryMmap, initrd: Option<(u64, u64)>, rsdp: u64) -> Result<u64, PvhError> {
    let map = memory_map(mem);
    if map.len() > MEMMAP_MAX {
        return Err(PvhError::TooManyRegions);
    }
    for (i, (addr, size, ty)) in map.iter().enumerate() {
        let mut e = [0u8; 24];
        e[0..8].copy_from_slice(&addr.to_le_bytes());
        e[8..16].copy_from_slice(&size.to_le_bytes());
        e[16..20].copy_from_slice(&ty.to_le_bytes());
        mem.write_slice(&e, GuestAddress(MEMMAP + i as u64 * 24))?;
    }
    let modules = match initrd {
        Some((addr, size)) => {
            let mut m = [0u8; 32];
            m[0..8].copy_from_slice(&addr.to_le_bytes());
            m[8..16].copy_from_slice(&size.to_le_bytes());
            mem.write_slice(&m, GuestAddress(MODLIST))?;
            1
        }
        None => 0,
    };
    let info = start_info(CMDLINE_START, rsdp, MEMMAP, map.len() as u32, modules, if modules > 0 { MODLIST } else { 0 });
    mem.write_slice(&info, GuestAddress(START_INFO))?;
    Ok(START_INFO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MachineConfig;

    #[test]
    fn start_info_points_at_a_map_of_guest_memory() {
        let mem = crate::vstate::memory::create(&MachineConfig { memory_mib: 32, ..Default::default() }).unwrap();
        let at = setup(&mem, Some((0x100_0000, 0x1000)), 0xe_0000).unwrap();
        let read = |addr: u64, n: usize| {
            let mut b = vec![0u8; n];
            mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        };
        let info = read(at, 56);
        let u32_at = |o: usize| u32::from_le_bytes(info[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(info[o..o + 8].try_into().unwrap());
        assert_eq!(u32_at(0), MAGIC);
        assert_eq!(u32_at(4), 1);
        assert_eq!(u64_at(24), CMDLINE_START);
        assert_eq!(u64_at(32), 0xe_0000);
        assert_eq!(u32_at(12), 1, "the initrd is module 0");
        let m = read(u64_at(16), 16);
        assert_eq!(u64::from_le_bytes(m[0..8].try_into().unwrap()), 0x100_0000);
        let n = u32_at(48) as usize;
        let map_at = u64_at(40);
        let entries: Vec<(u64, u64, u32)> = (0..n)
            .map(|i| {
                let e = read(map_at + 24 * i as u64, 24);
                (
                    u64::from_le_bytes(e[0..8].try_into().unwrap()),
                    u64::from_le_bytes(e[8..16].try_into().unwrap()),
                    u32::from_le_bytes(e[16..20].try_into().unwrap()),
                )
            })
            .collect();
        assert_eq!(entries, memory_map(&mem));
        let ram: u64 = entries.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (32 << 20) - (HIMEM_START - EBDA_START));
    }
}
