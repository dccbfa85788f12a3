//! Weighers: order the hosts that passed the filters.

use super::cache::CachedProvider;
use super::fit::Taken;

/// How hosts are ordered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Prefer the emptiest hosts (Nova's default: spreads load and failures).
    #[default]
    Spread,
    /// Prefer the fullest hosts (keeps whole hosts free for big requests).
    Pack,
}

/// The weight of a host for a candidate allocation: for every class the
/// allocation takes, the fraction of the tree's capacity of that class still
/// free after it, averaged over those classes. Spread prefers a high value,
/// pack a low one; the result is higher-is-better in both cases.
pub fn weigh(strategy: Strategy, tree: &[CachedProvider], taken: &Taken<'_>) -> f64 {
    let mut classes: Vec<(&str, u64)> = Vec::with_capacity(4);
    for (_, c, n) in taken.iter() {
        match classes.iter_mut().find(|(k, _)| k == c) {
            Some(e) => e.1 += n,
            None => classes.push((c, *n)),
        }
    }
    if classes.is_empty() {
        return 0.0;
    }
    let mut sum = 0.0;
    for (class, n) in &classes {
        let (mut cap, mut used) = (0u64, 0u64);
        for p in tree {
            if let Some(inv) = p.value.inventories.get(*class) {
                cap += inv.capacity();
                used += p.value.used(class);
            }
        }
        if cap > 0 {
            sum += cap.saturating_sub(used + n) as f64 / cap as f64;
        }
    }
    let free = sum / classes.len() as f64;
    match strategy {
        Strategy::Spread => free,
        Strategy::Pack => -free,
    }
}
