//! Embedded single-node store (to be written).

use std::path::Path;

/// The embedded store.
pub struct EmbeddedStore;

impl EmbeddedStore {
    /// Opens (or creates) the store file.
    pub fn open(_path: &Path) -> crate::Result<Self> {
        Err(crate::StoreError::Unavailable("embedded store not written yet".into()))
    }
}

#[async_trait::async_trait]
impl crate::Store for EmbeddedStore {
    async fn get(&self, _: &str) -> crate::Result<Option<crate::KeyValue>> { Err(crate::StoreError::Unavailable("not written".into())) }
    async fn range(&self, _: &str) -> crate::Result<crate::RangeResponse> { Err(crate::StoreError::Unavailable("not written".into())) }
    async fn txn(&self, _: crate::Txn) -> crate::Result<crate::TxnResponse> { Err(crate::StoreError::Unavailable("not written".into())) }
    async fn watch(&self, _: &str, _: i64) -> crate::Result<crate::WatchStream> { Err(crate::StoreError::Unavailable("not written".into())) }
    async fn lease_grant(&self, _: i64) -> crate::Result<crate::LeaseId> { Err(crate::StoreError::Unavailable("not written".into())) }
    async fn lease_keep_alive(&self, _: crate::LeaseId) -> crate::Result<i64> { Err(crate::StoreError::Unavailable("not written".into())) }
    async fn lease_revoke(&self, _: crate::LeaseId) -> crate::Result<()> { Err(crate::StoreError::Unavailable("not written".into())) }
    async fn compact(&self, _: i64) -> crate::Result<()> { Err(crate::StoreError::Unavailable("not written".into())) }
    async fn revision(&self) -> crate::Result<i64> { Err(crate::StoreError::Unavailable("not written".into())) }
}
