//! Boots the test guest and checks what it printed and wrote.

mod common;

use common::*;

fn written_sector() -> Vec<u8> {
    let mut s: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    s[..29].copy_from_slice(b"written by the vmm test guest");
    s
}

#[test]
fn guest_boots_prints_and_powers_off() {
    if skip_reason().is_some() {
        return;
    }
    let dir = TempDir::new("boot");
    let cfg = guest_config(&dir, vmm::TEST_GUEST, "console=ttyS0 guest.beats=2 guest.hb=20000");
    let mut vm = TestVm::boot(&dir, &cfg);
    let st = vm.wait_exit(60);
    let out = vm.console_text();
    assert!(st.success(), "vmm exit {st}\n{out}\n{}", vm.stderr_text());
    assert!(out.starts_with("guest: hello\n"), "{out}");
    assert!(out.contains("guest: cmdline console=ttyS0 guest.beats=2"), "{out}");
    assert!(out.contains("heartbeat 2\nguest: power off\n"), "{out}");
    assert!(vm.stderr_text().contains("GuestReset"), "{}", vm.stderr_text());
}

#[test]
fn virtio_blk_reads_writes_flushes_and_discards() {
    if skip_reason().is_some() {
        return;
    }
    let dir = TempDir::new("blk");
    let disk = dir.path("disk.img");
    let data = make_disk(&disk, 64, 7);
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "guest.blkwrite guest.beats=1 guest.hb=1000");
    cfg["block"] = serde_json::json!([{ "id": "root", "path": disk }]);
    let mut vm = TestVm::boot(&dir, &cfg);
    let st = vm.wait_exit(60);
    let out = vm.console_text();
    assert!(st.success(), "{out}");
    assert!(out.contains("blk: capacity 64 sectors ro=0"), "{out}");
    let want = format!("blk: read sectors 0-7 status=0 fnv={:#x}", fnv1a(&data[..4096]));
    assert!(out.contains(&want), "missing {want:?} in\n{out}");
    let sector = written_sector();
    let fnv = fnv1a(&sector);
    assert!(out.contains(&format!("blk: write sector 63 status=0 fnv={fnv:#x}")), "{out}");
    assert!(out.contains("blk: flush status=0"), "{out}");
    assert!(out.contains(&format!("blk: readback status=0 fnv={fnv:#x}")), "{out}");
    assert!(out.contains("blk: discard sector 62 status=0"), "{out}");
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after.len(), data.len());
    assert_eq!(&after[63 * 512..], &sector[..], "the guest's write reached the file");
    assert!(after[62 * 512..63 * 512].iter().all(|b| *b == 0), "the discarded sector reads as zeros");
    assert_eq!(&after[..62 * 512], &data[..62 * 512], "nothing else changed");
}

#[test]
fn read_only_disk_refuses_writes() {
    if skip_reason().is_some() {
        return;
    }
    let dir = TempDir::new("ro");
    let disk = dir.path("disk.img");
    let data = make_disk(&disk, 16, 11);
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "guest.blkwrite guest.beats=1 guest.hb=1000");
    cfg["block"] = serde_json::json!([{ "id": "ro", "path": disk, "read_only": true }]);
    let mut vm = TestVm::boot(&dir, &cfg);
    assert!(vm.wait_exit(60).success());
    let out = vm.console_text();
    assert!(out.contains("blk: capacity 16 sectors ro=1"), "{out}");
    assert!(out.contains("blk: write sector 15 status=1"), "write must fail with VIRTIO_BLK_S_IOERR\n{out}");
    assert!(!out.contains("blk: discard"), "discard is not offered on a read-only disk\n{out}");
    assert_eq!(std::fs::read(&disk).unwrap(), data, "the file is untouched");
}

#[test]
fn virtio_rng_hands_out_bytes() {
    if skip_reason().is_some() {
        return;
    }
    let dir = TempDir::new("rng");
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "guest.rngbytes=16 guest.beats=1 guest.hb=1000");
    cfg["rng"] = serde_json::json!({});
    let mut vm = TestVm::boot(&dir, &cfg);
    assert!(vm.wait_exit(60).success());
    let out = vm.console_text();
    let line = out.lines().find(|l| l.starts_with("rng: got 16 bytes:")).unwrap_or_else(|| panic!("{out}"));
    let bytes: Vec<u32> = line.split(':').nth(2).unwrap().split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(bytes.len(), 16);
    assert!(bytes.iter().any(|b| *b != bytes[0]), "16 random bytes are not all equal: {line}");
}

#[test]
fn two_vcpus_boot_with_an_mp_table() {
    if skip_reason().is_some() {
        return;
    }
    let dir = TempDir::new("smp");
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST, "guest.beats=1 guest.hb=1000");
    cfg["machine"]["vcpus"] = 2.into();
    let mut vm = TestVm::boot(&dir, &cfg);
    assert!(vm.wait_exit(60).success(), "{}", vm.stderr_text());
    let out = vm.console_text();
    assert!(out.contains("heartbeat 1"));
    // The guest walked RSDP -> XSDT -> MADT/FADT -> DSDT in its memory.
    let acpi = out.lines().find(|l| l.starts_with("acpi: ")).unwrap_or_else(|| panic!("{out}"));
    assert!(acpi.starts_with("acpi: rsdp 0xe0000 dsdt "), "{acpi}");
    assert!(acpi.ends_with(" cpus 2 ioapic 0xfec00000"), "{acpi}");
}

#[test]
fn an_elf_with_a_pvh_note_boots_through_the_pvh_entry() {
    if skip_reason().is_some() {
        return;
    }
    let dir = TempDir::new("pvh");
    let disk = dir.path("disk.img");
    let data = make_disk(&disk, 16, 11);
    let mut cfg = guest_config(&dir, vmm::TEST_GUEST_PVH, "guest.beats=2 guest.hb=1000 pvh-cmdline-marker");
    cfg["machine"]["vcpus"] = 3.into();
    cfg["block"] = serde_json::json!([{ "id": "root", "path": disk }]);
    let mut vm = TestVm::boot(&dir, &cfg);
    assert!(vm.wait_exit(60).success(), "{}\n{}", vm.console_text(), vm.stderr_text());
    let out = vm.console_text();
    // Entered at the note's 32-bit entry with %ebx at hvm_start_info: the
    // magic, the memory map (low RAM, reserved BIOS area, RAM from 1 MiB)
    // and the command line came from there.
    assert!(out.contains("guest: pvh entry magic 0x336ec578 memmap 3 entries"), "{out}");
    assert!(out.contains("pvh-cmdline-marker"), "{out}");
    assert!(out.contains(" cpus 3 ioapic 0xfec00000"), "{out}");
    // Devices work as after the 64-bit entry.
    let want = format!("blk: read sectors 0-7 status=0 fnv={:#x}", fnv1a(&data[..4096]));
    assert!(out.contains(&want), "{out}");
    assert!(out.contains("heartbeat 2"), "{out}");
}

#[test]
fn bad_configs_fail_clearly() {
    let dir = TempDir::new("badcfg");
    let path = dir.path("vm.json");
    std::fs::write(&path, r#"{"machine": {"vcpus": 0}}"#).unwrap();
    let out = std::process::Command::new(VMM).args(["--config", path.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vcpus must be 1..=32"), "{out:?}");
    let out = std::process::Command::new(VMM).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = std::process::Command::new(VMM).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--config", "--restore", "--resume", "--api-socket", "--serial-log", "--paused", "--no-seccomp"] {
        assert!(help.contains(flag), "--help explains {flag}");
    }
}
