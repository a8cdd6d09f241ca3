//! Where changes come from: the logical replication client and the publication/slot setup,
//! whether a reconnected server still holds our history, or (notify mode) the trigger-filled
//! outbox.

pub mod connect;
pub mod drift;
pub mod history;
pub mod invalidate;
pub mod notify;
pub mod replication;
pub mod setup;
pub mod teardown;
