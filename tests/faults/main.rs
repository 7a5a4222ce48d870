//! Fault-injection tests (issue 5): the service killed mid-write, the database killed and
//! frozen under load, SIGTERM under load, two replicas on one database, overload, slow
//! clients, and secrets kept out of the logs. They run one at a time (they measure timings)
//! and every process they start is killed when its handle drops.
//!
//! `cargo test --test faults -- --nocapture` prints the measured figures (lines starting
//! with `[faults::`).

#[path = "../it/common/mod.rs"]
mod common;
mod support;

mod crash;
mod database;
mod overload;
mod replicas;
mod secrets;
mod shutdown;
mod slow_clients;
mod tls;
