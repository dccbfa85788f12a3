//! The Intel MultiProcessor table, so that a guest finds every vCPU, the
//! IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX};
use crate::vstate::memory::GuestMemoryMmap;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table can name.
    #[error("Too many vCPUs for the MP table: {0}")]
    TooManyCpus(u8),
    /// Guest memory write failed.
    #[error("Cannot write the MP table: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// Builds the MP floating pointer and configuration table bytes placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus >= 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = cpu;
        e[2] = 0x14;
        e[3] = 1 | if cpu == 0 { 2 } else { 0 };
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    let mut io = [2u8, ioapic_id, 0x11, 1, 0, 0, 0, 0];
    io[4..8].copy_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&io);
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        let kind = if irq == 0 { 3 } else { 0 }; // ExtINT for the timer's PIC path, else INT
        entries.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]); // ExtINT -> LINT0
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]); // NMI -> LINT1
    count += 2;

    let table_addr = base + 16;
    let mut hdr = [0u8; 44];
    hdr[0..4].copy_from_slice(b"PCMP");
    let len = (44 + entries.len()) as u16;
    hdr[4..6].copy_from_slice(&len.to_le_bytes());
    hdr[6] = 4;
    hdr[8..16].copy_from_slice(b"EDGEVMM ");
    hdr[16..28].copy_from_slice(b"000000000000");
    hdr[34..36].copy_from_slice(&count.to_le_bytes());
    hdr[36..40].copy_from_slice(&(APIC_START as u32).to_le_bytes());
    let mut table = hdr.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    fp[8] = 1;
    fp[9] = 4;
    fp[10] = checksum(&fp);
    let mut out = fp.to_vec();
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table into the EBDA.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts_are_right() {
        let b = build(4, EBDA_START).unwrap();
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(b[0..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let t = &b[16..];
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        // 4 CPUs + bus + IOAPIC + 24 IRQs + 2 local.
        assert_eq!(u16::from_le_bytes([t[34], t[35]]), 4 + 1 + 1 + 24 + 2);
        assert_eq!(t[44 + 3], 3, "vCPU 0 is the enabled BSP");
        assert!(build(254, EBDA_START).is_err());
    }
}
