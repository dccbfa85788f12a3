//! Errors of host enrolment and the agent API.

use axum::http::StatusCode;

use crate::error::{ApiError, Dialect};

/// What can go wrong with hosts, join tokens and the agent API.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("The join token is not valid.")]
    TokenUnknown,
    #[error("The join token expired at {0}; create a new one.")]
    TokenExpired(String),
    #[error("The join token was already used (by host {host_id} at {at}); a join token works once, create a new one.")]
    TokenUsed { host_id: String, at: String },
    #[error("The join token is restricted to the host named '{0}'.")]
    TokenForOtherHost(String),
    #[error("A host named '{0}' is already enrolled; to enrol it again, create a join token restricted to it (--host {0}).")]
    NameTaken(String),
    #[error("Invalid request: {0}")]
    Invalid(String),
    #[error("Host {0} could not be found.")]
    NotFound(String),
    #[error("The host's records changed concurrently too often; try again.")]
    Contention,
    #[error("Placement refused the host's resource providers: {0}")]
    Placement(#[from] crate::placement::db::DbError),
    #[error("Store failure: {0}")]
    Store(#[from] store::StoreError),
}

impl HostsError {
    /// The API error for this failure in the given dialect.
    pub fn to_api(self, dialect: Dialect) -> ApiError {
        let status = match &self {
            HostsError::TokenUnknown | HostsError::TokenExpired(_) => StatusCode::UNAUTHORIZED,
            HostsError::TokenUsed { .. } | HostsError::NameTaken(_) | HostsError::Contention => StatusCode::CONFLICT,
            HostsError::TokenForOtherHost(_) => StatusCode::FORBIDDEN,
            HostsError::Invalid(_) => StatusCode::BAD_REQUEST,
            HostsError::NotFound(_) => StatusCode::NOT_FOUND,
            HostsError::Placement(e) => {
                use crate::placement::db::DbError as D;
                match e {
                    D::Store(_) => {
                        let HostsError::Placement(D::Store(e)) = self else { unreachable!() };
                        return ApiError::from_store(dialect, e);
                    }
                    D::InventoryInUse { .. }
                    | D::ProviderInUse(_)
                    | D::ProviderHasChildren(_)
                    | D::ProviderGeneration(_)
                    | D::DuplicateName(_)
                    | D::DuplicateUuid(_)
                    | D::Contention => StatusCode::CONFLICT,
                    D::InvalidResourceClass(_) | D::InvalidTrait(_) | D::InvalidInventory { .. } | D::InvalidTree(_) => {
                        StatusCode::BAD_REQUEST
                    }
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                }
            }
            HostsError::Store(_) => {
                let HostsError::Store(e) = self else { unreachable!() };
                return ApiError::from_store(dialect, e);
            }
        };
        ApiError::new(dialect, status, self.to_string())
    }
}

impl From<HostsError> for ApiError {
    fn from(e: HostsError) -> ApiError {
        e.to_api(Dialect::Plain)
    }
}
