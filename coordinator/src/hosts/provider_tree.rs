//! From a host's inventory to its tree of placement resource providers.
//!
//! - The host is the root: `VCPU` (all logical CPUs, overcommitted 4:1 as Nova does by
//!   default), `MEMORY_MB` (memory not set aside as hugepages), `DISK_GB` (free space of
//!   the instance pool) and the CPU feature traits.
//! - Each NUMA node is a child `<host>_NUMA<n>` with trait `HW_NUMA_ROOT`: `PCPU` (its
//!   CPUs, for dedicated pinning) and one `CUSTOM_HUGEPAGES_<size>` class per page size.
//! - Each SR-IOV PF is a child `<host>_PF_<interface>`: `SRIOV_NET_VF` (the VFs that
//!   exist), traits `HW_NIC_SRIOV` and `CUSTOM_PHYSNET_<NAME>` when a physnet is mapped.
//!
//! Child uuids are derived from the host id and the child's role, so a re-report maps
//! to the same providers and keeps their allocations.

use std::collections::{BTreeMap, BTreeSet};

use model::inventory::HostInventory;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::placement::classes;
use crate::placement::db::{Inventory, ProviderSpec, ProviderTree};
use crate::placement::traits;

/// VCPU overcommit, Nova's `initial_cpu_allocation_ratio` default.
pub const VCPU_ALLOCATION_RATIO: f64 = 4.0;

/// The stable uuid of a host's child provider with the given role (`numa0`, `pf:eth0`).
pub fn child_uuid(host_id: &Uuid, role: &str) -> Uuid {
    let digest = Sha256::digest(format!("{host_id}/{role}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

fn add(inventories: &mut BTreeMap<String, Inventory>, class: &str, total: u64, ratio: f64) {
    if total > 0 {
        let mut inv = Inventory::new(total);
        inv.allocation_ratio = ratio;
        inventories.insert(class.to_string(), inv);
    }
}

/// Trait of the root provider of a disabled host (Nova's spelling).
pub const DISABLED_TRAIT: &str = "COMPUTE_STATUS_DISABLED";

/// Builds the provider tree of host `host_id` named `hostname` from its inventory;
/// a disabled host's root carries [`DISABLED_TRAIT`].
pub fn build(host_id: &Uuid, hostname: &str, inv: &HostInventory, enabled: bool) -> ProviderTree {
    let hugepage_mb: u64 = inv.hugepages.iter().map(|p| p.total * p.size_kb / 1024).sum();
    let mut root_inv = BTreeMap::new();
    add(&mut root_inv, "VCPU", inv.cpu_count() as u64, VCPU_ALLOCATION_RATIO);
    add(&mut root_inv, "MEMORY_MB", inv.memory_mb.saturating_sub(hugepage_mb), 1.0);
    add(&mut root_inv, "DISK_GB", inv.instance_pool.as_ref().map_or(0, |p| p.free_gb), 1.0);
    let mut root_traits: BTreeSet<String> = inv.cpu_traits.iter().filter(|t| traits::is_well_formed(t)).cloned().collect();
    if !enabled {
        root_traits.insert(DISABLED_TRAIT.to_string());
    }

    let mut children = Vec::new();
    for node in &inv.numa_nodes {
        let mut node_inv = BTreeMap::new();
        add(&mut node_inv, "PCPU", node.cpus.len() as u64, 1.0);
        for pool in &node.hugepages {
            add(&mut node_inv, &classes::hugepages_class(pool.size_kb), pool.total, 1.0);
        }
        children.push(ProviderSpec {
            uuid: child_uuid(host_id, &format!("numa{}", node.id)),
            name: format!("{hostname}_NUMA{}", node.id),
            inventories: node_inv,
            traits: BTreeSet::from([traits::NUMA_ROOT.to_string()]),
            children: vec![],
        });
    }
    for pf in &inv.sriov_pfs {
        let mut pf_inv = BTreeMap::new();
        add(&mut pf_inv, "SRIOV_NET_VF", u64::from(pf.num_vfs), 1.0);
        let mut pf_traits = BTreeSet::from(["HW_NIC_SRIOV".to_string()]);
        if let Some(physnet) = &pf.physnet {
            pf_traits.insert(traits::physnet_trait(physnet));
        }
        children.push(ProviderSpec {
            uuid: child_uuid(host_id, &format!("pf:{}", pf.interface)),
            name: format!("{hostname}_PF_{}", pf.interface),
            inventories: pf_inv,
            traits: pf_traits,
            children: vec![],
        });
    }
    ProviderTree {
        root: ProviderSpec { uuid: *host_id, name: hostname.to_string(), inventories: root_inv, traits: root_traits, children },
    }
}

#[cfg(test)]
mod tests {
    use model::inventory::{DiskPool, HugepagePool, NumaNode, SriovPf};

    use super::*;

    fn inventory() -> HostInventory {
        HostInventory {
            hostname: "edge-1".into(),
            numa_nodes: vec![
                NumaNode {
                    id: 0,
                    cpus: vec![0, 1, 2, 3],
                    memory_mb: 8192,
                    hugepages: vec![HugepagePool { size_kb: 2048, total: 512, free: 512 }],
                },
                NumaNode { id: 1, cpus: vec![4, 5, 6, 7], memory_mb: 8192, hugepages: vec![] },
            ],
            memory_mb: 16384,
            hugepages: vec![HugepagePool { size_kb: 2048, total: 512, free: 512 }],
            instance_pool: Some(DiskPool { path: "/var/lib/x".into(), total_gb: 100, free_gb: 80 }),
            cpu_traits: vec!["HW_CPU_X86_AVX2".into(), "HW_CPU_X86_SSE42".into()],
            cpu_model: None,
            host_ip: None,
            sriov_pfs: vec![SriovPf {
                interface: "ens1f0".into(),
                pci_address: "0000:03:00.0".into(),
                numa_node: Some(0),
                total_vfs: 8,
                num_vfs: 4,
                physnet: Some("phys-net1".into()),
                vfs: vec![],
            }],
        }
    }

    #[test]
    fn host_numa_nodes_and_pfs_become_providers() {
        let host = Uuid::new_v4();
        let tree = build(&host, "edge-1", &inventory(), true);
        let root = &tree.root;
        assert_eq!(root.uuid, host);
        assert_eq!(root.inventories["VCPU"].total, 8);
        assert_eq!(root.inventories["VCPU"].allocation_ratio, VCPU_ALLOCATION_RATIO);
        assert_eq!(root.inventories["MEMORY_MB"].total, 16384 - 1024);
        assert_eq!(root.inventories["DISK_GB"].total, 80);
        assert!(root.traits.contains("HW_CPU_X86_AVX2"));
        let names: Vec<_> = root.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["edge-1_NUMA0", "edge-1_NUMA1", "edge-1_PF_ens1f0"]);
        let numa0 = &root.children[0];
        assert_eq!(numa0.inventories["PCPU"].total, 4);
        assert_eq!(numa0.inventories["CUSTOM_HUGEPAGES_2M"].total, 512);
        assert!(numa0.traits.contains("HW_NUMA_ROOT"));
        assert!(!root.children[1].inventories.contains_key("CUSTOM_HUGEPAGES_2M"));
        let pf = &root.children[2];
        assert_eq!(pf.inventories["SRIOV_NET_VF"].total, 4);
        assert!(pf.traits.contains("CUSTOM_PHYSNET_PHYS_NET1"), "{:?}", pf.traits);
    }

    #[test]
    fn child_uuids_are_stable_per_host_and_role() {
        let host = Uuid::new_v4();
        assert_eq!(child_uuid(&host, "numa0"), child_uuid(&host, "numa0"));
        assert_ne!(child_uuid(&host, "numa0"), child_uuid(&host, "numa1"));
        assert_ne!(child_uuid(&host, "numa0"), child_uuid(&Uuid::new_v4(), "numa0"));
        let a = build(&host, "h", &inventory(), true);
        let b = build(&host, "h", &inventory(), true);
        assert_eq!(a, b);
        let disabled = build(&host, "h", &inventory(), false);
        assert!(disabled.root.traits.contains(DISABLED_TRAIT));
        assert!(!a.root.traits.contains(DISABLED_TRAIT));
    }
}
