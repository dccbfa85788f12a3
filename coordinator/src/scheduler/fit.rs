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

/// Whether `p` can give `amount` more of `class` on top of what `alloc` already takes from it.
pub fn has_room(p: &CachedProvider, alloc: &Allocations, class: &str, amount: u64) -> bool {
    let v = &p.value;
    let Some(inv) = v.inventories.get(class) else { return false };
    let already = alloc.get(&v.uuid).and_then(|a| a.get(class)).copied().unwrap_or(0);
    let total = already + amount;
    inv.check_amount(v.uuid, class, total).is_ok() && v.used(class) + total <= inv.capacity()
}

fn take(alloc: &mut Allocations, p: &Uuid, class: &str, amount: u64) {
    *alloc.entry(*p).or_default().entry(class.to_string()).or_default() += amount;
}

fn give_back(alloc: &mut Allocations, p: &Uuid, class: &str, amount: u64) {
    if let Some(a) = alloc.get_mut(p) {
        if let Some(n) = a.get_mut(class) {
            *n -= amount;
            if *n == 0 {
                a.remove(class);
            }
        }
        if a.is_empty() {
            alloc.remove(p);
        }
    }
}

/// The host NUMA providers of a tree.
pub fn numa_nodes(tree: &[CachedProvider]) -> Vec<&CachedProvider> {
    tree.iter().filter(|p| p.value.traits.contains(NUMA_ROOT)).collect()
}

/// Assigns guest NUMA nodes to distinct host NUMA providers; returns the choice per guest node.
pub fn fit_numa(tree: &[CachedProvider], req: &RequestSpec, alloc: &mut Allocations) -> Option<Vec<Uuid>> {
    if req.numa_nodes.is_empty() {
        return Some(Vec::new());
    }
    let nodes = numa_nodes(tree);
    let wants: Vec<BTreeMap<String, u64>> = req.numa_nodes.iter().map(|n| n.resources()).collect();
    let mut chosen = Vec::with_capacity(wants.len());
    let mut used = vec![false; nodes.len()];
    if assign(&nodes, &wants, 0, &mut used, &mut chosen, alloc) {
        Some(chosen)
    } else {
        None
    }
}

fn assign(
    nodes: &[&CachedProvider],
    wants: &[BTreeMap<String, u64>],
    i: usize,
    used: &mut Vec<bool>,
    chosen: &mut Vec<Uuid>,
    alloc: &mut Allocations,
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
            take(alloc, &u, c, *a);
        }
        used[n] = true;
        chosen.push(u);
        if assign(nodes, wants, i + 1, used, chosen, alloc) {
            return true;
        }
        chosen.pop();
        used[n] = false;
        for (c, a) in &wants[i] {
            give_back(alloc, &u, c, *a);
        }
    }
    false
}

/// Picks a PF provider per SR-IOV request; returns the choice per request.
pub fn fit_sriov(tree: &[CachedProvider], req: &RequestSpec, alloc: &mut Allocations) -> Option<Vec<Uuid>> {
    let mut out = Vec::with_capacity(req.sriov.len());
    for r in &req.sriov {
        let t = physnet_trait(&r.physnet);
        let pf = tree.iter().find(|p| p.value.traits.contains(&t) && has_room(p, alloc, "SRIOV_NET_VF", r.count))?;
        take(alloc, &pf.value.uuid, "SRIOV_NET_VF", r.count);
        out.push(pf.value.uuid);
    }
    Some(out)
}

/// Places the tree-wide resources, root first.
pub fn fit_resources(tree: &[CachedProvider], req: &RequestSpec, alloc: &mut Allocations) -> bool {
    for (class, amount) in &req.resources {
        let Some(p) = tree.iter().find(|p| has_room(p, alloc, class, *amount)) else { return false };
        take(alloc, &p.value.uuid, class, *amount);
    }
    true
}

/// Fits the whole request into the tree, or `None` if it does not fit.
pub fn fit(tree: &[CachedProvider], req: &RequestSpec) -> Option<Selection> {
    let mut alloc = Allocations::new();
    let numa_nodes = fit_numa(tree, req, &mut alloc)?;
    let sriov_pfs = fit_sriov(tree, req, &mut alloc)?;
    if !fit_resources(tree, req, &mut alloc) {
        return None;
    }
    if alloc.is_empty() {
        return None;
    }
    let root = &tree[0].value;
    Some(Selection { host: root.uuid, host_name: root.name.clone(), allocations: alloc, numa_nodes, sriov_pfs })
}
