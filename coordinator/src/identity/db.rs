//! Reading and writing identity records, every write a compare-and-swap.

use store::record::{decode, encode, Record};
use store::{Compare, Op, Store, StoreError, Txn};

/// Errors of identity storage.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("Conflict: {0}")]
    Conflict(String),
    #[error("Concurrent update, try again")]
    Concurrent,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A record and the mod-revision it was read at.
pub struct Versioned<T> {
    pub value: T,
    pub rev: i64,
}

/// Reads one record.
pub async fn get<T: Record>(store: &dyn Store, key: &str) -> Result<Option<Versioned<T>>, StoreError> {
    match store.get(key).await? {
        Some(kv) => Ok(Some(Versioned { value: decode(key, &kv.value)?, rev: kv.mod_revision })),
        None => Ok(None),
    }
}

/// Reads every record under a prefix.
pub async fn list<T: Record>(store: &dyn Store, prefix: &str) -> Result<Vec<T>, StoreError> {
    let r = store.range(prefix).await?;
    r.kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
}

/// Resolves a unique-name index entry to the id it points at.
pub async fn lookup(store: &dyn Store, name_key: &str) -> Result<Option<String>, StoreError> {
    Ok(store.get(name_key).await?.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

/// Creates a record and its unique-name entry; `Conflict` if either exists.
pub async fn create<T: Record>(store: &dyn Store, key: &str, value: &T, name_key: Option<(&str, &str)>, what: &str) -> Result<(), DbError> {
    let mut txn = Txn::new().when(Compare::Absent(key.into())).and_then(Op::put(key, encode(value)));
    if let Some((nk, id)) = name_key {
        txn = txn.when(Compare::Absent(nk.into())).and_then(Op::put(nk, id.as_bytes().to_vec()));
    }
    if store.txn(txn).await?.succeeded {
        Ok(())
    } else {
        Err(DbError::Conflict(format!("Conflict occurred attempting to store {what}: a {what} with that name already exists.")))
    }
}

/// Replaces a record read at `rev`, moving its unique-name entry when the name changed.
pub async fn update<T: Record>(
    store: &dyn Store,
    key: &str,
    rev: i64,
    value: &T,
    rename: Option<(&str, &str, &str)>,
    what: &str,
) -> Result<(), DbError> {
    let mut txn = Txn::new().when(Compare::ModRevision(key.into(), rev)).and_then(Op::put(key, encode(value)));
    let mut name_taken = None;
    if let Some((old, new, id)) = rename {
        if old != new {
            txn = txn.when(Compare::Absent(new.into())).and_then(Op::delete(old)).and_then(Op::put(new, id.as_bytes().to_vec()));
            name_taken = Some(new);
        }
    }
    if store.txn(txn).await?.succeeded {
        return Ok(());
    }
    if let Some(new) = name_taken {
        if store.get(new).await?.is_some() {
            return Err(DbError::Conflict(format!("Conflict occurred attempting to store {what}: a {what} with that name already exists.")));
        }
    }
    Err(DbError::Concurrent)
}

/// Deletes a record read at `rev` along with other keys and prefixes, in one transaction.
pub async fn delete(store: &dyn Store, key: &str, rev: i64, extra: Vec<Op>) -> Result<(), DbError> {
    let mut txn = Txn::new().when(Compare::ModRevision(key.into(), rev)).and_then(Op::delete(key));
    for op in extra {
        txn = txn.and_then(op);
    }
    if store.txn(txn).await?.succeeded {
        Ok(())
    } else {
        Err(DbError::Concurrent)
    }
}
