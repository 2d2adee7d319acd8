//! Timing hooks: how the domain reports durations to whatever measures them.
//!
//! The domain only knows this trait. The HTTP module implements it with Prometheus
//! histograms and installs it on the broker, so the queue and topic code stays free of any
//! metrics library and pays one atomic load per event when nothing is installed.

use std::any::Any;
use std::time::Duration;

/// Receives durations measured by the broker. Implementations must be cheap and must not
/// block: they are called on the ack and delivery paths (never under a queue or topic lock).
pub trait Observer: Any + Send + Sync {
    /// A job of `queue` was acked `lease_to_ack` after the delivery was leased (the time a
    /// worker spent on it, extensions included). Repeat acks are not reported.
    fn job_acked(&self, queue: &str, lease_to_ack: Duration);

    /// Messages of `topic` were handed to a subscriber's transport, each `latency` after it
    /// was published (one call per run of messages of the same topic in a batch). Replays
    /// of messages published before the subscription opened are not reported: their age
    /// says nothing about delivery speed.
    fn messages_delivered(&self, topic: &str, latencies: &mut dyn Iterator<Item = Duration>);

    /// `queue` was deleted: whatever was kept for it can go (a new queue of the same name
    /// starts afresh).
    fn queue_deleted(&self, queue: &str);

    /// `topic` was deleted, as [`Observer::queue_deleted`].
    fn topic_deleted(&self, topic: &str);
}
