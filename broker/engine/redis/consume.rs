//! Consume streams on the Redis engine: the same session as the in-process engine's (credit
//! flow control, settlements on the stream, held jobs put back when the stream closes),
//! with leases and settlements as the queue's scripts and wake-ups from pub/sub.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::queue::{JobState, LeaseId, LeaseIdError};
use crate::broker::engine::{
    ConsumeCommandStream, ConsumeCommands, ConsumeEvent, ConsumeSpec, ConsumeStream, checks,
};

use super::RedisEngine;
use super::background::POLL;
use super::keys::QueueKeys;
use super::wake::Watch;

/// Most credit a stream may hold; more would let one worker hoard a queue.
const MAX_CREDITS: u64 = 10_000;

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
        loop {
            if self.credits > 0 {
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
            let credits = self.credits;
            let watch = self.watch.as_mut();
            tokio::select! {
                command = self.commands.next() => {
                    let Some(command) = command else {
                        self.ended = true;
                        return None;
                    };
                    self.stopped |= command.stop;
                    self.credits = if self.stopped {
                        0
                    } else {
                        (self.credits + command.credits as u64).min(MAX_CREDITS)
                    };
                    match self.engine.settle(&self.queue, &self.spec, command, &mut self.outstanding).await {
                        Ok(refused) if refused.is_empty() => {}
                        Ok(refused) => return Some(ConsumeEvent::Refused(refused)),
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
        };
        let events = futures::stream::unfold(session, |mut session| async move {
            let event = session.next_event().await?;
            Some((event, session))
        });
        Ok(ConsumeStream::new(Box::pin(events)))
    }

    /// Applies one command's settlements, durable before the stream goes on; returns the
    /// refused ones, each by its lease id. An error means Redis failed.
    async fn settle(
        &self,
        queue: &Arc<str>,
        spec: &ConsumeSpec,
        command: ConsumeCommands,
        outstanding: &mut HashMap<u64, u64>,
    ) -> Result<Vec<(String, BrokerError)>, BrokerError> {
        let limits = &self.inner.config.limits;
        let mut refused = Vec::new();
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
        // Acks of this stream's queue go as one script; others as unary acks of their own.
        let mut mine: Vec<(String, LeaseId, Option<Bytes>)> = Vec::new();
        let mut foreign = Vec::new();
        for (received, result) in command.acks {
            let text = String::from_utf8_lossy(&received).into_owned();
            let parsed = std::str::from_utf8(&received)
                .map_err(|_| checks::bad_lease_id("acks.lease_id", &text, LeaseIdError::NotUtf8))
                .and_then(|id| parse("acks.lease_id", id))
                .and_then(|lease| {
                    if let Some(r) = &result {
                        limits.check_payload("acks.result", r.len())?;
                    }
                    Ok(lease)
                });
            match parsed {
                Ok(lease) if *lease.queue == **queue => mine.push((text, lease, result)),
                Ok(_) => foreign.push((text, result)),
                Err(e) => refused.push((text, e)),
            }
        }
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
            self.durable(self.queue_commit(queue)).await?;
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
        let _ = self.durable(self.queue_commit(queue)).await;
        // A release can kill a job that was on its last attempt.
        self.route_dead_letters(queue).await;
    }
}

/// Whether `e` says Redis failed (the stream then ends) rather than refusing one
/// settlement.
fn is_unavailable(e: &BrokerError) -> bool {
    matches!(e, BrokerError::Unavailable(_))
}
