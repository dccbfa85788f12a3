//! Loading a kernel (ELF or bzImage), its command line and initrd, and
//! writing the Linux boot parameters with the e820 memory map.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::*;
use crate::vstate::memory::GuestMemoryMmap;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("Cannot open kernel {0}: {1}")]
    Kernel(String, std::io::Error),
    /// Neither an ELF nor a bzImage.
    #[error("Cannot load kernel {0}: not a loadable ELF ({1}) nor bzImage ({2})")]
    Load(String, loader::Error, loader::Error),
    /// The command line is too long or has bad characters.
    #[error("Invalid kernel command line: {0}")]
    Cmdline(String),
    /// The initrd could not be read or does not fit.
    #[error("Cannot load initrd {0}: {1}")]
    Initrd(String, String),
    /// Writing boot structures into guest memory failed.
    #[error("Cannot write boot parameters: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What loading produced.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// The bzImage setup header, when the kernel was one.
    pub setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    /// First byte past the kernel.
    pub end: u64,
    /// The 32-bit PVH entry point, when the ELF has a PVH note.
    pub pvh_entry: Option<u64>,
}

/// Loads an ELF or, failing that, a bzImage at 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(|e| BootError::Kernel(name.clone(), e))?;
    let elf_err = match Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            let pvh_entry = match r.pvh_boot_cap {
                linux_loader::loader::elf::PvhBootCapability::PvhEntryPresent(a) => Some(a.raw_value()),
                _ => None,
            };
            return Ok(LoadedKernel { entry: r.kernel_load.raw_value(), setup_header: None, end: r.kernel_end, pvh_entry });
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load.raw_value() + 0x200,
            setup_header: r.setup_header,
            end: r.kernel_end,
            pvh_entry: None,
        }),
        Err(bz) => Err(BootError::Load(name, elf_err, bz)),
    }
}

/// Loads the initrd page-aligned at the top of low memory; returns (address, size).
pub fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let err = |m: String| BootError::Initrd(name.clone(), m);
    let mut f = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let low_end = mem.iter().next().map(|r| r.last_addr().0 + 1).unwrap_or(0);
    let top = low_end.min(MMIO_GAP_START);
    let addr = top.checked_sub(size).ok_or_else(|| err("it does not fit in guest memory".into()))? & !0xfff;
    if addr < kernel_end {
        return Err(err("it does not fit between the kernel and the end of low memory".into()));
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| err(e.to_string()))?;
    Ok((addr, size))
}

/// Builds the command line from the user's part plus the virtio-mmio devices.
pub fn build_cmdline(user: &str, virtio: &[(u64, u32)]) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !user.is_empty() {
        c.insert_str(user).map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    for (addr, irq) in virtio {
        c.insert_str(format!("virtio_mmio.device=4K@{addr:#x}:{irq}"))
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    Ok(c)
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// How vCPU 0 enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, %rsi = zero page.
    Linux64(u64),
    /// PVH: 32-bit protected mode, paging off, %ebx = start info.
    Pvh {
        /// Entry point from the PVH note.
        entry: u64,
        /// Address of `hvm_start_info`.
        start_info: u64,
    },
}

/// Writes the command line and the zero page (boot_params with the e820 map).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline.as_cstring().map_err(|e| BootError::Cmdline(e.to_string()))?.as_bytes().len();
    let mut params = boot_params::default();
    if let Some(h) = kernel.setup_header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(a) = rsdp {
        params.acpi_rsdp_addr = a;
    }
    let mut e820 = vec![(0u64, EBDA_START, E820_RAM), (EBDA_START, 0x10_0000 - EBDA_START, E820_RESERVED)];
    for r in mem.iter() {
        let start = r.start_addr().0.max(HIMEM_START);
        let end = r.last_addr().0 + 1;
        if end > start {
            e820.push((start, end - start, E820_RAM));
        }
    }
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr: *addr, size: *size, r#type: *ty };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_lists_virtio_devices_as_linux_reads_them() {
        let c = build_cmdline("console=ttyS0", &[(0xd000_0000, 5)]).unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(s, "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5");
    }
}
