//! Placement's records in the store and every write to them.
//!
//! Layout (all under `/placement/`):
//! - `rp/<uuid>`: one [`Provider`]: its name, place in the tree, generation,
//!   inventories, traits, aggregates, children, and what all consumers
//!   together use of it (totals per class, and how many consumers). The
//!   record stays the same size however many consumers a provider serves, so
//!   a claim rewrites, and every scheduler's watch decodes, a few hundred
//!   bytes, and a claim needs only the provider records it touches.
//! - `alloc/<provider>/<consumer>`: one consumer's share of one provider
//!   ([`ProviderAllocation`]), the index behind a provider's allocation list;
//!   written in the same transaction as the totals and the consumer record.
//! - `rp-name/<name>`: the uuid owning a provider name (names are unique).
//! - `consumer/<uuid>`: one [`Consumer`]: project, user, generation and its
//!   allocations keyed by provider.
//! - `rc/<name>`: a custom resource class; `trait/<name>`: a custom trait (or a
//!   standard-looking one a host reported that this build does not list).
//!
//! Every write is one transaction comparing the mod-revision (or absence) of
//! every key it reads to decide, so two coordinators can never both win; a
//! lost race re-reads and tries again where the caller's expectations still
//! hold. The provider's `generation` is Placement's public generation: it goes
//! up on every change clients can see (inventories, traits, aggregates,
//! allocations).
//!
//! Provider records of schema 1 kept every consumer's allocations inside the
//! provider record; they are still read (the totals are summed on reading),
//! and the next write of such a provider moves those allocations to `alloc/`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use store::record::{decode, encode, Record};
use store::{Compare, KeyValue, Op, OpResult, Store, StoreError, Txn};
use uuid::Uuid;

use super::{classes, traits};

/// Key prefix of provider records.
pub const RP_PREFIX: &str = "/placement/rp/";
/// Key prefix of the provider name index.
pub const RP_NAME_PREFIX: &str = "/placement/rp-name/";
/// Key prefix of the per-provider allocation index.
pub const ALLOC_PREFIX: &str = "/placement/alloc/";
/// Key prefix of consumer records.
pub const CONSUMER_PREFIX: &str = "/placement/consumer/";
/// Key prefix of custom resource classes.
pub const RC_PREFIX: &str = "/placement/rc/";
/// Key prefix of custom traits.
pub const TRAIT_PREFIX: &str = "/placement/trait/";

/// How often a write re-reads and retries after losing a race before giving up.
const MAX_ATTEMPTS: usize = 64;

/// Key of a provider record.
pub fn rp_key(uuid: &Uuid) -> String {
    format!("{RP_PREFIX}{uuid}")
}

fn rp_name_key(name: &str) -> String {
    format!("{RP_NAME_PREFIX}{name}")
}

/// Key of a consumer record.
pub fn consumer_key(uuid: &Uuid) -> String {
    format!("{CONSUMER_PREFIX}{uuid}")
}

/// Key of one consumer's allocation on one provider.
pub fn alloc_key(provider: &Uuid, consumer: &Uuid) -> String {
    format!("{ALLOC_PREFIX}{provider}/{consumer}")
}

fn rc_key(name: &str) -> String {
    format!("{RC_PREFIX}{name}")
}

fn trait_key(name: &str) -> String {
    format!("{TRAIT_PREFIX}{name}")
}

/// Errors of Placement's storage layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("No resource provider with uuid {0} found")]
    ProviderNotFound(Uuid),
    #[error("Parent resource provider {0} not found")]
    ParentNotFound(Uuid),
    #[error("Conflicting resource provider name: {0} already exists")]
    DuplicateName(String),
    #[error("Conflicting resource provider uuid: {0} already exists")]
    DuplicateUuid(Uuid),
    #[error("Resource provider's generation already changed. Please update the generation and try again (provider {0})")]
    ProviderGeneration(Uuid),
    #[error("Consumer generation conflict - expected {expected} but got {actual} for consumer {consumer}")]
    ConsumerGeneration { consumer: Uuid, expected: String, actual: String },
    #[error("Gave up after {MAX_ATTEMPTS} attempts: too many concurrent writers on the same records")]
    Contention,
    #[error("Invalid resource class name {0:?}: must be a standard class or CUSTOM_ followed by A-Z, 0-9 and _")]
    InvalidResourceClass(String),
    #[error("No such resource class {0}")]
    UnknownResourceClass(String),
    #[error("Invalid trait name {0:?}: only A-Z, 0-9 and _ are allowed, custom traits start with CUSTOM_")]
    InvalidTrait(String),
    #[error("No such trait(s): {0}")]
    UnknownTrait(String),
    #[error("Invalid inventory for {class}: {reason}")]
    InvalidInventory { class: String, reason: String },
    #[error("Inventory for {class} on resource provider {provider} in use: {used} used, the new inventory would allow only {capacity}")]
    InventoryInUse { provider: Uuid, class: String, used: u64, capacity: u64 },
    #[error("Unable to allocate {requested} {class} on resource provider {provider}: {used} of {capacity} in use")]
    Capacity { provider: Uuid, class: String, requested: u64, used: u64, capacity: u64 },
    #[error("Inventory for {class} on resource provider {provider} does not exist")]
    NoInventory { provider: Uuid, class: String },
    #[error("Unable to allocate {amount} {class} on resource provider {provider}: {reason}")]
    BadAmount { provider: Uuid, class: String, amount: u64, reason: String },
    #[error("Unable to delete resource provider {0}: it has allocations")]
    ProviderInUse(Uuid),
    #[error("Unable to delete parent resource provider {0}: it has child resource providers")]
    ProviderHasChildren(Uuid),
    #[error("Resource class {0} is in use by an inventory")]
    ClassInUse(String),
    #[error("Trait {0} is in use by a resource provider")]
    TraitInUse(String),
    #[error("Cannot delete or change standard {0}")]
    Standard(String),
    #[error("Invalid provider tree: {0}")]
    InvalidTree(String),
    #[error("Invalid allocation request: {0}")]
    InvalidAllocation(String),
    #[error("Store: {0}")]
    Store(#[from] StoreError),
}

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, DbError>;

fn default_one() -> u64 {
    1
}
fn default_ratio() -> f64 {
    1.0
}
fn default_max() -> u64 {
    i32::MAX as u64
}

/// One resource class's inventory on one provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    /// Amount the provider has.
    pub total: u64,
    /// Amount kept back for the host itself.
    #[serde(default)]
    pub reserved: u64,
    /// Smallest amount one allocation may take.
    #[serde(default = "default_one")]
    pub min_unit: u64,
    /// Largest amount one allocation may take.
    #[serde(default = "default_max")]
    pub max_unit: u64,
    /// Allocations must be a multiple of this.
    #[serde(default = "default_one")]
    pub step_size: u64,
    /// Overcommit factor applied to `total - reserved`.
    #[serde(default = "default_ratio")]
    pub allocation_ratio: f64,
}

impl Inventory {
    /// An inventory of `total` with Placement's defaults for everything else
    /// (nothing reserved, units of 1 up to `total`, no overcommit).
    pub fn new(total: u64) -> Inventory {
        Inventory { total, reserved: 0, min_unit: 1, max_unit: total.max(1), step_size: 1, allocation_ratio: 1.0 }
    }

    /// What may be allocated in all: `(total - reserved) * allocation_ratio`, rounded down.
    pub fn capacity(&self) -> u64 {
        let base = self.total.saturating_sub(self.reserved) as f64;
        (base * self.allocation_ratio + 1e-9).floor() as u64
    }

    /// Checks the fields agree with each other (Placement's rules).
    pub fn validate(&self, class: &str) -> Result<()> {
        let bad = |reason: &str| Err(DbError::InvalidInventory { class: class.into(), reason: reason.into() });
        if self.total < 1 {
            return bad("total must be at least 1");
        }
        if self.reserved > self.total {
            return bad("reserved must not exceed total");
        }
        if self.min_unit < 1 || self.step_size < 1 || self.max_unit < 1 {
            return bad("min_unit, max_unit and step_size must be at least 1");
        }
        if self.min_unit > self.max_unit {
            return bad("min_unit must not exceed max_unit");
        }
        if !(self.allocation_ratio.is_finite() && self.allocation_ratio > 0.0) {
            return bad("allocation_ratio must be a positive number");
        }
        let limit = i32::MAX as u64;
        if self.total > limit || self.reserved > limit || self.max_unit > limit || self.min_unit > limit || self.step_size > limit {
            return bad("values must not exceed 2147483647");
        }
        Ok(())
    }

    /// Checks one allocation of `amount` against the unit rules.
    pub fn check_amount(&self, provider: Uuid, class: &str, amount: u64) -> Result<()> {
        let bad = |reason: String| Err(DbError::BadAmount { provider, class: class.into(), amount, reason });
        if amount < self.min_unit {
            return bad(format!("below min_unit {}", self.min_unit));
        }
        if amount > self.max_unit {
            return bad(format!("above max_unit {}", self.max_unit));
        }
        if !amount.is_multiple_of(self.step_size) {
            return bad(format!("not a multiple of step_size {}", self.step_size));
        }
        Ok(())
    }
}

/// A resource provider as stored: `/placement/rp/<uuid>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provider {
    pub uuid: Uuid,
    pub name: String,
    /// The provider above this one, `None` for a root.
    #[serde(default)]
    pub parent: Option<Uuid>,
    /// The root of this provider's tree (itself for a root).
    pub root: Uuid,
    /// Placement's public generation; bumped on every visible change.
    pub generation: u64,
    #[serde(default)]
    pub inventories: BTreeMap<String, Inventory>,
    #[serde(default)]
    pub traits: BTreeSet<String>,
    #[serde(default)]
    pub aggregates: BTreeSet<Uuid>,
    /// Direct children, kept here so deletes and tree walks need no range read.
    #[serde(default)]
    pub children: BTreeSet<Uuid>,
    /// What all consumers together hold of this provider, per resource class
    /// (classes in use only). Each consumer's share is in its consumer record
    /// and under `alloc/<provider>/<consumer>`.
    #[serde(default)]
    pub usage: BTreeMap<String, u64>,
    /// How many consumers hold allocations here.
    #[serde(default)]
    pub consumers: u64,
    /// Per-consumer allocations of a schema-1 record, which kept them inside
    /// the provider; the next write of the provider moves them to `alloc/`.
    #[serde(skip)]
    legacy_allocations: Option<BTreeMap<Uuid, BTreeMap<String, u64>>>,
}

/// Schema of provider records this build writes (1 kept per-consumer allocations inside).
const PROVIDER_VERSION: u32 = 2;

/// A provider record as read: any schema this build knows.
#[derive(Deserialize)]
struct StoredProvider {
    v: u32,
    uuid: Uuid,
    name: String,
    #[serde(default)]
    parent: Option<Uuid>,
    root: Uuid,
    generation: u64,
    #[serde(default)]
    inventories: BTreeMap<String, Inventory>,
    #[serde(default)]
    traits: BTreeSet<String>,
    #[serde(default)]
    aggregates: BTreeSet<Uuid>,
    #[serde(default)]
    children: BTreeSet<Uuid>,
    #[serde(default)]
    usage: BTreeMap<String, u64>,
    #[serde(default)]
    consumers: u64,
    /// Schema 1 only.
    #[serde(default)]
    allocations: Option<BTreeMap<Uuid, BTreeMap<String, u64>>>,
}

/// A provider record as written: the provider and its schema version.
#[derive(Serialize)]
struct ProviderOut<'a> {
    v: u32,
    #[serde(flatten)]
    provider: &'a Provider,
}

/// Encodes a provider record (schema 2) straight to JSON.
pub fn encode_provider(p: &Provider) -> Vec<u8> {
    serde_json::to_vec(&ProviderOut { v: PROVIDER_VERSION, provider: p }).expect("a provider always serializes")
}

/// A record as written: its fields and its schema version.
#[derive(Serialize)]
struct RecordOut<'a, T: Serialize> {
    v: u32,
    #[serde(flatten)]
    record: &'a T,
}

/// The same bytes' meaning as [`store::record::encode`] for a record that is
/// a struct, serialized in one pass (no intermediate JSON tree): for the
/// records every claim writes.
pub fn encode_record<T: Record>(value: &T) -> Vec<u8> {
    serde_json::to_vec(&RecordOut { v: T::VERSION, record: value }).expect("a record struct always serializes")
}

/// Decodes a provider record of schema 1 or 2 in one pass (no intermediate
/// JSON tree: every scheduler decodes every claim's record from its watch).
pub fn decode_provider(key: &str, bytes: &[u8]) -> std::result::Result<Provider, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { key: key.into(), reason };
    let s: StoredProvider = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if s.v < 1 || s.v > PROVIDER_VERSION {
        return Err(corrupt(format!("schema version {} not supported (this build reads 1..={PROVIDER_VERSION})", s.v)));
    }
    let mut p = Provider {
        uuid: s.uuid,
        name: s.name,
        parent: s.parent,
        root: s.root,
        generation: s.generation,
        inventories: s.inventories,
        traits: s.traits,
        aggregates: s.aggregates,
        children: s.children,
        usage: s.usage,
        consumers: s.consumers,
        legacy_allocations: None,
    };
    if s.v == 1 {
        let allocations = s.allocations.unwrap_or_default();
        p.usage.clear();
        for amounts in allocations.values() {
            p.add_usage(amounts);
        }
        p.consumers = allocations.len() as u64;
        if !allocations.is_empty() {
            p.legacy_allocations = Some(allocations);
        }
    }
    Ok(p)
}

fn decode_provider_kv(kv: &KeyValue) -> Result<Versioned<Provider>> {
    Ok(Versioned { value: decode_provider(&kv.key, &kv.value)?, mod_revision: kv.mod_revision })
}

/// Adds the put of `p` to `txn`, and the `alloc/` keys of the consumers a
/// schema-1 record still held inside (the caller has removed those it rewrites itself).
fn put_provider(mut txn: Txn, p: &Provider) -> Txn {
    if let Some(legacy) = &p.legacy_allocations {
        for (consumer, resources) in legacy {
            txn = txn.and_then(Op::put(alloc_key(&p.uuid, consumer), encode(&ProviderAllocation { resources: resources.clone() })));
        }
    }
    txn.and_then(Op::put(rp_key(&p.uuid), encode_provider(p)))
}

impl Provider {
    /// A new provider with nothing in it.
    pub fn new(uuid: Uuid, name: impl Into<String>, parent: Option<Uuid>, root: Uuid) -> Provider {
        Provider {
            uuid,
            name: name.into(),
            parent,
            root,
            generation: 0,
            inventories: BTreeMap::new(),
            traits: BTreeSet::new(),
            aggregates: BTreeSet::new(),
            children: BTreeSet::new(),
            usage: BTreeMap::new(),
            consumers: 0,
            legacy_allocations: None,
        }
    }

    /// How much of `class` is allocated.
    pub fn used(&self, class: &str) -> u64 {
        self.usage.get(class).copied().unwrap_or(0)
    }

    /// Usage of every class this provider has inventory or allocations of.
    pub fn usages(&self) -> BTreeMap<String, u64> {
        let mut u: BTreeMap<String, u64> = self.inventories.keys().map(|c| (c.clone(), 0)).collect();
        for (c, n) in &self.usage {
            *u.entry(c.clone()).or_default() += n;
        }
        u
    }

    /// Whether any consumer holds allocations here.
    pub fn has_allocations(&self) -> bool {
        self.consumers > 0 || !self.usage.is_empty()
    }

    /// What is still free of `class` (0 without inventory).
    pub fn free(&self, class: &str) -> u64 {
        self.inventories.get(class).map(|i| i.capacity().saturating_sub(self.used(class))).unwrap_or(0)
    }

    /// Whether one more allocation of `amount` of `class` fits (units and capacity).
    pub fn can_take(&self, class: &str, amount: u64) -> bool {
        match self.inventories.get(class) {
            Some(inv) => inv.check_amount(self.uuid, class, amount).is_ok() && self.used(class) + amount <= inv.capacity(),
            None => false,
        }
    }

    fn add_usage(&mut self, amounts: &BTreeMap<String, u64>) {
        for (c, n) in amounts {
            *self.usage.entry(c.clone()).or_default() += n;
        }
    }

    fn remove_usage(&mut self, amounts: &BTreeMap<String, u64>) {
        for (c, n) in amounts {
            if let Some(u) = self.usage.get_mut(c) {
                *u = u.saturating_sub(*n);
                if *u == 0 {
                    self.usage.remove(c);
                }
            }
        }
    }
}

/// One consumer's share of one provider: `/placement/alloc/<provider>/<consumer>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderAllocation {
    /// Resource class -> amount.
    pub resources: BTreeMap<String, u64>,
}

impl Record for ProviderAllocation {
    const VERSION: u32 = 1;
}

/// A consumer's allocations: `/placement/consumer/<uuid>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Consumer {
    pub uuid: Uuid,
    pub project_id: String,
    pub user_id: String,
    /// Placement's consumer type (microversion 1.38), e.g. `INSTANCE`.
    #[serde(default)]
    pub consumer_type: Option<String>,
    /// Bumped on every change of this consumer's allocations.
    pub generation: u64,
    /// Provider -> resource class -> amount.
    pub allocations: BTreeMap<Uuid, BTreeMap<String, u64>>,
}

impl Record for Consumer {
    const VERSION: u32 = 1;
}

/// A custom resource class or trait: the record under `rc/` or `trait/`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Named {
    pub name: String,
}

impl Record for Named {
    const VERSION: u32 = 1;
}

/// The owner of a provider name: the record under `rp-name/`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NameOwner {
    pub uuid: Uuid,
}

impl Record for NameOwner {
    const VERSION: u32 = 1;
}

/// A provider together with the store mod-revision it was read at.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    /// Store mod-revision of the record (the compare of the next write).
    pub mod_revision: i64,
}

fn decode_kv<T: Record>(kv: &KeyValue) -> Result<Versioned<T>> {
    Ok(Versioned { value: decode(&kv.key, &kv.value)?, mod_revision: kv.mod_revision })
}

/// Reads one provider.
pub async fn get_provider(store: &dyn Store, uuid: &Uuid) -> Result<Option<Versioned<Provider>>> {
    match store.get(&rp_key(uuid)).await? {
        Some(kv) => Ok(Some(decode_provider_kv(&kv)?)),
        None => Ok(None),
    }
}

/// Reads one provider, or fails with [`DbError::ProviderNotFound`].
pub async fn must_get_provider(store: &dyn Store, uuid: &Uuid) -> Result<Versioned<Provider>> {
    get_provider(store, uuid).await?.ok_or(DbError::ProviderNotFound(*uuid))
}

/// Reads every provider (the scheduler uses its watch-fed cache instead),
/// sorted by uuid. The read is split into 16 ranges by the uuid's first hex
/// digit so no single answer outgrows a gRPC message (etcd clients refuse
/// answers over 4 MiB, about 6,500 providers). Each record is read whole, but
/// the ranges are taken one after another: the revision returned is the
/// oldest of them, so a watch started after it misses nothing.
pub async fn list_providers(store: &dyn Store) -> Result<(Vec<Versioned<Provider>>, i64)> {
    let mut out = Vec::new();
    let mut revision = i64::MAX;
    for digit in "0123456789abcdef".chars() {
        let r = store.range(&format!("{RP_PREFIX}{digit}")).await?;
        revision = revision.min(r.revision);
        for kv in &r.kvs {
            out.push(decode_provider_kv(kv)?);
        }
    }
    Ok((out, revision))
}

/// Every consumer's allocations on one provider: consumer -> class -> amount.
pub async fn provider_allocations(store: &dyn Store, p: &Provider) -> Result<BTreeMap<Uuid, BTreeMap<String, u64>>> {
    let prefix = format!("{ALLOC_PREFIX}{}/", p.uuid);
    let r = store.range(&prefix).await?;
    let mut out = p.legacy_allocations.clone().unwrap_or_default();
    for kv in &r.kvs {
        let consumer = Uuid::parse_str(&kv.key[prefix.len()..])
            .map_err(|e| StoreError::Corrupt { key: kv.key.clone(), reason: format!("not a consumer uuid: {e}") })?;
        out.insert(consumer, decode::<ProviderAllocation>(&kv.key, &kv.value)?.resources);
    }
    Ok(out)
}

/// Looks a provider up by name.
pub async fn provider_by_name(store: &dyn Store, name: &str) -> Result<Option<Versioned<Provider>>> {
    match store.get(&rp_name_key(name)).await? {
        Some(kv) => {
            let owner: NameOwner = decode(&kv.key, &kv.value)?;
            get_provider(store, &owner.uuid).await
        }
        None => Ok(None),
    }
}

/// Reads one consumer.
pub async fn get_consumer(store: &dyn Store, uuid: &Uuid) -> Result<Option<Versioned<Consumer>>> {
    match store.get(&consumer_key(uuid)).await? {
        Some(kv) => Ok(Some(decode_kv(&kv)?)),
        None => Ok(None),
    }
}

/// Reads every consumer (for usage reports by project or user).
pub async fn list_consumers(store: &dyn Store) -> Result<Vec<Consumer>> {
    let r = store.range(CONSUMER_PREFIX).await?;
    r.kvs.iter().map(|kv| Ok(decode::<Consumer>(&kv.key, &kv.value)?)).collect()
}

/// Every provider of the tree rooted at `root`, root first (breadth-first by children).
pub async fn get_tree(store: &dyn Store, root: &Uuid) -> Result<Vec<Versioned<Provider>>> {
    let mut out = Vec::new();
    let mut queue = std::collections::VecDeque::from([*root]);
    while let Some(u) = queue.pop_front() {
        if let Some(p) = get_provider(store, &u).await? {
            queue.extend(p.value.children.iter().copied());
            out.push(p);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- classes and traits

/// Every resource class name: standard ones, then custom ones.
pub async fn list_resource_classes(store: &dyn Store) -> Result<Vec<String>> {
    let mut out: Vec<String> = classes::STANDARD_CLASSES.iter().map(|s| s.to_string()).collect();
    let r = store.range(RC_PREFIX).await?;
    for kv in &r.kvs {
        out.push(decode::<Named>(&kv.key, &kv.value)?.name);
    }
    Ok(out)
}

/// Whether a resource class exists (standard or created).
pub async fn resource_class_exists(store: &dyn Store, name: &str) -> Result<bool> {
    Ok(classes::is_standard(name) || store.get(&rc_key(name)).await?.is_some())
}

/// Creates a custom resource class; `Ok(false)` if it already existed.
pub async fn create_resource_class(store: &dyn Store, name: &str) -> Result<bool> {
    if classes::is_standard(name) {
        return Ok(false);
    }
    if !classes::is_valid_custom(name) {
        return Err(DbError::InvalidResourceClass(name.into()));
    }
    let key = rc_key(name);
    let r = store
        .txn(Txn::new().when(Compare::Absent(key.clone())).and_then(Op::put(key, encode(&Named { name: name.into() }))))
        .await?;
    Ok(r.succeeded)
}

/// Deletes a custom resource class unless an inventory uses it. `Ok(false)` if absent.
pub async fn delete_resource_class(store: &dyn Store, name: &str) -> Result<bool> {
    if classes::is_standard(name) {
        return Err(DbError::Standard(format!("resource class {name}")));
    }
    let Some(kv) = store.get(&rc_key(name)).await? else { return Ok(false) };
    let (providers, _) = list_providers(store).await?;
    if providers.iter().any(|p| p.value.inventories.contains_key(name)) {
        return Err(DbError::ClassInUse(name.into()));
    }
    // A provider taking up the class between the check and the delete is
    // tolerated as Placement does; the class record is only a name.
    store.txn(Txn::new().when(Compare::ModRevision(kv.key.clone(), kv.mod_revision)).and_then(Op::delete(kv.key))).await?;
    Ok(true)
}

/// Every trait name: standard ones, then custom (and host-reported) ones.
pub async fn list_traits(store: &dyn Store) -> Result<Vec<String>> {
    let mut out: BTreeSet<String> = traits::STANDARD_TRAITS.iter().map(|s| s.to_string()).collect();
    let r = store.range(TRAIT_PREFIX).await?;
    for kv in &r.kvs {
        out.insert(decode::<Named>(&kv.key, &kv.value)?.name);
    }
    Ok(out.into_iter().collect())
}

/// Whether a trait exists (standard or created).
pub async fn trait_exists(store: &dyn Store, name: &str) -> Result<bool> {
    Ok(traits::is_standard(name) || store.get(&trait_key(name)).await?.is_some())
}

/// Creates a custom trait; `Ok(false)` if it already existed.
pub async fn create_trait(store: &dyn Store, name: &str) -> Result<bool> {
    if traits::is_standard(name) {
        return Ok(false);
    }
    if !traits::is_valid_custom(name) {
        return Err(DbError::InvalidTrait(name.into()));
    }
    let key = trait_key(name);
    let r = store
        .txn(Txn::new().when(Compare::Absent(key.clone())).and_then(Op::put(key, encode(&Named { name: name.into() }))))
        .await?;
    Ok(r.succeeded)
}

/// Deletes a custom trait unless a provider carries it. `Ok(false)` if absent.
pub async fn delete_trait(store: &dyn Store, name: &str) -> Result<bool> {
    if traits::is_standard(name) {
        return Err(DbError::Standard(format!("trait {name}")));
    }
    let Some(kv) = store.get(&trait_key(name)).await? else { return Ok(false) };
    let (providers, _) = list_providers(store).await?;
    if providers.iter().any(|p| p.value.traits.contains(name)) {
        return Err(DbError::TraitInUse(name.into()));
    }
    store.txn(Txn::new().when(Compare::ModRevision(kv.key.clone(), kv.mod_revision)).and_then(Op::delete(kv.key))).await?;
    Ok(true)
}

/// Fails with [`DbError::UnknownTrait`] naming every trait in `names` that does not exist.
pub async fn check_traits_exist(store: &dyn Store, names: &BTreeSet<String>) -> Result<()> {
    let mut missing = Vec::new();
    for n in names {
        if !traits::is_well_formed(n) {
            return Err(DbError::InvalidTrait(n.clone()));
        }
        if !trait_exists(store, n).await? {
            missing.push(n.clone());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DbError::UnknownTrait(missing.join(", ")))
    }
}

// ---------------------------------------------------------------- providers

/// Creates a provider (a root, or a child of `parent`).
pub async fn create_provider(store: &dyn Store, uuid: Option<Uuid>, name: &str, parent: Option<Uuid>) -> Result<Provider> {
    let uuid = uuid.unwrap_or_else(Uuid::new_v4);
    validate_provider_name(name)?;
    for _ in 0..MAX_ATTEMPTS {
        let key = rp_key(&uuid);
        let name_key = rp_name_key(name);
        let mut txn = Txn::new()
            .when(Compare::Absent(key.clone()))
            .when(Compare::Absent(name_key.clone()))
            .or_else(Op::get(key.clone()))
            .or_else(Op::get(name_key.clone()));
        let mut provider = Provider::new(uuid, name, None, uuid);
        if let Some(parent_uuid) = parent {
            let mut p = get_provider(store, &parent_uuid).await?.ok_or(DbError::ParentNotFound(parent_uuid))?;
            provider.parent = Some(parent_uuid);
            provider.root = p.value.root;
            p.value.children.insert(uuid);
            txn = put_provider(txn.when(Compare::ModRevision(rp_key(&parent_uuid), p.mod_revision)), &p.value);
        }
        txn = put_provider(txn, &provider).and_then(Op::put(name_key, encode(&NameOwner { uuid })));
        let r = store.txn(txn).await?;
        if r.succeeded {
            return Ok(provider);
        }
        if matches!(r.results.first(), Some(OpResult::Get(Some(_)))) {
            return Err(DbError::DuplicateUuid(uuid));
        }
        if matches!(r.results.get(1), Some(OpResult::Get(Some(_)))) {
            return Err(DbError::DuplicateName(name.into()));
        }
        // The parent changed under us: read it again.
    }
    Err(DbError::Contention)
}

fn validate_provider_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 200 {
        return Err(DbError::InvalidTree("a provider name must be 1 to 200 characters".into()));
    }
    Ok(())
}

/// Read-modify-write of one provider: `change` edits it (and may refuse);
/// `expected_generation`, if given, must match the stored generation. The
/// generation goes up by one when `change` returns `true` (it changed something).
pub async fn update_provider<F>(store: &dyn Store, uuid: &Uuid, expected_generation: Option<u64>, mut change: F) -> Result<Provider>
where
    F: FnMut(&mut Provider) -> Result<bool>,
{
    for _ in 0..MAX_ATTEMPTS {
        let current = must_get_provider(store, uuid).await?;
        if expected_generation.is_some_and(|g| g != current.value.generation) {
            return Err(DbError::ProviderGeneration(*uuid));
        }
        let mut p = current.value.clone();
        if !change(&mut p)? {
            return Ok(p);
        }
        p.generation += 1;
        let key = rp_key(uuid);
        let r = store.txn(put_provider(Txn::new().when(Compare::ModRevision(key, current.mod_revision)), &p)).await?;
        if r.succeeded {
            return Ok(p);
        }
    }
    Err(DbError::Contention)
}

/// Renames a provider and/or changes its parent (1.37 re-parenting within a tree is refused
/// when it would create a loop; moving to another tree is allowed only for a root without children).
pub async fn rename_provider(store: &dyn Store, uuid: &Uuid, name: &str, parent: Option<Option<Uuid>>) -> Result<Provider> {
    validate_provider_name(name)?;
    for _ in 0..MAX_ATTEMPTS {
        let current = must_get_provider(store, uuid).await?;
        let mut p = current.value.clone();
        let mut txn = Txn::new().when(Compare::ModRevision(rp_key(uuid), current.mod_revision));
        if p.name != name {
            let new_key = rp_name_key(name);
            txn = txn
                .when(Compare::Absent(new_key.clone()))
                .and_then(Op::delete(rp_name_key(&p.name)))
                .and_then(Op::put(new_key.clone(), encode(&NameOwner { uuid: *uuid })))
                .or_else(Op::get(new_key));
            p.name = name.to_string();
        }
        if let Some(new_parent) = parent {
            if new_parent != p.parent {
                if !p.children.is_empty() && new_parent.is_some() && p.parent.is_none() {
                    return Err(DbError::InvalidTree("a root provider with children cannot be given a parent".into()));
                }
                if let Some(old) = p.parent {
                    let mut op = must_get_provider(store, &old).await?;
                    op.value.children.remove(uuid);
                    txn = put_provider(txn.when(Compare::ModRevision(rp_key(&old), op.mod_revision)), &op.value);
                }
                match new_parent {
                    Some(np_uuid) => {
                        if np_uuid == *uuid {
                            return Err(DbError::InvalidTree("a provider cannot be its own parent".into()));
                        }
                        let mut np = get_provider(store, &np_uuid).await?.ok_or(DbError::ParentNotFound(np_uuid))?;
                        // Refuse loops: the new parent must not sit below this provider.
                        let mut cursor = np.value.parent;
                        while let Some(c) = cursor {
                            if c == *uuid {
                                return Err(DbError::InvalidTree("the new parent is a descendant of the provider".into()));
                            }
                            cursor = get_provider(store, &c).await?.and_then(|x| x.value.parent);
                        }
                        if p.parent.is_some() && np.value.root != p.root {
                            return Err(DbError::InvalidTree("a child provider cannot move to another tree".into()));
                        }
                        np.value.children.insert(*uuid);
                        p.root = np.value.root;
                        txn = put_provider(txn.when(Compare::ModRevision(rp_key(&np_uuid), np.mod_revision)), &np.value);
                    }
                    None => {
                        if !p.children.is_empty() {
                            return Err(DbError::InvalidTree("un-parenting a provider with children is not supported".into()));
                        }
                        p.root = p.uuid;
                    }
                }
                p.parent = new_parent;
            }
        }
        if p == current.value {
            return Ok(p);
        }
        p.generation += 1;
        txn = put_provider(txn, &p);
        let r = store.txn(txn).await?;
        if r.succeeded {
            return Ok(p);
        }
        if matches!(r.results.first(), Some(OpResult::Get(Some(kv))) if kv.key.starts_with(RP_NAME_PREFIX)) {
            return Err(DbError::DuplicateName(name.into()));
        }
    }
    Err(DbError::Contention)
}

/// Deletes a provider that has no allocations and no children.
pub async fn delete_provider(store: &dyn Store, uuid: &Uuid) -> Result<()> {
    for _ in 0..MAX_ATTEMPTS {
        let current = must_get_provider(store, uuid).await?;
        let p = &current.value;
        if !p.children.is_empty() {
            return Err(DbError::ProviderHasChildren(*uuid));
        }
        if p.has_allocations() {
            return Err(DbError::ProviderInUse(*uuid));
        }
        let mut txn = Txn::new()
            .when(Compare::ModRevision(rp_key(uuid), current.mod_revision))
            .and_then(Op::delete(rp_key(uuid)))
            .and_then(Op::delete(rp_name_key(&p.name)));
        if let Some(parent) = p.parent {
            if let Some(mut pp) = get_provider(store, &parent).await? {
                pp.value.children.remove(uuid);
                txn = put_provider(txn.when(Compare::ModRevision(rp_key(&parent), pp.mod_revision)), &pp.value);
            }
        }
        if store.txn(txn).await?.succeeded {
            return Ok(());
        }
    }
    Err(DbError::Contention)
}

/// Checks that replacing a provider's inventories with `new` leaves every
/// class in use with room for its current usage.
pub fn check_inventory_change(p: &Provider, new: &BTreeMap<String, Inventory>) -> Result<()> {
    for (class, used) in p.usages() {
        if used == 0 {
            continue;
        }
        let capacity = new.get(&class).map(|i| i.capacity()).unwrap_or(0);
        if capacity < used {
            return Err(DbError::InventoryInUse { provider: p.uuid, class, used, capacity });
        }
    }
    Ok(())
}

/// Validates class names and inventory fields, and that custom classes exist.
pub async fn validate_inventories(store: &dyn Store, inv: &BTreeMap<String, Inventory>) -> Result<()> {
    for (class, i) in inv {
        if !classes::is_valid(class) {
            return Err(DbError::InvalidResourceClass(class.clone()));
        }
        i.validate(class)?;
        if !resource_class_exists(store, class).await? {
            return Err(DbError::UnknownResourceClass(class.clone()));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- allocations

/// What the caller expects of a consumer's generation before it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumerGeneration {
    /// No check (microversions before 1.28, and DELETE).
    Any,
    /// The consumer must not exist yet (`"consumer_generation": null`).
    New,
    /// The consumer must be at this generation.
    Is(u64),
}

/// The new allocations of one consumer: they replace all it had.
#[derive(Clone, Debug)]
pub struct ConsumerAllocations {
    pub consumer: Uuid,
    pub project_id: String,
    pub user_id: String,
    pub consumer_type: Option<String>,
    pub generation: ConsumerGeneration,
    /// Provider -> class -> amount; empty removes the consumer's allocations.
    pub allocations: BTreeMap<Uuid, BTreeMap<String, u64>>,
}

/// Replaces the allocations of one or more consumers in one transaction.
/// Checks consumer generations, inventories, units and capacity; loses no race
/// silently (a concurrent change of a touched provider makes it re-read and
/// re-check; a concurrent change of a consumer fails a generation check).
pub async fn replace_allocations(store: &dyn Store, requests: &[ConsumerAllocations]) -> Result<()> {
    reshape(store, &BTreeMap::new(), requests).await
}

/// Placement's reshaper: replaces the inventories of some providers (each
/// with the generation the caller read) and the allocations of some
/// consumers in one transaction, checking capacity on the result, so
/// inventory can move between providers while in use.
pub async fn reshape(
    store: &dyn Store,
    inventories: &BTreeMap<Uuid, (u64, BTreeMap<String, Inventory>)>,
    requests: &[ConsumerAllocations],
) -> Result<()> {
    let mut seen = BTreeSet::new();
    for r in requests {
        if !seen.insert(r.consumer) {
            return Err(DbError::InvalidAllocation(format!("consumer {} appears twice", r.consumer)));
        }
        for (rp, classes) in &r.allocations {
            if classes.is_empty() {
                return Err(DbError::InvalidAllocation(format!("no resources for provider {rp}")));
            }
            for (class, amount) in classes {
                if !classes::is_valid(class) {
                    return Err(DbError::InvalidResourceClass(class.clone()));
                }
                if *amount == 0 {
                    return Err(DbError::InvalidAllocation(format!("amount of {class} on {rp} must be at least 1")));
                }
            }
        }
    }
    for _ in 0..MAX_ATTEMPTS {
        let consumers = futures::future::try_join_all(requests.iter().map(|r| get_consumer(store, &r.consumer))).await?;
        let mut txn = Txn::new();
        let mut touched: BTreeSet<Uuid> = inventories.keys().copied().collect();
        for (req, current) in requests.iter().zip(&consumers) {
            check_consumer_generation(req, current.as_ref())?;
            if let Some(c) = current {
                touched.extend(c.value.allocations.keys().copied());
            }
            touched.extend(req.allocations.keys().copied());
        }
        let providers = futures::future::try_join_all(touched.iter().map(|u| get_provider(store, u))).await?;
        let mut providers: BTreeMap<Uuid, Versioned<Provider>> = touched
            .iter()
            .zip(providers)
            .filter_map(|(u, p)| p.map(|p| (*u, p)))
            .collect();
        let before: HashMap<Uuid, Provider> = providers.iter().map(|(u, p)| (*u, p.value.clone())).collect();
        for (rp, (generation, inv)) in inventories {
            let p = providers.get_mut(rp).ok_or(DbError::ProviderNotFound(*rp))?;
            if p.value.generation != *generation {
                return Err(DbError::ProviderGeneration(*rp));
            }
            p.value.inventories = inv.clone();
        }
        // The `alloc/` index: (provider, consumer) -> new share, `None` to delete.
        let mut index: BTreeMap<(Uuid, Uuid), Option<&BTreeMap<String, u64>>> = BTreeMap::new();
        for (req, current) in requests.iter().zip(&consumers) {
            if let Some(c) = current {
                for (rp, amounts) in &c.value.allocations {
                    if let Some(p) = providers.get_mut(rp) {
                        p.value.remove_usage(amounts);
                        p.value.consumers = p.value.consumers.saturating_sub(1);
                        if let Some(legacy) = &mut p.value.legacy_allocations {
                            legacy.remove(&req.consumer);
                        }
                    }
                    index.insert((*rp, req.consumer), None);
                }
            }
            for (rp, amounts) in &req.allocations {
                let p = providers.get_mut(rp).ok_or(DbError::ProviderNotFound(*rp))?;
                for (class, amount) in amounts {
                    let inv = p.value.inventories.get(class).ok_or_else(|| DbError::NoInventory { provider: *rp, class: class.clone() })?;
                    inv.check_amount(*rp, class, *amount)?;
                }
                p.value.add_usage(amounts);
                p.value.consumers += 1;
                index.insert((*rp, req.consumer), Some(amounts));
            }
        }
        // Capacity: every class whose usage went up, or whose inventory was replaced, must still fit.
        for (uuid, p) in &providers {
            let old = &before[uuid];
            let reshaped = inventories.contains_key(uuid);
            for (class, used) in p.value.usages() {
                if reshaped && used > 0 && !p.value.inventories.contains_key(&class) {
                    return Err(DbError::NoInventory { provider: *uuid, class });
                }
                if used > old.used(&class) || (reshaped && used > 0) {
                    let capacity = p.value.inventories.get(&class).map(|i| i.capacity()).unwrap_or(0);
                    if used > capacity {
                        let requested = used.saturating_sub(old.used(&class));
                        return Err(DbError::Capacity { provider: *uuid, class, requested, used: used - requested, capacity });
                    }
                }
            }
        }
        for (uuid, p) in &mut providers {
            if p.value != before[uuid] {
                p.value.generation += 1;
                txn = put_provider(txn.when(Compare::ModRevision(rp_key(uuid), p.mod_revision)), &p.value);
            }
        }
        for ((rp, consumer), share) in index {
            let key = alloc_key(&rp, &consumer);
            txn = txn.and_then(match share {
                Some(resources) => Op::put(key, encode(&ProviderAllocation { resources: resources.clone() })),
                None => Op::delete(key),
            });
        }
        for (req, current) in requests.iter().zip(&consumers) {
            let key = consumer_key(&req.consumer);
            txn = txn.when(match current {
                Some(c) => Compare::ModRevision(key.clone(), c.mod_revision),
                None => Compare::Absent(key.clone()),
            });
            if req.allocations.is_empty() {
                if current.is_some() {
                    txn = txn.and_then(Op::delete(key));
                }
            } else {
                let c = Consumer {
                    uuid: req.consumer,
                    project_id: req.project_id.clone(),
                    user_id: req.user_id.clone(),
                    consumer_type: req.consumer_type.clone().or_else(|| current.as_ref().and_then(|c| c.value.consumer_type.clone())),
                    generation: current.as_ref().map(|c| c.value.generation + 1).unwrap_or(1),
                    allocations: req.allocations.clone(),
                };
                txn = txn.and_then(Op::put(key, encode(&c)));
            }
        }
        if txn.success.is_empty() {
            return Ok(());
        }
        if store.txn(txn).await?.succeeded {
            return Ok(());
        }
    }
    Err(DbError::Contention)
}

fn check_consumer_generation(req: &ConsumerAllocations, current: Option<&Versioned<Consumer>>) -> Result<()> {
    let actual = current.map(|c| c.value.generation);
    let ok = match req.generation {
        ConsumerGeneration::Any => true,
        ConsumerGeneration::New => actual.is_none(),
        ConsumerGeneration::Is(g) => actual == Some(g),
    };
    if ok {
        return Ok(());
    }
    let show = |g: Option<u64>| g.map(|g| g.to_string()).unwrap_or_else(|| "None".into());
    let expected = match req.generation {
        ConsumerGeneration::Is(g) => g.to_string(),
        _ => "None".into(),
    };
    Err(DbError::ConsumerGeneration { consumer: req.consumer, expected, actual: show(actual) })
}

/// Removes every allocation of a consumer (no generation check, like Placement's DELETE).
/// `Ok(false)` when the consumer had none.
pub async fn delete_allocations(store: &dyn Store, consumer: &Uuid) -> Result<bool> {
    let Some(c) = get_consumer(store, consumer).await? else { return Ok(false) };
    let req = ConsumerAllocations {
        consumer: *consumer,
        project_id: c.value.project_id.clone(),
        user_id: c.value.user_id.clone(),
        consumer_type: None,
        generation: ConsumerGeneration::Any,
        allocations: BTreeMap::new(),
    };
    replace_allocations(store, &[req]).await?;
    Ok(true)
}

/// A record outside Placement that a claim also compares and rewrites in
/// its transaction (e.g. a server group's membership), so that claims which
/// must see each other's outcome serialize on it.
#[derive(Clone, Debug)]
pub struct Guard {
    pub key: String,
    /// Mod-revision the caller read the record at (0: the record was absent).
    pub mod_revision: i64,
    /// The record to write if the claim succeeds.
    pub value: Vec<u8>,
}

/// The outcome of a [`claim`] against cached providers.
#[derive(Debug)]
pub enum Claim {
    /// The allocations are written; the providers as stored now (same order
    /// as given) and the store revision of the write (the guard's new mod-revision).
    Claimed { providers: Vec<Versioned<Provider>>, revision: i64 },
    /// A provider or the guard changed since it was read; here is what is
    /// stored now (`None` where a provider or the guard is gone, and for the
    /// guard when none was given). Nothing was written.
    Stale { providers: Vec<Option<Versioned<Provider>>>, guard: Option<KeyValue> },
}

/// The scheduler's claim: one transaction that compares the cached
/// mod-revision of every provider it is given (so a provider changed by
/// anyone since it was read makes it fail) and of the guard, if any, and
/// writes the new usage totals of the providers, the consumer's share of each
/// (`alloc/`), the new consumer and the guard. On failure it returns the
/// providers and the guard as they are now, read in the same round trip, so
/// the caller can refresh its cache and move on without another read.
///
/// `providers` holds each touched provider as cached; `allocations` maps
/// provider uuid -> class -> amount. Fails with [`DbError::Capacity`] without
/// touching the store when the cached state already shows no room, and with
/// [`DbError::ConsumerGeneration`] when the consumer already exists.
pub async fn claim<P: std::borrow::Borrow<Versioned<Provider>>>(
    store: &dyn Store,
    consumer: &Consumer,
    providers: &[P],
    allocations: &BTreeMap<Uuid, BTreeMap<String, u64>>,
    guard: Option<&Guard>,
) -> Result<Claim> {
    if allocations.keys().any(|u| !providers.iter().any(|p| p.borrow().value.uuid == *u)) {
        return Err(DbError::InvalidAllocation("an allocation names a provider that was not given".into()));
    }
    let mut updated = Vec::with_capacity(providers.len());
    let ckey = consumer_key(&consumer.uuid);
    let mut txn = Txn::new().when(Compare::Absent(ckey.clone())).or_else(Op::get(ckey.clone()));
    for cached in providers {
        let cached = cached.borrow();
        let mut p = cached.value.clone();
        let key = rp_key(&p.uuid);
        txn = txn.when(Compare::ModRevision(key.clone(), cached.mod_revision)).or_else(Op::get(key));
        if let Some(amounts) = allocations.get(&p.uuid) {
            for (class, amount) in amounts {
                let inv = p.inventories.get(class).ok_or_else(|| DbError::NoInventory { provider: p.uuid, class: class.clone() })?;
                inv.check_amount(p.uuid, class, *amount)?;
                let used = p.used(class);
                if used + amount > inv.capacity() {
                    return Err(DbError::Capacity { provider: p.uuid, class: class.clone(), requested: *amount, used, capacity: inv.capacity() });
                }
            }
            p.add_usage(amounts);
            p.consumers += 1;
            p.generation += 1;
            txn = put_provider(txn, &p)
                .and_then(Op::put(alloc_key(&p.uuid, &consumer.uuid), encode_record(&ProviderAllocation { resources: amounts.clone() })));
        }
        updated.push(p);
    }
    if let Some(g) = guard {
        txn = txn
            .when(Compare::ModRevision(g.key.clone(), g.mod_revision))
            .and_then(Op::put(g.key.clone(), g.value.clone()))
            .or_else(Op::get(g.key.clone()));
    }
    let mut record = consumer.clone();
    record.generation = 1;
    record.allocations = allocations.clone();
    txn = txn.and_then(Op::put(ckey, encode_record(&record)));
    let r = store.txn(txn).await?;
    if r.succeeded {
        let revision = r.revision;
        let providers = updated
            .into_iter()
            .zip(providers)
            .map(|(mut value, cached)| {
                let cached = cached.borrow();
                if value.generation == cached.value.generation {
                    // Compared but not written: still at its old revision.
                    return Versioned { value, mod_revision: cached.mod_revision };
                }
                value.legacy_allocations = None;
                Versioned { value, mod_revision: revision }
            })
            .collect();
        return Ok(Claim::Claimed { providers, revision });
    }
    let mut results = r.results.into_iter();
    if let Some(OpResult::Get(Some(_))) = results.next() {
        return Err(DbError::ConsumerGeneration { consumer: consumer.uuid, expected: "None".into(), actual: "an existing consumer".into() });
    }
    let mut fresh = Vec::with_capacity(providers.len());
    for res in results.by_ref().take(providers.len()) {
        fresh.push(match res {
            OpResult::Get(Some(kv)) => Some(decode_provider_kv(&kv)?),
            _ => None,
        });
    }
    let guard = match results.next() {
        Some(OpResult::Get(kv)) => kv,
        _ => None,
    };
    Ok(Claim::Stale { providers: fresh, guard })
}

// ---------------------------------------------------------------- provider trees from hosts

/// One provider of a host's tree as the host reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderSpec {
    pub uuid: Uuid,
    /// Unique across the whole site (e.g. `host1`, `host1_NUMA0`, `host1_PF_ens1f0`).
    pub name: String,
    /// Resource class -> inventory.
    #[serde(default)]
    pub inventories: BTreeMap<String, Inventory>,
    #[serde(default)]
    pub traits: BTreeSet<String>,
    #[serde(default)]
    pub children: Vec<ProviderSpec>,
}

/// A host's provider tree: the host is the root; NUMA nodes, SR-IOV PFs and the like are children.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderTree {
    pub root: ProviderSpec,
}

impl ProviderTree {
    /// Every provider of the tree with its parent, parents before children.
    pub fn flatten(&self) -> Vec<(&ProviderSpec, Option<Uuid>)> {
        let mut out = Vec::new();
        let mut queue = std::collections::VecDeque::from([(&self.root, None)]);
        while let Some((spec, parent)) = queue.pop_front() {
            out.push((spec, parent));
            for c in &spec.children {
                queue.push_back((c, Some(spec.uuid)));
            }
        }
        out
    }
}

/// What [`sync_provider_tree`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
}

/// Makes the stored tree of a host match `tree`, in one transaction:
/// creates missing providers, updates names, inventories and traits that
/// differ (keeping allocations), deletes providers of the stored tree that the
/// host no longer reports, and registers custom classes and unknown traits it
/// uses. Idempotent: an unchanged tree writes nothing. Refuses, without
/// writing anything, to shrink or drop an inventory below its current usage
/// ([`DbError::InventoryInUse`]) and to drop a provider that has allocations.
pub async fn sync_provider_tree(store: &dyn Store, tree: &ProviderTree) -> Result<SyncReport> {
    let flat = tree.flatten();
    let mut uuids = BTreeSet::new();
    let mut names = BTreeSet::new();
    let mut all_traits = BTreeSet::new();
    let mut custom_classes = BTreeSet::new();
    for (spec, _) in &flat {
        validate_provider_name(&spec.name)?;
        if !uuids.insert(spec.uuid) {
            return Err(DbError::InvalidTree(format!("uuid {} appears twice", spec.uuid)));
        }
        if !names.insert(spec.name.clone()) {
            return Err(DbError::InvalidTree(format!("name {} appears twice", spec.name)));
        }
        for (class, inv) in &spec.inventories {
            if !classes::is_valid(class) {
                return Err(DbError::InvalidResourceClass(class.clone()));
            }
            inv.validate(class)?;
            if !classes::is_standard(class) {
                custom_classes.insert(class.clone());
            }
        }
        for t in &spec.traits {
            if !traits::is_well_formed(t) {
                return Err(DbError::InvalidTrait(t.clone()));
            }
            if !traits::is_standard(t) {
                all_traits.insert(t.clone());
            }
        }
    }
    let root = tree.root.uuid;
    'attempt: for _ in 0..MAX_ATTEMPTS {
        let mut report = SyncReport::default();
        let mut txn = Txn::new();
        // Names and traits first: they are registered if absent.
        for class in &custom_classes {
            let key = rc_key(class);
            if store.get(&key).await?.is_none() {
                txn = txn.when(Compare::Absent(key.clone())).and_then(Op::put(key, encode(&Named { name: class.clone() })));
            }
        }
        for t in &all_traits {
            let key = trait_key(t);
            if store.get(&key).await?.is_none() {
                txn = txn.when(Compare::Absent(key.clone())).and_then(Op::put(key, encode(&Named { name: t.clone() })));
            }
        }
        let stored_tree = get_tree(store, &root).await?;
        let stored: HashMap<Uuid, &Versioned<Provider>> = stored_tree.iter().map(|p| (p.value.uuid, p)).collect();
        if let Some(r) = stored.get(&root) {
            if r.value.parent.is_some() {
                return Err(DbError::InvalidTree(format!("provider {root} is a child in another tree")));
            }
        }
        for (spec, parent) in &flat {
            let children: BTreeSet<Uuid> = spec.children.iter().map(|c| c.uuid).collect();
            match stored.get(&spec.uuid) {
                Some(cur) => {
                    let old = &cur.value;
                    check_inventory_change(old, &spec.inventories)?;
                    let mut p = old.clone();
                    p.inventories = spec.inventories.clone();
                    p.traits = spec.traits.clone();
                    p.children = children;
                    p.parent = *parent;
                    if p.name != spec.name {
                        let nk = rp_name_key(&spec.name);
                        txn = txn
                            .when(Compare::Absent(nk.clone()))
                            .and_then(Op::delete(rp_name_key(&p.name)))
                            .and_then(Op::put(nk, encode(&NameOwner { uuid: spec.uuid })));
                        p.name = spec.name.clone();
                    }
                    txn = txn.when(Compare::ModRevision(rp_key(&spec.uuid), cur.mod_revision));
                    if p != *old {
                        p.generation += 1;
                        txn = put_provider(txn, &p);
                        report.updated += 1;
                    } else {
                        report.unchanged += 1;
                    }
                }
                None => {
                    // Not in this tree: it must not exist anywhere else either.
                    if let Some(other) = get_provider(store, &spec.uuid).await? {
                        return Err(DbError::InvalidTree(format!(
                            "provider {} already belongs to the tree of {}",
                            spec.uuid, other.value.root
                        )));
                    }
                    let mut p = Provider::new(spec.uuid, spec.name.clone(), *parent, root);
                    p.inventories = spec.inventories.clone();
                    p.traits = spec.traits.clone();
                    p.children = children;
                    let key = rp_key(&spec.uuid);
                    let nk = rp_name_key(&spec.name);
                    txn = put_provider(txn.when(Compare::Absent(key)).when(Compare::Absent(nk.clone())), &p)
                        .and_then(Op::put(nk.clone(), encode(&NameOwner { uuid: spec.uuid })))
                        .or_else(Op::get(nk));
                    report.created += 1;
                }
            }
        }
        for p in &stored_tree {
            if uuids.contains(&p.value.uuid) {
                continue;
            }
            if p.value.has_allocations() {
                return Err(DbError::ProviderInUse(p.value.uuid));
            }
            let key = rp_key(&p.value.uuid);
            txn = txn
                .when(Compare::ModRevision(key.clone(), p.mod_revision))
                .and_then(Op::delete(key))
                .and_then(Op::delete(rp_name_key(&p.value.name)));
            report.deleted += 1;
        }
        if txn.success.is_empty() {
            return Ok(report);
        }
        let r = store.txn(txn).await?;
        if r.succeeded {
            return Ok(report);
        }
        for res in &r.results {
            if let OpResult::Get(Some(kv)) = res {
                if kv.key.starts_with(RP_NAME_PREFIX) {
                    let owner: NameOwner = decode(&kv.key, &kv.value)?;
                    if !uuids.contains(&owner.uuid) {
                        return Err(DbError::DuplicateName(kv.key[RP_NAME_PREFIX.len()..].to_string()));
                    }
                }
            }
        }
        continue 'attempt;
    }
    Err(DbError::Contention)
}
