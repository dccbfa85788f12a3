//! What a scheduling request asks for and what it gets.

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

/// Everything a new server needs from its host.
#[derive(Clone, Debug, Default)]
pub struct RequestSpec {
    /// The consumer (the server's uuid) the allocations are made for.
    pub consumer: Uuid,
    pub project_id: String,
    pub user_id: String,
    /// Resources that may come from any provider of the host's tree, one
    /// provider per class (e.g. `VCPU`, `MEMORY_MB`, `DISK_GB`).
    pub resources: BTreeMap<String, u64>,
    /// Traits the host's tree must have.
    pub required_traits: BTreeSet<String>,
    /// Traits no provider of the host's tree may have.
    pub forbidden_traits: BTreeSet<String>,
    /// Availability zone the host must be in.
    pub availability_zone: Option<String>,
    /// Per guest NUMA node: what one host NUMA node must provide.
    pub numa_nodes: Vec<NumaNodeRequest>,
    /// SR-IOV virtual functions per physical network.
    pub sriov: Vec<SriovRequest>,
    /// The server group this server joins, if any.
    pub server_group: Option<ServerGroup>,
}

/// What one guest NUMA node needs from one host NUMA node (a provider with
/// the `HW_NUMA_ROOT` trait): dedicated CPUs, shared CPUs, memory and hugepages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NumaNodeRequest {
    /// Dedicated (pinned) CPUs: class `PCPU`.
    pub pcpus: u64,
    /// Shared CPUs: class `VCPU`.
    pub vcpus: u64,
    /// Ordinary memory: class `MEMORY_MB`.
    pub memory_mb: u64,
    /// Hugepages: class (e.g. `CUSTOM_HUGEPAGES_2M`) -> number of pages.
    pub hugepages: BTreeMap<String, u64>,
}

impl NumaNodeRequest {
    /// The node's needs as (resource class, amount), without zeros.
    pub fn resources(&self) -> Vec<(&str, u64)> {
        let mut r = Vec::with_capacity(3 + self.hugepages.len());
        for (class, n) in [("PCPU", self.pcpus), ("VCPU", self.vcpus), ("MEMORY_MB", self.memory_mb)] {
            if n > 0 {
                r.push((class, n));
            }
        }
        for (class, n) in &self.hugepages {
            if *n > 0 {
                r.push((class.as_str(), *n));
            }
        }
        r
    }
}

/// Virtual functions wanted on one physical network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SriovRequest {
    /// Physical network name; the PF's provider carries `CUSTOM_PHYSNET_<NAME>`.
    pub physnet: String,
    /// Number of VFs.
    pub count: u64,
}

/// Placement policy of a server group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupPolicy {
    /// All members on one host.
    Affinity,
    /// No two members on one host.
    AntiAffinity,
}

/// A server group and where its existing members run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerGroup {
    /// The group's id: the scheduler records members placed through it under
    /// this id ([`super::groups`]) and serializes their claims on that record.
    pub id: Uuid,
    pub policy: GroupPolicy,
    /// Root provider uuids (hosts) of members the caller knows of, on top of
    /// those the scheduler recorded.
    pub member_hosts: BTreeSet<Uuid>,
}

/// Where a request landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The host's root provider.
    pub host: Uuid,
    pub host_name: String,
    /// Provider -> class -> amount, as written to Placement.
    pub allocations: BTreeMap<Uuid, BTreeMap<String, u64>>,
    /// For each requested NUMA node, the host NUMA provider chosen.
    pub numa_nodes: Vec<Uuid>,
    /// For each SR-IOV request, the PF provider chosen.
    pub sriov_pfs: Vec<Uuid>,
}
