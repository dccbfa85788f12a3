//! Fitting a request into one host's provider tree: which provider gives what.
//!
//! Rules, in order:
//! 1. each requested guest NUMA node gets its own host NUMA provider (trait
//!    `HW_NUMA_ROOT`) that has room for all of that node's needs; every
//!    assignment of guest nodes to host nodes is tried;
//! 2. each SR-IOV request takes its VFs from one provider carrying
//!    `SRIOV_NET_VF` inventory and the physnet's trait;
//! 3. every other requested class comes from one provider of the tree, the
//!    root if it can, else the first provider with room.
//!
//! Room means the consumer's total amount of the class on that provider
//! obeys min_unit, max_unit and step_size, and usage plus that amount stays
//! within `(total - reserved) * allocation_ratio`.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::cache::CachedProvider;
use super::request::{RequestSpec, Selection};
use crate::placement::traits::{physnet_trait, NUMA_ROOT};

/// Provider -> class -> amount.
pub type Allocations = BTreeMap<Uuid, BTreeMap<String, u64>>;

/// What a fit takes so far: (provider, class, amount) entries. A request
/// takes a handful, so a short vector beats nested maps: fitting a host costs
/// one small allocation, not a map node and a class name copy per class, and
/// the scheduler fits dozens of hosts per request.
#[derive(Clone, Debug, Default)]
pub struct Taken<'r> {
    entries: Vec<(Uuid, &'r str, u64)>,
}

impl<'r> Taken<'r> {
    /// How much of `class` this fit takes from `p` so far.
    pub fn get(&self, p: &Uuid, class: &str) -> u64 {
        self.entries.iter().find(|(u, c, _)| u == p && *c == class).map_or(0, |e| e.2)
    }

    fn take(&mut self, p: &Uuid, class: &'r str, amount: u64) {
        match self.entries.iter_mut().find(|(u, c, _)| u == p && *c == class) {
            Some(e) => e.2 += amount,
            None => self.entries.push((*p, class, amount)),
        }
    }

    fn give_back(&mut self, p: &Uuid, class: &str, amount: u64) {
        if let Some(i) = self.entries.iter().position(|(u, c, _)| u == p && *c == class) {
            self.entries[i].2 -= amount;
            if self.entries[i].2 == 0 {
                self.entries.swap_remove(i);
            }
        }
    }

    /// Whether nothing is taken.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every (provider, class, amount) taken.
    pub fn iter(&self) -> impl Iterator<Item = &(Uuid, &'r str, u64)> {
        self.entries.iter()
    }

    /// The same as provider -> class -> amount, as written to Placement.
    pub fn to_allocations(&self) -> Allocations {
        let mut out = Allocations::new();
        for (p, c, n) in &self.entries {
            *out.entry(*p).or_default().entry(c.to_string()).or_default() += n;
        }
        out
    }
}

/// Whether `p` can give `amount` more of `class` on top of what `taken` already takes from it.
pub fn has_room(p: &CachedProvider, taken: &Taken<'_>, class: &str, amount: u64) -> bool {
    let v = &p.value;
    let Some(inv) = v.inventories.get(class) else { return false };
    let total = taken.get(&v.uuid, class) + amount;
    inv.check_amount(v.uuid, class, total).is_ok() && v.used(class) + total <= inv.capacity()
}

/// The host NUMA providers of a tree.
pub fn numa_nodes(tree: &[CachedProvider]) -> Vec<&CachedProvider> {
    tree.iter().filter(|p| p.value.traits.contains(NUMA_ROOT)).collect()
}

/// Assigns guest NUMA nodes to distinct host NUMA providers; returns the choice per guest node.
pub fn fit_numa<'r>(tree: &[CachedProvider], req: &'r RequestSpec, alloc: &mut Taken<'r>) -> Option<Vec<Uuid>> {
    if req.numa_nodes.is_empty() {
        return Some(Vec::new());
    }
    let nodes = numa_nodes(tree);
    let wants: Vec<Vec<(&'r str, u64)>> = req.numa_nodes.iter().map(|n| n.resources()).collect();
    let mut chosen = Vec::with_capacity(wants.len());
    let mut used = vec![false; nodes.len()];
    if assign(&nodes, &wants, 0, &mut used, &mut chosen, alloc) {
        Some(chosen)
    } else {
        None
    }
}

fn assign<'r>(
    nodes: &[&CachedProvider],
    wants: &[Vec<(&'r str, u64)>],
    i: usize,
    used: &mut Vec<bool>,
    chosen: &mut Vec<Uuid>,
    alloc: &mut Taken<'r>,
) -> bool {
    if i == wants.len() {
        return true;
    }
    for (n, node) in nodes.iter().enumerate() {
        if used[n] || !wants[i].iter().all(|(c, a)| has_room(node, alloc, c, *a)) {
            continue;
        }
        let u = node.value.uuid;
        for (c, a) in &wants[i] {
            alloc.take(&u, c, *a);
        }
        used[n] = true;
        chosen.push(u);
        if assign(nodes, wants, i + 1, used, chosen, alloc) {
            return true;
        }
        chosen.pop();
        used[n] = false;
        for (c, a) in &wants[i] {
            alloc.give_back(&u, c, *a);
        }
    }
    false
}

/// Picks a PF provider per SR-IOV request; returns the choice per request.
pub fn fit_sriov<'r>(tree: &[CachedProvider], req: &'r RequestSpec, alloc: &mut Taken<'r>) -> Option<Vec<Uuid>> {
    let mut out = Vec::with_capacity(req.sriov.len());
    for r in &req.sriov {
        let t = physnet_trait(&r.physnet);
        let pf = tree.iter().find(|p| p.value.traits.contains(&t) && has_room(p, alloc, "SRIOV_NET_VF", r.count))?;
        alloc.take(&pf.value.uuid, "SRIOV_NET_VF", r.count);
        out.push(pf.value.uuid);
    }
    Some(out)
}

/// Places the tree-wide resources, root first.
pub fn fit_resources<'r>(tree: &[CachedProvider], req: &'r RequestSpec, alloc: &mut Taken<'r>) -> bool {
    for (class, amount) in &req.resources {
        let Some(p) = tree.iter().find(|p| has_room(p, alloc, class, *amount)) else { return false };
        alloc.take(&p.value.uuid, class, *amount);
    }
    true
}

/// A whole request fitted into one tree, before it becomes a [`Selection`].
#[derive(Debug)]
pub struct Fit<'r> {
    pub taken: Taken<'r>,
    /// For each requested NUMA node, the host NUMA provider chosen.
    pub numa_nodes: Vec<Uuid>,
    /// For each SR-IOV request, the PF provider chosen.
    pub sriov_pfs: Vec<Uuid>,
}

/// Fits the whole request into the tree (allocating nothing a failed fit
/// would throw away), or `None` if it does not fit.
pub fn fit_taken<'r>(tree: &[CachedProvider], req: &'r RequestSpec) -> Option<Fit<'r>> {
    let mut taken = Taken::default();
    let numa_nodes = fit_numa(tree, req, &mut taken)?;
    let sriov_pfs = fit_sriov(tree, req, &mut taken)?;
    if !fit_resources(tree, req, &mut taken) || taken.is_empty() {
        return None;
    }
    Some(Fit { taken, numa_nodes, sriov_pfs })
}

/// Fits the whole request into the tree, or `None` if it does not fit.
pub fn fit(tree: &[CachedProvider], req: &RequestSpec) -> Option<Selection> {
    let f = fit_taken(tree, req)?;
    let root = &tree[0].value;
    Some(Selection {
        host: root.uuid,
        host_name: root.name.clone(),
        allocations: f.taken.to_allocations(),
        numa_nodes: f.numa_nodes,
        sriov_pfs: f.sriov_pfs,
    })
}
