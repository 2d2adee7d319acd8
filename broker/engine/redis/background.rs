//! The sweep every node runs: it expires leases and promotes due jobs of queues nobody is
//! leasing from (a lease does both for its own queue first), moves dead letters to their
//! dead-letter queues, and trims topics by age. Every step is a script that is harmless
//! to run twice, so several nodes sweeping the same queue at once only repeat work.

use std::time::Duration;

use super::RedisEngine;

/// Every this many sweeps, the catalog of queues is read again, topics are trimmed by age
/// (age retention is coarse), the bindings are read again (a binding made on another
/// node), and redrives a stopped node left half done are finished.
const SLOW_SWEEP_EVERY: u32 = 10;

impl RedisEngine {
    /// Sweeps every `sweep_interval` until shutdown. A failure (Redis unreachable) is
    /// logged once per run of failures, and the next tick tries again.
    pub(super) async fn sweep(self) {
        let mut ticks = tokio::time::interval(self.inner.config.sweep_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut round: u32 = 0;
        let mut evicting = false;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            round = round.wrapping_add(1);
            let slow = round % SLOW_SWEEP_EVERY == 1;
            if slow {
                evicting = self.watch_eviction(evicting).await;
            }
            match super::conn::background(self.sweep_once(slow)).await {
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

    /// Looks again at the primaries' eviction policy (checked at start, but it can be
    /// changed at run time, and a promoted replica brings its own): an error in the log
    /// while any evicts keys, once each time that starts, and a line when it stops.
    /// Returns whether one evicts now (`was`: whether one did at the last look).
    async fn watch_eviction(&self, was: bool) -> bool {
        let mut conn = self.inner.conn.clone();
        let Ok(policies) = super::conn::background(conn.eviction_policies()).await else {
            // Redis unreachable: the sweep says so.
            return was;
        };
        let now = !policies.is_empty();
        if now && !was {
            tracing::error!("{}", super::conn::evicting_refusal(&policies));
        } else if was && !now {
            tracing::info!("redis maxmemory-policy is noeviction again on every primary");
        }
        now
    }

    /// One sweep over every queue (and the slow part when `slow`).
    async fn sweep_once(&self, slow: bool) -> Result<(), crate::broker::BrokerError> {
        let queues = &self.inner.queues;
        if slow {
            self.refresh_bindings().await?;
        }
        let bindings: Vec<(String, Vec<crate::broker::domain::names::Pattern>)> =
            crate::broker::sync::lock(&self.inner.bindings)
                .iter()
                .map(|(q, p)| (q.clone(), p.clone()))
                .collect();
        for (queue, patterns) in bindings {
            match super::binding::pump_bindings(queues, &self.inner.topics, &queue, &patterns).await
            {
                Ok(_) | Err(crate::broker::BrokerError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // The catalog is read on slow sweeps only: a queue another node made since is
        // swept by that node meanwhile (and a lease sweeps its own queue first).
        let stale = crate::broker::sync::lock(&self.inner.catalog).is_none();
        if slow || stale {
            let names = queues.names().await?;
            *crate::broker::sync::lock(&self.inner.catalog) = Some(names);
        }
        let mut names: std::collections::BTreeSet<String> =
            crate::broker::sync::lock(&self.inner.catalog)
                .iter()
                .flatten()
                .cloned()
                .collect();
        names.extend(crate::broker::sync::lock(&self.inner.known).iter().cloned());
        for name in names {
            if self.inner.shutdown.is_cancelled() {
                return Ok(());
            }
            let swept = match queues.sweep(&name).await {
                Ok(swept) => swept,
                // Deleted since the catalog was read.
                Err(crate::broker::BrokerError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            if swept.dead_letters > 0 {
                queues.move_dead_letters(&name).await?;
            }
            if slow {
                queues.resume_redrives(&name).await?;
            }
        }
        self.run_due_schedules().await?;
        if slow {
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
