//! kvstore: a key/value REST service (warp) with a read-through moka cache in front of
//! MySQL. The read path is `api/keys.rs` (handler) and `cache.rs` (cache); the write path
//! is `api/keys.rs` and `store/mod.rs`. See README.md for the why.

pub mod api;
pub mod app;
pub mod cache;
pub mod config;
pub mod error;
pub mod import;
pub mod logging;
pub mod metrics;
pub mod refusal;
pub mod stall;
pub mod store;
pub mod time;
