//! Consume streams on the Redis engine: the same session as the in-process engine's (credit
//! flow control, settlements on the stream, held jobs put back when the stream closes),
//! with leases and settlements as the queue's scripts and wake-ups from pub/sub.
//!
//! **Lease-ahead.** A worker that acks its job and asks for the next would otherwise wait
//! for a Redis round trip every cycle (worker -> node -> Redis and back), and Redis would
//! see one script call per job. A stream whose worker comes back for more before the last
//! lease call even returned leases jobs ahead of its credits instead: it holds up to
//! `depth` of them on the node and serves the worker's next credit from them at once, while
//! one call at a time acks what the worker settled meanwhile and leases what it took. The
//! depth doubles whenever the worker finds nothing held although it came back within a
//! few of the calls' round trips ([`QUICK_ROUND_TRIPS`]), up to `--redis-lease-ahead`; it drops to 0 when the queue runs dry,
//! when the jobs held wait [`AHEAD_HOLD`] for a credit, and on a pause or a stop. Jobs
//! held are leased in Redis (their visibility timeout runs, ListConsumers counts them) and
//! given back when not delivered: visible again at once, as if never leased (no attempt
//! counted). A slow worker (one that comes back after more than a few round trips) never
//! gets any held for it, and acks on the stream are applied at most one call later (they have
//! no answer; the stream confirms them before it ends, as before).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;
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
const CONFIRM_AFTER: Duration = Duration::from_millis(2);

/// How long jobs leased ahead wait for the worker to ask for one before they are given
/// back: a worker that was fast and now is not (a slow job) must not keep them from other
/// workers, nor spend much of their visibility timeout.
const AHEAD_HOLD: Duration = Duration::from_millis(50);

/// A worker that comes back for more within this many lease round trips of its last
/// job gets jobs held ahead: it would otherwise spend a good part of its cycle (a fifth or
/// more) waiting for Redis. A slower one gains too little for the jobs it would hold.
const QUICK_ROUND_TRIPS: u32 = 4;

/// An ack (as received, parsed, its result) of the stream's queue.
type Ack = (String, LeaseId, Option<Bytes>);

/// What an ack-and-lease script answers: each ack's outcome (all applied or none), and the
/// jobs leased.
type Settled = (Vec<Result<(), BrokerError>>, Vec<Delivery>);

/// A stream's lease call, running while the stream serves its worker.
type Call = Pin<Box<dyn Future<Output = CallDone> + Send>>;

/// What a lease call did.
struct CallDone {
    /// The acks it carried.
    acks: Vec<Ack>,
    /// How many jobs it asked for.
    asked: usize,
    /// When it was sent.
    started: Instant,
    /// What the script answered, or Redis failed.
    result: Result<Settled, BrokerError>,
}

/// One consume stream's state between two of its messages.
struct Session {
    engine: RedisEngine,
    queue: Arc<str>,
    spec: ConsumeSpec,
    consumer: String,
    commands: ConsumeCommandStream,
    shutdown: CancellationToken,
    watch: Option<Watch>,
    /// The queue's pause channel (watched with its wake channel).
    pause_channel: String,
    credits: u64,
    stopped: bool,
    ended: bool,
    /// Deliveries of this stream not yet settled on it, by seq (the value is the nonce).
    outstanding: HashMap<u64, u64>,
    /// Settlements refused, to send before any more jobs.
    refused: Vec<(String, BrokerError)>,
    /// The stream's note as a waiter on its queue, made before it waits.
    note: WaitingNote,
    /// Whether acks of this stream may not be on the replicas yet. Leasing goes on
    /// meanwhile, as on the in-process engine: waiting for each ack's `WAIT` before the
    /// next jobs go out would put a replication round trip in every worker's cycle. It is
    /// confirmed whenever the stream would wait anyway and before the stream ends; a
    /// `WAIT` that fails ends the stream.
    unconfirmed: bool,
    /// Acks received and not yet sent to Redis: the next call carries them.
    deferred: Vec<Ack>,
    /// The lease call under way, if any (one at a time).
    call: Option<Call>,
    /// Whether the last lease found fewer jobs than it asked for: the next look waits for
    /// a wake-up (or the poll) rather than asking Redis again at once.
    drained: bool,
    /// Jobs leased and not yet sent, oldest first: those the credits asked for, on their
    /// way out, and behind them those leased ahead of the credits (see the module docs).
    ahead: VecDeque<Delivery>,
    /// How many at the back of `ahead` were leased ahead of the credits.
    beyond: usize,
    /// How many jobs to lease ahead now, and at most (`--redis-lease-ahead`).
    depth: usize,
    max_depth: usize,
    /// Since when the jobs held have waited for the worker: the last delivery, or when
    /// the first of them came.
    held_since: Instant,
    /// When the worker was last sent jobs.
    last_sent: Option<Instant>,
    /// How long the last lease call took.
    round_trip: Duration,
    /// Whether a call of this stream has succeeded: its queue existed since it opened.
    served: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        let call = self.call.take();
        let acks = std::mem::take(&mut self.deferred);
        let ahead: Vec<Delivery> = self.ahead.drain(..).collect();
        let mut outstanding = std::mem::take(&mut self.outstanding);
        if call.is_none() && acks.is_empty() && ahead.is_empty() && outstanding.is_empty() {
            return;
        }
        for (_, lease, _) in &acks {
            outstanding.remove(&lease.seq);
        }
        // Without a runtime (process exit) the leases simply expire.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (engine, queue) = (self.engine.clone(), self.queue.clone());
            runtime
                .spawn(async move { engine.wind_up(&queue, call, acks, ahead, outstanding).await });
        }
    }
}

impl Session {
    /// The stream's next message: leased jobs as soon as there are credits and visible
    /// jobs, refusals after a command with refused settlements; `None` at the end.
    async fn next_event(&mut self) -> Option<ConsumeEvent> {
        loop {
            if self.ended {
                return None;
            }
            if !self.refused.is_empty() {
                return Some(ConsumeEvent::Refused(std::mem::take(&mut self.refused)));
            }
            if self.credits > 0 && !self.ahead.is_empty() {
                let jobs = self.take_ahead();
                self.refill().await;
                return Some(ConsumeEvent::Jobs(jobs));
            }
            self.refill().await;
            // Noted as waiting (renewed every poll) and then one more look, so a job made
            // visible before the note is not missed.
            if self.drained
                && self.call.is_none()
                && self.credits > 0
                && self.watch.is_some()
                && self.note.due()
            {
                if let Err(e) = self.note.note(&self.engine.inner.queues, &self.queue).await {
                    return Some(self.fail(e));
                }
                self.drained = false;
                continue;
            }
            let waiting = self.drained && self.call.is_none() && self.want() > 0;
            let watching = waiting || !self.ahead.is_empty();
            let holding = self.credits == 0 && !self.ahead.is_empty();
            let hold_ends = self.held_since + AHEAD_HOLD;
            let confirming = self.unconfirmed && self.call.is_none() && self.deferred.is_empty();
            let (engine, queue) = (&self.engine, &self.queue);
            // Lazy: built (and its commit's key named) only when polled; and only once the
            // stream has waited `CONFIRM_AFTER`, so a worker's next ack, which usually comes
            // sooner, does not leave a WAIT behind it each time (one WAIT then covers
            // many acks, and the replica is asked once per pause instead of per job).
            let confirm = async move {
                tokio::time::sleep(CONFIRM_AFTER).await;
                engine.queue_durable(queue).await
            };
            let calling = self.call.is_some();
            let call = self.call.as_mut();
            let watch = self.watch.as_mut();
            tokio::select! {
                done = async move {
                    match call {
                        Some(call) => call.await,
                        None => std::future::pending().await,
                    }
                }, if calling => {
                    self.call = None;
                    if let Err(e) = self.finish_call(done).await {
                        return Some(self.fail(e));
                    }
                }
                command = self.commands.next() => {
                    let Some(command) = command else {
                        // The client half-closed: what it settled is applied and
                        // confirmed on the replicas before the stream ends OK.
                        self.ended = true;
                        return self.close().await;
                    };
                    if let Err(e) = self.command(command).await {
                        return Some(self.fail(e));
                    }
                }
                confirmed = confirm, if confirming => {
                    // Covers every ack made before it (the WAIT's fence): no call ran
                    // meanwhile, since a command or a call's end ends this branch.
                    match confirmed {
                        Ok(()) => self.unconfirmed = false,
                        Err(e) => return Some(self.fail(e)),
                    }
                }
                fired = async {
                    match watch {
                        Some(watch) => watch.wait(POLL).await,
                        None => {
                            tokio::time::sleep(POLL).await;
                            Vec::new()
                        }
                    }
                }, if watching => {
                    if fired.contains(&self.pause_channel) {
                        self.depth = 0;
                        self.give_back_ahead().await;
                    }
                    self.drained = false;
                }
                _ = tokio::time::sleep_until(hold_ends), if holding => {
                    self.depth = 0;
                    self.give_back_ahead().await;
                }
                _ = self.shutdown.cancelled() => {
                    self.ended = true;
                    return None;
                }
            }
        }
    }

    /// How many jobs a lease call should ask for now: the worker's credits and the depth
    /// to hold ahead, less what is held already.
    fn want(&self) -> usize {
        if self.stopped {
            return 0;
        }
        let target = (self.credits as usize).saturating_add(self.depth);
        target
            .saturating_sub(self.ahead.len())
            .min(self.engine.inner.config.limits.max_batch)
    }

    /// Jobs held ahead, as many as the credits allow, now the worker's leases.
    fn take_ahead(&mut self) -> Vec<Delivery> {
        let n = (self.credits as usize)
            .min(self.ahead.len())
            .min(self.engine.inner.config.limits.max_batch);
        let asked_for = self.ahead.len() - self.beyond;
        let jobs: Vec<Delivery> = self.ahead.drain(..n).collect();
        self.credits -= n as u64;
        let served_ahead = n.saturating_sub(asked_for);
        self.beyond -= served_ahead;
        let served = &self.engine.inner.served_ahead;
        served.fetch_add(served_ahead as u64, std::sync::atomic::Ordering::Relaxed);
        let leases = jobs.iter().map(|d| (d.lease_id.seq, d.lease_id.nonce));
        self.outstanding.extend(leases);
        let now = Instant::now();
        self.last_sent = Some(now);
        self.held_since = now;
        jobs
    }

    /// Starts a lease call if none runs and there is something to do: acks to apply, or
    /// jobs wanted from a queue that did not just run dry.
    async fn refill(&mut self) {
        if self.call.is_some() || self.ended {
            return;
        }
        let asked = self.want();
        if self.deferred.is_empty() && (asked == 0 || self.drained) {
            return;
        }
        if asked > 0 && self.watch.is_none() {
            // Armed before looking, so a job made visible meanwhile is not missed.
            let channels = [
                QueueKeys::new(&self.queue).key("wake"),
                self.pause_channel.clone(),
            ];
            self.watch = Some(self.engine.inner.wakes.watch(&channels).await);
        }
        let acks = std::mem::take(&mut self.deferred);
        let (engine, queue) = (self.engine.clone(), self.queue.clone());
        let (consumer, address) = (self.consumer.clone(), self.spec.address.clone());
        let visibility = self.spec.visibility_timeout_ms;
        self.call = Some(Box::pin(async move {
            let started = Instant::now();
            let queues = &engine.inner.queues;
            let leases: Vec<(LeaseId, Option<Bytes>)> = acks
                .iter()
                .map(|(_, lease, result)| (lease.clone(), result.clone()))
                .collect();
            let result = if asked == 0 {
                queues
                    .ack(&queue, leases)
                    .await
                    .map(|acked| (acked, Vec::new()))
            } else if leases.is_empty() {
                queues
                    .lease(&queue, asked, visibility, &consumer, &address)
                    .await
                    .map(|jobs| (Vec::new(), jobs))
            } else {
                let lease = (asked, visibility, consumer.as_str(), address.as_str());
                queues.ack_lease(&queue, &leases, lease).await
            };
            CallDone {
                acks,
                asked,
                started,
                result,
            }
        }));
    }

    /// Takes in what a lease call did: its acks settled (or refused), its jobs held.
    async fn finish_call(&mut self, done: CallDone) -> Result<(), BrokerError> {
        let CallDone {
            acks,
            asked,
            started,
            result,
        } = done;
        let (acked, jobs) = match result {
            Ok(outcome) => outcome,
            Err(BrokerError::NotFound(_)) if !self.served => {
                // The stream's first call, and the queue this node knew is gone (deleted
                // through another node, or lost with Redis's data): opening the stream
                // is the queue's first use, which makes it, as a Lease would.
                self.deferred.extend(acks);
                self.engine.forget_queue(&self.queue);
                return self
                    .engine
                    .ensure_queue("queue", &self.queue, true)
                    .await
                    .map(drop);
            }
            Err(BrokerError::NotFound(_)) => {
                // Gone under a running stream: it ends, as on the in-process engine (a
                // new queue of that name is another queue). Its jobs went with it.
                self.engine.forget_queue(&self.queue);
                self.outstanding.clear();
                self.ahead.clear();
                self.beyond = 0;
                return Err(BrokerError::NotFound(format!(
                    "queue {:?} no longer exists (deleted, or lost with Redis's data); this \
                     Consume stream ends: open a new one to consume from a queue of that name",
                    self.queue
                )));
            }
            Err(e) => {
                // Unknown whether its acks were applied: the stream's end acks them again
                // (harmless) rather than putting their jobs back.
                self.deferred.extend(acks);
                return Err(e);
            }
        };
        self.round_trip = started.elapsed();
        self.served = true;
        if !acks.is_empty() {
            // All or nothing: when one was stale none was applied, and they go again one
            // by one in effect, as a command of acks alone does.
            if acked.iter().all(Result::is_ok) {
                for (_, lease, _) in &acks {
                    self.outstanding.remove(&lease.seq);
                }
            } else {
                let refused = self
                    .engine
                    .ack_each(&self.queue, acks, &mut self.outstanding)
                    .await?;
                self.refused.extend(refused);
            }
            self.unconfirmed |= self.engine.inner.config.replicas > 0;
        }
        if asked > 0 {
            self.drained = jobs.len() < asked;
            if self.drained {
                // The queue ran dry (or a limit held it back): holding jobs ahead would
                // only keep them from other workers.
                self.depth = 0;
            }
        }
        if self.stopped {
            self.engine.give_back(&self.queue, jobs).await;
        } else if !jobs.is_empty() {
            if self.ahead.is_empty() {
                self.held_since = Instant::now();
            }
            self.ahead.extend(jobs);
            self.beyond = self.ahead.len().saturating_sub(self.credits as usize);
        }
        Ok(())
    }

    /// Takes in one command of the worker: credits, settlements, a stop.
    async fn command(&mut self, command: ConsumeCommands) -> Result<(), BrokerError> {
        self.stopped |= command.stop;
        let granted = command.credits as u64;
        if self.stopped {
            self.credits = 0;
            self.depth = 0;
            self.give_back_ahead().await;
        } else {
            self.credits = (self.credits + granted).min(MAX_CREDITS);
            // The worker came back for more quickly and finds nothing held: it waits for
            // Redis every cycle, so hold more ahead.
            let quick = self
                .last_sent
                .is_some_and(|sent| sent.elapsed() < self.round_trip * QUICK_ROUND_TRIPS);
            if granted > 0 && quick && self.ahead.is_empty() && !self.drained {
                let grown = (self.depth * 2).max(granted as usize);
                self.depth = grown.min(self.max_depth);
            }
        }
        let sorted = self.engine.sort_acks(&self.queue, &command.acks);
        let acks_only = command.nacks.is_empty()
            && command.extends.is_empty()
            && sorted.foreign.is_empty()
            && sorted.refused.is_empty();
        if acks_only {
            // Applied by the next call, together with the next lease.
            self.deferred.extend(sorted.mine);
            return Ok(());
        }
        // Nacks, extends, other queues' acks, refusals: the call under way first, then
        // everything of this command and the acks before it, in order, durable before the
        // stream goes on.
        if let Some(call) = self.call.take() {
            let done = call.await;
            self.finish_call(done).await?;
        }
        let mut sorted = sorted;
        let mut mine = std::mem::take(&mut self.deferred);
        mine.append(&mut sorted.mine);
        sorted.mine = mine;
        let refused = self
            .engine
            .settle(
                &self.queue,
                &self.spec,
                sorted,
                command,
                &mut self.outstanding,
            )
            .await?;
        self.refused.extend(refused);
        Ok(())
    }

    /// The end of a half-closed stream: the call under way finished, held jobs given
    /// back, deferred acks applied, every ack confirmed on the replicas. Returns the last
    /// event: refusals, or the failure that ends the stream.
    async fn close(&mut self) -> Option<ConsumeEvent> {
        if let Some(call) = self.call.take() {
            let done = call.await;
            if let Err(e) = self.finish_call(done).await {
                return Some(ConsumeEvent::Failed(e));
            }
        }
        self.give_back_ahead().await;
        if !self.deferred.is_empty() {
            let acks = std::mem::take(&mut self.deferred);
            match self
                .engine
                .ack_each(&self.queue, acks, &mut self.outstanding)
                .await
            {
                Ok(refused) => self.refused.extend(refused),
                Err(e) => return Some(ConsumeEvent::Failed(e)),
            }
            self.unconfirmed |= self.engine.inner.config.replicas > 0;
        }
        if self.unconfirmed {
            if let Err(e) = self.engine.queue_durable(&self.queue).await {
                return Some(ConsumeEvent::Failed(e));
            }
            self.unconfirmed = false;
        }
        if self.refused.is_empty() {
            None
        } else {
            Some(ConsumeEvent::Refused(std::mem::take(&mut self.refused)))
        }
    }

    /// Gives back every job held ahead.
    async fn give_back_ahead(&mut self) {
        self.beyond = 0;
        let held: Vec<Delivery> = self.ahead.drain(..).collect();
        self.engine.give_back(&self.queue, held).await;
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
        let pause_channel = QueueKeys::new(&spec.queue).key("pause");
        let session = Session {
            engine: self.clone(),
            queue: Arc::from(spec.queue.as_str()),
            spec,
            consumer,
            commands,
            shutdown,
            watch: None,
            pause_channel,
            credits: 0,
            stopped: false,
            ended: false,
            outstanding: HashMap::new(),
            refused: Vec::new(),
            note: WaitingNote::new(),
            unconfirmed: false,
            deferred: Vec::new(),
            call: None,
            drained: false,
            ahead: VecDeque::new(),
            beyond: 0,
            depth: 0,
            max_depth: self
                .inner
                .config
                .lease_ahead
                .min(self.inner.config.limits.max_batch),
            held_since: Instant::now(),
            last_sent: None,
            round_trip: Duration::ZERO,
            served: false,
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

    /// Gives back jobs a stream leased ahead and did not deliver (see the module docs).
    /// If Redis cannot be reached their leases expire instead, each then a failed attempt.
    async fn give_back(&self, queue: &str, jobs: Vec<Delivery>) {
        if jobs.is_empty() {
            return;
        }
        let held = jobs.iter().map(|d| (d.lease_id.seq, d.lease_id.nonce));
        match self.inner.queues.unlease(queue, held).await {
            // Those still leased to the stream: the rest were settled or expired meanwhile.
            Ok(back) => {
                let counted = &self.inner.given_back;
                counted.fetch_add(back, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(queue, error = %e, "jobs leased ahead left to expire"),
        }
    }

    /// What a stream that went away (dropped, not half-closed) leaves: the call under way
    /// finished, the acks its worker sent applied (they were the worker's word), the jobs
    /// held ahead given back, and what the worker still held put back as failed attempts.
    async fn wind_up(
        &self,
        queue: &Arc<str>,
        call: Option<Call>,
        mut acks: Vec<Ack>,
        mut ahead: Vec<Delivery>,
        mut outstanding: HashMap<u64, u64>,
    ) {
        if let Some(call) = call {
            let done = call.await;
            match done.result {
                Ok((acked, jobs)) => {
                    ahead.extend(jobs);
                    if !acked.iter().all(Result::is_ok) {
                        acks.extend(done.acks);
                    }
                }
                // Unknown whether they were applied: acking again is harmless.
                Err(_) => acks.extend(done.acks),
            }
        }
        let acked = !acks.is_empty();
        if acked {
            let mut settled = HashMap::new();
            if let Err(e) = self.ack_each(queue, acks, &mut settled).await {
                tracing::debug!(queue = &**queue, error = %e, "a closed stream's acks not applied");
            }
        }
        self.give_back(queue, ahead).await;
        if !outstanding.is_empty() {
            self.release(queue, std::mem::take(&mut outstanding)).await;
        } else if acked {
            let _ = self.queue_durable(queue).await;
        }
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
