//! The Redis engine: queues and topics kept in Redis (a standalone server or a Redis
//! Cluster), so several Sluice nodes serve the same state and none holds any of it.
//!
//! * `queue`: work queues as Lua scripts, one script call per operation, each in its
//!   queue's slot (hash tag `{q:<name>}`).
//! * `topic` and `subscription`: topics as Redis Streams with explicit sequence ids, and
//!   the subscriptions that read them (each node writes how many of its subscriptions
//!   follow each topic, with a heartbeat, for Stats: see `topic/subscribers.rs`).
//! * `wake`: sharded pub/sub (`SPUBLISH`) wakes long polls, consume streams and
//!   subscribers on every node within milliseconds; a slow poll is the safety net.
//! * `replication`: an answer waits until its change is on `--redis-replicas` replicas
//!   (`WAIT`, one in flight per shard, shared by the requests that arrive meanwhile).
//! * `background`: the sweep every node runs: lease expiry and due timers of queues
//!   nobody is leasing from, dead letters on their way, topic retention by age.
//!
//! Each node keeps only caches that a miss repairs (which queues it has seen exist).
//! Time is Redis's, so nodes with skewed clocks agree on deadlines.

mod background;
pub(crate) mod binding;
mod catalog_lock;
pub(crate) mod conn;
mod consume;
mod engine;
pub(crate) mod keys;
pub(crate) mod queue;
mod redrive;
pub(crate) mod replication;
mod schedule;
pub(crate) mod schema;
pub(crate) mod subscription;
pub(crate) mod topic;
pub(crate) mod wake;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::Limits;
use crate::broker::domain::names::Pattern;
use crate::broker::domain::observe::Observer;
use crate::broker::domain::queue::QueuePolicy;
use crate::broker::engine::checks;
use crate::broker::engine::local::stats::StatsHub;
use crate::broker::sync::lock;

use self::conn::RedisConn;
pub use self::conn::redacted_seeds;
use self::keys::QueueKeys;
use self::queue::QueueStore;
use self::replication::Replication;
use self::schema::SchemaStore;
use self::topic::TopicStore;
use self::wake::Wakes;

/// How to reach Redis and how durable an answer must be.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port` of a standalone server, or several seed nodes of a cluster.
    pub seeds: Vec<String>,
    /// Replicas each change must reach before it is answered (`WAIT`); 0 answers once the
    /// primary has it.
    pub replicas: u32,
    /// How long an answer waits for the replicas before it is UNAVAILABLE (outcome
    /// unknown).
    pub replica_timeout: Duration,
    /// Request limits.
    pub limits: Limits,
    /// How often each node sweeps (lease expiry, due timers, dead letters, retention).
    pub sweep_interval: Duration,
    /// Most jobs a consume stream leases ahead of its worker's credits (see
    /// `consume.rs`, "lease-ahead"); 0 leases only what the credits ask for.
    pub lease_ahead: usize,
}

impl RedisConfig {
    /// The default of [`Self::lease_ahead`].
    pub const DEFAULT_LEASE_AHEAD: usize = 256;

    /// Defaults for `seeds`: no replicas to wait for, a 1 s replica timeout, the default
    /// limits and a 100 ms sweep.
    pub fn new(seeds: Vec<String>) -> Self {
        Self {
            seeds,
            replicas: 0,
            replica_timeout: Duration::from_secs(1),
            limits: Limits::default(),
            sweep_interval: Duration::from_millis(100),
            lease_ahead: Self::DEFAULT_LEASE_AHEAD,
        }
    }
}

/// What a change made through the Redis engine waits for before it is answered: the
/// key whose shard must `WAIT` for the replicas (`None`: nothing to wait for).
#[derive(Debug)]
pub struct RedisCommit(Option<String>);

/// The Redis engine. Clone it freely: clones share one set of connections.
#[derive(Clone)]
pub struct RedisEngine {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    conn: RedisConn,
    queues: QueueStore,
    topics: TopicStore,
    /// Message schemas, and this node's compiled cache of them.
    schemas: SchemaStore,
    wakes: Wakes,
    replication: Replication,
    shutdown: CancellationToken,
    /// Queues this node has seen exist: enqueue and lease create a missing queue (as the
    /// in-process engine does) without asking Redis first each time. A queue deleted by
    /// another node is found missing by its next script, which repairs this.
    known: Mutex<HashSet<String>>,
    /// The topic bindings of every queue that has some, as of this node's last look
    /// (its own policy changes, and the sweep's refresh): a publish here pumps them.
    bindings: Mutex<HashMap<String, Vec<Pattern>>>,
    /// The catalog's queues as of the sweep's last slow round (read once a second, not
    /// every sweep); each sweep also covers the queues this node knows.
    catalog: Mutex<Option<Vec<String>>>,
    stats: StatsHub,
    observer: OnceLock<Arc<dyn Observer>>,
    /// Subscriptions open on this node, against `--max-subscriptions` (a node's own
    /// resources: each holds a task's worth of reads).
    subscriptions: Arc<AtomicUsize>,
    /// Schedules whose last fire failed on this node (a full queue, no room for the
    /// queue), and when this node tries again: the sweep runs every 100 ms, and a warning
    /// a sweep would be noise.
    schedule_retry: Mutex<HashMap<String, crate::broker::domain::time::Millis>>,
    /// Jobs Consume streams sent from what they leased ahead, and jobs they gave back
    /// undelivered (see `consume.rs`).
    served_ahead: AtomicU64,
    given_back: AtomicU64,
    /// This node's queue creators, one at a time (see `catalog_lock.rs`).
    creating: tokio::sync::Mutex<()>,
}

/// One open subscription's place under `--max-subscriptions`; given back when dropped
/// (with the stream that holds it).
pub(crate) struct SubscriptionSlot(Arc<AtomicUsize>);

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RedisEngine {
    /// Connects to Redis (a standalone server or a cluster, told apart by the server) and
    /// starts this node's wake-up subscriber, sweep and subscriber-count heartbeat. Must
    /// be called inside a Tokio runtime; the tasks end on [`RedisEngine::shutdown`].
    pub async fn connect(config: RedisConfig) -> Result<Self, BrokerError> {
        // `rediss://` seeds: TLS by rustls, which needs a process-wide crypto provider
        // (the same ring the gRPC side uses); one installed already is kept.
        if config.seeds.iter().any(|s| s.starts_with("rediss://")) {
            let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        }
        // Replies wait at most a second past the replica timeout (a WAIT's longest).
        let response_timeout = config.replica_timeout + Duration::from_secs(1);
        let mut conn = conn::connect_with(&config.seeds, response_timeout).await?;
        let evicting = conn
            .eviction_policies()
            .await
            .map_err(|e| conn::unavailable("INFO memory", e))?;
        if !evicting.is_empty() {
            return Err(conn::evicting_refusal(&evicting));
        }
        // Replicas may join later, so too few is no reason to refuse to start; but until
        // they do every write waits out its WAIT and is UNAVAILABLE, which the log says.
        if config.replicas > 0 {
            match conn.fewest_replicas().await {
                Ok(connected) if connected < u64::from(config.replicas) => tracing::warn!(
                    replicas = config.replicas,
                    connected,
                    "--redis-replicas {}: a Redis primary has {connected} replica(s) \
                     connected; writes are refused (UNAVAILABLE, outcome unknown) until {} are",
                    config.replicas,
                    config.replicas
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not count the primaries' replicas"),
            }
        }
        let shutdown = CancellationToken::new();
        let wakes = Wakes::start(config.seeds.clone(), shutdown.clone());
        // A WAIT blocks the connection it travels on until the replicas answer: on the
        // shared connection every request of this node to that primary would wait behind
        // it, a replication round trip each time. So WAITs get a connection of their own
        // (their fence write makes them cover every connection's writes).
        let wait_conn = if config.replicas > 0 {
            conn.sibling(&config.seeds, response_timeout).await?
        } else {
            conn.clone()
        };
        let replication = Replication::new(wait_conn, config.replicas, config.replica_timeout);
        let engine = Self {
            inner: Arc::new(Inner {
                queues: QueueStore::new(conn.clone()),
                topics: TopicStore::new(conn.clone()),
                schemas: SchemaStore::new(conn.clone()),
                conn,
                wakes,
                replication,
                shutdown,
                known: Mutex::new(HashSet::new()),
                bindings: Mutex::new(HashMap::new()),
                catalog: Mutex::new(None),
                stats: StatsHub::default(),
                observer: OnceLock::new(),
                subscriptions: Arc::new(AtomicUsize::new(0)),
                schedule_retry: Mutex::new(HashMap::new()),
                served_ahead: AtomicU64::new(0),
                given_back: AtomicU64::new(0),
                creating: tokio::sync::Mutex::new(()),
                config,
            }),
        };
        tokio::spawn(engine.clone().sweep());
        tokio::spawn(
            engine
                .inner
                .topics
                .subscribers()
                .clone()
                .heartbeat(engine.inner.shutdown.clone()),
        );
        Ok(engine)
    }

    /// Starts shutting down: long polls return, streams and the sweep end.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Whether the connection is to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.conn.is_cluster()
    }

    /// Requests this node has sent to Redis so far: its network round trips, a pipeline
    /// (such as a WAIT with its fence write) counting once. Pub/sub deliveries to the
    /// node are not requests. The benchmark divides it by jobs (`benches/compare/s6.rs`).
    pub fn redis_requests(&self) -> u64 {
        self.inner.conn.requests()
    }

    /// How many of [`RedisEngine::redis_requests`] the node's own upkeep sent: the sweep
    /// every `sweep_interval` (expiries and due jobs of queues nobody leases from, dead
    /// letters, the catalog, bindings, schedules, topic trimming). Its cost is per second
    /// and per node, whatever the job rate; the rest are the requests that served clients.
    pub fn redis_background_requests(&self) -> u64 {
        self.inner.conn.background_requests()
    }

    /// Jobs this node's Consume streams sent from what they had leased ahead of their
    /// workers' credits (no Redis round trip between a worker's ack and its next job),
    /// and jobs they gave back undelivered: see the README, "Sluice on Redis".
    pub fn lease_ahead_counts(&self) -> (u64, u64) {
        (
            self.inner.served_ahead.load(Ordering::Relaxed),
            self.inner.given_back.load(Ordering::Relaxed),
        )
    }

    /// Makes sure queue `name` exists (creating it with the default policy, counted
    /// against `--max-queues`), unless this node has seen it already. For a Lease or
    /// Consume (`for_consumer`), a queue that does not exist and that no policy names as
    /// its dead-letter queue is refused with `--strict-queues`, or else created marked
    /// created by a consumer, and the node that created it warns (as the in-process
    /// engine does: [`checks::consumer_names_unknown_queue`]). `Ok(true)`: this node had
    /// seen it already and asked Redis nothing, so it may have vanished since.
    async fn ensure_queue(
        &self,
        field: &str,
        name: &str,
        for_consumer: bool,
    ) -> Result<bool, BrokerError> {
        if lock(&self.inner.known).contains(name) {
            return Ok(true);
        }
        crate::broker::domain::names::validate_name(field, name)?;
        if self.inner.queues.info(name).await?.is_none() {
            let policy = QueuePolicy::default_for(name);
            checks::dead_letter_name(field, name, &policy.dead_letter_queue)?;
            self.creating_queues(async {
                let (existing, reserved) = self.queues_in_use().await?;
                if existing.contains(name) {
                    // Made by another request while this one waited for the lock.
                    return Ok(());
                }
                let closest = if for_consumer && !reserved.contains(name) {
                    Some(checks::consumer_names_unknown_queue(
                        &self.inner.config.limits,
                        field,
                        name,
                        existing.iter().map(String::as_str),
                    )?)
                } else {
                    None
                };
                self.check_queue_room(
                    &existing,
                    &reserved,
                    field,
                    name,
                    &policy.dead_letter_queue,
                )?;
                let created = self
                    .inner
                    .queues
                    .ensure(name, &policy, closest.is_some())
                    .await?;
                if let Some(closest) = closest.filter(|_| created) {
                    checks::created_by_consumer(name, closest.as_deref());
                }
                Ok(())
            })
            .await?;
        }
        lock(&self.inner.known).insert(name.to_owned());
        Ok(false)
    }

    /// What `--max-queues` counts, as the in-process engine counts it: every queue, and
    /// every dead-letter queue a policy names that does not exist yet (its first dead
    /// letter creates it and must never be refused, so its slot is taken when a policy
    /// names it). Reads every policy: queue creation is rare.
    async fn queues_in_use(&self) -> Result<(BTreeSet<String>, BTreeSet<String>), BrokerError> {
        let existing: BTreeSet<String> = self.inner.queues.names().await?.into_iter().collect();
        let mut reserved = BTreeSet::new();
        for name in &existing {
            if let Some((policy, _)) = self.inner.queues.info(name).await? {
                let dlq = policy.dead_letter_queue;
                if !dlq.is_empty() && !existing.contains(&dlq) {
                    reserved.insert(dlq);
                }
            }
        }
        Ok((existing, reserved))
    }

    /// Refuses to create queue `name` (dead-lettering into `dlq`) past `--max-queues`, with
    /// the queues in use as [`RedisEngine::queues_in_use`] read them.
    fn check_queue_room(
        &self,
        existing: &BTreeSet<String>,
        reserved: &BTreeSet<String>,
        field: &str,
        name: &str,
        dlq: &str,
    ) -> Result<(), BrokerError> {
        let in_use = existing.len() + reserved.len();
        let own = usize::from(!reserved.contains(name));
        let extra = usize::from(
            !dlq.is_empty() && dlq != name && !existing.contains(dlq) && !reserved.contains(dlq),
        );
        let max = self.inner.config.limits.max_queues;
        if in_use + own + extra > max {
            let what = if extra > 0 {
                format!("queue {name:?} with its dead-letter queue {dlq:?}")
            } else {
                format!("queue {name:?}")
            };
            return Err(checks::too_many_queues(max, field, what, in_use));
        }
        Ok(())
    }

    /// Refuses a policy change of queue `name` to dead-letter queue `dlq` (from `old`)
    /// that would pass `--max-queues`.
    async fn check_dead_letter_room(&self, old: &str, dlq: &str) -> Result<(), BrokerError> {
        if old == dlq || dlq.is_empty() {
            return Ok(());
        }
        let (existing, reserved) = self.queues_in_use().await?;
        let in_use = existing.len() + reserved.len();
        let extra = usize::from(!existing.contains(dlq) && !reserved.contains(dlq));
        let max = self.inner.config.limits.max_queues;
        if in_use + extra > max {
            return Err(checks::too_many_queues(
                max,
                "policy.dead_letter_queue",
                format!("dead-letter queue {dlq:?}"),
                in_use,
            ));
        }
        Ok(())
    }

    /// Refuses a redrive whose queues to create (`targets` that do not exist, with their
    /// default dead-letter queues) would pass `--max-queues`.
    async fn check_redrive_room(
        &self,
        field: &str,
        targets: impl Iterator<Item = &String>,
    ) -> Result<(), BrokerError> {
        let (existing, reserved) = self.queues_in_use().await?;
        let takes_slot = |n: &str| !n.is_empty() && !existing.contains(n) && !reserved.contains(n);
        let mut new = BTreeSet::new();
        for name in targets {
            let dlq = QueuePolicy::default_for(name).dead_letter_queue;
            for n in [name.as_str(), dlq.as_str()] {
                if takes_slot(n) {
                    new.insert(n.to_owned());
                }
            }
        }
        let in_use = existing.len() + reserved.len();
        let max = self.inner.config.limits.max_queues;
        if in_use + new.len() > max {
            let names: Vec<String> = new.into_iter().collect();
            return Err(checks::too_many_queues(
                max,
                field,
                format!("queues {}", names.join(", ")),
                in_use,
            ));
        }
        Ok(())
    }

    /// Takes a place for a subscription to `pattern`, or refuses it past
    /// `--max-subscriptions` (as the in-process engine words it).
    fn subscription_slot(&self, pattern: &str) -> Result<SubscriptionSlot, BrokerError> {
        let max = self.inner.config.limits.max_subscriptions;
        let open = &self.inner.subscriptions;
        if open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(BrokerError::ResourceExhausted(format!(
                "cannot subscribe to {pattern:?}: the broker holds the maximum of {max} subscriptions"
            )));
        }
        Ok(SubscriptionSlot(open.clone()))
    }

    /// Forgets that queue `name` exists (it was deleted here or elsewhere).
    fn forget_queue(&self, name: &str) {
        lock(&self.inner.known).remove(name);
    }

    /// What a change to queue `name` waits for.
    fn queue_commit(&self, name: &str) -> RedisCommit {
        RedisCommit(
            (self.inner.config.replicas > 0).then(|| QueueKeys::new(name).base().to_owned()),
        )
    }

    /// Waits until the changes made so far to queue `name` are on the replicas.
    async fn queue_durable(&self, name: &str) -> Result<(), BrokerError> {
        self.durable(self.queue_commit(name)).await
    }

    /// Waits until a change to the shard holding `commit`'s key is on the replicas.
    async fn durable(&self, commit: RedisCommit) -> Result<(), BrokerError> {
        match commit.0 {
            Some(key) => self.inner.replication.confirm(&key).await,
            None => Ok(()),
        }
    }
}
