//! Guest memory: anonymous, hugetlb or shared file-backed mappings, with a
//! dirty bitmap for writes the VMM itself makes.

use std::fs::OpenOptions;
use std::path::Path;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout;
use crate::config::{MachineConfig, MemoryBackend};

/// Guest memory as every part of the VMM sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of it.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap failed.
    #[error("Cannot map guest memory: {0}")]
    Mmap(#[from] vm_memory::mmap::MmapRegionError),
    /// The regions overlap or are out of order.
    #[error("Cannot assemble guest memory: {0}")]
    Collection(#[from] vm_memory::GuestRegionCollectionError),
    /// The backing file could not be opened or sized.
    #[error("Cannot prepare memory file {0}: {1}")]
    File(String, std::io::Error),
    /// mbind failed.
    #[error("Cannot bind guest memory to NUMA node {0}: {1}")]
    Mbind(u32, std::io::Error),
    /// A region would wrap the address space.
    #[error("Guest memory region does not fit the address space")]
    Overflow,
}

const MAP_HUGE_SHIFT: i32 = 26;

/// Creates guest memory of `cfg.memory_mib` with the configured backing.
pub fn create(cfg: &MachineConfig) -> Result<GuestMemoryMmap, MemoryError> {
    let size = cfg.memory_mib << 20;
    let ranges = layout::ram_ranges(size);
    let file = match (cfg.memory_backend, &cfg.memory_file) {
        (MemoryBackend::File, Some(path)) => Some(open_backing_file(path, size)?),
        (backend, _) if cfg.memory_shared => Some(memfd(backend, size)?),
        _ => None,
    };
    let shared = file.is_some();
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (start, len) in ranges {
        let len = len as usize;
        let (flags, huge) = match cfg.memory_backend {
            // A memfd carries the page size itself.
            b if shared => (libc::MAP_SHARED, matches!(b, MemoryBackend::Hugetlb2m | MemoryBackend::Hugetlb1g)),
            MemoryBackend::Anonymous => {
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, false)
            }
            MemoryBackend::Hugetlb2m => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | (21 << MAP_HUGE_SHIFT),
                true,
            ),
            MemoryBackend::Hugetlb1g => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | (30 << MAP_HUGE_SHIFT),
                true,
            ),
            MemoryBackend::File => (libc::MAP_SHARED, false),
        };
        let mut builder = MmapRegionBuilder::new_with_bitmap(
            len,
            <AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(len),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(huge);
        if let Some(f) = &file {
            let f = f.try_clone().map_err(|e| MemoryError::File("clone".into(), e))?;
            builder = builder.with_file_offset(FileOffset::new(f, file_offset));
            file_offset += len as u64;
        }
        let region = builder.build()?;
        if let Some(node) = cfg.numa_node {
            mbind(region.as_ptr(), len, node)?;
        }
        regions.push(GuestRegionMmap::new(region, GuestAddress(start)).ok_or(MemoryError::Overflow)?);
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

fn open_backing_file(path: &Path, size: u64) -> Result<std::fs::File, MemoryError> {
    let err = |e| MemoryError::File(path.display().to_string(), e);
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(err)?;
    f.set_len(size).map_err(err)?;
    Ok(f)
}

/// A memfd of `size` bytes, on hugepages for the hugetlb backends.
fn memfd(backend: MemoryBackend, size: u64) -> Result<std::fs::File, MemoryError> {
    use std::os::fd::FromRawFd;
    let flags = libc::MFD_CLOEXEC
        | match backend {
            MemoryBackend::Hugetlb2m => libc::MFD_HUGETLB | (21 << libc::MFD_HUGE_SHIFT),
            MemoryBackend::Hugetlb1g => libc::MFD_HUGETLB | (30 << libc::MFD_HUGE_SHIFT),
            _ => 0,
        };
    // SAFETY: the name is a NUL-terminated literal; the call creates a new fd.
    let fd = unsafe { libc::memfd_create(c"vmm-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::File("memfd".into(), std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and nothing else owns it.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(size).map_err(|e| MemoryError::File("memfd".into(), e))?;
    Ok(f)
}

fn mbind(addr: *mut u8, len: usize, node: u32) -> Result<(), MemoryError> {
    const MPOL_BIND: libc::c_long = 2;
    let mask: [u64; 16] = {
        let mut m = [0u64; 16];
        if node as usize >= 16 * 64 {
            return Err(MemoryError::Mbind(node, std::io::Error::from_raw_os_error(libc::EINVAL)));
        }
        m[node as usize / 64] = 1 << (node % 64);
        m
    };
    // SAFETY: mbind only changes the memory policy of the mapping we just
    // created (addr..addr+len); the node mask lives on our stack for the call.
    let r = unsafe {
        libc::syscall(libc::SYS_mbind, addr, len, MPOL_BIND, mask.as_ptr(), (16 * 64) as libc::c_ulong, 0)
    };
    if r != 0 {
        return Err(MemoryError::Mbind(node, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Total bytes of guest RAM.
pub fn total_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn anonymous_memory_reads_back() {
        let cfg = MachineConfig { memory_mib: 16, ..Default::default() };
        let mem = create(&cfg).unwrap();
        assert_eq!(total_size(&mem), 16 << 20);
        mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1234_5678);
    }

    #[test]
    fn shared_memory_comes_from_a_memfd() {
        let cfg = MachineConfig { memory_mib: 16, memory_shared: true, ..Default::default() };
        let mem = create(&cfg).unwrap();
        let r = mem.iter().next().unwrap();
        let f = r.file_offset().expect("a memfd backs the region");
        mem.write_slice(b"memfd", GuestAddress(0x3000)).unwrap();
        let mut buf = [0u8; 5];
        use std::os::unix::fs::FileExt;
        f.file().read_exact_at(&mut buf, 0x3000).unwrap();
        assert_eq!(&buf, b"memfd");
    }

    #[test]
    fn file_memory_is_shared_with_the_file() {
        let path = std::env::temp_dir().join(format!("vmm-memfile-{}", std::process::id()));
        let cfg = MachineConfig {
            memory_mib: 16,
            memory_backend: MemoryBackend::File,
            memory_file: Some(path.clone()),
            ..Default::default()
        };
        let mem = create(&cfg).unwrap();
        mem.write_slice(b"shared", GuestAddress(0x2000)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&bytes[0x2000..0x2006], b"shared");
    }
}
