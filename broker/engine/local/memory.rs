//! The broker-wide budget for retained payload bytes (`--max-memory-bytes`).
//!
//! Every queue and topic knows the payload bytes it holds (a queue's live jobs and its
//! history, a topic's retained log). One atomic counter holds their sum: a lock of a queue
//! or topic taken through [`Accounted`] adds the change it made when it is released, so a
//! batch costs one atomic add, not one per message, and nothing that stores or frees a
//! payload can be missed. Publish and Enqueue check the counter before they write.

use std::ops::{Deref, DerefMut};
use std::sync::MutexGuard;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::queue::Queue;
use crate::broker::domain::topic::Topic;

/// What holds payload bytes the budget counts.
pub(crate) trait Retains {
    /// Payload bytes held now.
    fn retained_bytes(&self) -> u64;
}

impl Retains for Queue {
    fn retained_bytes(&self) -> u64 {
        self.payload_bytes()
    }
}

impl Retains for Topic {
    fn retained_bytes(&self) -> u64 {
        self.retained().1
    }
}

/// The budget and what is in use.
#[derive(Debug, Default)]
pub(crate) struct MemoryBudget {
    /// Bytes allowed; 0 is no budget (use is still counted, for Stats).
    limit: u64,
    used: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `limit` bytes (0: none).
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Bytes allowed (0: no budget).
    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Payload bytes retained now.
    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether writes are checked at all.
    pub(crate) fn is_limited(&self) -> bool {
        self.limit > 0
    }

    /// Refuses a write of `incoming` payload bytes that would take use past the budget.
    /// Checked before the write, so writers racing each other can pass it by one request
    /// each; what was accepted is never dropped to make room.
    pub(crate) fn check(&self, field: &str, incoming: u64) -> Result<(), BrokerError> {
        if self.limit == 0 {
            return Ok(());
        }
        let used = self.used();
        if used.saturating_add(incoming) > self.limit {
            return Err(BrokerError::ResourceExhausted(format!(
                "{field}: {incoming} payload bytes exceed the memory budget (--max-memory-bytes) of {} bytes: {used} bytes are in use; retained messages free as topics evict them and jobs as they finish and leave history",
                self.limit
            )));
        }
        Ok(())
    }

    /// Sets the bytes in use, when the whole state is installed at once (recovery, or
    /// the reload of the durable state after a storage failure).
    pub(crate) fn reset(&self, used: u64) {
        self.used.store(used, Ordering::Relaxed);
    }

    /// Counts a change of held bytes from `before` to `after`.
    pub(crate) fn changed(&self, before: u64, after: u64) {
        if after > before {
            self.used.fetch_add(after - before, Ordering::Relaxed);
        } else if before > after {
            self.used.fetch_sub(before - after, Ordering::Relaxed);
        }
    }
}

/// A locked queue or topic whose change of held payload bytes goes to the budget when the
/// lock is released (still under it, so the counter never runs ahead of the state).
pub(crate) struct Accounted<'a, T: Retains> {
    guard: MutexGuard<'a, T>,
    budget: &'a MemoryBudget,
    before: u64,
}

impl<'a, T: Retains> Accounted<'a, T> {
    /// Starts counting what the holder of `guard` changes.
    pub(crate) fn new(guard: MutexGuard<'a, T>, budget: &'a MemoryBudget) -> Self {
        let before = guard.retained_bytes();
        Self {
            guard,
            budget,
            before,
        }
    }
}

impl<T: Retains> Deref for Accounted<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T: Retains> DerefMut for Accounted<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T: Retains> Drop for Accounted<'_, T> {
    fn drop(&mut self) {
        self.budget
            .changed(self.before, self.guard.retained_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_refuses_what_would_pass_it_and_counts_changes() {
        let budget = MemoryBudget::new(100);
        budget.changed(0, 60);
        budget.check("jobs", 40).unwrap();
        let err = budget.check("jobs", 41).unwrap_err().to_string();
        assert!(
            err.contains("jobs: 41 payload bytes")
                && err.contains("of 100 bytes: 60 bytes are in use"),
            "{err}"
        );
        budget.changed(60, 10);
        assert_eq!(budget.used(), 10);
        budget.check("jobs", 90).unwrap();
        // No budget: never refused, still counted.
        let open = MemoryBudget::new(0);
        open.changed(0, u64::MAX / 2);
        open.check("jobs", u64::MAX).unwrap();
        assert_eq!(open.used(), u64::MAX / 2);
    }
}
