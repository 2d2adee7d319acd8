//! Durability confirmation: `WAIT numreplicas timeout` after a change, as the write-ahead
//! log's group commit does for fsync. [`Replication::confirm`] returns once the writes
//! this node made so far to the shard owning a key are on `replicas` replicas.
//!
//! # Which writes a WAIT covers
//!
//! Redis's WAIT waits for the replication offset of the *connection* it is sent on (the
//! offset after that connection's last write). So every WAIT is preceded, in the same
//! pipeline, by a fence write (`SET <tag>:wait-fence ""` in the key's own slot): it moves
//! the connection's offset to the primary's current end of the replication stream, so the
//! WAIT covers every write the primary took before it, whichever connection made it. That
//! is what lets WAITs travel on a connection of their own (the engine gives
//! [`Replication`] one, see "Costs and limits" below), and what keeps a WAIT right after a
//! reconnect, when the new connection has written nothing yet. The tests check it by
//! writing on one connection, confirming on another and reading the writes on the replica
//! right after.
//!
//! # Sharing
//!
//! Confirms of the same shard share one WAIT in flight: a confirm arriving while a WAIT
//! is in flight joins the next one (which the fence then covers), so N concurrent confirms
//! cost two WAITs, not N. A shard is the whole server when standalone and a hash slot on a
//! cluster (the slot-to-node map of redis-rs is private, so confirms of two slots of the
//! same node do not share; each still routes to the slot's current primary).
//!
//! # Costs and limits
//!
//! WAIT blocks its connection on the server: while it waits, later commands on the same
//! connection to that primary wait behind it (one replication round trip when replicas
//! are healthy, up to the timeout when they are not). The engine therefore hands
//! [`Replication`] a connection of its own (`RedisConn::sibling`): leases, scripts and
//! reads of the node never queue behind a WAIT. The connection's own response timeout
//! (set a second past the replica timeout) also ends a longer WAIT; either way the caller
//! gets the same `Unavailable`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::cluster_routing::Slot;
use tokio::sync::oneshot;

use super::conn::RedisConn;
use crate::broker::domain::error::BrokerError;

/// Confirms writes on replicas with `WAIT`. Cheap to clone (one shared state).
#[derive(Clone)]
pub(crate) struct Replication {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RedisConn,
    replicas: u32,
    timeout: Duration,
    /// The shards with a WAIT in flight (present = a driver task runs) and the confirms
    /// waiting for their next WAIT. `None` is the standalone server.
    shards: Mutex<HashMap<Option<Slot>, Batch>>,
}

/// The confirms of one shard waiting for its next WAIT.
struct Batch {
    /// A key of the shard for the fence write (the first waiter's).
    fence: String,
    waiters: Vec<oneshot::Sender<Result<(), BrokerError>>>,
}

impl Replication {
    /// Confirms on `replicas` replicas within `timeout` each (at least 1 ms: WAIT with 0
    /// would wait forever), over `conn`.
    pub(crate) fn new(conn: RedisConn, replicas: u32, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                conn,
                replicas,
                timeout: timeout.max(Duration::from_millis(1)),
                shards: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Returns once the writes this node made so far to the shard owning `key` are on
    /// `replicas` replicas (at once when `replicas` is 0). Otherwise `Unavailable`: the
    /// change is on the primary but may be lost with it, so its outcome is unknown.
    pub(crate) async fn confirm(&self, key: &str) -> Result<(), BrokerError> {
        if self.inner.replicas == 0 {
            return Ok(());
        }
        let shard = self.inner.conn.is_cluster().then(|| Slot::for_key(key));
        let (tx, rx) = oneshot::channel();
        {
            let mut shards = self.inner.shards.lock().expect("replication state lock");
            match shards.entry(shard) {
                Entry::Occupied(mut batch) => batch.get_mut().waiters.push(tx),
                Entry::Vacant(slot) => {
                    slot.insert(Batch {
                        fence: fence_key(key),
                        waiters: vec![tx],
                    });
                    // A task, not this future: a caller that gives up must not strand the
                    // confirms that joined its WAIT.
                    tokio::spawn(drive(self.inner.clone(), shard));
                }
            }
        }
        rx.await.unwrap_or_else(|_| {
            Err(BrokerError::Unavailable(
                "redis: the WAIT for replicas was abandoned; the change's outcome is unknown: \
                 retry with the same idempotency key"
                    .into(),
            ))
        })
    }
}

/// Runs WAITs for `shard` while confirms are waiting, each covering the confirms that
/// arrived before it was sent; removes the shard's entry when none are left.
async fn drive(inner: Arc<Inner>, shard: Option<Slot>) {
    loop {
        let (fence, waiters) = {
            let mut shards = inner.shards.lock().expect("replication state lock");
            let Some(batch) = shards.get_mut(&shard) else {
                return;
            };
            if batch.waiters.is_empty() {
                shards.remove(&shard);
                return;
            }
            (batch.fence.clone(), std::mem::take(&mut batch.waiters))
        };
        let result = inner.wait_once(shard, &fence).await;
        for waiter in waiters {
            // A caller that stopped waiting does not mind.
            let _ = waiter.send(result.clone());
        }
    }
}

impl Inner {
    /// One fence write and WAIT on the primary of `shard` (`fence` is in its slot).
    async fn wait_once(&self, shard: Option<Slot>, fence: &str) -> Result<(), BrokerError> {
        let ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(fence)
            .arg("")
            .cmd("WAIT")
            .arg(self.replicas)
            .arg(ms);
        let mut conn = self.conn.clone();
        let request = async {
            let values = conn.pipeline_to(pipe, 2, shard).await?;
            let acked = values.into_iter().nth(1).unwrap_or(redis::Value::Nil);
            Ok::<i64, redis::RedisError>(redis::from_redis_value(acked)?)
        };
        // A margin over WAIT's own timeout, for a connection stuck reconnecting.
        let outcome = tokio::time::timeout(self.timeout + Duration::from_secs(1), request).await;
        let not_confirmed = |why: String| {
            BrokerError::Unavailable(format!(
                "redis: WAIT on {fence:?}'s primary: {why}: the change was applied on the \
                 primary but is not confirmed on {} replica(s) within {ms} ms; its outcome is \
                 unknown: retry with the same idempotency key",
                self.replicas
            ))
        };
        match outcome {
            Ok(Ok(acked)) if acked >= i64::from(self.replicas) => Ok(()),
            Ok(Ok(acked)) => Err(not_confirmed(format!("{acked} replica(s) confirmed"))),
            Ok(Err(e)) if e.is_timeout() => Err(not_confirmed("no answer".into())),
            Ok(Err(e)) => Err(not_confirmed(e.to_string())),
            Err(_) => Err(not_confirmed("no answer".into())),
        }
    }
}

/// `<tag>:wait-fence` in `key`'s slot: the key's `{...}` hash tag with its prefix (every
/// engine key has one, see `keys`). For a key without a tag (Redis hashes all of it) a
/// tag of the same slot is searched for: `{n}` for the first number `n` in that slot (about
/// 16384 CRC16s of a few bytes, and only for such keys).
fn fence_key(key: &str) -> String {
    let tag_end = key.find('{').and_then(|open| {
        let close = open + key[open..].find('}')?;
        // `{}` is no tag: Redis hashes the whole key then.
        (close > open + 1).then_some(close)
    });
    match tag_end {
        Some(close) => format!("{}:wait-fence", &key[..=close]),
        None => {
            let slot = Slot::for_key(key);
            let n = (0u64..)
                .find(|n| Slot::for_key(n.to_string()) == slot)
                .expect("every slot has a number hashing to it");
            format!("{{{n}}}:wait-fence")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::broker::engine::redis::conn;
    use crate::broker::engine::redis::keys::QueueKeys;
    use crate::broker::testing::redis::{RedisCluster, RedisServer};

    /// `INFO <section>` of the server on `port`, on a connection of its own.
    async fn info(port: u16, section: &str) -> String {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("INFO")
            .arg(section)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// How many WAITs the server on `port` ran.
    async fn waits(port: u16) -> u64 {
        let stats = info(port, "commandstats").await;
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_wait:calls="))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// A primary and one replica in sync with it.
    async fn primary_and_replica() -> (RedisServer, RedisServer) {
        let primary = RedisServer::start();
        let replica =
            RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
        let start = Instant::now();
        while !info(primary.port, "replication")
            .await
            .contains("state=online")
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the replica never synced"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (primary, replica)
    }

    #[test]
    fn the_fence_is_in_the_keys_slot() {
        let key = QueueKeys::new("jobs").key("ready");
        assert_eq!(fence_key(&key), "sluice:{q:jobs}:wait-fence");
        assert_eq!(Slot::for_key(fence_key(&key)), Slot::for_key(&key));
        assert_eq!(Slot::for_key(fence_key("plain")), Slot::for_key("plain"));
        assert_eq!(Slot::for_key(fence_key("a{}b")), Slot::for_key("a{}b"));
    }

    #[tokio::test]
    async fn no_replicas_confirms_at_once_without_a_wait() {
        let server = RedisServer::start();
        let conn = conn::connect(&[server.url()]).await.unwrap();
        let replication = Replication::new(conn, 0, Duration::from_secs(5));
        let start = Instant::now();
        replication.confirm("sluice:{q:a}:ready").await.unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(waits(server.port).await, 0);
    }

    #[tokio::test]
    async fn a_confirmed_write_is_on_the_replica() {
        let (primary, replica) = primary_and_replica().await;
        let conn = conn::connect_with(&[primary.url()], Duration::from_secs(6))
            .await
            .unwrap();
        // Generous: on a loaded machine the replica may take a while to acknowledge; a
        // confirmed write returns as soon as it does. The WAIT travels on a connection of
        // its own, as the engine sends it: the fence makes it cover the other's writes.
        let own = conn
            .sibling(&[primary.url()], Duration::from_secs(6))
            .await
            .unwrap();
        let replication = Replication::new(own, 1, Duration::from_secs(5));
        let key = QueueKeys::new("jobs").key("ready");
        for i in 0..100 {
            let mut c = conn.clone();
            let _: () = redis::cmd("RPUSH")
                .arg(&key)
                .arg(i)
                .query_async(&mut c)
                .await
                .unwrap();
        }
        let requests = conn.requests();
        replication.confirm(&key).await.unwrap();
        assert_eq!(
            conn.requests(),
            requests + 1,
            "the WAIT with its fence is one request, counted with the node's"
        );
        // Read on the replica right away: the WAIT covered every write before it.
        let client = redis::Client::open(replica.url()).unwrap();
        let mut r = client.get_multiplexed_async_connection().await.unwrap();
        let len: i64 = redis::cmd("LLEN")
            .arg(&key)
            .query_async(&mut r)
            .await
            .unwrap();
        assert_eq!(len, 100);
    }

    #[tokio::test]
    async fn a_dead_replica_is_unavailable_within_the_timeout() {
        let (primary, mut replica) = primary_and_replica().await;
        let conn = conn::connect(&[primary.url()]).await.unwrap();
        let replication = Replication::new(conn.clone(), 1, Duration::from_millis(300));
        replica.kill();
        let key = QueueKeys::new("jobs").key("ready");
        let mut c = conn.clone();
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("x")
            .query_async(&mut c)
            .await
            .unwrap();
        let start = Instant::now();
        let err = replication.confirm(&key).await.unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        let BrokerError::Unavailable(message) = err else {
            panic!("expected Unavailable, got {err:?}");
        };
        assert!(
            message.contains("not confirmed on 1 replica(s) within 300 ms")
                && message.contains("retry with the same idempotency key"),
            "{message}"
        );
        // Asking for more replicas than exist fails the same way.
        let (primary, _replica) = primary_and_replica().await;
        let conn = conn::connect(&[primary.url()]).await.unwrap();
        let err = Replication::new(conn, 2, Duration::from_millis(100))
            .confirm(&key)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BrokerError::Unavailable(m) if m.contains("1 replica(s) confirmed")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn confirms_arriving_during_a_wait_share_the_next_one() {
        // No replica answers, so each WAIT lasts its whole timeout: long enough to see
        // that confirms arriving meanwhile do not send WAITs of their own.
        let (primary, mut replica) = primary_and_replica().await;
        replica.kill();
        let conn = conn::connect(&[primary.url()]).await.unwrap();
        let replication = Replication::new(conn, 1, Duration::from_millis(300));
        let key = QueueKeys::new("jobs").key("ready");
        let first = tokio::spawn({
            let r = replication.clone();
            let key = key.clone();
            async move { r.confirm(&key).await }
        });
        // Until the first WAIT blocks on the server.
        let start = Instant::now();
        while !info(primary.port, "clients")
            .await
            .contains("blocked_clients:1")
        {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the WAIT never blocked"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let later: Vec<_> = (0..20)
            .map(|_| {
                let r = replication.clone();
                let key = key.clone();
                tokio::spawn(async move { r.confirm(&key).await })
            })
            .collect();
        assert!(first.await.unwrap().is_err());
        for confirm in later {
            assert!(confirm.await.unwrap().is_err());
        }
        assert_eq!(
            waits(primary.port).await,
            2,
            "one WAIT in flight, one for the 20 later"
        );
    }

    #[tokio::test]
    async fn on_a_cluster_the_wait_goes_to_the_keys_primary() {
        let cluster = RedisCluster::start(3, 1);
        let conn = conn::connect_with(&cluster.seeds(), Duration::from_secs(6))
            .await
            .unwrap();
        assert!(conn.is_cluster());
        // Generous, as above: a confirmed write returns as soon as its replica answers.
        let replication = Replication::new(conn.clone(), 1, Duration::from_secs(5));
        // A queue on every primary.
        let mut keys = HashMap::new();
        for i in 0.. {
            let key = QueueKeys::new(&format!("q{i}")).key("ready");
            keys.entry(cluster.primary_for_key(&key)).or_insert(key);
            if keys.len() == 3 {
                break;
            }
        }
        for (&port, key) in &keys {
            let mut c = conn.clone();
            let _: () = redis::cmd("SET")
                .arg(key)
                .arg("x")
                .query_async(&mut c)
                .await
                .unwrap();
            let before = waits(port).await;
            replication.confirm(key).await.unwrap();
            assert_eq!(
                waits(port).await,
                before + 1,
                "the WAIT for {key} ran on {port}"
            );
        }
    }
}
