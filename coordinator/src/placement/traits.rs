//! Trait names: the standard ones this service knows and the rules for custom ones.

use super::classes::is_upper_identifier;

/// The trait a provider carries when it stands for a NUMA node of its host.
pub const NUMA_ROOT: &str = "HW_NUMA_ROOT";
/// Prefix of the trait naming the physical network an SR-IOV PF is wired to.
pub const PHYSNET_PREFIX: &str = "CUSTOM_PHYSNET_";

/// Standard traits this service knows without being told (a subset of os-traits
/// covering CPU features, NUMA, NICs, storage and compute capabilities).
pub const STANDARD_TRAITS: &[&str] = &[
    "HW_CPU_X86_AVX",
    "HW_CPU_X86_AVX2",
    "HW_CPU_X86_AVX512F",
    "HW_CPU_X86_AVX512CD",
    "HW_CPU_X86_AVX512BW",
    "HW_CPU_X86_AVX512DQ",
    "HW_CPU_X86_AVX512VL",
    "HW_CPU_X86_AVX512VNNI",
    "HW_CPU_X86_AES",
    "HW_CPU_X86_ABM",
    "HW_CPU_X86_BMI",
    "HW_CPU_X86_BMI2",
    "HW_CPU_X86_CLMUL",
    "HW_CPU_X86_F16C",
    "HW_CPU_X86_FMA3",
    "HW_CPU_X86_FMA4",
    "HW_CPU_X86_MMX",
    "HW_CPU_X86_MPX",
    "HW_CPU_X86_PDPE1GB",
    "HW_CPU_X86_SHA",
    "HW_CPU_X86_SSE",
    "HW_CPU_X86_SSE2",
    "HW_CPU_X86_SSE3",
    "HW_CPU_X86_SSSE3",
    "HW_CPU_X86_SSE41",
    "HW_CPU_X86_SSE42",
    "HW_CPU_X86_SSE4A",
    "HW_CPU_X86_SVM",
    "HW_CPU_X86_VMX",
    "HW_CPU_X86_XOP",
    "HW_CPU_X86_AMD_SEV",
    "HW_CPU_X86_INTEL_VMX",
    "HW_CPU_HYPERTHREADING",
    "HW_NUMA_ROOT",
    "HW_NIC_SRIOV",
    "HW_NIC_SRIOV_MULTIQUEUE",
    "HW_NIC_SRIOV_TRUSTED",
    "HW_NIC_DCB_PFC",
    "HW_NIC_OFFLOAD_TSO",
    "HW_NIC_OFFLOAD_GRO",
    "HW_NIC_OFFLOAD_GSO",
    "HW_NIC_OFFLOAD_RX",
    "HW_NIC_OFFLOAD_TX",
    "HW_NIC_OFFLOAD_SG",
    "HW_NIC_OFFLOAD_VXLAN",
    "HW_NIC_ACCEL_SSL",
    "HW_NIC_VMDQ",
    "HW_GPU_API_VULKAN",
    "STORAGE_DISK_HDD",
    "STORAGE_DISK_SSD",
    "COMPUTE_DEVICE_TAGGING",
    "COMPUTE_NET_ATTACH_INTERFACE",
    "COMPUTE_NET_ATTACH_INTERFACE_WITH_TAG",
    "COMPUTE_VOLUME_ATTACH_WITH_TAG",
    "COMPUTE_VOLUME_EXTEND",
    "COMPUTE_VOLUME_MULTI_ATTACH",
    "COMPUTE_TRUSTED_CERTS",
    "COMPUTE_IMAGE_TYPE_RAW",
    "COMPUTE_IMAGE_TYPE_QCOW2",
    "COMPUTE_IMAGE_TYPE_ISO",
    "COMPUTE_NODE",
    "COMPUTE_STATUS_DISABLED",
    "COMPUTE_ACCELERATORS",
    "COMPUTE_SOCKET_PCI_NUMA_AFFINITY",
    "COMPUTE_RESCUE_BFV",
    "COMPUTE_NET_VIF_MODEL_VIRTIO",
    "COMPUTE_NET_VIF_MODEL_E1000",
    "COMPUTE_NET_VIRTIO_PACKED",
    "COMPUTE_VIOMMU_MODEL_AUTO",
    "COMPUTE_SECURITY_UEFI_SECURE_BOOT",
    "COMPUTE_GRAPHICS_MODEL_VIRTIO",
    "COMPUTE_STORAGE_BUS_VIRTIO",
    "COMPUTE_STORAGE_BUS_SCSI",
    "COMPUTE_MEM_BACKING_FILE",
    "MISC_SHARES_VIA_AGGREGATE",
];

/// Whether `name` is one of the standard traits.
pub fn is_standard(name: &str) -> bool {
    STANDARD_TRAITS.contains(&name)
}

/// Whether `name` is a well-formed custom trait: `CUSTOM_` then `A-Z`, `0-9`, `_`.
pub fn is_valid_custom(name: &str) -> bool {
    name.len() > "CUSTOM_".len() && name.starts_with("CUSTOM_") && is_upper_identifier(name)
}

/// Whether `name` is shaped like a trait (`A-Z`, `0-9`, `_`); hosts may report
/// standard-looking traits this build does not list, and those are accepted.
pub fn is_well_formed(name: &str) -> bool {
    is_upper_identifier(name)
}

/// The trait naming physical network `physnet` (upper-cased, other characters as `_`).
pub fn physnet_trait(physnet: &str) -> String {
    let mut t = String::from(PHYSNET_PREFIX);
    for c in physnet.chars() {
        if c.is_ascii_alphanumeric() {
            t.push(c.to_ascii_uppercase());
        } else {
            t.push('_');
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_physnet_traits() {
        assert_eq!(physnet_trait("physnet-1"), "CUSTOM_PHYSNET_PHYSNET_1");
        assert!(is_valid_custom(&physnet_trait("data")));
        assert!(is_standard("HW_CPU_X86_AVX2"));
        assert!(!is_well_formed("hw_cpu"));
    }
}
