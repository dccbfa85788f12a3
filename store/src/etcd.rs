//! etcd backend (to be written).

/// The etcd store.
pub struct EtcdStore;

impl EtcdStore {
    /// Connects to an etcd cluster.
    pub async fn connect(_endpoints: &[String]) -> crate::Result<Self> {
        Err(crate::StoreError::Unavailable("etcd store not written yet".into()))
    }
}

#[async_trait::async_trait]
impl crate::Store for EtcdStore {
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
