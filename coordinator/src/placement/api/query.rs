//! Query-string grammar shared by the provider list and allocation candidates:
//! `resources=VCPU:1,MEMORY_MB:512`, `required=A,!B,in:C,D`, `member_of=in:u1,u2`.

use std::collections::{BTreeMap, BTreeSet};

use axum::http::StatusCode;
use uuid::Uuid;

use super::{bad_request, error};
use crate::error::ApiError;
use crate::placement::db::Provider;
use crate::placement::microversion::Version;
use crate::placement::{classes, traits};

fn bad_value(msg: String) -> ApiError {
    error(StatusCode::BAD_REQUEST, msg, "placement.query.bad_value")
}

/// Parses `CLASS:AMOUNT,...`.
pub fn resources(s: &str) -> Result<BTreeMap<String, u64>, ApiError> {
    let mut out = BTreeMap::new();
    for item in s.split(',') {
        let Some((class, amount)) = item.split_once(':') else {
            return Err(bad_value(format!("Badly formed resources parameter. Expected resources query string parameter in form: ?resources=VCPU:2,MEMORY_MB:1024. Got: {s}.")));
        };
        let amount: u64 = amount.parse().map_err(|_| bad_value(format!("Requested resource {class} expected positive integer amount. Got: {amount}.")))?;
        if amount < 1 {
            return Err(bad_value(format!("Requested resource {class} requires amount >= 1. Got: {amount}.")));
        }
        if !classes::is_valid(class) {
            return Err(bad_request(format!("Invalid resource class in resources parameter: {class}")));
        }
        if out.insert(class.to_string(), amount).is_some() {
            return Err(bad_value(format!("Resource {class} appears twice in {s}")));
        }
    }
    Ok(out)
}

/// Trait constraints: every any-of set must meet the provider's traits; no forbidden one may.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraitRule {
    pub all_of: Vec<BTreeSet<String>>,
    pub forbidden: BTreeSet<String>,
}

impl TraitRule {
    /// Whether the rule is empty.
    pub fn is_empty(&self) -> bool {
        self.all_of.is_empty() && self.forbidden.is_empty()
    }
    /// Whether `traits` satisfy the rule.
    pub fn matches(&self, traits: &BTreeSet<String>) -> bool {
        self.all_of.iter().all(|any| any.iter().any(|t| traits.contains(t))) && !self.forbidden.iter().any(|t| traits.contains(t))
    }
    /// Every trait named.
    pub fn names(&self) -> BTreeSet<String> {
        self.all_of.iter().flatten().chain(&self.forbidden).cloned().collect()
    }
}

/// Adds one `required` value to `rule`: `A,!B` (1.22 allows `!`), `in:A,B` (1.39).
pub fn required(rule: &mut TraitRule, s: &str, v: Version) -> Result<(), ApiError> {
    if let Some(list) = s.strip_prefix("in:") {
        if !v.at_least(39) {
            return Err(bad_value(format!("Invalid query string parameters: the in: syntax needs microversion 1.39 ({s})")));
        }
        let set: BTreeSet<String> = list.split(',').map(str::to_string).collect();
        for t in &set {
            check_trait(t)?;
        }
        rule.all_of.push(set);
        return Ok(());
    }
    for t in s.split(',') {
        if let Some(name) = t.strip_prefix('!') {
            if !v.at_least(22) {
                return Err(bad_value(format!("Invalid query string parameters: forbidden traits need microversion 1.22 ({s})")));
            }
            check_trait(name)?;
            rule.forbidden.insert(name.to_string());
        } else {
            check_trait(t)?;
            rule.all_of.push(BTreeSet::from([t.to_string()]));
        }
    }
    let named: BTreeSet<&String> = rule.all_of.iter().filter(|s| s.len() == 1).flatten().collect();
    if let Some(both) = rule.forbidden.iter().find(|t| named.contains(t)) {
        return Err(bad_value(format!("Conflicting required and forbidden traits found in the following traits keys: {both}")));
    }
    Ok(())
}

fn check_trait(t: &str) -> Result<(), ApiError> {
    if traits::is_well_formed(t) {
        Ok(())
    } else {
        Err(bad_value(format!("Invalid query string parameters: Expected 'required' parameter value of the form: HW_CPU_X86_VMX,!CUSTOM_MAGIC. Got: {t}")))
    }
}

/// Aggregate constraints: each any-of set must meet the provider's aggregates; no forbidden one may.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AggregateRule {
    pub all_of: Vec<BTreeSet<Uuid>>,
    pub forbidden: BTreeSet<Uuid>,
}

impl AggregateRule {
    /// Whether `aggs` satisfy the rule.
    pub fn matches(&self, aggs: &BTreeSet<Uuid>) -> bool {
        self.all_of.iter().all(|any| any.iter().any(|a| aggs.contains(a))) && !self.forbidden.iter().any(|a| aggs.contains(a))
    }
}

/// Adds one `member_of` value: `u`, `in:u1,u2`, and (1.32) `!u`, `!in:u1,u2`.
pub fn member_of(rule: &mut AggregateRule, s: &str, v: Version) -> Result<(), ApiError> {
    let (negated, rest) = match s.strip_prefix('!') {
        Some(r) => {
            if !v.at_least(32) {
                return Err(bad_value(format!("Forbidden aggregates need microversion 1.32: {s}")));
            }
            (true, r)
        }
        None => (false, s),
    };
    let list = rest.strip_prefix("in:").unwrap_or(rest);
    if rest.strip_prefix("in:").is_none() && list.contains(',') {
        return Err(bad_value(format!("Invalid query string parameters: Expected 'member_of' parameter to contain valid UUID(s). Got: {s}")));
    }
    let mut set = BTreeSet::new();
    for u in list.split(',') {
        set.insert(Uuid::parse_str(u).map_err(|_| {
            bad_value(format!("Invalid query string parameters: Expected 'member_of' parameter to contain valid UUID(s). Got: {s}"))
        })?);
    }
    if negated {
        rule.forbidden.extend(set);
    } else {
        rule.all_of.push(set);
    }
    Ok(())
}

/// Whether a provider has room for `amount` of `class` (units and capacity).
pub fn has_room(p: &Provider, class: &str, amount: u64) -> bool {
    p.can_take(class, amount)
}
