//! The sweep every node runs: it expires leases and promotes due jobs of queues nobody is
//! leasing from (a lease does both for its own queue first), moves dead letters to their
//! dead-letter queues, and trims topics by age. Every step is a script that is harmless
//! to run twice, so several nodes sweeping the same queue at once only repeat work.

use std::time::Duration;

use super::RedisEngine;

/// Topics are trimmed by age once every this many sweeps (age retention is coarse).
const TOPIC_SWEEP_EVERY: u32 = 10;

impl RedisEngine {
    /// Sweeps every `sweep_interval` until shutdown. A failure (Redis unreachable) is
    /// logged once per run of failures, and the next tick tries again.
    pub(super) async fn sweep(self) {
        let mut ticks = tokio::time::interval(self.inner.config.sweep_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut round: u32 = 0;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            round = round.wrapping_add(1);
            match self.sweep_once(round % TOPIC_SWEEP_EVERY == 0).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("redis sweep works again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "redis sweep failed; retrying every {:?}", self.inner.config.sweep_interval);
                }
                Err(_) => {}
            }
        }
    }

    /// One sweep over every queue (and every topic when `topics`).
    async fn sweep_once(&self, topics: bool) -> Result<(), crate::broker::BrokerError> {
        let queues = &self.inner.queues;
        for name in queues.names().await? {
            if self.inner.shutdown.is_cancelled() {
                return Ok(());
            }
            match queues.sweep(&name).await {
                Ok(_) => {}
                // Deleted since the catalog was read.
                Err(crate::broker::BrokerError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
            queues.move_dead_letters(&name).await?;
        }
        if topics {
            for name in self.inner.topics.names().await? {
                match self.inner.topics.sweep(&name).await {
                    Ok(()) | Err(crate::broker::BrokerError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// How long a long poll sleeps before looking again when no wake-up comes: the wake-up
/// is the fast path, this bounds what a lost one costs.
pub(super) const POLL: Duration = super::wake::POLL_INTERVAL;
