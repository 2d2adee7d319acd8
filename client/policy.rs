//! A typed builder of a queue policy for [`Client::create_queue`](super::Client::create_queue)
//! and [`Client::update_queue`](super::Client::update_queue).

use std::time::Duration;

use crate::pb;

/// A queue policy. Fields left alone are unset: a new queue takes their defaults, an
/// update keeps their current values.
///
/// ```
/// use sluice::client::Policy;
/// // At most 10 emails a second (bursts of 20), 5 being sent at once.
/// let policy = Policy::new().rate_limit(10, 20).max_in_flight(5);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Policy(pb::QueuePolicy);

impl Policy {
    /// A policy that sets nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Default lease duration (whole milliseconds).
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.0.visibility_timeout_ms = timeout.as_millis().try_into().unwrap_or(u64::MAX);
        self
    }

    /// Deliveries before a job is dead-lettered.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.0.max_attempts = attempts;
        self
    }

    /// The queue that receives dead jobs.
    pub fn dead_letter_queue(mut self, queue: impl Into<String>) -> Self {
        self.0.dead_letter_queue = queue.into();
        self
    }

    /// Most live jobs.
    pub fn max_depth(mut self, jobs: u64) -> Self {
        self.0.max_depth = jobs;
        self
    }

    /// Hands out at most `per_second` jobs a second, up to `burst` at once after a quiet
    /// spell (0: `per_second`).
    pub fn rate_limit(mut self, per_second: u32, burst: u32) -> Self {
        self.0.rate_limit = Some(pb::RateLimit { per_second, burst });
        self
    }

    /// Removes the rate limit (on update).
    pub fn no_rate_limit(self) -> Self {
        self.rate_limit(0, 0)
    }

    /// Leases at most `jobs` at once, by all consumers together (0 removes the limit).
    pub fn max_in_flight(mut self, jobs: u32) -> Self {
        self.0.max_in_flight = Some(jobs);
        self
    }
}

impl From<Policy> for pb::QueuePolicy {
    fn from(policy: Policy) -> Self {
        policy.0
    }
}
