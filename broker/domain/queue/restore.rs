//! Rebuilding a queue from the write-ahead log: jobs and idempotency keys as recovery
//! replays them, and the keys a snapshot keeps.

use std::sync::Arc;

use uuid::Uuid;

use super::slots::{Kinds, LiveJob};
use crate::broker::domain::time::Millis;

use super::job::{Job, JobState};
use super::policy::{MAX_ATTEMPTS, MAX_PRIORITY};
use super::{Finished, Queue, clamp_attempts};

impl Queue {
    /// Remembered idempotency keys: (key, job id, expiry), for snapshots.
    pub fn dedup_entries(&self) -> Vec<(String, Uuid, Millis)> {
        self.dedup
            .entries()
            .map(|(k, id, expires)| (k.to_owned(), id, expires))
            .collect()
    }

    /// Recovery: remembers an idempotency key until `expires`, in any order.
    pub fn restore_dedup(&mut self, key: String, id: Uuid, expires: Millis) {
        self.dedup.insert(key, id, expires);
    }

    /// Recovery: adds a job rebuilt from the write-ahead log, after every job restored
    /// before it (its seq is the next one, so call in enqueue order for live jobs and in
    /// finish order for finished ones). A job that was leased is visible again, because
    /// leases are not persisted: a crash causes a redelivery, never a loss. Ordering keys,
    /// indexes and history are rebuilt exactly as [`Queue::enqueue`] would. The job keeps
    /// its id, which is then mapped like a dead letter's.
    pub fn restore_job(&mut self, now: Millis, mut job: Job) {
        let seq = self.next_seq;
        self.next_seq += 1;
        job.seq = seq;
        job.lease_deadline = None;
        job.lease_nonce = 0;
        job.blocked = false;
        if let Some(old) = self.seq_of(&job.id) {
            // Recovery hands each id over once; a repeat would be a bug there, and the
            // newest record wins like in `insert_with_id`.
            self.forget(old, now);
        }
        self.foreign.insert(job.id, seq);
        let payload = self.payloads.store([job.payload].iter())[0];
        let mut slot = LiveJob {
            payload,
            kind: Kinds::OWN,
            enqueued_at: job.enqueued_at,
            attempts: job.attempts.min(MAX_ATTEMPTS) as u16,
            max_attempts: clamp_attempts(job.max_attempts),
            priority: job.priority.min(MAX_PRIORITY),
            state: job.state,
            blocked: false,
            extra: None,
        };
        let rare = slot.rare_mut();
        rare.id = Some(job.id);
        rare.kind = Some(job.kind);
        rare.headers = job.headers;
        rare.idempotency_key = job.idempotency_key;
        rare.ordering_key = job.ordering_key.clone();
        rare.dead_letter_queue = job.dead_letter_queue;
        rare.origin = job.origin;
        let extra = slot.extra_mut();
        extra.run_at = job.run_at;
        extra.updated_at = job.updated_at;
        extra.last_error = job.last_error.map(Arc::from);
        if job.state.is_finished() {
            self.finished.insert(
                seq,
                Finished {
                    slot,
                    finished_at: job.finished_at.unwrap_or(job.updated_at),
                    lease_nonce: 0,
                    consumer: None,
                    result: job.result,
                },
            );
            self.history.push_back(seq);
            self.trim_history();
            return;
        }
        // A job that was leased is retried at once; others keep their run time.
        if job.state == JobState::Leased {
            extra.run_at = extra.run_at.min(now);
        }
        slot.state = JobState::Pending;
        let updated_at = job.updated_at;
        self.add_live_slot(seq, slot, job.ordering_key, now);
        let slot = self.slots.get_mut(seq).expect("restored job exists");
        slot.extra_mut().updated_at = updated_at;
    }
}
