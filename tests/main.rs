//! The one integration test binary: real Postgres and Redis servers owned by the harness.

mod cli;
mod cluster;
mod cluster_sidecar;
mod deleter;
mod deploy;
mod dry_run;
mod e2e;
mod exodrive;
mod faults;
mod identifiers;
mod invalidate;
mod memory;
mod notify;
mod observability;
mod partitions;
mod privilege;
mod reload;
mod replication;
mod sidecar;
mod slots;
mod support;
mod targets;
mod tls;
