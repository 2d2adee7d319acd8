//! Consume streams on the Redis engine: the same session as the in-process engine's (credit
//! flow control, settlements on the stream, held jobs put back when the stream closes),
//! with leases and settlements as the queue's scripts and wake-ups from pub/sub.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::queue::{Delivery, JobState, LeaseId, LeaseIdError};
use crate::broker::engine::{
    ConsumeCommandStream, ConsumeCommands, ConsumeEvent, ConsumeSpec, ConsumeStream, checks,
};

use super::RedisEngine;
use super::background::POLL;
use super::keys::QueueKeys;
use super::queue::WaitingNote;
use super::wake::Watch;

/// Most credit a stream may hold; more would let one worker hoard a queue.
const MAX_CREDITS: u64 = 10_000;

/// How long a stream with unconfirmed acks waits before it confirms them (see
/// `Session::unconfirmed`): longer than a busy worker takes to ack its job and ask for the
/// next, far shorter than any replica timeout.
const CONFIRM_AFTER: std::time::Duration = std::time::Duration::from_millis(2);

/// One consume stream's state between two of its messages.
struct Session {
    engine: RedisEngine,
    queue: Arc<str>,
    spec: ConsumeSpec,
    consumer: String,
    commands: ConsumeCommandStream,
    shutdown: CancellationToken,
    watch: Option<Watch>,
    credits: u64,
    stopped: bool,
    ended: bool,
    /// Deliveries of this stream not yet settled on it, by seq (the value is the nonce).
    outstanding: HashMap<u64, u64>,
    /// Jobs leased together with acks that were refused: sent after the refusals.
    leased: Vec<Delivery>,
    /// The stream's note as a waiter on its queue, made before it waits.
    note: WaitingNote,
    /// Whether acks of this stream (an ack-and-lease) may not be on the replicas yet.
    /// Leasing goes on meanwhile, as on the in-process engine: waiting for each ack's
    /// `WAIT` before the next jobs go out would put a replication round trip in every
    /// worker's cycle. It is confirmed whenever the stream would wait anyway and before
    /// the stream ends; a `WAIT` that fails ends the stream.
    unconfirmed: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.outstanding.is_empty() {
            return;
        }
        let leases = std::mem::take(&mut self.outstanding);
        // Without a runtime (process exit) the leases simply expire.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (engine, queue) = (self.engine.clone(), self.queue.clone());
            runtime.spawn(async move { engine.release(&queue, leases).await });
        }
    }
}

impl Session {
    /// The stream's next message: leased jobs as soon as there are credits and visible
    /// jobs, refusals after a command with refused settlements; `None` at the end.
    async fn next_event(&mut self) -> Option<ConsumeEvent> {
        if self.ended {
            return None;
        }
        if !self.leased.is_empty() {
            return Some(ConsumeEvent::Jobs(std::mem::take(&mut self.leased)));
        }
        // Set when an ack-and-lease found nothing: the next look waits for a wake-up (the
        // watch is armed) rather than asking Redis again at once.
        let mut looked = false;
        loop {
            if self.credits > 0 && !std::mem::take(&mut looked) {
                // Armed before looking, so a job made visible meanwhile is not missed.
                if self.watch.is_none() {
                    let channel = QueueKeys::new(&self.queue).key("wake");
                    self.watch = Some(self.engine.inner.wakes.watch(&[channel]).await);
                }
                let max = self
                    .credits
                    .min(self.engine.inner.config.limits.max_batch as u64);
                let leased = self
                    .engine
                    .inner
                    .queues
                    .lease(
                        &self.queue,
                        max as usize,
                        self.spec.visibility_timeout_ms,
                        &self.consumer,
                        &self.spec.address,
                    )
                    .await;
                match leased {
                    Ok(jobs) if !jobs.is_empty() => {
                        self.credits -= jobs.len() as u64;
                        let leases = jobs.iter().map(|d| (d.lease_id.seq, d.lease_id.nonce));
                        self.outstanding.extend(leases);
                        return Some(ConsumeEvent::Jobs(jobs));
                    }
                    Ok(_) => {}
                    Err(e) => return Some(self.fail(e)),
                }
            }
            // Noted as waiting (renewed every poll) and then one more look, so a job made
            // visible before the note is not missed.
            if self.credits > 0 && self.watch.is_some() && self.note.due() {
                if let Err(e) = self.note.note(&self.engine.inner.queues, &self.queue).await {
                    return Some(self.fail(e));
                }
                looked = false;
                continue;
            }
            let credits = self.credits;
            let unconfirmed = self.unconfirmed;
            let (engine, queue) = (&self.engine, &self.queue);
            // Lazy: built (and its commit's key named) only when polled; and only once the
            // stream has waited `CONFIRM_AFTER`, so a worker's next ack, which usually comes
            // sooner, does not leave a WAIT behind it each time (a WAIT holds up the node's
            // later commands to that primary on the connection it travels on).
            let confirm = async move {
                tokio::time::sleep(CONFIRM_AFTER).await;
                engine.queue_durable(queue).await
            };
            let watch = self.watch.as_mut();
            tokio::select! {
                command = self.commands.next() => {
                    let Some(command) = command else {
                        // The client half-closed: its acks count once on the replicas.
                        self.ended = true;
                        if self.unconfirmed {
                            let confirmed = self.engine.queue_durable(&self.queue).await;
                            return confirmed.err().map(ConsumeEvent::Failed);
                        }
                        return None;
                    };
                    self.stopped |= command.stop;
                    self.credits = if self.stopped {
                        0
                    } else {
                        (self.credits + command.credits as u64).min(MAX_CREDITS)
                    };
                    let sorted = self.engine.sort_acks(&self.queue, &command.acks);
                    // A worker that acks what it got and wants more: both in one script.
                    let refill = self.credits > 0
                        && command.nacks.is_empty()
                        && command.extends.is_empty()
                        && !sorted.mine.is_empty()
                        && sorted.foreign.is_empty()
                        && sorted.refused.is_empty();
                    if refill {
                        match self.ack_and_lease(sorted.mine).await {
                            Ok(None) => {
                                looked = true;
                                continue;
                            }
                            Ok(Some(event)) => return Some(event),
                            Err(e) => return Some(self.fail(e)),
                        }
                    }
                    match self.engine.settle(&self.queue, &self.spec, sorted, command, &mut self.outstanding).await {
                        Ok(refused) if refused.is_empty() => {}
                        Ok(refused) => return Some(ConsumeEvent::Refused(refused)),
                        Err(e) => return Some(self.fail(e)),
                    }
                }
                confirmed = confirm, if unconfirmed => {
                    // Covers every ack made before it (the WAIT's fence): nothing else ran
                    // meanwhile, since the other branches end this one.
                    match confirmed {
                        Ok(()) => self.unconfirmed = false,
                        Err(e) => return Some(self.fail(e)),
                    }
                }
                _ = async {
                    match watch {
                        Some(watch) => { watch.wait(POLL).await; }
                        None => tokio::time::sleep(POLL).await,
                    }
                }, if credits > 0 => {}
                _ = self.shutdown.cancelled() => {
                    self.ended = true;
                    return None;
                }
            }
        }
    }

    /// Acks `acks` (all of this stream's queue) and leases up to the credits in one
    /// script; the acks are confirmed on the replicas later (`unconfirmed`), not before
    /// the jobs go out. Returns the event to send, if any (`None`: nothing leased, wait).
    async fn ack_and_lease(
        &mut self,
        acks: Vec<(String, LeaseId, Option<Bytes>)>,
    ) -> Result<Option<ConsumeEvent>, BrokerError> {
        let max = self
            .credits
            .min(self.engine.inner.config.limits.max_batch as u64) as usize;
        let leases: Vec<(LeaseId, Option<Bytes>)> = acks
            .iter()
            .map(|(_, lease, result)| (lease.clone(), result.clone()))
            .collect();
        let lease = (
            max,
            self.spec.visibility_timeout_ms,
            self.consumer.as_str(),
            self.spec.address.as_str(),
        );
        let (acked, jobs) = self
            .engine
            .inner
            .queues
            .ack_lease(&self.queue, &leases, lease)
            .await?;
        // All or nothing: when one was stale none was applied, and they go again one by
        // one in effect, as a command of acks alone does.
        let refused = if acked.iter().all(Result::is_ok) {
            for (_, lease, _) in &acks {
                self.outstanding.remove(&lease.seq);
            }
            Vec::new()
        } else {
            self.engine
                .ack_each(&self.queue, acks, &mut self.outstanding)
                .await?
        };
        self.unconfirmed |= self.engine.inner.config.replicas > 0;
        if !jobs.is_empty() {
            self.credits -= jobs.len() as u64;
            let leases = jobs.iter().map(|d| (d.lease_id.seq, d.lease_id.nonce));
            self.outstanding.extend(leases);
        }
        Ok(match (refused.is_empty(), jobs.is_empty()) {
            (true, true) => None,
            (true, false) => Some(ConsumeEvent::Jobs(jobs)),
            (false, _) => {
                self.leased = jobs;
                Some(ConsumeEvent::Refused(refused))
            }
        })
    }

    /// Ends the stream with `e` (Redis failed).
    fn fail(&mut self, e: BrokerError) -> ConsumeEvent {
        self.ended = true;
        ConsumeEvent::Failed(e)
    }
}

impl RedisEngine {
    /// Opens a consume session on `spec.queue` (created if missing, as Lease does).
    pub(super) async fn open_consume(
        &self,
        spec: ConsumeSpec,
        commands: ConsumeCommandStream,
    ) -> Result<ConsumeStream, BrokerError> {
        if let Some(v) = spec.visibility_timeout_ms {
            checks::visibility("visibility_timeout_ms", v)?;
        }
        self.ensure_queue("queue", &spec.queue, true).await?;
        let consumer = if spec.consumer.is_empty() {
            spec.address.clone()
        } else {
            spec.consumer.clone()
        };
        let shutdown = spec
            .ends_on
            .clone()
            .unwrap_or_else(|| self.inner.shutdown.clone());
        let session = Session {
            engine: self.clone(),
            queue: Arc::from(spec.queue.as_str()),
            spec,
            consumer,
            commands,
            shutdown,
            watch: None,
            credits: 0,
            stopped: false,
            ended: false,
            outstanding: HashMap::new(),
            leased: Vec::new(),
            note: WaitingNote::new(),
            unconfirmed: false,
        };
        let events = futures::stream::unfold(session, |mut session| async move {
            let event = session.next_event().await?;
            Some((event, session))
        });
        Ok(ConsumeStream::new(Box::pin(events)))
    }

    /// A command's acks by where they go: leases of this stream's `queue` (one script),
    /// of other queues (unary acks of their own), and refused (bad lease id or result).
    fn sort_acks(&self, queue: &Arc<str>, acks: &[(Bytes, Option<Bytes>)]) -> Sorted {
        let limits = &self.inner.config.limits;
        let mut sorted = Sorted {
            mine: Vec::new(),
            foreign: Vec::new(),
            refused: Vec::new(),
        };
        for (received, result) in acks {
            let text = String::from_utf8_lossy(received).into_owned();
            let parsed = std::str::from_utf8(received)
                .map_err(|_| checks::bad_lease_id("acks.lease_id", &text, LeaseIdError::NotUtf8))
                .and_then(|id| {
                    LeaseId::try_parse_for(id, queue)
                        .map_err(|why| checks::bad_lease_id("acks.lease_id", id, why))
                })
                .and_then(|lease| {
                    if let Some(r) = result {
                        limits.check_payload("acks.result", r.len())?;
                    }
                    Ok(lease)
                });
            match parsed {
                Ok(lease) if *lease.queue == **queue => {
                    sorted.mine.push((text, lease, result.clone()))
                }
                Ok(_) => sorted.foreign.push((text, result.clone())),
                Err(e) => sorted.refused.push((text, e)),
            }
        }
        sorted
    }

    /// Applies one command's settlements (`acks`: its acks as [`Self::sort_acks`] sorted
    /// them), durable before the stream goes on; returns the refused ones, each by its
    /// lease id. An error means Redis failed.
    async fn settle(
        &self,
        queue: &Arc<str>,
        spec: &ConsumeSpec,
        acks: Sorted,
        command: ConsumeCommands,
        outstanding: &mut HashMap<u64, u64>,
    ) -> Result<Vec<(String, BrokerError)>, BrokerError> {
        let limits = &self.inner.config.limits;
        let parse = |field: &str, lease_id: &str| {
            LeaseId::try_parse_for(lease_id, queue)
                .map_err(|why| checks::bad_lease_id(field, lease_id, why))
        };
        let own = |field: &str, lease: &LeaseId| -> Result<(), BrokerError> {
            if *lease.queue == **queue {
                Ok(())
            } else {
                Err(BrokerError::invalid(
                    field,
                    format!("lease {lease} is not from queue {queue:?} of this stream"),
                ))
            }
        };
        let mut changed = false;
        let Sorted {
            mine,
            foreign,
            mut refused,
        } = acks;
        if !mine.is_empty() {
            changed = true;
            refused.extend(self.ack_each(queue, mine, outstanding).await?);
        }
        for nack in &command.nacks {
            let outcome = async {
                let lease = parse("nacks.lease_id", &nack.lease_id)?;
                checks::nack(limits, "nacks.", &nack.error, nack.retry_delay_ms)?;
                own("nacks.lease_id", &lease)?;
                let (state, _) = self
                    .inner
                    .queues
                    .nack(
                        &lease,
                        nack.error.clone(),
                        nack.retry_delay_ms,
                        nack.dead_letter,
                    )
                    .await?;
                outstanding.remove(&lease.seq);
                Ok::<_, BrokerError>(state)
            };
            match outcome.await {
                Ok(state) => {
                    changed = true;
                    if state == JobState::Dead {
                        self.route_dead_letters(queue).await;
                    }
                }
                Err(e) if is_unavailable(&e) => return Err(e),
                Err(e) => refused.push((nack.lease_id.clone(), e)),
            }
        }
        for (lease_id, timeout) in &command.extends {
            let outcome = async {
                let lease = parse("extends.lease_id", lease_id)?;
                checks::visibility("extends.visibility_timeout_ms", *timeout)?;
                own("extends.lease_id", &lease)?;
                self.inner.queues.extend(&lease, *timeout).await.map(|_| ())
            };
            match outcome.await {
                Ok(()) => {}
                Err(e) if is_unavailable(&e) => return Err(e),
                Err(e) => refused.push((lease_id.clone(), e)),
            }
        }
        if changed {
            self.queue_durable(queue).await?;
        }
        for (lease_id, result) in foreign {
            let acked = self
                .ack_leases(&spec.access, vec![(lease_id.clone(), result)])
                .await;
            if let Err(e) = acked {
                refused.push((lease_id, e));
            }
        }
        Ok(refused)
    }

    /// Acks leases of `queue` one by one in effect: the script is all-or-nothing, so when
    /// some are refused the rest go again without them.
    async fn ack_each(
        &self,
        queue: &str,
        mut acks: Vec<(String, LeaseId, Option<Bytes>)>,
        outstanding: &mut HashMap<u64, u64>,
    ) -> Result<Vec<(String, BrokerError)>, BrokerError> {
        let mut refused = Vec::new();
        while !acks.is_empty() {
            let batch = acks
                .iter()
                .map(|(_, lease, result)| (lease.clone(), result.clone()))
                .collect();
            let results = self.inner.queues.ack(queue, batch).await?;
            if results.iter().all(Result::is_ok) {
                for (_, lease, _) in &acks {
                    outstanding.remove(&lease.seq);
                }
                break;
            }
            let mut rest = Vec::with_capacity(acks.len());
            for ((text, lease, result), outcome) in acks.into_iter().zip(results) {
                match outcome {
                    Ok(()) => rest.push((text, lease, result)),
                    Err(e) => {
                        outstanding.remove(&lease.seq);
                        refused.push((text, e));
                    }
                }
            }
            acks = rest;
        }
        Ok(refused)
    }

    /// Puts back what a closed stream held: visible again at once (together), each a
    /// failed attempt.
    async fn release(&self, queue: &Arc<str>, outstanding: HashMap<u64, u64>) {
        let released = self
            .inner
            .queues
            .release(queue, "released: the consumer stream closed", outstanding)
            .await;
        if let Err(e) = released {
            // Redis is unreachable: the leases expire instead, at their deadlines.
            tracing::debug!(queue = &**queue, error = %e, "closed stream's leases left to expire");
            return;
        }
        let _ = self.queue_durable(queue).await;
        // A release can kill a job that was on its last attempt.
        self.route_dead_letters(queue).await;
    }
}

/// A command's acks, sorted by [`RedisEngine::sort_acks`].
struct Sorted {
    /// Leases of the stream's queue: (lease id as received, parsed, result).
    mine: Vec<(String, LeaseId, Option<Bytes>)>,
    /// Leases of other queues: (lease id, result).
    foreign: Vec<(String, Option<Bytes>)>,
    /// Refused before reaching Redis.
    refused: Vec<(String, BrokerError)>,
}

/// Whether `e` says Redis failed (the stream then ends) rather than refusing one
/// settlement.
fn is_unavailable(e: &BrokerError) -> bool {
    matches!(e, BrokerError::Unavailable(_))
}
