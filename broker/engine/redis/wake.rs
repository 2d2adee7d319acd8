//! The node's wake-up bus: one Redis connection subscribed (sharded pub/sub, RESP3
//! pushes) to the `<queue or topic base>:wake` channels and the catalog's
//! `keys::catalog("wake")` that some waiter on this node asked for, so a waiter learns of
//! a change made by any node at once instead of at its next poll.
//!
//! Channels are subscribed lazily, the first time a waiter watches them, and stay
//! subscribed until shutdown (a wake on a channel nobody watches any more costs one push).
//! Pub/sub is at-most-once: a message published while the connection is down, or before
//! the subscription is confirmed, is lost. That is why waiters never wait longer than
//! [`POLL_INTERVAL`] before looking again: a lost wake costs at most that much latency,
//! never a lost message (the state is in Redis, the wake only hurries the look).
//!
//! After a reconnect (a Redis restart, a failover) every channel is subscribed again and
//! every waiter is woken once, since wakes may have been lost while it was down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::broker::domain::error::BrokerError;
use crate::broker::engine::redis::conn::{
    MIN_RETRY_WAIT_MS, Probed, RedisConn, invalid_seed, probe, redacted_seeds, unavailable,
};
use crate::broker::sync::lock;

/// The longest a waiter waits without looking at Redis again, whether or not a wake
/// came: the bound on the latency a lost pub/sub message adds.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The first delay before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest delay between two reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often an idle subscriber connection is pinged, so a connection that died without
/// a reset (a partition) is noticed and rebuilt.
const PING_EVERY: Duration = Duration::from_secs(5);

/// One channel's wake state: a generation counter bumped by every wake, and a `Notify`
/// whose waiters are all woken by it.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    generation: AtomicU64,
    notify: Notify,
}

impl Signal {
    /// A wake: bump the generation first, so a waiter that looks after being notified
    /// (or just before waiting) sees it.
    fn fire(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }
}

/// What the hub's task is asked to do.
struct Subscribe {
    /// The shard channel.
    channel: String,
    /// Answered once the server confirmed the subscription (dropped if it failed).
    done: oneshot::Sender<()>,
}

/// The state shared by every clone of [`Wakes`] and its task.
struct Hub {
    /// Every channel some waiter asked for, subscribed or to be subscribed.
    channels: Mutex<HashMap<String, Arc<Signal>>>,
    /// Subscriptions for the task to make.
    requests: mpsc::UnboundedSender<Subscribe>,
    /// Whether the task holds a live connection (if not, nobody waits for a confirmation).
    connected: AtomicBool,
}

impl Hub {
    /// Wakes the waiters of `channel` (nobody waits on a channel not in the map).
    fn fire(&self, channel: &str) {
        let signal = lock(&self.channels).get(channel).cloned();
        if let Some(signal) = signal {
            signal.fire();
        }
    }

    /// Wakes every waiter (after a reconnect, when wakes may have been lost).
    fn fire_all(&self) {
        let signals: Vec<Arc<Signal>> = lock(&self.channels).values().cloned().collect();
        for signal in signals {
            signal.fire();
        }
    }
}

/// The node-wide wake-up hub (see the module docs). Cheap to clone.
#[derive(Clone)]
pub(crate) struct Wakes {
    hub: Arc<Hub>,
}

impl Wakes {
    /// Starts the hub's task, which connects to `seeds` (the same addresses as
    /// [`crate::broker::engine::redis::conn::connect`]) on its own connection and keeps
    /// reconnecting until `shutdown` is cancelled. Returns at once: until the connection
    /// is up, waiters simply poll. Call inside a Tokio runtime (it spawns the task).
    pub(crate) fn start(seeds: Vec<String>, shutdown: CancellationToken) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub {
            channels: Mutex::new(HashMap::new()),
            requests,
            connected: AtomicBool::new(false),
        });
        tokio::spawn(run(seeds, hub.clone(), rx, shutdown));
        Self { hub }
    }

    /// A watch over `channels`: subscribes those not subscribed yet and returns once the
    /// server confirmed them (or at once while the connection is down, or after
    /// [`POLL_INTERVAL`] at the latest). A wake that comes after this returns is seen by
    /// the watch's next [`Watch::wait`], even if it comes before the wait starts.
    ///
    /// Only the waiter that first asks for a channel waits for its confirmation; another
    /// one asking while it is under way goes on at once, so a wake in that window costs
    /// it one poll.
    ///
    /// How a caller waits (a queue's long poll, say): watch, then look at Redis, then
    /// `wait(POLL_INTERVAL)` and look again, in a loop.
    pub(crate) async fn watch(&self, channels: &[String]) -> Watch {
        let mut watch = Watch {
            entries: Vec::new(),
        };
        watch.add(self, channels).await;
        watch
    }
}

/// Sends a wake on `channel` (SPUBLISH; the payload is not read).
pub(crate) async fn publish(conn: &RedisConn, channel: &str) -> Result<(), BrokerError> {
    let mut c = conn.clone();
    redis::cmd("SPUBLISH")
        .arg(channel)
        .arg(1)
        .query_async::<i64>(&mut c)
        .await
        .map(drop)
        .map_err(|e| unavailable(&format!("SPUBLISH {channel}"), e))
}

/// A set of channels a waiter follows, with the generation of each it has seen.
pub(crate) struct Watch {
    /// (channel, its signal, the generation last seen).
    entries: Vec<(String, Arc<Signal>, u64)>,
}

impl Watch {
    /// Adds channels (those already watched are skipped); see [`Wakes::watch`].
    pub(crate) async fn add(&mut self, wakes: &Wakes, channels: &[String]) {
        let mut pending = Vec::new();
        for channel in channels {
            if self.entries.iter().any(|(c, _, _)| c == channel) {
                continue;
            }
            let (signal, new) = {
                let mut map = lock(&wakes.hub.channels);
                match map.get(channel) {
                    Some(signal) => (signal.clone(), false),
                    None => {
                        let signal = Arc::new(Signal::default());
                        map.insert(channel.clone(), signal.clone());
                        (signal, true)
                    }
                }
            };
            if new {
                let (done, confirmed) = oneshot::channel();
                let request = Subscribe {
                    channel: channel.clone(),
                    done,
                };
                if wakes.hub.requests.send(request).is_ok() {
                    pending.push(confirmed);
                }
            }
            let seen = signal.generation.load(Ordering::Acquire);
            self.entries.push((channel.clone(), signal, seen));
        }
        if !pending.is_empty() && wakes.hub.connected.load(Ordering::Acquire) {
            // Bounded: a slow or failing subscribe must not hold a waiter longer than the
            // poll it falls back on.
            let _ = tokio::time::timeout(POLL_INTERVAL, futures::future::join_all(pending)).await;
        }
    }

    /// Stops following `channel` (the node stays subscribed; see the module docs).
    pub(crate) fn remove(&mut self, channel: &str) {
        self.entries.retain(|(c, _, _)| c != channel);
    }

    /// Waits until a wake came on any watched channel since the last `wait` (or since it
    /// was added), or `timeout` passed. Returns the channels that were woken (empty on a
    /// timeout).
    pub(crate) async fn wait(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Enable every notification before looking at the generations, so a wake that
            // lands between the look and the wait still ends the wait.
            let signals: Vec<Arc<Signal>> = self.entries.iter().map(|e| e.1.clone()).collect();
            let mut waits: Vec<_> = signals
                .iter()
                .map(|s| Box::pin(s.notify.notified()))
                .collect();
            for w in &mut waits {
                w.as_mut().enable();
            }
            let fired = self.take_fired();
            if !fired.is_empty() {
                return fired;
            }
            let any = async {
                if waits.is_empty() {
                    futures::future::pending::<()>().await;
                } else {
                    futures::future::select_all(waits).await;
                }
            };
            if tokio::time::timeout_at(deadline, any).await.is_err() {
                return self.take_fired();
            }
        }
    }

    /// The channels whose generation moved since last seen (and marks them seen).
    fn take_fired(&mut self) -> Vec<String> {
        let mut fired = Vec::new();
        for (channel, signal, seen) in &mut self.entries {
            let now = signal.generation.load(Ordering::Acquire);
            if now != *seen {
                *seen = now;
                fired.push(channel.clone());
            }
        }
        fired
    }
}

/// The hub's subscriber connection.
enum SubConn {
    /// A standalone server.
    Single(MultiplexedConnection),
    /// A Redis Cluster (it reconnects and re-subscribes by itself).
    Cluster(ClusterConnection),
}

impl SubConn {
    /// Subscribes to one shard channel, returning once the server confirmed it.
    async fn ssubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            // One channel per command: the multiplexed connection expects one
            // confirmation per plain command (redis-rs has no `ssubscribe` for it).
            Self::Single(c) => {
                redis::cmd("SSUBSCRIBE")
                    .arg(channel)
                    .query_async::<Value>(c)
                    .await?;
                Ok(())
            }
            Self::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    /// A round trip, to tell a live connection from a dead one.
    async fn ping(&mut self) -> redis::RedisResult<()> {
        let cmd = redis::cmd("PING");
        match self {
            Self::Single(c) => cmd.query_async::<Value>(c).await.map(drop),
            Self::Cluster(c) => cmd.query_async::<Value>(c).await.map(drop),
        }
    }
}

/// Opens the subscriber connection (RESP3, pushes to `pushes`): a cluster or a standalone
/// server, as the first seed that answers says ([`probe`]).
async fn connect(
    seeds: &[String],
    pushes: mpsc::UnboundedSender<PushInfo>,
) -> Result<SubConn, BrokerError> {
    let Probed {
        client,
        shown,
        cluster,
    } = probe(seeds).await?;
    if !cluster {
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))
            .map_err(|e| invalid_seed(&shown, e))?;
        let config = AsyncConnectionConfig::new().set_push_sender(pushes.clone());
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| unavailable(&format!("connecting to {shown}"), e))?;
        return Ok(SubConn::Single(conn));
    }
    let cluster = ClusterClientBuilder::new(seeds.to_vec())
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(pushes)
        .min_retry_wait(MIN_RETRY_WAIT_MS)
        .build()
        .map_err(|e| invalid_seed(&redacted_seeds(seeds), e))?;
    let conn = cluster
        .get_async_connection()
        .await
        .map_err(|e| unavailable("connecting to the cluster", e))?;
    Ok(SubConn::Cluster(conn))
}

/// The channel a push names, if it is a sharded pub/sub message.
fn message_channel(push: &PushInfo) -> Option<String> {
    if push.kind != PushKind::SMessage {
        return None;
    }
    push_channel(push)
}

/// The channel a push is about (its first element).
fn push_channel(push: &PushInfo) -> Option<String> {
    match push.data.first()? {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The hub's task: connect, subscribe every known channel, forward pushes to the
/// signals and serve new subscriptions; on any failure, back off and do it again.
async fn run(
    seeds: Vec<String>,
    hub: Arc<Hub>,
    mut requests: mpsc::UnboundedReceiver<Subscribe>,
    shutdown: CancellationToken,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut warned = false;
    loop {
        let (tx, mut pushes) = mpsc::unbounded_channel();
        let attempt = async {
            let mut conn = connect(&seeds, tx).await?;
            let known: Vec<String> = lock(&hub.channels).keys().cloned().collect();
            for channel in &known {
                conn.ssubscribe(channel)
                    .await
                    .map_err(|e| unavailable(&format!("SSUBSCRIBE {channel}"), e))?;
            }
            Ok::<_, BrokerError>(conn)
        };
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = attempt => c,
        };
        match connected {
            Err(e) => {
                if !warned {
                    tracing::warn!(
                        "redis wake-up subscriber: {e}; waiters poll every {POLL_INTERVAL:?} until it is back"
                    );
                    warned = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Ok(mut conn) => {
                if warned {
                    tracing::info!("redis wake-up subscriber connected again");
                }
                backoff = FIRST_BACKOFF;
                hub.connected.store(true, Ordering::Release);
                // Wakes sent while no connection was up are lost: everyone looks once.
                hub.fire_all();
                let cluster = matches!(conn, SubConn::Cluster(_));
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.tick().await;
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        push = pushes.recv() => match push {
                            None => break,
                            Some(push) if push.kind == PushKind::Disconnection => {
                                hub.fire_all();
                                // The cluster connection reconnects and re-subscribes by
                                // itself; a standalone one is rebuilt here.
                                if !cluster {
                                    break;
                                }
                            }
                            Some(push) if push.kind == PushKind::SUnsubscribe => {
                                // The node never unsubscribes: the server dropped the
                                // channel because its slot moved to another primary
                                // (resharding). Subscribed again, the cluster client finds
                                // the new owner; wakes sent meanwhile are lost, so its
                                // waiters look once.
                                let Some(channel) = push_channel(&push) else { continue };
                                if !lock(&hub.channels).contains_key(&channel) {
                                    continue;
                                }
                                hub.fire(&channel);
                                if let Err(e) = conn.ssubscribe(&channel).await {
                                    tracing::warn!("redis wake-up subscriber: SSUBSCRIBE {channel} again: {e}");
                                    break;
                                }
                            }
                            Some(push) => {
                                if let Some(channel) = message_channel(&push) {
                                    hub.fire(&channel);
                                }
                            }
                        },
                        request = requests.recv() => {
                            let Some(request) = request else { return };
                            if let Err(e) = conn.ssubscribe(&request.channel).await {
                                tracing::warn!("redis wake-up subscriber: SSUBSCRIBE {}: {e}", request.channel);
                                break;
                            }
                            let _ = request.done.send(());
                        }
                        _ = ping.tick() => {
                            let alive = tokio::time::timeout(PING_EVERY / 2, conn.ping()).await;
                            if !matches!(alive, Ok(Ok(()))) {
                                break;
                            }
                        }
                    }
                }
                hub.connected.store(false, Ordering::Release);
                tracing::warn!("redis wake-up subscriber lost its connection; reconnecting");
                warned = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::engine::redis::conn::connect;
    use crate::broker::testing::redis::RedisServer;
    use std::time::Instant;

    async fn until_connected(wakes: &Wakes, connected: bool) {
        let start = Instant::now();
        while wakes.hub.connected.load(Ordering::Acquire) != connected {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "connected stays {}",
                !connected
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The subscriber passes over a seed that does not answer for one that does, as the
    /// command connection does (`conn::probe`), and hears what is published there.
    #[tokio::test]
    async fn subscribes_through_the_first_cluster_seed_that_answers() {
        use crate::broker::testing::redis::{RedisCluster, free_port};
        let cluster = RedisCluster::start(3, 0);
        let mut seeds = vec![format!("redis://127.0.0.1:{}", free_port())];
        seeds.extend(cluster.seeds());
        let shutdown = CancellationToken::new();
        let wakes = Wakes::start(seeds.clone(), shutdown.clone());
        until_connected(&wakes, true).await;
        let channel = "sluice:{q:jobs}:wake".to_string();
        let mut watch = wakes.watch(std::slice::from_ref(&channel)).await;
        let other = connect(&seeds).await.unwrap();
        publish(&other, &channel).await.unwrap();
        assert_eq!(watch.wait(Duration::from_secs(10)).await, [channel]);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_publish_from_another_connection_wakes_the_watch() {
        let server = RedisServer::start();
        let shutdown = CancellationToken::new();
        let wakes = Wakes::start(vec![server.url()], shutdown.clone());
        let other = connect(&[server.url()]).await.unwrap();
        let (a, b) = (
            "sluice:{t:a}:wake".to_string(),
            "sluice:{t:b}:wake".to_string(),
        );
        // Until the hub is connected, a watch does not wait for its subscription: wait
        // for the connection so the first publish is not lost (the poll would catch it,
        // but this test shows the push).
        until_connected(&wakes, true).await;
        let mut watch = wakes.watch(&[a.clone(), b.clone()]).await;
        // Nothing fired yet (the connect's wake-everyone happened before the watch).
        assert!(watch.wait(Duration::from_millis(20)).await.is_empty());

        for _ in 0..3 {
            publish(&other, &b).await.unwrap();
            // A generous bound: a timeout returns no channel, so this fails if only the
            // timeout ended the wait.
            assert_eq!(watch.wait(Duration::from_secs(10)).await, [b.as_str()]);
        }
        // A wake that lands before the wait starts is not lost.
        publish(&other, &a).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(watch.wait(Duration::from_secs(10)).await, [a.as_str()]);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_password_protected_server_wakes_the_watch() {
        let server = RedisServer::start();
        server.config_set("requirepass", "s3cret-pw");
        let url = format!("redis://:s3cret-pw@127.0.0.1:{}", server.port);
        let shutdown = CancellationToken::new();
        let wakes = Wakes::start(vec![url.clone()], shutdown.clone());
        let other = connect(&[url]).await.unwrap();
        let channel = "sluice:{t:p}:wake".to_string();
        until_connected(&wakes, true).await;
        let mut watch = wakes.watch(std::slice::from_ref(&channel)).await;
        publish(&other, &channel).await.unwrap();
        assert_eq!(
            watch.wait(Duration::from_secs(10)).await,
            [channel.as_str()]
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn resubscribes_after_a_redis_restart() {
        let mut server = RedisServer::start();
        let port = server.port;
        let shutdown = CancellationToken::new();
        let wakes = Wakes::start(vec![server.url()], shutdown.clone());
        until_connected(&wakes, true).await;
        let channel = "sluice:{q:jobs}:wake".to_string();
        let mut watch = wakes.watch(std::slice::from_ref(&channel)).await;

        server.kill();
        until_connected(&wakes, false).await;
        // While Redis is down a waiter still returns at its poll.
        let start = Instant::now();
        watch.wait(POLL_INTERVAL).await;
        assert!(start.elapsed() < Duration::from_secs(5));

        server.restart();
        until_connected(&wakes, true).await;
        // The reconnect wakes every waiter once (wakes may have been lost); take that.
        tokio::time::sleep(Duration::from_millis(50)).await;
        watch.wait(Duration::from_millis(20)).await;
        let other = connect(&[format!("redis://127.0.0.1:{port}")])
            .await
            .unwrap();
        publish(&other, &channel).await.unwrap();
        assert_eq!(watch.wait(Duration::from_secs(10)).await, [channel]);
        shutdown.cancel();
    }
}
