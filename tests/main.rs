//! The one integration test binary: real Postgres and Redis servers owned by the harness.

mod cli;
mod deleter;
mod deploy;
mod e2e;
mod exodrive;
mod faults;
mod invalidate;
mod memory;
mod notify;
mod privilege;
mod replication;
mod sidecar;
mod slots;
mod support;
mod tls;
