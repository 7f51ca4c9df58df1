//! What nt's coordinator, worker and client share: the object store and its
//! layout, authentication, TLS and logging. No libtorch.

pub mod auth;
pub mod layout;
pub mod storage;
pub mod telemetry;
pub mod tls;

pub use storage::{ObjectInfo, Storage, StorageArgs};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
