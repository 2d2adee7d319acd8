//! The domain: what queues, jobs, topics and messages are and how they change. Every
//! operation takes `now` as an argument, so the state machines are unit-tested without
//! sleeping; nothing here knows tonic, protobuf, HTTP, locks or files.

pub(super) mod dedup;
pub(super) mod error;
pub(super) mod limits;
pub(super) mod names;
pub(super) mod observe;
pub(super) mod queue;
pub(super) mod rate;
pub(super) mod schedule;
pub(super) mod schema;
pub(super) mod time;
pub(super) mod topic;
