//! Redrive on the Redis engine.

use crate::broker::auth::Access;
use crate::broker::domain::error::BrokerError;
use crate::broker::engine::RedriveOutcome;

use super::RedisEngine;

impl RedisEngine {
    /// Returns dead letters to the queues they came from.
    pub(super) async fn redrive_dead_letters(
        &self,
        _dead_letter_queue: &str,
        _ids: &[String],
        _rate_per_second: u32,
        _max_jobs: u64,
        _access: &Access,
    ) -> Result<RedriveOutcome, BrokerError> {
        Err(BrokerError::FailedPrecondition("WIP".into()))
    }
}
