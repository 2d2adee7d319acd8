//! Engines: where queues and topics live. `local` keeps them in this process (memory, or
//! memory plus the write-ahead log); `redis` keeps them in Redis (standalone or cluster),
//! so several stateless nodes serve the same queues and topics.

pub(crate) mod local;
#[allow(dead_code)] // Wired in by the engine interface; removed once it is.
pub(crate) mod redis;
