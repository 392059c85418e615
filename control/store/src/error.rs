//! Store errors.

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No endpoint answered in time. Retrying later may succeed.
    #[error("etcd unavailable: no endpoint answered (tried {endpoints}): {detail}")]
    Unavailable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// What the client said.
        detail: String,
    },
    /// The configuration cannot work (bad endpoint URL, unreadable certificate, ...).
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The lease does not exist (it expired or was revoked).
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(i64),
    /// etcd refused or failed the request.
    #[error("etcd request {op} failed: {detail}")]
    Request {
        /// The operation.
        op: &'static str,
        /// etcd's message.
        detail: String,
    },
    /// A key or value that is not UTF-8 where text is required.
    #[error("etcd returned a non UTF-8 {what}")]
    NotUtf8 {
        /// "key" or "value".
        what: &'static str,
    },
}

impl StoreError {
    /// Whether the failure may go away by itself (store down, network, timeouts).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}
