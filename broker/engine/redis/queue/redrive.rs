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
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use uuid::Uuid;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::{Headers, MAX_QUEUE_DEPTH, MAX_REDRIVE_RATE, check_count};
use crate::broker::domain::queue::{BROKER_HEADER_PREFIX, QueuePolicy};
use crate::broker::engine::local::RedriveOutcome;

use super::library::Call;
use super::{Fields, QueueKeys, QueueStore, Row, encode_headers, malformed};

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
        let mut inv = Call::new("redrive_targets", keys.base());
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
            self.ensure(target, &QueuePolicy::default_for(target), false)
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
            let mut inv = Call::new("redrive_claim", keys.base());
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
        let mut inv = Call::new("redrive_take", keys.base());
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
        let mut inv = Call::new("redrive_done", keys.base());
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
            let mut inv = Call::new("redrive_forget", keys.base());
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
        let mut inv = Call::new("redrive_put", keys.base());
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
                self.ensure(&job.origin, &QueuePolicy::default_for(&job.origin), false)
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::broker::domain::queue::{HEADER_ORIGINAL_QUEUE, Job, JobState, NewJob, QueuePolicy};
    use crate::broker::engine::redis::conn::connect;
    use crate::broker::testing::redis::RedisServer;

    async fn store() -> (RedisServer, QueueStore) {
        let server = RedisServer::start();
        let conn = connect(&[server.url()]).await.expect("connect");
        (server, QueueStore::new(conn))
    }

    /// Creates `queue` (dead-lettering into `<queue>.dlq`) and kills one job per payload
    /// into its dead-letter queue; returns their ids.
    async fn dead_letters(s: &QueueStore, queue: &str, payloads: &[&str]) -> Vec<Uuid> {
        s.ensure(queue, &QueuePolicy::default_for(queue), false)
            .await
            .unwrap();
        let jobs = payloads
            .iter()
            .map(|p| NewJob {
                payload: Bytes::from(p.to_string()),
                kind: "k".into(),
                headers: [("user".to_owned(), p.to_string())].into(),
                priority: 3,
                ..NewJob::default()
            })
            .collect();
        let ids: Vec<Uuid> = s
            .enqueue(queue, jobs)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        let leased = s
            .lease(queue, payloads.len(), None, "w", "a")
            .await
            .unwrap();
        assert_eq!(leased.len(), payloads.len());
        for d in leased {
            s.nack(&d.lease_id, "boom".into(), None, true)
                .await
                .unwrap();
        }
        assert_eq!(
            s.move_dead_letters(queue).await.unwrap(),
            payloads.len() as u64
        );
        ids
    }

    async fn job(s: &QueueStore, queue: &str, id: &Uuid) -> Option<Job> {
        s.get(queue, id).await.unwrap()
    }

    fn allowed(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// Every job goes back to its recorded origin with the broker's headers stripped,
    /// attempts reset and its dead record there replaced; the dead-letter queue keeps
    /// nothing of it.
    #[tokio::test]
    async fn redis_redrive_returns_dead_letters_to_their_origins() {
        let (_srv, s) = store().await;
        let a = dead_letters(&s, "a", &["a1", "a2"]).await;
        let b = dead_letters(&s, "b", &["b1"]).await;
        // Both dead-letter into their own queue: move b's into a.dlq to mix origins.
        let dead_b = job(&s, "b.dlq", &b[0]).await.unwrap();
        s.cancel("b.dlq", &b[0]).await.unwrap();
        let mut dead_b_in_b = job(&s, "b", &b[0]).await.unwrap();
        dead_b_in_b.dead_letter_queue = Some("a.dlq".into());
        s.insert_dead_letter("b", dead_b_in_b.seq + 100, dead_b_in_b)
            .await
            .unwrap();
        assert_eq!(dead_b.origin.as_deref(), Some("b"));
        let dead_a = job(&s, "a.dlq", &a[0]).await.unwrap();
        assert_eq!(
            dead_a
                .headers
                .get(HEADER_ORIGINAL_QUEUE)
                .map(String::as_str),
            Some("a")
        );

        assert_eq!(
            s.redrive_targets("a.dlq", &[], 0).await.unwrap(),
            allowed(&["a", "b"])
        );
        assert_eq!(
            s.redrive_targets("a.dlq", &[], 1).await.unwrap(),
            allowed(&["a"])
        );
        let report = s
            .redrive("a.dlq", &[], 0, 0, &allowed(&["a", "b"]))
            .await
            .unwrap();
        assert_eq!(
            report.by_origin,
            [("a".to_owned(), 2), ("b".to_owned(), 1)].into()
        );
        assert!(report.skipped.is_empty());
        assert_eq!(report.clone().into_outcome().redriven, 3);

        let dlq = s.counts("a.dlq").await.unwrap();
        assert_eq!((dlq.pending, dlq.scheduled, dlq.retrying), (0, 0, 0));
        for (queue, id, payload) in [("a", a[0], "a1"), ("a", a[1], "a2"), ("b", b[0], "b1")] {
            assert!(job(&s, "a.dlq", &id).await.is_none());
            let back = job(&s, queue, &id).await.unwrap();
            assert_eq!(back.state, JobState::Pending);
            assert_eq!((back.attempts, back.priority), (0, 3));
            assert_eq!(back.payload, payload.as_bytes());
            assert_eq!(back.origin, None);
            assert_eq!(
                back.headers,
                [("user".to_owned(), payload.to_owned())].into()
            );
        }
        // The dead records were replaced: one live job each, none dead in history.
        let counts = s.counts("a").await.unwrap();
        assert_eq!(counts.pending, 2);
        assert!(s.history("a", 10).await.unwrap().is_empty());
        let leased = s.lease("a", 10, None, "w", "a").await.unwrap();
        assert_eq!(leased.len(), 2);
        assert!(leased.iter().all(|d| d.attempt == 1));
    }

    /// Requested ids that are not movable are skipped: unknown, leased, given twice, or
    /// from an origin the caller did not allow.
    #[tokio::test]
    async fn redis_redrive_by_id_skips_what_it_may_not_move() {
        let (_srv, s) = store().await;
        let ids = dead_letters(&s, "q", &["1", "2", "3"]).await;
        let leased = s.lease("q.dlq", 1, None, "w", "a").await.unwrap();
        assert_eq!(leased[0].job_id, ids[0]);
        let unknown = Uuid::now_v7();
        let ask = [ids[0], ids[1], ids[1], unknown, ids[2]];
        assert_eq!(
            s.redrive_targets("q.dlq", &ask, 0).await.unwrap(),
            allowed(&["q"])
        );
        let report = s
            .redrive("q.dlq", &ask, 0, 0, &allowed(&["q"]))
            .await
            .unwrap();
        assert_eq!(report.by_origin, [("q".to_owned(), 2)].into());
        assert_eq!(report.skipped, vec![ids[0], ids[1], unknown]);
        // Not allowed: stays.
        let other = dead_letters(&s, "r", &["4"]).await;
        let report = s
            .redrive("r.dlq", &other, 0, 0, &allowed(&["q"]))
            .await
            .unwrap();
        assert_eq!(report.redriven(), 0);
        assert_eq!(report.skipped, other);
        assert!(job(&s, "r.dlq", &other[0]).await.is_some());
        // A missing dead-letter queue is NotFound, with the in-process wording.
        let err = s.redrive_targets("nope", &[], 0).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            BrokerError::NotFound("queue \"nope\" does not exist".into()).to_string()
        );
    }

    /// `max_jobs` caps a redrive and `rate_per_second` paces it (a batch per 100 ms).
    #[tokio::test]
    async fn redis_redrive_is_capped_and_paced() {
        let (_srv, s) = store().await;
        dead_letters(&s, "q", &["1", "2", "3", "4", "5"]).await;
        let start = Instant::now();
        let report = s
            .redrive("q.dlq", &[], 10, 3, &allowed(&["q"]))
            .await
            .unwrap();
        assert_eq!(report.redriven(), 3);
        // One job a tick at 10/s: ticks at 0, 100 and 200 ms.
        assert!(start.elapsed() >= Duration::from_millis(150));
        assert_eq!(s.counts("q.dlq").await.unwrap().pending, 2);
        let err = s
            .redrive("q.dlq", &[], 100_001, 0, &allowed(&["q"]))
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::InvalidArgument { .. }), "{err}");
        assert!(err.to_string().contains("rate_per_second"), "{err}");
    }

    /// A node that stops after parking jobs (and after storing some of them) leaves them
    /// parked; once its ownership ends, the next redrive finishes the moves, storing each
    /// job once. While owned, nobody else claims them.
    #[tokio::test]
    async fn redis_redrive_finishes_moves_a_stopped_node_left() {
        let (_srv, s) = store().await;
        let ids = dead_letters(&s, "q", &["1", "2"]).await;
        let (parked, _) = s
            .take_for_redrive("q.dlq", &[], 10, &allowed(&["q"]))
            .await
            .unwrap();
        assert_eq!(parked.len(), 2);
        // Step 2 ran for the first job only, then the node "stopped".
        assert!(
            s.put_redriven(parked[0].letter.as_ref().unwrap())
                .await
                .unwrap()
        );
        assert!(job(&s, "q.dlq", &ids[0]).await.is_none());
        assert!(s.list("q.dlq", None, 10, None).await.unwrap().0.is_empty());
        // Still owned: nothing to claim, and a redrive finds nothing to move.
        assert_eq!(s.resume_redrives("q.dlq").await.unwrap().redriven(), 0);
        // End the ownership (as 60 s would).
        let mut c = s.conn.clone();
        let _: () = redis::cmd("ZADD")
            .arg(QueueKeys::new("q.dlq").key("rdbox"))
            .arg("XX")
            .arg(0)
            .arg(parked[0].seq)
            .arg(0)
            .arg(parked[1].seq)
            .query_async(&mut c)
            .await
            .unwrap();
        let report = s
            .redrive("q.dlq", &[], 0, 0, &allowed(&["q"]))
            .await
            .unwrap();
        // The first was stored before the stop: its retry stores nothing.
        assert_eq!(report.by_origin, [("q".to_owned(), 1)].into());
        assert_eq!(s.counts("q").await.unwrap().pending, 2);
        for id in &ids {
            assert_eq!(job(&s, "q", id).await.unwrap().state, JobState::Pending);
        }
        // Nothing is left parked, and no token remains.
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*rd*")
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(keys.is_empty(), "{keys:?}");
        // Deleting a queue with parked jobs leaves no key behind.
        let more = dead_letters(&s, "z", &["9"]).await;
        s.take_for_redrive("z.dlq", &more, 10, &allowed(&["z"]))
            .await
            .unwrap();
        s.delete("z.dlq").await.unwrap();
        let left: Vec<String> = redis::cmd("KEYS")
            .arg("*z.dlq*")
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }
}
