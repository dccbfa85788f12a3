//! Minimal ACPI tables, so that a guest finds every vCPU, the IOAPIC and the
//! legacy devices without an MP table: RSDP -> XSDT -> FADT (hardware-reduced,
//! pointing at the DSDT) and MADT. The DSDT describes COM1 in AML; virtio-mmio
//! devices stay on the kernel command line, where the VMM already lists them.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, IOAPIC_START, SERIAL_IRQ, SERIAL_PORT};
use crate::vstate::memory::GuestMemoryMmap;

/// Where the RSDP goes: the start of the BIOS area Linux scans, reserved in
/// the e820 map; the other tables follow it.
pub const RSDP_START: u64 = 0xe_0000;
/// End of the area the tables may use.
pub const ACPI_END: u64 = 0xf_0000;

const OEM_ID: &[u8; 6] = b"EDGVMM";
const OEM_TABLE_ID: &[u8; 8] = b"EDGEVMM ";
const CREATOR_ID: &[u8; 4] = b"EVMM";

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// More vCPUs than the APIC ids the MADT can name here.
    #[error("Too many vCPUs for the MADT: {0}")]
    TooManyCpus(u8),
    /// The tables do not fit their area.
    #[error("ACPI tables of {0} bytes do not fit below {ACPI_END:#x}")]
    TooLarge(u64),
    /// Guest memory write failed.
    #[error("Cannot write ACPI tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Byte sum that makes a table's bytes add up to zero.
pub fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// A system description table: the 36-byte header, then `body`, checksummed.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = 36 + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// MADT: one enabled local APIC per vCPU (APIC id = vCPU index), the IOAPIC
/// with GSIs from 0, and LINT1 as NMI on every processor. PCAT_COMPAT says
/// the 8259 pair is there too.
pub fn madt(num_cpus: u8) -> Result<Vec<u8>, AcpiError> {
    if num_cpus == 0 || num_cpus >= 254 {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }
    let mut b = Vec::new();
    b.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT
    for cpu in 0..num_cpus {
        b.extend_from_slice(&[0, 8, cpu, cpu]); // processor local APIC: uid, APIC id
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    let ioapic_id = num_cpus;
    b.extend_from_slice(&[1, 12, ioapic_id, 0]);
    b.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]); // local APIC NMI: all processors, LINT1
    Ok(sdt(b"APIC", 5, &b))
}

const FADT_LEN: usize = 276;
/// FADT flags: hardware-reduced ACPI (no PM timer, no fixed-feature events).
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// IA-PC boot architecture flags: an 8042 is present, no VGA, no MSI, no CMOS RTC.
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const BOOT_ARCH_NO_MSI: u16 = 1 << 3;
const BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

/// FADT (ACPI 6.5 layout) pointing at the DSDT at `dsdt`.
pub fn fadt(dsdt: u64) -> Vec<u8> {
    let mut b = vec![0u8; FADT_LEN - 36];
    let at = |off: usize| off - 36;
    b[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    let arch = BOOT_ARCH_8042 | BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_MSI | BOOT_ARCH_NO_CMOS_RTC;
    b[at(109)..at(111)].copy_from_slice(&arch.to_le_bytes());
    b[at(112)..at(116)].copy_from_slice(&FADT_HW_REDUCED_ACPI.to_le_bytes());
    b[at(131)] = 5; // FADT minor version: 6.5
    b[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes()); // X_DSDT
    b[at(268)..at(276)].copy_from_slice(b"EDGEVMM\0"); // hypervisor vendor identity
    sdt(b"FACP", 6, &b)
}

/// An AML PkgLength for `len` bytes of contents (the encoding counts itself).
fn pkg_length(len: usize) -> Vec<u8> {
    for n in 1..=4usize {
        let total = len + n;
        let fits = match n {
            1 => total < 0x40,
            2 => total < 0x1000,
            3 => total < 0x10_0000,
            _ => total < 0x1000_0000,
        };
        if fits {
            if n == 1 {
                return vec![total as u8];
            }
            let mut v = vec![(((n - 1) as u8) << 6) | (total & 0xf) as u8];
            let mut rest = total >> 4;
            for _ in 1..n {
                v.push((rest & 0xff) as u8);
                rest >>= 8;
            }
            return v;
        }
    }
    unreachable!("AML packages here are far below 256 MiB")
}

/// `Name(NAME, value)` with an already encoded value.
fn aml_name(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(name);
    v.extend_from_slice(value);
    v
}

/// A DWordConst holding the compressed EISA id of e.g. "PNP0501".
fn aml_eisa_id(id: &str) -> Vec<u8> {
    let c = id.as_bytes();
    let l = |i: usize| u32::from(c[i] - 0x40) & 0x1f;
    let h = |i: usize| (c[i] as char).to_digit(16).unwrap_or(0);
    let v: u32 = (l(0) << 26) | (l(1) << 21) | (l(2) << 16) | (h(3) << 12) | (h(4) << 8) | (h(5) << 4) | h(6);
    let mut out = vec![0x0c];
    out.extend_from_slice(&v.swap_bytes().to_le_bytes());
    out
}

/// `Device(NAME) { ... }`.
fn aml_device(name: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut inner = name.to_vec();
    inner.extend_from_slice(body);
    let mut v = vec![0x5b, 0x82];
    v.extend(pkg_length(inner.len()));
    v.extend(inner);
    v
}

/// A `ResourceTemplate` buffer of I/O port range and IRQ descriptors.
fn aml_resources(port: u16, count: u8, irq: u32) -> Vec<u8> {
    let mut r = vec![0x47, 0x01]; // I/O port descriptor, 16-bit decode
    r.extend_from_slice(&port.to_le_bytes());
    r.extend_from_slice(&port.to_le_bytes());
    r.extend_from_slice(&[1, count]);
    r.push(0x22); // IRQ descriptor without flags
    r.extend_from_slice(&(1u16 << irq).to_le_bytes());
    r.extend_from_slice(&[0x79, 0]); // end tag
    let mut size = vec![0x0a, r.len() as u8]; // BytePrefix buffer size
    size.extend(r);
    let mut v = vec![0x11];
    v.extend(pkg_length(size.len()));
    v.extend(size);
    v
}

/// DSDT: `Scope(\_SB) { Device(COM1) { _HID PNP0501, _UID 0, _CRS } }`.
pub fn dsdt() -> Vec<u8> {
    let mut com1 = aml_name(b"_HID", &aml_eisa_id("PNP0501"));
    com1.extend(aml_name(b"_UID", &[0x00]));
    com1.extend(aml_name(b"_CRS", &aml_resources(SERIAL_PORT, 8, SERIAL_IRQ)));
    let dev = aml_device(b"COM1", &com1);
    let mut inner = b"\\_SB_".to_vec();
    inner.extend(dev);
    let mut scope = vec![0x10];
    scope.extend(pkg_length(inner.len()));
    scope.extend(inner);
    sdt(b"DSDT", 2, &scope)
}

/// XSDT listing `tables` by address.
pub fn xsdt(tables: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = tables.iter().flat_map(|a| a.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &body)
}

/// RSDP revision 2 pointing at the XSDT.
pub fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = vec![0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(OEM_ID);
    r[15] = 2;
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// All tables laid out from [`RSDP_START`]: (address, bytes) pairs.
pub fn build(num_cpus: u8) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let mut at = align(RSDP_START + 36);
    let mut out = Vec::new();
    let dsdt_addr = at;
    let d = dsdt();
    at = align(at + d.len() as u64);
    out.push((dsdt_addr, d));
    let fadt_addr = at;
    let f = fadt(dsdt_addr);
    at = align(at + f.len() as u64);
    out.push((fadt_addr, f));
    let madt_addr = at;
    let m = madt(num_cpus)?;
    at = align(at + m.len() as u64);
    out.push((madt_addr, m));
    let xsdt_addr = at;
    let x = xsdt(&[fadt_addr, madt_addr]);
    at += x.len() as u64;
    out.push((xsdt_addr, x));
    if at > ACPI_END {
        return Err(AcpiError::TooLarge(at - RSDP_START));
    }
    out.insert(0, (RSDP_START, rsdp(xsdt_addr)));
    Ok(out)
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<u64, AcpiError> {
    for (addr, bytes) in build(num_cpus)? {
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// Finds a table by address in the laid-out set and checks its header.
    fn table<'a>(all: &'a [(u64, Vec<u8>)], addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        let (_, t) = all.iter().find(|(a, _)| *a == addr).unwrap_or_else(|| panic!("no table at {addr:#x}"));
        assert_eq!(&t[0..4], sig);
        assert_eq!(u32_at(t, 4) as usize, t.len(), "{} length", String::from_utf8_lossy(sig));
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    /// Reads an AML PkgLength: (length, bytes it took).
    fn read_pkg_length(b: &[u8]) -> (usize, usize) {
        let n = (b[0] >> 6) as usize;
        if n == 0 {
            return ((b[0] & 0x3f) as usize, 1);
        }
        let mut len = (b[0] & 0xf) as usize;
        for i in 0..n {
            len |= (b[1 + i] as usize) << (4 + 8 * i);
        }
        (len, n + 1)
    }

    #[test]
    fn tables_chain_from_the_rsdp_and_add_up() {
        let all = build(4).unwrap();
        let (addr, r) = &all[0];
        assert_eq!(*addr, RSDP_START);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(r[..20].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0, "ACPI 1.0 checksum");
        assert_eq!(r.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0, "extended checksum");
        assert_eq!(r[15], 2);
        let x = table(&all, u64_at(r, 24), b"XSDT");
        let entries: Vec<u64> = (36..x.len()).step_by(8).map(|o| u64_at(x, o)).collect();
        assert_eq!(entries.len(), 2);
        let f = table(&all, entries[0], b"FACP");
        assert_eq!(f.len(), FADT_LEN);
        assert_ne!(u32_at(f, 112) & FADT_HW_REDUCED_ACPI, 0);
        assert_eq!(u64_at(f, 140), u64::from(u32_at(f, 40)), "X_DSDT and DSDT agree");
        table(&all, u64_at(f, 140), b"DSDT");
        table(&all, entries[1], b"APIC");
        for (a, t) in &all {
            assert!(*a >= RSDP_START && a + t.len() as u64 <= ACPI_END);
        }
    }

    #[test]
    fn madt_names_every_vcpu_and_the_ioapic() {
        let m = madt(3).unwrap();
        assert_eq!(u32_at(&m, 36), APIC_START as u32);
        let (mut cpus, mut ioapics, mut nmis) = (Vec::new(), Vec::new(), 0);
        let mut o = 44;
        while o < m.len() {
            let (ty, len) = (m[o], m[o + 1] as usize);
            assert!(len >= 2 && o + len <= m.len(), "entry at {o} overruns");
            match ty {
                0 => {
                    assert_eq!(u32_at(&m, o + 4) & 1, 1, "enabled");
                    cpus.push(m[o + 3]);
                }
                1 => ioapics.push((m[o + 2], u32_at(&m, o + 4), u32_at(&m, o + 8))),
                4 => nmis += 1,
                _ => panic!("unexpected MADT entry {ty}"),
            }
            o += len;
        }
        assert_eq!(cpus, vec![0, 1, 2]);
        assert_eq!(ioapics, vec![(3, IOAPIC_START as u32, 0)]);
        assert_eq!(nmis, 1);
        assert!(madt(0).is_err() && madt(254).is_err());
    }

    #[test]
    fn dsdt_aml_describes_com1() {
        let d = dsdt();
        let aml = &d[36..];
        assert_eq!(aml[0], 0x10, "Scope");
        let (len, n) = read_pkg_length(&aml[1..]);
        assert_eq!(1 + len, aml.len(), "the scope spans the whole body");
        let body = &aml[1 + n..];
        assert_eq!(&body[..5], b"\\_SB_");
        let dev = &body[5..];
        assert_eq!(&dev[..2], &[0x5b, 0x82], "Device");
        let (dlen, dn) = read_pkg_length(&dev[2..]);
        assert_eq!(2 + dlen, dev.len());
        let inner = &dev[2 + dn..];
        assert_eq!(&inner[..4], b"COM1");
        // Name(_HID, EisaId("PNP0501")) is 0x41d00501 byte-swapped.
        assert_eq!(&inner[4..10], &[0x08, b'_', b'H', b'I', b'D', 0x0c]);
        assert_eq!(u32::from_le_bytes(inner[10..14].try_into().unwrap()), 0x0105_d041);
        let crs = inner.windows(4).position(|w| w == b"_CRS").expect("_CRS");
        let io = inner[crs..].windows(2).position(|w| w == [0x47, 0x01]).expect("I/O descriptor") + crs;
        assert_eq!(u16::from_le_bytes([inner[io + 2], inner[io + 3]]), SERIAL_PORT);
        let irq = inner[io..].iter().position(|b| *b == 0x22).unwrap() + io;
        assert_eq!(u16::from_le_bytes([inner[irq + 1], inner[irq + 2]]), 1 << SERIAL_IRQ);
    }

    #[test]
    fn pkg_lengths_encode_as_the_spec_says() {
        assert_eq!(pkg_length(10), vec![11]);
        assert_eq!(read_pkg_length(&pkg_length(10)), (11, 1));
        let two = pkg_length(100);
        assert_eq!(two.len(), 2);
        assert_eq!(read_pkg_length(&two), (102, 2));
        let three = pkg_length(5000);
        assert_eq!(read_pkg_length(&three), (5003, 3));
    }
}
