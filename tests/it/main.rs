//! Integration tests against a real MySQL-protocol server (see `common`).

mod common;

mod api;
mod auth;
mod batch;
mod cache;
mod coalescing;
mod conditional;
mod consistency;
mod listing;
mod process;
mod seed_and_counter;
mod ttl;
