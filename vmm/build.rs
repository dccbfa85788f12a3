//! Builds the freestanding test guest (vmm/guest/guest.c) with gcc and tells
//! the crate where it is through `VMM_TEST_GUEST`, `VMM_TEST_GUEST_HOSTILE` and
//! `VMM_TEST_GUEST_PVH`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const FLAGS: &[&str] = &[
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-no-pie",
    "-fno-stack-protector",
    "-fno-builtin",
    "-fno-asynchronous-unwind-tables",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-nostdlib",
    "-static",
    "-Wall",
    "-Wl,--build-id=none",
    "-Wl,--no-warn-rwx-segments",
];

fn build(out: &std::path::Path, name: &str, defines: &[&str]) -> PathBuf {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("guest");
    let target = out.join(name);
    let status = Command::new(env::var("VMM_GUEST_CC").unwrap_or_else(|_| "gcc".into()))
        .args(FLAGS)
        .args(defines)
        .arg(format!("-Wl,-T,{}", dir.join("guest.ld").display()))
        .arg("-o")
        .arg(&target)
        .arg(dir.join("guest.c"))
        .status()
        .expect("Running gcc to build the test guest (install build-essential)");
    assert!(status.success(), "Building the test guest {name} failed");
    target
}

fn main() {
    println!("cargo:rerun-if-changed=guest/guest.c");
    println!("cargo:rerun-if-changed=guest/guest.ld");
    println!("cargo:rerun-if-env-changed=VMM_GUEST_CC");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let plain = build(&out, "guest.elf", &[]);
    let hostile = build(&out, "guest-hostile.elf", &["-DHOSTILE"]);
    let pvh = build(&out, "guest-pvh.elf", &["-DPVH"]);
    println!("cargo:rustc-env=VMM_TEST_GUEST={}", plain.display());
    println!("cargo:rustc-env=VMM_TEST_GUEST_HOSTILE={}", hostile.display());
    println!("cargo:rustc-env=VMM_TEST_GUEST_PVH={}", pvh.display());
}
