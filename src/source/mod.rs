//! Where changes come from: the logical replication client and the publication/slot setup,
//! or (notify mode) the trigger-filled outbox.

pub mod connect;
pub mod drift;
pub mod invalidate;
pub mod notify;
pub mod replication;
pub mod setup;
