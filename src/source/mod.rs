//! Where changes come from: the logical replication client and the publication/slot setup.

pub mod replication;
pub mod setup;
