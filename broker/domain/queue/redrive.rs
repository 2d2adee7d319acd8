//! Dead letters: taking them from a queue, keeping them in its dead-letter queue, and
//! redriving them back to the queue they came from.

use std::collections::BTreeSet;

use bytes::Bytes;
use uuid::Uuid;

use super::slots::{Kinds, LiveJob};
use crate::broker::domain::limits::Headers;
use crate::broker::domain::time::Millis;

use super::job::{BROKER_HEADER_PREFIX, DeadLetter, JobState, Redriven};
use super::policy::MAX_PRIORITY;
use super::{Queue, clamp_attempts};

impl Queue {
    /// Dead jobs waiting to be moved to their dead-letter queue. The broker routes them
    /// after releasing this queue's lock.
    pub fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.outbox)
    }

    /// Stores a dead letter from another queue, recording where it came from (its
    /// [`Job::origin`]). Dead letters ignore max depth: losing them would be a silent drop.
    pub fn insert_dead_letter(&mut self, now: Millis, dead: DeadLetter) {
        self.insert_with_id(
            now,
            dead.job_id,
            dead.kind,
            dead.payload,
            dead.headers,
            dead.priority,
            Some(dead.origin),
        );
        self.counts.enqueued += 1;
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn insert_with_id(
        &mut self,
        now: Millis,
        id: Uuid,
        kind: String,
        payload: Bytes,
        headers: Headers,
        priority: u8,
        origin: Option<String>,
    ) {
        self.named_by_producer();
        if let Some(old) = self.seq_of(&id) {
            // The same job has a record here already (it died here before, or it is
            // dead-lettered twice): the new record replaces it.
            self.forget(old, now);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let payload = self.payloads.store([payload].iter())[0];
        let mut slot = LiveJob {
            payload,
            kind: Kinds::OWN,
            enqueued_at: now,
            attempts: 0,
            max_attempts: clamp_attempts(self.policy.max_attempts),
            priority: priority.min(MAX_PRIORITY),
            state: JobState::Pending,
            blocked: false,
            extra: None,
        };
        let rare = slot.rare_mut();
        rare.id = Some(id);
        rare.kind = Some(kind);
        rare.headers = headers;
        rare.origin = origin;
        self.foreign.insert(id, seq);
        self.add_live_slot(seq, slot, None, now);
    }

    /// Whether a redrive may move this job: it is not leased and the broker recorded the
    /// queue it was dead-lettered from.
    pub(super) fn redrivable(slot: &LiveJob) -> Option<&str> {
        if slot.state == JobState::Leased {
            return None;
        }
        slot.rare().and_then(|r| r.origin.as_deref())
    }

    /// The distinct queues a redrive of `ids` (or, when empty, of up to `max` of the oldest
    /// movable jobs) would move jobs into, so the broker can check them all before anything
    /// moves. Reads the queue once; moves nothing.
    pub fn redrive_targets(&self, ids: &[Uuid], max: usize) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if ids.is_empty() {
            for origin in self
                .slots
                .iter_from(0)
                .filter_map(|(_, s)| Self::redrivable(s))
                .take(max)
            {
                if !out.contains(origin) {
                    out.insert(origin.to_owned());
                }
            }
        } else {
            for id in ids {
                if let Some(origin) = self
                    .seq_of(id)
                    .and_then(|seq| self.slots.get(seq))
                    .and_then(Self::redrivable)
                {
                    out.insert(origin.to_owned());
                }
            }
        }
        out
    }

    /// Takes jobs out of this dead-letter queue for redrive: the given ids, or else up to
    /// `max` of the oldest movable ones. A job returns to its recorded origin (never to a
    /// queue a header names). Leased or finished jobs, jobs the broker never dead-lettered
    /// (no origin), and jobs whose origin `allowed` refuses stay here (and are listed when
    /// asked for by id).
    pub fn take_for_redrive(
        &mut self,
        now: Millis,
        ids: &[Uuid],
        max: usize,
        allowed: impl Fn(&str) -> bool,
    ) -> (Vec<Redriven>, Vec<Uuid>) {
        let movable = |s: &LiveJob| Self::redrivable(s).is_some_and(&allowed);
        let mut skipped = Vec::new();
        let seqs: Vec<u64> = if ids.is_empty() {
            self.slots
                .iter_from(0)
                .filter(|(_, s)| movable(s))
                .take(max)
                .map(|(seq, _)| seq)
                .collect()
        } else {
            let mut seqs = Vec::new();
            for id in ids {
                match self.seq_of(id) {
                    // An id given twice is moved once, then skipped like any id that is
                    // no longer here.
                    Some(seq)
                        if self.slots.get(seq).is_some_and(movable) && !seqs.contains(&seq) =>
                    {
                        seqs.push(seq)
                    }
                    _ => skipped.push(*id),
                }
            }
            seqs
        };
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let slot = self.slots.get(seq).expect("redriven job exists");
            let job = self.materialize(seq, slot);
            self.forget(seq, now);
            let target = job.origin.expect("only jobs with an origin are moved");
            let headers = job
                .headers
                .into_iter()
                .filter(|(k, _)| !k.starts_with(BROKER_HEADER_PREFIX))
                .collect();
            out.push(Redriven {
                target,
                job_id: job.id,
                kind: job.kind,
                payload: job.payload,
                headers,
                priority: job.priority,
            });
        }
        (out, skipped)
    }

    /// Puts a redriven job back, attempts reset, replacing its dead record. It is an
    /// ordinary job here again: it has no origin.
    pub fn restore(&mut self, now: Millis, job: Redriven) {
        self.insert_with_id(
            now,
            job.job_id,
            job.kind,
            job.payload,
            job.headers,
            job.priority,
            None,
        );
    }
}
