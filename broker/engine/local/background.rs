//! The broker's background tasks: the expiry ticker, the compactor and the storage
//! failure watch. Each ends on the shutdown token.

use std::sync::Arc;

use crate::broker::domain::time::now_ms;
use crate::broker::store::Journal;
use crate::broker::sync::lock;

use super::{Broker, SharedQueue, SharedTopic};

impl Broker {
    /// Waits for the log to fail, then shows only what is durable: the state is reloaded
    /// from disk and swapped in before the refused requests get their answer, so nothing
    /// refused is ever visible after the refusal (see [`Journal::settle`]).
    pub(in crate::broker) async fn run_failure_watch(self, journal: Arc<Journal>) {
        tokio::select! {
            _ = self.inner.shutdown.cancelled() => {
                // Stopping: nobody is left to show anything to.
                journal.settle();
                return;
            }
            _ = journal.failed() => {}
        }
        let broker = self.clone();
        let reloading = journal.clone();
        let outcome =
            tokio::task::spawn_blocking(move || broker.revert_to_durable(&reloading)).await;
        match outcome {
            Ok(Ok(())) => tracing::warn!(
                "after the storage failure the broker shows the state that is durable on disk (read-only)"
            ),
            Ok(Err(e)) => tracing::error!(
                error = %e,
                "after the storage failure the durable state could not be reloaded; changes that were refused may still show until a restart"
            ),
            Err(e) => tracing::error!(error = %e, "reloading the durable state panicked"),
        }
        journal.settle();
    }

    pub(in crate::broker) async fn run_compactor(self, journal: Arc<Journal>) {
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = journal.compaction_due() => {}
            }
            if !journal.compaction_still_due() {
                continue;
            }
            let broker = self.clone();
            match tokio::task::spawn_blocking(move || broker.compact()).await {
                Ok(Ok(bytes)) => {
                    tracing::info!(snapshot_bytes = bytes, "write-ahead log compacted")
                }
                // The log itself is intact (nothing was deleted), so this is not fail-stop;
                // the next segment roll tries again.
                Ok(Err(e)) => tracing::error!(error = %e, "write-ahead log compaction failed"),
                Err(e) => tracing::error!(error = %e, "write-ahead log compaction panicked"),
            }
        }
    }

    pub(in crate::broker) async fn run_ticker(self) {
        let mut interval = tokio::time::interval(self.inner.config.tick_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = interval.tick() => {}
            }
            let now = now_ms();
            let queues: Vec<Arc<SharedQueue>> = self
                .inner
                .queues
                .iter()
                .map(|e| e.value().clone())
                .collect();
            for slot in queues {
                let due = lock(&slot.queue).next_due().is_some_and(|t| t <= now);
                if due {
                    // After a storage failure nothing changes any more (fail-stop).
                    let Ok(_change) = self.begin() else { break };
                    let _ = self.with_queue(&slot, now, |q, _| q.tick(now));
                }
            }
            let topics: Vec<Arc<SharedTopic>> = self
                .inner
                .topics
                .iter()
                .map(|e| e.value().clone())
                .collect();
            for slot in topics {
                self.lock_topic(&slot).enforce_retention(now);
            }
            self.run_due_schedules(now);
        }
    }

    // ---- queues: lookup and mutation helpers ------------------------------------------
}
