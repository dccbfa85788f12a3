//! Resource class names: the standard ones and the rules for custom ones.

/// Resource classes every Placement service knows without being told.
pub const STANDARD_CLASSES: &[&str] = &[
    "VCPU",
    "MEMORY_MB",
    "DISK_GB",
    "PCI_DEVICE",
    "SRIOV_NET_VF",
    "NUMA_SOCKET",
    "NUMA_CORE",
    "NUMA_THREAD",
    "NUMA_MEMORY_MB",
    "IPV4_ADDRESS",
    "VGPU",
    "VGPU_DISPLAY_HEAD",
    "NET_BW_EGR_KILOBIT_PER_SEC",
    "NET_BW_IGR_KILOBIT_PER_SEC",
    "PCPU",
    "MEM_ENCRYPTION_CONTEXT",
    "FPGA",
    "PGPU",
    "NET_PACKET_RATE_KILOPACKET_PER_SEC",
    "NET_PACKET_RATE_EGR_KILOPACKET_PER_SEC",
    "NET_PACKET_RATE_IGR_KILOPACKET_PER_SEC",
];

/// The custom class for hugepages of 2 MiB, counted in pages.
pub const HUGEPAGES_2M: &str = "CUSTOM_HUGEPAGES_2M";
/// The custom class for hugepages of 1 GiB, counted in pages.
pub const HUGEPAGES_1G: &str = "CUSTOM_HUGEPAGES_1G";

/// Longest name Placement accepts for a class or trait.
pub const MAX_NAME_LEN: usize = 255;

/// Whether `name` is one of the standard classes.
pub fn is_standard(name: &str) -> bool {
    STANDARD_CLASSES.contains(&name)
}

/// Whether `name` is a well-formed custom class name: `CUSTOM_` then `A-Z`, `0-9`, `_`.
pub fn is_valid_custom(name: &str) -> bool {
    name.len() > "CUSTOM_".len() && name.starts_with("CUSTOM_") && is_upper_identifier(name)
}

/// Whether `name` may name a resource class at all (standard, or custom and well-formed).
pub fn is_valid(name: &str) -> bool {
    is_standard(name) || is_valid_custom(name)
}

/// The custom class that counts hugepages of `size_kib` KiB (e.g. 2048 -> `CUSTOM_HUGEPAGES_2M`).
pub fn hugepages_class(size_kib: u64) -> String {
    if size_kib % (1024 * 1024) == 0 {
        format!("CUSTOM_HUGEPAGES_{}G", size_kib / (1024 * 1024))
    } else if size_kib % 1024 == 0 {
        format!("CUSTOM_HUGEPAGES_{}M", size_kib / 1024)
    } else {
        format!("CUSTOM_HUGEPAGES_{}K", size_kib)
    }
}

/// `A-Z`, `0-9` and `_` only, at most [`MAX_NAME_LEN`] long, not empty.
pub fn is_upper_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_names() {
        assert!(is_valid("VCPU"));
        assert!(is_valid("CUSTOM_HUGEPAGES_2M"));
        assert!(!is_valid("CUSTOM_"));
        assert!(!is_valid("custom_foo"));
        assert!(!is_valid("FOO"));
        assert!(!is_valid("CUSTOM_FOO-BAR"));
        assert!(!is_valid(&format!("CUSTOM_{}", "A".repeat(300))));
    }

    #[test]
    fn names_hugepage_classes() {
        assert_eq!(hugepages_class(2048), HUGEPAGES_2M);
        assert_eq!(hugepages_class(1024 * 1024), HUGEPAGES_1G);
    }
}
