//! Boots a real Linux kernel (ELF vmlinux or bzImage) with an initrd, taken
//! from the environment:
//!   VMM_LINUX_KERNEL   kernel image, e.g. /boot/vmlinuz-6.1.0-...-cloud-amd64
//!   VMM_LINUX_INITRD   initramfs (optional)
//!   VMM_LINUX_EXPECT   console text that proves the boot (default "Run /init as init process")
//! It runs only where the CPU offers hardware virtualization: on a nested
//! KVM that emulates guest code, stock kernels stop early (cmpxchg16b,
//! xrstor, int3 are not emulated), so the test says why it skipped.

mod common;

use common::*;

fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm"))))
        .unwrap_or(false)
}

#[test]
fn boots_a_linux_kernel_from_the_environment() {
    let Some(kernel) = std::env::var_os("VMM_LINUX_KERNEL") else {
        eprintln!("SKIPPED: set VMM_LINUX_KERNEL (and VMM_LINUX_INITRD) to boot a real Linux guest");
        return;
    };
    if skip_reason().is_some() {
        return;
    }
    if !hardware_virtualization() {
        eprintln!(
            "SKIPPED: this CPU shows no vmx/svm flag, so KVM here emulates guest code and stock \
             Linux kernels do not boot on it (they stop at cmpxchg16b / xrstor / int3)"
        );
        return;
    }
    let expect = std::env::var("VMM_LINUX_EXPECT").unwrap_or_else(|_| "Run /init as init process".into());
    let dir = TempDir::new("linux");
    let mut cfg = guest_config(
        &dir,
        kernel.to_str().unwrap(),
        "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd",
    );
    cfg["machine"]["memory_mib"] = 512.into();
    cfg["machine"]["vcpus"] = 2.into();
    if let Some(initrd) = std::env::var_os("VMM_LINUX_INITRD") {
        cfg["boot"]["initrd"] = initrd.to_str().unwrap().into();
    }
    let mut vm = TestVm::boot(&dir, &cfg);
    let out = vm.wait_for(&expect, 300);
    assert!(out.contains("Linux version"), "{out}");
}
