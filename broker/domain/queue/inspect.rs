//! Reading a queue without changing it: get, list, history, counts and consumers, and
//! the job images the journal records.

use std::sync::Arc;

use uuid::Uuid;

use super::slots::LiveJob;
use crate::broker::domain::time::Millis;

use super::job::{Job, JobState, JobUpdate};
use super::{CONSUMER_ACTIVE_MS, ConsumerState, Finished, Queue, QueueCounts};

impl Queue {
    /// Looks a job up by id.
    pub fn get(&self, id: &Uuid) -> Option<Job> {
        self.job_by_seq(self.seq_of(id)?)
    }

    /// Jobs in `state` (live ones if `None`), oldest first, after enqueue seq `after`.
    /// Returns the page and the seq to continue after, if more match.
    pub fn list(
        &self,
        state: Option<JobState>,
        after: u64,
        limit: usize,
    ) -> (Vec<Job>, Option<u64>) {
        let from = after.saturating_add(1);
        let (page, more): (Vec<Job>, bool) = match state {
            Some(s) if s.is_finished() => {
                // History is bounded by the policy, so sorting the matches is cheap.
                let mut matching: Vec<(u64, &Finished)> = self
                    .finished
                    .iter()
                    .filter(|(seq, f)| **seq >= from && f.slot.state == s)
                    .map(|(seq, f)| (*seq, f))
                    .collect();
                matching.sort_unstable_by_key(|(seq, _)| *seq);
                let more = matching.len() > limit;
                let page = matching
                    .into_iter()
                    .take(limit)
                    .map(|(seq, f)| self.materialize_finished(seq, f))
                    .collect();
                (page, more)
            }
            _ => {
                let mut matching = self
                    .slots
                    .iter_from(from)
                    .filter(|(_, slot)| state.is_none_or(|s| slot.state == s));
                let page = matching
                    .by_ref()
                    .take(limit)
                    .map(|(seq, slot)| self.materialize(seq, slot))
                    .collect();
                (page, matching.next().is_some())
            }
        };
        let next = if more {
            page.last().map(|j: &Job| j.seq)
        } else {
            None
        };
        (page, next)
    }

    /// The newest finished jobs, newest first.
    pub fn history(&self, limit: usize) -> Vec<Job> {
        self.history
            .iter()
            .rev()
            .take(limit)
            .filter_map(|seq| {
                let f = self.finished.get(seq)?;
                Some(self.materialize_finished(*seq, f))
            })
            .collect()
    }

    /// The state-change record of the job with this seq (live or finished), without
    /// materializing the whole [`Job`].
    pub fn job_update(&self, seq: u64) -> Option<JobUpdate> {
        let (slot, finished) = match self.slots.get(seq) {
            Some(slot) => (slot, None),
            None => {
                let f = self.finished.get(&seq)?;
                (&f.slot, Some(f))
            }
        };
        Some(JobUpdate {
            id: self.id_of(seq, slot),
            state: slot.state,
            attempts: u32::from(slot.attempts),
            run_at: slot.run_at(),
            last_error: slot
                .extra
                .as_deref()
                .and_then(|e| e.last_error.as_deref().map(str::to_owned)),
            result: finished.and_then(|f| f.result.clone()),
            dead_letter_queue: finished
                .and_then(|f| f.slot.rare())
                .and_then(|r| r.dead_letter_queue.clone()),
        })
    }

    /// Looks a job up by its seq (e.g. a lease's): a live job's record is built on the
    /// spot, a finished one is borrowed from history.
    pub fn job_by_seq(&self, seq: u64) -> Option<Job> {
        match self.slots.get(seq) {
            Some(slot) => Some(self.materialize(seq, slot)),
            None => self
                .finished
                .get(&seq)
                .map(|f| self.materialize_finished(seq, f)),
        }
    }

    /// The queue's counters.
    pub fn counts(&self, now: Millis) -> QueueCounts {
        let slots = &self.slots;
        let oldest = self
            .ready
            .oldest_since(|seq| slots.get(seq).map_or(now, LiveJob::run_at))
            .map(|since| now.saturating_sub(since))
            .unwrap_or(0);
        let throttle = self.throttle_counts(now);
        QueueCounts {
            pending: self.ready.len() as u64 + self.blocked,
            scheduled: self.timers.len() as u64 - self.retrying,
            leased: self.leases.len() as u64,
            retrying: self.retrying,
            oldest_pending_age_ms: oldest,
            enqueue_rate: self.enqueue_rate.per_second(now),
            ack_rate: self.ack_rate.per_second(now),
            consumers: self
                .consumers
                .values()
                .filter(|c| {
                    c.leases_held > 0 || c.last_seen.saturating_add(CONSUMER_ACTIVE_MS) > now
                })
                .count() as u32,
            paused: self.paused,
            max_in_flight: self.policy.max_in_flight.unwrap_or(0),
            rate_limit_per_second: self.policy.rate_limit.map_or(0, |r| r.per_second),
            rate_limit_burst: self.policy.rate_limit.map_or(0, |r| r.burst),
            rate_tokens: throttle.tokens,
            rate_limited_ms: throttle.rate_limited_ms,
            in_flight_limited_ms: throttle.in_flight_limited_ms,
            created_by_consumer: self.created_by_consumer,
            ..self.counts.clone()
        }
    }

    /// Consumers seen, by name.
    pub fn consumers(&self) -> Vec<(Arc<str>, ConsumerState)> {
        let mut out: Vec<_> = self
            .consumers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
