//! How many subscriptions follow each topic, on every node: what Stats shows as a
//! topic's `subscribers`.
//!
//! Each node counts its own subscriptions per topic ([`Subscribers`]) and writes the count
//! to the topic's `<base>:subs` hash (in the topic's slot), field = the node's id, with
//! Redis's time of the write (`subs_put.lua`). It writes when a subscription starts
//! following a topic (before that subscription reads it, so the count is there by its
//! first delivery), soon after one stops (from the stream's drop, in a spawned task), and
//! for every topic it counts every [`HEARTBEAT`] (`Subscribers::heartbeat`, run by the
//! engine). The counts script adds up the fields written in the last [`STALE_MS`].
//!
//! Staleness bound: a node that stops without closing its subscriptions (killed, cut off
//! from Redis) is still counted for at most [`STALE_MS`] (5 s) after its last write; a
//! change that could not be written (Redis unreachable) shows at most one [`HEARTBEAT`]
//! (1 s) after Redis is reachable again. Writes race (a drop's write against an opening's
//! write): each carries a version taken with the count it sends, and Redis keeps the
//! newest, so the last count stands whatever order they arrive in.
//!
//! The heartbeat costs one small script per topic this node's subscriptions follow, per
//! second. Fields of stopped nodes are dropped by the next write of another node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::domain::error::BrokerError;
use crate::broker::engine::redis::conn::{RedisConn, unavailable};
use crate::broker::engine::redis::keys::TopicKeys;
use crate::broker::sync::lock;

use super::SUBS_PUT;

/// How often a node writes its counts again.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);

/// A node's count that was not written for this long is not counted (several heartbeats
/// may be lost before a live node drops out).
pub(crate) const STALE_MS: u64 = 5_000;

/// This node's open subscriptions per topic. Cheap to clone (clones share the counts).
#[derive(Clone)]
pub(crate) struct Subscribers {
    shared: Arc<Shared>,
}

struct Shared {
    conn: RedisConn,
    /// This node's field in every `<base>:subs` hash: random per engine, so two engines in
    /// one process (tests) count as two nodes.
    node: String,
    counts: Mutex<Counts>,
}

/// The counts, and the version of the next write (taken under the same lock as the
/// count it sends, so a higher version always carries a newer count).
#[derive(Default)]
struct Counts {
    by_topic: HashMap<String, u32>,
    version: u64,
}

impl Subscribers {
    /// No subscriptions yet, counted as a new node.
    pub(crate) fn new(conn: RedisConn) -> Self {
        Self {
            shared: Arc::new(Shared {
                conn,
                node: format!("{:016x}", fastrand::u64(..)),
                counts: Mutex::new(Counts::default()),
            }),
        }
    }

    /// One more subscription follows `topic`; written to Redis before this returns (a
    /// failure is left to the heartbeat: a count is not worth failing a subscription).
    pub(crate) async fn add(&self, topic: &str) {
        *lock(&self.shared.counts)
            .by_topic
            .entry(topic.to_owned())
            .or_default() += 1;
        self.write_logged(topic).await;
    }

    /// One subscription fewer follows `topic`. Written by a spawned task (this runs
    /// where nothing can wait, e.g. a stream's drop); without a runtime, the count is
    /// left to expire.
    pub(crate) fn remove(&self, topic: &str) {
        {
            let mut counts = lock(&self.shared.counts);
            if let Some(n) = counts.by_topic.get_mut(topic) {
                *n = n.saturating_sub(1);
            }
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let this = self.clone();
            let topic = topic.to_owned();
            rt.spawn(async move { this.write_logged(&topic).await });
        }
    }

    /// Writes this node's counts every [`HEARTBEAT`] until `shutdown`.
    pub(crate) async fn heartbeat(self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(HEARTBEAT);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let topics: Vec<String> = lock(&self.shared.counts).by_topic.keys().cloned().collect();
            for topic in topics {
                self.write_logged(&topic).await;
            }
        }
    }

    /// [`Subscribers::write`], a failure logged.
    async fn write_logged(&self, topic: &str) {
        if let Err(e) = self.write(topic).await {
            tracing::debug!(topic, error = %e, "subscriber count not written; the heartbeat retries");
        }
    }

    /// Writes this node's current count of `topic`. A count of 0 is written (so it
    /// overrides an older write still on its way) and then forgotten here: the field
    /// expires in Redis.
    async fn write(&self, topic: &str) -> Result<(), BrokerError> {
        let (count, version) = {
            let mut counts = lock(&self.shared.counts);
            let count = counts.by_topic.get(topic).copied().unwrap_or(0);
            if count == 0 {
                counts.by_topic.remove(topic);
            }
            counts.version += 1;
            (count, counts.version)
        };
        let mut c = self.shared.conn.clone();
        let _: i64 = SUBS_PUT
            .key(TopicKeys::new(topic).base())
            .arg(&self.shared.node)
            .arg(count)
            .arg(version)
            .arg(STALE_MS)
            .invoke_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("counting the subscribers of topic {topic:?}"), e))?;
        Ok(())
    }
}
