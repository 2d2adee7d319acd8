//! Redriving dead letters back to the queues they came from, as the in-process
//! `Broker::redrive` does: a job returns to the origin the broker recorded when it
//! dead-lettered it (never to a queue a header names), with its `x-sluice-*` headers
//! stripped and its attempts reset, replacing its dead record there; leased jobs and jobs
//! without an origin stay.
//!
//! # Moving a job between two slots exactly once
//!
//! A dead-letter queue and an origin are two slots, so a move is four scripts, each safe
//! to repeat:
//!
//! 1. `redrive_take.lua` (dead-letter queue) parks the job: it leaves every index of the
//!    queue, its hash becomes `:rd:<seq>` with a token of this move
//!    (`<queue>/<seq>/<node-made nonce>`), and its seq goes into the `:rdbox` zset scored
//!    by the end of the caller's ownership ([`PARK_MS`]).
//! 2. `redrive_put.lua` (origin) stores the job unless the token is in the origin's
//!    `:rdseen` zset, and records the token there.
//! 3. `redrive_done.lua` (dead-letter queue) drops the parked job.
//! 4. `redrive_forget.lua` (origin) drops the token: no retry of step 2 can come now.
//!
//! A node that stops after step 1 leaves the job parked; once its ownership ends, the
//! next redrive of that queue (or [`QueueStore::resume_redrives`], which the engine's
//! sweep calls) claims it and repeats steps 2 to 4: if step 2 had run, its token answers
//! "stored already". A stop between steps 3 and 4 leaves a token that nothing looks up
//! again; step 2 drops tokens older than a week. The one way to store a job twice is a
//! node that stalls for longer than [`PARK_MS`] between steps 1 and 4 while another
//! claims its jobs and runs step 2 after the first's step 4.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use redis::{Script, Value};
use uuid::Uuid;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::{Headers, MAX_QUEUE_DEPTH, MAX_REDRIVE_RATE, check_count};
use crate::broker::domain::queue::{BROKER_HEADER_PREFIX, QueuePolicy};
use crate::broker::engine::local::RedriveOutcome;

use super::{COMMON, Fields, QueueKeys, QueueStore, Row, encode_headers, malformed};

/// A script of this file: the queues' [`COMMON`] followed by its own `.lua` file (next
/// to this one; `queue.rs`'s `script!` resolves paths from `queue.rs`), built once.
macro_rules! script {
    ($file:literal) => {{
        static SCRIPT: LazyLock<Script> =
            LazyLock::new(|| Script::new(&format!("{COMMON}\n{}", include_str!($file))));
        &*SCRIPT
    }};
}

/// How long a redrive owns the jobs it parks before another redrive may claim them.
const PARK_MS: u64 = 60_000;

/// Parked jobs claimed at a time by [`QueueStore::resume_redrives`].
const CLAIM_BATCH: usize = 100;

/// What a redrive moved: per origin queue, how many jobs it stored there, and the
/// requested ids it could not move (not here, finished, leased, never dead-lettered by
/// the broker, or from a queue the caller did not allow).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RedriveReport {
    /// Jobs stored back, by the queue they went to.
    pub(crate) by_origin: BTreeMap<String, u64>,
    /// Requested ids left where they were.
    pub(crate) skipped: Vec<Uuid>,
}

impl RedriveReport {
    /// Jobs moved back in all.
    pub(crate) fn redriven(&self) -> u64 {
        self.by_origin.values().sum()
    }

    /// The engine-neutral result.
    pub(crate) fn into_outcome(self) -> RedriveOutcome {
        RedriveOutcome {
            redriven: self.redriven(),
            skipped: self.skipped,
        }
    }
}

/// A job parked by step 1: its seq there, and what step 2 stores (none if its hash is
/// gone, which only a hand-made change to Redis does: the move is then just dropped).
struct Parked {
    seq: u64,
    letter: Option<Letter>,
}

/// What step 2 stores.
struct Letter {
    token: String,
    origin: String,
    id: Uuid,
    kind: String,
    payload: Bytes,
    headers: Headers,
    priority: u8,
}

impl QueueStore {
    /// The distinct queues a redrive of `ids` (or, when empty, of up to `max_jobs` of the
    /// oldest movable jobs; 0 = all) would move jobs into, so the caller can check
    /// access and room before anything moves. Moves nothing. NotFound if the dead-letter
    /// queue does not exist.
    pub(crate) async fn redrive_targets(
        &self,
        dead_letter_queue: &str,
        ids: &[Uuid],
        max_jobs: u64,
    ) -> Result<BTreeSet<String>, BrokerError> {
        let keys = QueueKeys::new(dead_letter_queue);
        let mut inv = script!("redrive_targets.lua").key(keys.base());
        inv.arg(dead_letter_queue).arg(most(max_jobs));
        for id in ids {
            inv.arg(id.to_string());
        }
        let origins: Vec<String> = self
            .run(
                &format!("reading the redrive targets of queue {dead_letter_queue:?}"),
                None,
                &inv,
            )
            .await?;
        Ok(origins.into_iter().collect())
    }

    /// Moves dead jobs of `dead_letter_queue` back to the queues they were dead-lettered
    /// from: `ids`, or when empty the oldest movable jobs, at most `max_jobs` (0: no cap)
    /// and `rate_per_second` a second (0: 1 000), in batches every 100 ms as the
    /// in-process engine does. Only jobs whose origin is in `allowed` move (the caller
    /// gets them from [`QueueStore::redrive_targets`] and checks access and room first);
    /// a missing one is created with the default policy. Jobs an earlier redrive of this
    /// queue left parked are finished first (and counted). Dropping the future between
    /// batches or mid-batch loses nothing: see the module docs.
    ///
    /// The id count limit, id parsing and access checks are the caller's.
    pub(crate) async fn redrive(
        &self,
        dead_letter_queue: &str,
        ids: &[Uuid],
        rate_per_second: u32,
        max_jobs: u64,
        allowed: &BTreeSet<String>,
    ) -> Result<RedriveReport, BrokerError> {
        check_count("rate_per_second", rate_per_second.into(), MAX_REDRIVE_RATE)?;
        check_count("max_jobs", max_jobs, MAX_QUEUE_DEPTH)?;
        for target in allowed {
            self.ensure(target, &QueuePolicy::default_for(target))
                .await?;
        }
        let mut report = self.resume_redrives(dead_letter_queue).await?;
        let rate = if rate_per_second == 0 {
            1_000
        } else {
            rate_per_second
        } as usize;
        // Ten steps a second keep the rate smooth.
        let step = rate.div_ceil(10);
        let mut moved: u64 = 0;
        let mut pending_ids = ids;
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        loop {
            ticker.tick().await;
            let budget = if max_jobs == 0 {
                step
            } else {
                step.min((max_jobs - moved) as usize)
            };
            let (chunk, rest) = pending_ids.split_at(pending_ids.len().min(budget));
            pending_ids = rest;
            let (parked, skipped) = self
                .take_for_redrive(dead_letter_queue, chunk, budget, allowed)
                .await?;
            report.skipped.extend(skipped);
            let taken = parked.len() as u64;
            self.land(dead_letter_queue, parked, &mut report).await?;
            moved += taken;
            let done = if ids.is_empty() {
                taken < budget as u64
            } else {
                pending_ids.is_empty()
            };
            if done || (max_jobs > 0 && moved >= max_jobs) {
                return Ok(report);
            }
        }
    }

    /// Finishes the moves of jobs that redrives of `dead_letter_queue` parked and no
    /// longer own (their node stopped, or stalled past [`PARK_MS`]). The engine's sweep
    /// calls it; [`QueueStore::redrive`] does first. Returns what it moved.
    pub(crate) async fn resume_redrives(
        &self,
        dead_letter_queue: &str,
    ) -> Result<RedriveReport, BrokerError> {
        let keys = QueueKeys::new(dead_letter_queue);
        let mut report = RedriveReport::default();
        loop {
            let mut inv = script!("redrive_claim.lua").key(keys.base());
            inv.arg(dead_letter_queue).arg(CLAIM_BATCH).arg(PARK_MS);
            let rows: Vec<Value> = self
                .run(
                    &format!("claiming parked redrives of queue {dead_letter_queue:?}"),
                    None,
                    &inv,
                )
                .await?;
            let full = rows.len() == CLAIM_BATCH;
            let parked = parked_rows(dead_letter_queue, rows)?;
            self.land(dead_letter_queue, parked, &mut report).await?;
            if !full {
                return Ok(report);
            }
        }
    }

    /// Step 1: parks up to `budget` movable jobs (`ids`, or the oldest if empty).
    async fn take_for_redrive(
        &self,
        dead_letter_queue: &str,
        ids: &[Uuid],
        budget: usize,
        allowed: &BTreeSet<String>,
    ) -> Result<(Vec<Parked>, Vec<Uuid>), BrokerError> {
        let keys = QueueKeys::new(dead_letter_queue);
        let mut inv = script!("redrive_take.lua").key(keys.base());
        inv.arg(dead_letter_queue)
            .arg(budget.max(1))
            .arg(format!("{:016x}", fastrand::u64(..)))
            .arg(PARK_MS)
            .arg(allowed.len());
        for origin in allowed {
            inv.arg(origin);
        }
        for id in ids {
            inv.arg(id.to_string());
        }
        let reply: Value = self
            .run(
                &format!("taking dead letters out of queue {dead_letter_queue:?}"),
                None,
                &inv,
            )
            .await?;
        let mut row = Row::new("redrive take", reply)?;
        let rows: Vec<Value> = row.next()?;
        let skipped: Vec<String> = row.next()?;
        let skipped = skipped
            .iter()
            .map(|id| Uuid::parse_str(id).map_err(|e| malformed("redrive take", e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((parked_rows(dead_letter_queue, rows)?, skipped))
    }

    /// Steps 2 to 4 for parked jobs; counts what step 2 stored into `report`.
    async fn land(
        &self,
        dead_letter_queue: &str,
        parked: Vec<Parked>,
        report: &mut RedriveReport,
    ) -> Result<(), BrokerError> {
        if parked.is_empty() {
            return Ok(());
        }
        let mut tokens: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for job in parked.iter().filter_map(|p| p.letter.as_ref()) {
            if self.put_redriven(job).await? {
                *report.by_origin.entry(job.origin.clone()).or_default() += 1;
            }
            tokens.entry(&job.origin).or_default().push(&job.token);
        }
        let keys = QueueKeys::new(dead_letter_queue);
        let mut inv = script!("redrive_done.lua").key(keys.base());
        inv.arg(dead_letter_queue);
        for job in &parked {
            inv.arg(job.seq);
        }
        self.run::<i64>(
            &format!("dropping redriven jobs from queue {dead_letter_queue:?}"),
            None,
            &inv,
        )
        .await?;
        for (origin, tokens) in tokens {
            let keys = QueueKeys::new(origin);
            let mut inv = script!("redrive_forget.lua").key(keys.base());
            inv.arg(origin).arg(&tokens);
            self.run::<i64>(
                &format!("finishing a redrive into queue {origin:?}"),
                None,
                &inv,
            )
            .await?;
        }
        Ok(())
    }

    /// Step 2 for one job: whether this call stored it. A job already taken out must
    /// land, so an origin deleted since the redrive began is created again.
    async fn put_redriven(&self, job: &Letter) -> Result<bool, BrokerError> {
        let keys = QueueKeys::new(&job.origin);
        let mut inv = script!("redrive_put.lua").key(keys.base());
        inv.arg(&job.origin)
            .arg(&job.token)
            .arg(job.id.to_string())
            .arg(&job.kind)
            .arg(job.payload.as_ref())
            .arg(encode_headers(&job.headers))
            .arg(job.priority);
        let doing = format!("redriving a job into queue {:?}", job.origin);
        let stored: i64 = match self.run(&doing, None, &inv).await {
            Err(BrokerError::NotFound(_)) => {
                self.ensure(&job.origin, &QueuePolicy::default_for(&job.origin))
                    .await?;
                self.run(&doing, None, &inv).await?
            }
            other => other?,
        };
        Ok(stored == 1)
    }
}

/// `max_jobs` as the scripts' "most" (0: no cap).
fn most(max_jobs: u64) -> u64 {
    if max_jobs == 0 {
        u64::from(u32::MAX)
    } else {
        max_jobs
    }
}

/// Reads `{seq, fields}` rows of parked jobs.
fn parked_rows(queue: &str, rows: Vec<Value>) -> Result<Vec<Parked>, BrokerError> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut r = Row::new("a parked redrive", row)?;
        let seq: u64 = r.next()?;
        let mut map: HashMap<String, Vec<u8>> = r.next()?;
        if map.is_empty() {
            out.push(Parked { seq, letter: None });
            continue;
        }
        let token = map
            .remove("rdtoken")
            .and_then(|t| String::from_utf8(t).ok())
            .ok_or_else(|| malformed("a parked redrive", format!("job {seq} has no token")))?;
        let job = Fields { queue, seq, map }.into_job()?;
        let origin = job
            .origin
            .ok_or_else(|| malformed("a parked redrive", format!("job {seq} has no origin")))?;
        out.push(Parked {
            seq,
            letter: Some(Letter {
                token,
                origin,
                id: job.id,
                kind: job.kind,
                payload: job.payload,
                headers: job
                    .headers
                    .into_iter()
                    .filter(|(k, _)| !k.starts_with(BROKER_HEADER_PREFIX))
                    .collect(),
                priority: job.priority,
            }),
        });
    }
    Ok(out)
}
