//! `GET /allocation_candidates` (1.10): which providers could satisfy a request.
//!
//! A request is an unnumbered group (`resources`, `required`, `member_of`,
//! `in_tree`) plus suffixed groups (`resources1`, `required_FOO`, ...; 1.25,
//! any suffix from 1.33), `group_policy`, `root_required` (1.35),
//! `same_subtree` (1.36) and `limit` (1.16). Candidates come from one
//! provider tree each:
//! - each class of the unnumbered group comes from one provider of the tree;
//!   its traits and aggregates may be met by any provider of the tree, and
//!   none of the providers it uses may carry a forbidden trait or aggregate;
//! - a suffixed group comes whole from one provider carrying its traits and
//!   aggregates (a group without resources just names such a provider);
//! - `group_policy=isolate` gives every suffixed group a different provider;
//! - `root_required` looks at the root's traits only;
//! - each `same_subtree` list of suffixes must be met by providers that all
//!   sit at or below one of them.
//! Before 1.29 only the root provider of each tree is considered.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::query::{self, AggregateRule, TraitRule};
use super::{bad_request, error, parse_uuid, Admin, QueryPairs};
use crate::error::ApiError;
use crate::placement::db::{self, Provider};
use crate::placement::microversion::Version;
use crate::state::AppState;

/// Most candidates returned per tree, to bound the combinations of big trees.
const MAX_PER_TREE: usize = 64;

#[derive(Clone, Debug, Default)]
struct Group {
    suffix: String,
    resources: BTreeMap<String, u64>,
    traits: TraitRule,
    aggregates: AggregateRule,
    in_tree: Option<Uuid>,
}

struct Request {
    groups: Vec<Group>,
    isolate: bool,
    root_required: TraitRule,
    same_subtree: Vec<Vec<String>>,
    limit: Option<usize>,
}

fn valid_suffix(s: &str, v: Version) -> bool {
    if v.at_least(33) {
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    } else {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
    }
}

fn parse(q: &QueryPairs, v: Version) -> Result<Request, ApiError> {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut policy = None;
    let mut root_required = TraitRule::default();
    let mut same_subtree = Vec::new();
    let mut limit = None;
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for (k, val) in q {
        let repeatable = k.starts_with("member_of") || k == "same_subtree" || (k.starts_with("required") && v.at_least(39));
        if !repeatable && !seen.insert(k) {
            return Err(error(StatusCode::BAD_REQUEST, format!("Query parameter {k:?} may be given only once"), "placement.query.duplicate_key"));
        }
        let (base, suffix) = ["resources", "required", "member_of", "in_tree"]
            .iter()
            .find_map(|b| k.strip_prefix(b).map(|s| (*b, s)))
            .unwrap_or((k.as_str(), ""));
        match base {
            "resources" | "required" | "member_of" | "in_tree" => {
                if !suffix.is_empty() && (!v.at_least(25) || !valid_suffix(suffix, v)) {
                    return Err(bad_request(format!("Invalid query string parameters: '{k}' is not a known parameter")));
                }
                let allowed = match base {
                    "required" => v.at_least(17),
                    "member_of" => v.at_least(21),
                    "in_tree" => v.at_least(31),
                    _ => true,
                };
                if !allowed {
                    return Err(bad_request(format!("Invalid query string parameters: Additional properties are not allowed ('{k}' was unexpected)")));
                }
                let g = groups.entry(suffix.to_string()).or_insert_with(|| Group { suffix: suffix.to_string(), ..Group::default() });
                match base {
                    "resources" => g.resources = query::resources(val)?,
                    "required" => query::required(&mut g.traits, val, v)?,
                    "member_of" => query::member_of(&mut g.aggregates, val, v)?,
                    _ => g.in_tree = Some(parse_uuid(val, "in_tree")?),
                }
            }
            "group_policy" if v.at_least(25) => {
                policy = Some(match val.as_str() {
                    "isolate" => true,
                    "none" => false,
                    _ => return Err(bad_request(format!("Invalid query string parameters: group_policy must be 'none' or 'isolate', not {val:?}"))),
                })
            }
            "limit" if v.at_least(16) => {
                let n: usize = val.parse().ok().filter(|n| *n > 0).ok_or_else(|| bad_request(format!("Invalid query string parameters: limit must be a positive integer, not {val:?}")))?;
                limit = Some(n);
            }
            "root_required" if v.at_least(35) => {
                if val.starts_with("in:") {
                    return Err(bad_request("Invalid query string parameters: root_required does not take the in: syntax"));
                }
                query::required(&mut root_required, val, v)?;
            }
            "same_subtree" if v.at_least(36) => same_subtree.push(val.split(',').map(str::to_string).collect::<Vec<_>>()),
            _ => return Err(bad_request(format!("Invalid query string parameters: Additional properties are not allowed ('{k}' was unexpected)"))),
        }
    }
    let suffixed = groups.keys().filter(|s| !s.is_empty()).count();
    if suffixed > 1 && policy.is_none() {
        return Err(bad_request("The \"group_policy\" parameter is required when specifying more than one \"resources{N}\" parameter."));
    }
    for g in groups.values() {
        if g.resources.is_empty() && !(g.suffix.is_empty() || v.at_least(36)) {
            return Err(bad_request(format!("All traits parameters must be associated with resources. Found the following orphaned traits keys: required{}", g.suffix)));
        }
    }
    if !groups.values().any(|g| !g.resources.is_empty()) {
        return Err(bad_request("At least one resources query parameter is required"));
    }
    for list in &same_subtree {
        for s in list {
            if !groups.contains_key(s) || s.is_empty() {
                return Err(bad_request(format!("No such request group suffix in same_subtree: {s:?}")));
            }
        }
    }
    // The unnumbered group first, then the suffixed ones in order.
    let groups = groups.into_values().collect();
    Ok(Request { groups, isolate: policy.unwrap_or(false), root_required, same_subtree, limit })
}

/// One way to satisfy the request from one tree.
struct Candidate {
    allocations: BTreeMap<Uuid, BTreeMap<String, u64>>,
    mappings: BTreeMap<String, BTreeSet<Uuid>>,
}

/// A choice to make: one provider for one class of the unnumbered group, or for a whole suffixed group.
struct Slot<'a> {
    group: &'a Group,
    class: Option<(&'a String, u64)>,
    options: Vec<Uuid>,
}

struct Search<'a> {
    slots: Vec<Slot<'a>>,
    providers: &'a HashMap<Uuid, &'a Provider>,
    req: &'a Request,
    picks: Vec<Uuid>,
    taken: BTreeMap<(Uuid, String), u64>,
    out: Vec<Candidate>,
}

impl Search<'_> {
    fn room(&self, p: &Provider, class: &str, amount: u64) -> bool {
        let Some(inv) = p.inventories.get(class) else { return false };
        let already = self.taken.get(&(p.uuid, class.to_string())).copied().unwrap_or(0);
        let total = already + amount;
        inv.check_amount(p.uuid, class, total).is_ok() && p.used(class) + total <= inv.capacity()
    }

    fn run(&mut self, i: usize) {
        if self.out.len() >= MAX_PER_TREE {
            return;
        }
        if i == self.slots.len() {
            self.finish();
            return;
        }
        let options = self.slots[i].options.clone();
        for u in options {
            let p = self.providers[&u];
            let slot = &self.slots[i];
            let wants: Vec<(String, u64)> = match slot.class {
                Some((c, n)) => vec![(c.clone(), n)],
                None => slot.group.resources.iter().map(|(c, n)| (c.clone(), *n)).collect(),
            };
            if !wants.iter().all(|(c, n)| self.room(p, c, *n)) {
                continue;
            }
            if self.req.isolate && slot.class.is_none() {
                let clash = self.slots[..i].iter().zip(&self.picks).any(|(s, pick)| s.class.is_none() && !s.group.suffix.is_empty() && *pick == u);
                if clash {
                    continue;
                }
            }
            for (c, n) in &wants {
                *self.taken.entry((u, c.clone())).or_default() += n;
            }
            self.picks.push(u);
            self.run(i + 1);
            self.picks.pop();
            for (c, n) in &wants {
                let e = self.taken.get_mut(&(u, c.clone())).unwrap();
                *e -= n;
                if *e == 0 {
                    self.taken.remove(&(u, c.clone()));
                }
            }
        }
    }

    fn finish(&mut self) {
        let mut mappings: BTreeMap<String, BTreeSet<Uuid>> = BTreeMap::new();
        for (slot, pick) in self.slots.iter().zip(&self.picks) {
            mappings.entry(slot.group.suffix.clone()).or_default().insert(*pick);
        }
        // Forbidden traits and aggregates of the unnumbered group apply to the providers it uses.
        if let Some(g) = self.req.groups.iter().find(|g| g.suffix.is_empty()) {
            for u in mappings.get("").into_iter().flatten() {
                let p = self.providers[u];
                if g.traits.forbidden.iter().any(|t| p.traits.contains(t)) || g.aggregates.forbidden.iter().any(|a| p.aggregates.contains(a)) {
                    return;
                }
            }
        }
        for list in &self.req.same_subtree {
            let members: Vec<Uuid> = list.iter().flat_map(|s| mappings.get(s).into_iter().flatten().copied()).collect();
            let under = |top: &Uuid, u: &Uuid| {
                let mut cursor = Some(*u);
                while let Some(c) = cursor {
                    if c == *top {
                        return true;
                    }
                    cursor = self.providers.get(&c).and_then(|p| p.parent);
                }
                false
            };
            if !members.iter().any(|top| members.iter().all(|m| under(top, m))) {
                return;
            }
        }
        let mut allocations: BTreeMap<Uuid, BTreeMap<String, u64>> = BTreeMap::new();
        for ((u, c), n) in &self.taken {
            allocations.entry(*u).or_default().insert(c.clone(), *n);
        }
        if self.out.iter().any(|c| c.allocations == allocations && c.mappings == mappings) {
            return;
        }
        self.out.push(Candidate { allocations, mappings });
    }
}

fn tree_candidates(tree: &[&Provider], req: &Request, v: Version, roots_of: &HashMap<Uuid, Uuid>) -> Vec<Candidate> {
    let root = tree[0];
    if !req.root_required.matches(&root.traits) {
        return Vec::new();
    }
    let providers: HashMap<Uuid, &Provider> = tree.iter().map(|p| (p.uuid, *p)).collect();
    let tree_traits: BTreeSet<String> = tree.iter().flat_map(|p| p.traits.iter().cloned()).collect();
    let tree_aggs: BTreeSet<Uuid> = tree.iter().flat_map(|p| p.aggregates.iter().copied()).collect();
    let in_tree_ok = |g: &Group| g.in_tree.is_none_or(|t| roots_of.get(&t) == Some(&root.uuid));
    let mut slots = Vec::new();
    for g in &req.groups {
        if !in_tree_ok(g) {
            return Vec::new();
        }
        if g.suffix.is_empty() {
            let positive = TraitRule { all_of: g.traits.all_of.clone(), forbidden: BTreeSet::new() };
            let positive_aggs = AggregateRule { all_of: g.aggregates.all_of.clone(), forbidden: BTreeSet::new() };
            if !positive.matches(&tree_traits) || !positive_aggs.matches(&tree_aggs) {
                return Vec::new();
            }
            for (c, n) in &g.resources {
                let options: Vec<Uuid> = tree.iter().filter(|p| p.can_take(c, *n)).map(|p| p.uuid).collect();
                if options.is_empty() {
                    return Vec::new();
                }
                slots.push(Slot { group: g, class: Some((c, *n)), options });
            }
        } else {
            let options: Vec<Uuid> = tree
                .iter()
                .filter(|p| g.traits.matches(&p.traits) && g.aggregates.matches(&p.aggregates))
                .filter(|p| g.resources.iter().all(|(c, n)| p.can_take(c, *n)))
                .map(|p| p.uuid)
                .collect();
            if options.is_empty() {
                return Vec::new();
            }
            slots.push(Slot { group: g, class: None, options });
        }
    }
    let _ = v;
    let mut s = Search { slots, providers: &providers, req, picks: Vec::new(), taken: BTreeMap::new(), out: Vec::new() };
    s.run(0);
    s.out
}

/// GET /allocation_candidates
pub async fn list(
    State(st): State<AppState>,
    _a: Admin,
    Extension(v): Extension<Version>,
    Query(q): Query<QueryPairs>,
) -> Result<Json<Value>, ApiError> {
    super::providers::require(v, 10)?;
    let req = parse(&q, v)?;
    let mut named_traits = req.root_required.names();
    for g in &req.groups {
        named_traits.extend(g.traits.names());
        for c in g.resources.keys() {
            if !db::resource_class_exists(st.store.as_ref(), c).await? {
                return Err(bad_request(format!("Invalid resource class in resources parameter: No such resource class {c}.")));
            }
        }
    }
    db::check_traits_exist(st.store.as_ref(), &named_traits).await?;
    let (all, _) = db::list_providers(st.store.as_ref()).await?;
    let by_uuid: HashMap<Uuid, &Provider> = all.iter().map(|p| (p.value.uuid, &p.value)).collect();
    let roots_of: HashMap<Uuid, Uuid> = all.iter().map(|p| (p.value.uuid, p.value.root)).collect();
    let mut trees: BTreeMap<Uuid, Vec<&Provider>> = BTreeMap::new();
    for p in &all {
        trees.entry(p.value.root).or_default();
    }
    for (root, members) in trees.iter_mut() {
        // Root first, then the rest of the tree breadth-first.
        let Some(r) = by_uuid.get(root) else { continue };
        members.push(r);
        if v.at_least(29) {
            let mut i = 0;
            while i < members.len() {
                let children: Vec<&Provider> = members[i].children.iter().filter_map(|c| by_uuid.get(c).copied()).collect();
                members.extend(children);
                i += 1;
            }
        }
    }
    let mut requests = Vec::new();
    let mut summarised: BTreeSet<Uuid> = BTreeSet::new();
    'trees: for (_, tree) in trees.iter().filter(|(_, t)| !t.is_empty()) {
        let found = tree_candidates(tree, &req, v, &roots_of);
        if found.is_empty() {
            continue;
        }
        if v.at_least(29) {
            summarised.extend(tree.iter().map(|p| p.uuid));
        }
        for c in found {
            if req.limit.is_some_and(|l| requests.len() >= l) {
                break 'trees;
            }
            summarised.extend(c.allocations.keys().copied());
            requests.push(c);
        }
    }
    let requested: BTreeSet<&String> = req.groups.iter().flat_map(|g| g.resources.keys()).collect();
    let mut summaries = Map::new();
    for u in &summarised {
        let p = by_uuid[u];
        let mut resources = Map::new();
        for (class, inv) in &p.inventories {
            if v.at_least(27) || requested.contains(class) {
                resources.insert(class.clone(), json!({"capacity": inv.capacity(), "used": p.used(class)}));
            }
        }
        let mut s = json!({"resources": resources});
        if v.at_least(17) {
            s["traits"] = json!(p.traits);
        }
        if v.at_least(29) {
            s["parent_provider_uuid"] = json!(p.parent);
            s["root_provider_uuid"] = json!(p.root);
        }
        summaries.insert(u.to_string(), s);
    }
    let allocation_requests: Vec<Value> = requests
        .iter()
        .map(|c| {
            let allocations = if v.at_least(12) {
                json!(c.allocations.iter().map(|(u, r)| (u.to_string(), json!({"resources": r}))).collect::<Map<String, Value>>())
            } else {
                json!(c.allocations.iter().map(|(u, r)| json!({"resource_provider": {"uuid": u}, "resources": r})).collect::<Vec<_>>())
            };
            let mut out = json!({"allocations": allocations});
            if v.at_least(34) {
                out["mappings"] = json!(c.mappings);
            }
            out
        })
        .collect();
    Ok(Json(json!({"allocation_requests": allocation_requests, "provider_summaries": summaries})))
}
