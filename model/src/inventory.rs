//! A host inventory as the agent discovers it.
//!
//! The agent fills this from sysfs and procfs; the coordinator stores it and
//! turns it into a tree of placement resource providers (the host, its NUMA
//! nodes, its SR-IOV physical functions).

use serde::{Deserialize, Serialize};

/// Everything a host offers to the scheduler, as discovered on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInventory {
    /// The host's name (`uname -n`, or the configured override).
    pub hostname: String,
    /// NUMA nodes with their CPUs, memory and hugepages; one node on a non-NUMA host.
    pub numa_nodes: Vec<NumaNode>,
    /// Total memory of the host in MiB (`MemTotal` of /proc/meminfo).
    pub memory_mb: u64,
    /// Hugepages of the whole host, one entry per page size.
    #[serde(default)]
    pub hugepages: Vec<HugepagePool>,
    /// The file system that holds instance disks, if one was found.
    #[serde(default)]
    pub instance_pool: Option<DiskPool>,
    /// CPU feature traits in os-traits spelling, such as `HW_CPU_X86_AVX2`, sorted.
    #[serde(default)]
    pub cpu_traits: Vec<String>,
    /// CPU model name from /proc/cpuinfo, for display.
    #[serde(default)]
    pub cpu_model: Option<String>,
    /// SR-IOV capable network interfaces (physical functions), sorted by interface name.
    #[serde(default)]
    pub sriov_pfs: Vec<SriovPf>,
    /// The address the host reaches the coordinator from (its management IP).
    #[serde(default)]
    pub host_ip: Option<String>,
}

/// One NUMA node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaNode {
    /// Node number as the kernel numbers it (`nodeN`).
    pub id: u32,
    /// Logical CPU numbers on this node, sorted.
    pub cpus: Vec<u32>,
    /// Memory of this node in MiB.
    pub memory_mb: u64,
    /// Hugepages of this node, one entry per page size.
    #[serde(default)]
    pub hugepages: Vec<HugepagePool>,
}

/// Hugepages of one page size (on a node or on the whole host).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugepagePool {
    /// Page size in KiB (2048 for 2 MiB pages, 1048576 for 1 GiB pages).
    pub size_kb: u64,
    /// Pages reserved for hugetlb use (`nr_hugepages`).
    pub total: u64,
    /// Pages not in use (`free_hugepages`).
    pub free: u64,
}

/// The file system that holds instance disks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskPool {
    /// Directory of the pool.
    pub path: String,
    /// Size of the file system in GiB (rounded down).
    pub total_gb: u64,
    /// Space available to unprivileged writers in GiB (rounded down).
    pub free_gb: u64,
}

/// An SR-IOV physical function (a network interface that can spawn VFs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SriovPf {
    /// Kernel interface name, e.g. `enp3s0f0`.
    pub interface: String,
    /// PCI address of the PF, e.g. `0000:03:00.0`.
    pub pci_address: String,
    /// NUMA node the device is attached to, if the kernel knows it.
    #[serde(default)]
    pub numa_node: Option<u32>,
    /// Most VFs the device supports (`sriov_totalvfs`).
    pub total_vfs: u32,
    /// VFs currently created (`sriov_numvfs`).
    pub num_vfs: u32,
    /// Physical network this PF is cabled to, from the agent's configuration.
    #[serde(default)]
    pub physnet: Option<String>,
    /// The VFs that exist now.
    #[serde(default)]
    pub vfs: Vec<SriovVf>,
}

/// One SR-IOV virtual function.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SriovVf {
    /// VF index (the N of `virtfnN`).
    pub index: u32,
    /// PCI address of the VF.
    pub pci_address: String,
}

impl HostInventory {
    /// Number of logical CPUs over all NUMA nodes.
    pub fn cpu_count(&self) -> usize {
        self.numa_nodes.iter().map(|n| n.cpus.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json_and_tolerates_missing_optional_fields() {
        let inv = HostInventory {
            hostname: "edge-1".into(),
            numa_nodes: vec![NumaNode { id: 0, cpus: vec![0, 1], memory_mb: 1024, hugepages: vec![] }],
            memory_mb: 1024,
            ..Default::default()
        };
        let text = serde_json::to_string(&inv).unwrap();
        assert_eq!(serde_json::from_str::<HostInventory>(&text).unwrap(), inv);
        let minimal: HostInventory =
            serde_json::from_str(r#"{"hostname":"h","numa_nodes":[],"memory_mb":5}"#).unwrap();
        assert_eq!(minimal.memory_mb, 5);
        assert_eq!(inv.cpu_count(), 2);
    }
}
