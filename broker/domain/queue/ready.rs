//! The index of visible jobs: highest priority first, then lowest seq.
//!
//! Most jobs become visible in seq order (enqueued and leased in FIFO), so each priority has
//! a plain deque of seqs, 8 bytes per job. Jobs that come back out of order (retries,
//! delayed jobs, expired leases, ordering keys) go to a small sorted set. Leasing takes the
//! lower of the two fronts.
//!
//! Removal from the middle of a deque (a cancel) is lazy: the entry stays until it reaches
//! the front and is dropped there. That is safe because a job only leaves the index
//! without being popped when it leaves the queue for good (cancel, purge, redrive, dead
//! letter replaced), and seqs are never reused; the caller says which seqs are gone.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::MAX_PRIORITY;
use crate::broker::domain::time::Millis;

const LEVELS: usize = MAX_PRIORITY as usize + 1;

/// Visible jobs. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Ready {
    /// Per priority: seqs in increasing order, visible-since non-decreasing. The front is
    /// never a job that is gone.
    fifo: [VecDeque<u64>; LEVELS],
    /// Per priority: the visible-since time of the last seq pushed to `fifo`.
    fifo_back_since: [Millis; LEVELS],
    /// Out-of-order arrivals: (priority, seq) -> visible since.
    returns: BTreeMap<(Reverse<u8>, u64), Millis>,
    returns_since: BTreeSet<(Millis, u64)>,
    /// Visible jobs (entries of jobs that are gone are not counted).
    len: usize,
}

impl Ready {
    /// Visible jobs.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is visible.
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a job visible since `since`.
    pub(super) fn push(&mut self, priority: u8, seq: u64, since: Millis) {
        let p = priority as usize;
        let fifo = &mut self.fifo[p];
        if fifo.back().is_none_or(|back| *back < seq) && since >= self.fifo_back_since[p] {
            fifo.push_back(seq);
            self.fifo_back_since[p] = since;
        } else {
            self.returns.insert((Reverse(priority), seq), since);
            self.returns_since.insert((since, seq));
        }
        self.len += 1;
    }

    /// Takes the best job out; `gone(seq)` says whether a seq has left the queue.
    pub(super) fn pop(&mut self, gone: impl Fn(u64) -> bool) -> Option<u64> {
        let fifo = (0..LEVELS)
            .rev()
            .find_map(|p| self.fifo[p].front().map(|seq| (Reverse(p as u8), *seq)));
        let returned = self.returns.keys().next().copied();
        let take_fifo = match (fifo, returned) {
            (None, None) => return None,
            (Some(f), Some(r)) => f < r,
            (f, _) => f.is_some(),
        };
        self.len -= 1;
        if take_fifo {
            let (Reverse(p), seq) = fifo.expect("chosen");
            self.fifo[p as usize].pop_front();
            self.clean_front(p, &gone);
            Some(seq)
        } else {
            let key = returned.expect("chosen");
            let since = self.returns.remove(&key).expect("chosen");
            self.returns_since.remove(&(since, key.1));
            Some(key.1)
        }
    }

    /// Removes a job that is leaving the queue for good (`gone(seq)` is already true).
    pub(super) fn remove(&mut self, priority: u8, seq: u64, gone: impl Fn(u64) -> bool) {
        if let Some(since) = self.returns.remove(&(Reverse(priority), seq)) {
            self.returns_since.remove(&(since, seq));
        } else {
            self.clean_front(priority, &gone);
        }
        self.len -= 1;
    }

    /// Forgets everything (a purge took every visible job).
    pub(super) fn clear(&mut self) {
        *self = Self::default();
    }

    fn clean_front(&mut self, priority: u8, gone: &impl Fn(u64) -> bool) {
        let fifo = &mut self.fifo[priority as usize];
        while fifo.front().is_some_and(|seq| gone(*seq)) {
            fifo.pop_front();
        }
        if fifo.is_empty() {
            // Release the memory of a drained backlog.
            if fifo.capacity() > 1_024 {
                *fifo = VecDeque::new();
            }
            self.fifo_back_since[priority as usize] = 0;
        }
    }

    /// When the longest-visible job became visible; `since(seq)` gives a fifo job's time.
    pub(super) fn oldest_since(&self, since: impl Fn(u64) -> Millis) -> Option<Millis> {
        let fifo = self
            .fifo
            .iter()
            .filter_map(|f| f.front().map(|seq| since(*seq)))
            .min();
        let returned = self.returns_since.first().map(|(s, _)| *s);
        match (fifo, returned) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_first_then_seq_across_fifo_and_returns() {
        let mut r = Ready::default();
        r.push(0, 5, 10);
        r.push(0, 6, 10);
        r.push(3, 7, 11);
        // An older seq coming back (a retry) goes before newer ones of its priority.
        r.push(0, 2, 20);
        assert_eq!(r.len(), 4);
        let order: Vec<u64> = std::iter::from_fn(|| r.pop(|_| false)).collect();
        assert_eq!(order, vec![7, 2, 5, 6]);
        assert!(r.is_empty());
    }

    #[test]
    fn removed_jobs_are_skipped_and_oldest_is_exact() {
        let mut r = Ready::default();
        for seq in 1..=4 {
            r.push(0, seq, 100 + seq);
        }
        r.push(0, 0, 50);
        let gone = |seq: u64| seq == 1 || seq == 3;
        // Seq 3 leaves from the middle: lazily. Seq 1 is the fifo front: dropped at once.
        r.remove(0, 3, gone);
        r.remove(0, 1, gone);
        assert_eq!(r.len(), 3);
        assert_eq!(r.oldest_since(|seq| 100 + seq), Some(50));
        assert_eq!(r.pop(gone), Some(0));
        assert_eq!(r.oldest_since(|seq| 100 + seq), Some(102));
        assert_eq!(r.pop(gone), Some(2));
        assert_eq!(r.pop(gone), Some(4));
        assert_eq!(r.pop(gone), None);
        assert_eq!(r.len(), 0);
    }
}
