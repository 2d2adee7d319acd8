//! Streaming consumers: one long-lived session per worker stream, with credit-based flow
//! control (the worker says how many unsettled jobs it can hold) and settlements flowing
//! back on the same stream. This saves a round trip per lease and batches everything.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::broker::auth::{Access, Action};
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::check_duration_ms;
use crate::broker::domain::queue::{Delivery, LeaseId, LeaseIdError, MAX_VISIBILITY_MS};
use crate::broker::domain::time::now_ms;
use crate::broker::engine::checks;
use crate::broker::engine::local::{Broker, SharedQueue};
use crate::broker::store::Commit;

/// Who consumes what.
#[derive(Debug, Clone)]
pub struct ConsumeSpec {
    /// What the stream may do: it was allowed to consume `queue`; acks it sends for
    /// leases of other queues are checked against this too.
    pub access: Access,
    /// Queue name.
    pub queue: String,
    /// Worker name (empty: the address).
    pub consumer: String,
    /// Peer address.
    pub address: String,
    /// Lease duration; `None` takes the queue policy's.
    pub visibility_timeout_ms: Option<u64>,
    /// Ends the stream besides the broker's shutdown (e.g. a tokens reload that revoked
    /// its token); a child of the broker's shutdown token. `None`: shutdown only.
    pub ends_on: Option<tokio_util::sync::CancellationToken>,
}

/// A failed delivery reported on the stream.
#[derive(Debug, Clone)]
pub struct NackCommand {
    /// Lease id.
    pub lease_id: String,
    /// Error text.
    pub error: String,
    /// Explicit retry delay.
    pub retry_delay_ms: Option<u64>,
    /// Dead-letter now.
    pub dead_letter: bool,
}

/// One client message of a consume stream.
#[derive(Debug, Clone, Default)]
pub struct ConsumeCommands {
    /// More credit.
    pub credits: u32,
    /// Acks (lease id as received, optional result). The id stays a slice of the received
    /// buffer (a stream acks every job it gets): it is checked as UTF-8 when parsed.
    pub acks: Vec<(Bytes, Option<Bytes>)>,
    /// Nacks.
    pub nacks: Vec<NackCommand>,
    /// Extensions (lease id, visibility timeout).
    pub extends: Vec<(String, u64)>,
    /// Push no more jobs on this stream.
    pub stop: bool,
}

/// One server message of a consume stream.
#[derive(Debug)]
pub enum ConsumeEvent {
    /// Newly leased jobs.
    Jobs(Vec<Delivery>),
    /// Settlements that were refused, by lease id.
    Refused(Vec<(String, BrokerError)>),
    /// The stream ends with this error (the broker's log failed).
    Failed(BrokerError),
}

/// The server side of a consume stream; ends on shutdown or when the client side ends.
///
/// There is no task behind it: jobs are leased when the transport polls the stream for
/// its next message, that is when the connection can take more, and settlements are
/// applied in the same poll. Dropping the stream puts back what it held.
pub struct ConsumeStream {
    events: Pin<Box<dyn Stream<Item = ConsumeEvent> + Send>>,
}

impl ConsumeStream {
    /// A stream of `events` (each engine builds its own session).
    pub(crate) fn new(events: Pin<Box<dyn Stream<Item = ConsumeEvent> + Send>>) -> Self {
        Self { events }
    }
}

impl Stream for ConsumeStream {
    type Item = ConsumeEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ConsumeEvent>> {
        self.events.as_mut().poll_next(cx)
    }
}

/// Most credit a stream may hold; more would let one worker hoard a queue.
const MAX_CREDITS: u64 = 10_000;

/// Lease nonces by job seq.
type Leases = HashMap<u64, u64, foldhash::fast::RandomState>;

/// One consume stream's state between two of its messages.
struct Session<S> {
    broker: Broker,
    slot: Arc<SharedQueue>,
    spec: ConsumeSpec,
    consumer: Arc<str>,
    commands: S,
    shutdown: tokio_util::sync::CancellationToken,
    credits: u64,
    stopped: bool,
    ended: bool,
    /// Deliveries of this stream not yet settled on it, by seq (the value is the lease
    /// nonce). When the stream is dropped they are put back at once, as a failed attempt.
    outstanding: Leases,
    /// The newest commit of this stream's settlements not yet known durable. Leasing goes
    /// on meanwhile: waiting for each ack's fsync before the next lease would cost a
    /// worker at batch 1 two fsyncs a job (its ack's, then the one its next ack joins).
    /// It is awaited whenever the stream would wait anyway and before the stream ends, and
    /// a log failure ends the stream as before.
    unconfirmed: Commit,
}

impl<S> Drop for Session<S> {
    fn drop(&mut self) {
        if self.outstanding.is_empty() {
            return;
        }
        let leases = std::mem::take(&mut self.outstanding);
        // Putting back is logged like a nack, and a log write is awaited; without a
        // runtime (process exit) the leases simply expire.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (broker, slot) = (self.broker.clone(), self.slot.clone());
            runtime.spawn(async move { broker.release(&slot, leases).await });
        }
    }
}

impl<S> Session<S>
where
    S: Stream<Item = ConsumeCommands> + Send + Unpin + 'static,
{
    /// The stream's next message: leased jobs as soon as there are credits and visible
    /// jobs, refusals after a command with refused settlements; `None` at the end.
    async fn next_event(&mut self) -> Option<ConsumeEvent> {
        if self.ended {
            return None;
        }
        loop {
            // Registered before looking, so a job made visible meanwhile is not missed; and
            // only with credits, since a wake-up reaches one waiter (`SharedQueue::wake_one`)
            // and a stream that cannot lease must not hold it while others could.
            let slot = self.slot.clone();
            let notified = slot.ready.notified();
            tokio::pin!(notified);
            if self.credits > 0 {
                notified.as_mut().enable();
            }
            // Deleting a queue wakes every waiter; its streams end, as a deleted queue's
            // consumers are cancelled in RabbitMQ, rather than wait on a queue that no
            // enqueue reaches any more (a new queue of that name is another queue).
            if self.slot.deleted.load(Ordering::Acquire) {
                return Some(self.fail(BrokerError::NotFound(format!(
                    "queue {:?} was deleted; this Consume stream ends: open a new one to \
                     consume from a queue of that name",
                    self.slot.name
                ))));
            }
            let mut due_in_ms = None;
            if self.credits > 0 {
                match self.lease() {
                    Ok((jobs, _)) if !jobs.is_empty() => {
                        self.credits -= jobs.len() as u64;
                        let leases = jobs.iter().map(|d| (d.lease_id.seq, d.lease_id.nonce));
                        self.outstanding.extend(leases);
                        return Some(ConsumeEvent::Jobs(jobs));
                    }
                    Ok((_, due)) => due_in_ms = due,
                    Err(e) => return Some(self.fail(e)),
                }
            }
            // A due time too far ahead for the clock (a retry saturated at the end of
            // time) is no wake-up at all.
            let wake_at = due_in_ms
                .and_then(|ms| tokio::time::Instant::now().checked_add(Duration::from_millis(ms)));
            let credits = self.credits;
            let unconfirmed = self.unconfirmed;
            tokio::select! {
                command = self.commands.next() => {
                    let Some(command) = command else {
                        // The client half-closed: its settlements count once durable.
                        let confirmed = match self.unconfirmed {
                            Commit::NONE => Ok(()),
                            unconfirmed => self.broker.durable(unconfirmed).await,
                        };
                        self.ended = true;
                        return confirmed.err().map(ConsumeEvent::Failed);
                    };
                    self.stopped |= command.stop;
                    self.credits = if self.stopped {
                        0
                    } else {
                        (self.credits + command.credits as u64).min(MAX_CREDITS)
                    };
                    match self.broker.settle(&self.slot, &self.spec.access, command, &mut self.outstanding).await {
                        Ok((refused, commit)) => {
                            self.unconfirmed = self.unconfirmed.max(commit);
                            if !refused.is_empty() {
                                return Some(ConsumeEvent::Refused(refused));
                            }
                        }
                        Err(e) => return Some(self.fail(e)),
                    }
                }
                confirmed = self.broker.durable(unconfirmed), if unconfirmed != Commit::NONE => {
                    match confirmed {
                        // Settlements appended meanwhile carry a newer commit.
                        Ok(()) if self.unconfirmed == unconfirmed => self.unconfirmed = Commit::NONE,
                        Ok(()) => {}
                        Err(e) => return Some(self.fail(e)),
                    }
                }
                _ = &mut notified, if credits > 0 => {}
                _ = async { tokio::time::sleep_until(wake_at.expect("guarded")).await }, if credits > 0 && wake_at.is_some() => {}
                _ = self.shutdown.cancelled() => {
                    self.ended = true;
                    return None;
                }
            }
        }
    }

    /// Leases up to the stream's credit (at most a batch); also returns in how many ms
    /// the next delayed job is due. Leases are not logged, but the expiries a lease runs
    /// first are.
    fn lease(&self) -> Result<(Vec<Delivery>, Option<u64>), BrokerError> {
        let max = self.credits.min(self.broker.limits().max_batch as u64) as usize;
        let now = now_ms();
        let _change = self.broker.begin()?;
        let ((leased, next_due), _) = self.broker.with_queue(&self.slot, now, |q, _| {
            let visibility = self
                .spec
                .visibility_timeout_ms
                .unwrap_or(q.policy().visibility_timeout_ms);
            (
                q.lease(now, max, visibility, &self.consumer, &self.spec.address),
                q.next_due(),
            )
        })?;
        Ok((leased, next_due.map(|due| due.saturating_sub(now))))
    }

    /// Ends the stream with `e` (the broker's log failed, or the queue was deleted).
    fn fail(&mut self, e: BrokerError) -> ConsumeEvent {
        self.ended = true;
        ConsumeEvent::Failed(e)
    }
}

impl Broker {
    /// Opens a consume session. `commands` is the client side of the stream.
    pub fn consume<S>(&self, spec: ConsumeSpec, commands: S) -> Result<ConsumeStream, BrokerError>
    where
        S: Stream<Item = ConsumeCommands> + Send + Unpin + 'static,
    {
        if let Some(v) = spec.visibility_timeout_ms {
            check_duration_ms("visibility_timeout_ms", v, MAX_VISIBILITY_MS)?;
        }
        let slot = self.queue_for_consumer("queue", &spec.queue)?;
        let consumer: Arc<str> = Arc::from(if spec.consumer.is_empty() {
            spec.address.as_str()
        } else {
            spec.consumer.as_str()
        });
        let shutdown = spec
            .ends_on
            .clone()
            .unwrap_or_else(|| self.inner.shutdown.clone());
        let session = Session {
            broker: self.clone(),
            slot,
            spec,
            consumer,
            commands,
            shutdown,
            credits: 0,
            stopped: false,
            ended: false,
            outstanding: Leases::default(),
            unconfirmed: Commit::NONE,
        };
        let events = futures::stream::unfold(session, |mut session| async move {
            let event = session.next_event().await?;
            Some((event, session))
        });
        Ok(ConsumeStream {
            events: Box::pin(events),
        })
    }

    /// Applies one command's settlements one by one, logged like their unary forms;
    /// returns the refused ones and the commit to wait for before they count (the
    /// stream leases on meanwhile). An error means the log failed (the broker is
    /// fail-stopped).
    async fn settle(
        &self,
        slot: &SharedQueue,
        access: &Access,
        command: ConsumeCommands,
        outstanding: &mut Leases,
    ) -> Result<(Vec<(String, BrokerError)>, Commit), BrokerError> {
        let mut refused = Vec::new();
        let limits = self.limits();
        // Leases of a stream name its queue: sharing the name costs no allocation.
        let parse = |field: &str, lease_id: &str| {
            LeaseId::try_parse_for(lease_id, &slot.name)
                .map_err(|why| checks::bad_lease_id(field, lease_id, why))
        };
        // Nacks and extensions name a lease of this stream's queue.
        let own = |field: &str, lease: &LeaseId, queue: &str| -> Result<(), BrokerError> {
            if *lease.queue == *queue {
                Ok(())
            } else {
                Err(BrokerError::invalid(
                    field,
                    format!("lease {lease} is not from queue {queue:?} of this stream"),
                ))
            }
        };
        // Settlements for another queue (leases from a unary Lease) go through the unary
        // path, which finds their queue itself.
        let mut foreign_acks = Vec::new();
        let mut acked_after_ms = Vec::new();
        self.wait_for_log_space().await?;
        let now = now_ms();
        let commit = {
            let _change = self.begin()?;
            let ((), commit) = self.with_queue(slot, now, |q, batch| {
                for (received, result) in command.acks {
                    let lease_id = std::str::from_utf8(&received);
                    let outcome = match lease_id {
                        Ok(lease_id) => parse("acks.lease_id", lease_id),
                        Err(_) => Err(checks::bad_lease_id(
                            "acks.lease_id",
                            &String::from_utf8_lossy(&received),
                            LeaseIdError::NotUtf8,
                        )),
                    };
                    let outcome = outcome.and_then(|lease| {
                        if *lease.queue != *q.name() {
                            let lease_id = lease_id.unwrap_or_default().to_owned();
                            foreign_acks.push((lease_id, lease, result));
                            return Ok(());
                        }
                        if let Some(r) = &result {
                            limits.check_payload("acks.result", r.len())?;
                        }
                        acked_after_ms.extend(q.ack(now, &lease, result)?);
                        batch.job_state_of(&slot.name, q, lease.seq);
                        outstanding.remove(&lease.seq);
                        Ok(())
                    });
                    if let Err(e) = outcome {
                        refused.push((String::from_utf8_lossy(&received).into_owned(), e));
                    }
                }
                for nack in &command.nacks {
                    let outcome = parse("nacks.lease_id", &nack.lease_id).and_then(|lease| {
                        checks::nack(
                            &self.inner.config.limits,
                            "nacks.",
                            &nack.error,
                            nack.retry_delay_ms,
                        )?;
                        own("nacks.lease_id", &lease, q.name())?;
                        q.nack(
                            now,
                            &lease,
                            nack.error.clone(),
                            nack.retry_delay_ms,
                            nack.dead_letter,
                        )?;
                        batch.job_state_of(&slot.name, q, lease.seq);
                        outstanding.remove(&lease.seq);
                        Ok(())
                    });
                    if let Err(e) = outcome {
                        refused.push((nack.lease_id.clone(), e));
                    }
                }
                // Extensions are not logged: leases do not survive a restart anyway.
                for (lease_id, timeout) in &command.extends {
                    let outcome = parse("extends.lease_id", lease_id).and_then(|lease| {
                        checks::visibility("extends.visibility_timeout_ms", *timeout)?;
                        own("extends.lease_id", &lease, q.name())?;
                        q.extend(now, &lease, *timeout).map(|_| ())
                    });
                    if let Err(e) = outcome {
                        refused.push((lease_id.clone(), e));
                    }
                }
            })?;
            commit
        };
        if let Some(observer) = self.inner.observer.get() {
            for ms in acked_after_ms {
                observer.job_acked(&slot.name, Duration::from_millis(ms));
            }
        }
        // Each is settled as a one-ack Ack of its own (its fields are named as there), at
        // this command's time; each waits for its own commit, which follows this one.
        for (lease_id, lease, result) in foreign_acks {
            let settled = async {
                access.check(Action::Consume, "acks.lease_id", &lease.queue)?;
                if let Some(r) = &result {
                    limits.check_payload("acks[0].result", r.len())?;
                }
                self.wait_for_log_space().await?;
                self.ack_leases(vec![(lease, result)], now).await
            };
            if let Err(e) = settled.await {
                refused.push((lease_id, e));
            }
        }
        Ok((refused, commit))
    }

    /// Puts back what a closed stream held: visible again at once, as a failed attempt.
    async fn release(&self, slot: &SharedQueue, outstanding: Leases) {
        if outstanding.is_empty() {
            return;
        }
        let now = now_ms();
        let commit = {
            // After a storage failure nothing changes any more (fail-stop); the leases
            // then simply expire.
            let Ok(_change) = self.begin() else { return };
            let released = self.with_queue(slot, now, |q, batch| {
                for (seq, nonce) in outstanding {
                    let lease = LeaseId {
                        queue: slot.name.clone(),
                        seq,
                        nonce,
                    };
                    // Already settled elsewhere or expired: nothing to release.
                    let released = q.nack(
                        now,
                        &lease,
                        "released: the consumer stream closed".into(),
                        Some(0),
                        false,
                    );
                    if released.is_ok() {
                        batch.job_state_of(&slot.name, q, seq);
                    }
                }
            });
            match released {
                Ok(((), commit)) => commit,
                Err(_) => return,
            }
        };
        let _ = self.durable(commit).await;
    }
}
