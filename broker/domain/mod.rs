//! The domain: what queues, jobs, topics and messages are and how they change. Every
//! operation takes `now` as an argument, so the state machines are unit-tested without
//! sleeping; nothing here knows tonic, protobuf, HTTP, locks or files.

pub mod dedup;
pub mod error;
pub mod limits;
pub mod names;
pub mod observe;
pub mod queue;
pub mod rate;
pub mod time;
pub mod topic;
