//! Server group membership as the scheduler records it:
//! `/scheduler/server-groups/<id>`, member (consumer) -> host.
//!
//! Every claim for a member of a group compares and rewrites its group's
//! record in the same transaction as the allocations
//! ([`crate::placement::db::claim`] with a guard). Two schedulers placing
//! members of one group at once therefore cannot both decide on the same
//! membership: the second transaction fails, the scheduler takes the record
//! the failed transaction returned, and places again knowing where the first
//! member went. Without it, two anti-affinity members could both land on a
//! host that neither saw the other take.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use store::record::{decode, encode, Record};
use store::{Compare, KeyValue, Op, Store, Txn};
use uuid::Uuid;

use crate::placement::db::DbError;

/// Key prefix of server group records.
pub const GROUP_PREFIX: &str = "/scheduler/server-groups/";

/// How often [`remove_member`] retries after losing a race.
const MAX_ATTEMPTS: usize = 64;

/// Key of a server group's record.
pub fn group_key(id: &Uuid) -> String {
    format!("{GROUP_PREFIX}{id}")
}

/// The members of a server group and where each runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMembers {
    /// Member (the server's consumer uuid) -> host (root provider uuid).
    pub members: BTreeMap<Uuid, Uuid>,
}

impl Record for GroupMembers {
    const VERSION: u32 = 1;
}

/// A group's record as read, with the mod-revision to compare (0: no record yet).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupState {
    pub members: GroupMembers,
    pub mod_revision: i64,
}

impl GroupState {
    /// The state a read (or a failed claim's read) of the record gives.
    pub fn from_kv(kv: Option<&KeyValue>) -> Result<GroupState, DbError> {
        match kv {
            Some(kv) => Ok(GroupState { members: decode(&kv.key, &kv.value)?, mod_revision: kv.mod_revision }),
            None => Ok(GroupState::default()),
        }
    }
}

/// Reads a group's membership.
pub async fn read(store: &dyn Store, id: &Uuid) -> Result<GroupState, DbError> {
    GroupState::from_kv(store.get(&group_key(id)).await?.as_ref())
}

/// Removes a member (its server was deleted or left the group); `Ok(false)`
/// if it was not one. The record goes when its last member does.
pub async fn remove_member(store: &dyn Store, id: &Uuid, member: &Uuid) -> Result<bool, DbError> {
    let key = group_key(id);
    for _ in 0..MAX_ATTEMPTS {
        let mut state = read(store, id).await?;
        if state.members.members.remove(member).is_none() {
            return Ok(false);
        }
        let txn = Txn::new().when(Compare::ModRevision(key.clone(), state.mod_revision));
        let txn = if state.members.members.is_empty() {
            txn.and_then(Op::delete(key.clone()))
        } else {
            txn.and_then(Op::put(key.clone(), encode(&state.members)))
        };
        if store.txn(txn).await?.succeeded {
            return Ok(true);
        }
    }
    Err(DbError::Contention)
}
