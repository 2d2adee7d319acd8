//! The Redis engine: queues and topics kept in Redis (a standalone server or a Redis
//! Cluster), so several Sluice nodes serve the same state and none holds any of it.

pub(crate) mod binding;
pub(crate) mod conn;
pub(crate) mod keys;
pub(crate) mod queue;
pub(crate) mod replication;
pub(crate) mod subscription;
pub(crate) mod topic;
pub(crate) mod wake;
