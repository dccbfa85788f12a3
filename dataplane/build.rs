//! Builds the DPDK C shim, only with the `dpdk` feature; otherwise nothing.

fn main() {
    #[cfg(feature = "dpdk")]
    dpdk_shim();
}

/// Compiles src/dpdk_shim.c with libdpdk's flags from pkg-config and links libdpdk.
#[cfg(feature = "dpdk")]
fn dpdk_shim() {
    println!("cargo:rerun-if-changed=src/dpdk_shim.c");
    let lib = pkg_config::Config::new().atleast_version("22.11").probe("libdpdk").expect("libdpdk (Debian package libdpdk-dev) via pkg-config");
    let cflags = std::process::Command::new("pkg-config").args(["--cflags", "libdpdk"]).output().expect("pkg-config");
    let mut b = cc::Build::new();
    b.file("src/dpdk_shim.c");
    for p in &lib.include_paths {
        b.include(p);
    }
    let flags = String::from_utf8_lossy(&cflags.stdout).into_owned();
    let mut it = flags.split_whitespace();
    while let Some(f) = it.next() {
        if f == "-include" {
            if let Some(h) = it.next() {
                b.flag("-include").flag(h);
            }
        } else if !f.starts_with("-I") {
            b.flag(f);
        }
    }
    b.warnings(false).compile("dpdk_shim");
    // rte_vdev_init lives in the vdev bus driver, which pkg-config does not list.
    println!("cargo:rustc-link-lib=rte_bus_vdev");
}
