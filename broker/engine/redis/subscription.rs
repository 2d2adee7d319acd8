//! Subscriptions over Redis topics: a stream per subscription that follows every topic
//! in the catalog matching its pattern, by sequence, as
//! `engine::local::subscription` does in process.
//!
//! The stream reads in the task that polls it. It looks at a topic when the topic's
//! `<base>:wake` channel fired, when its last read filled the batch (there may be more),
//! and at every [`POLL_INTERVAL`] (the safety net for lost pub/sub messages); it re-reads
//! the catalog when `keys::catalog("wake")` fired and at every poll, picking up topics
//! created later (read from their start) and dropping deleted ones. A topic deleted and
//! created again under the same name (a new epoch) is read from its new start.
//!
//! A Redis failure ends the stream with UNAVAILABLE: the client resumes from the
//! sequences it saw (`resume_from`), which is the same path as a node going away.

use std::collections::{BTreeMap, BTreeSet};

use futures::Stream;
use tokio_util::sync::CancellationToken;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::topic::BlockSlice;
use crate::broker::engine::local::subscription::{
    GapNotice, GapPolicy, Start, SubscribeSpec, SubscriptionBatch,
};
use crate::broker::engine::redis::keys::{TopicKeys, catalog};
use crate::broker::engine::redis::topic::{Subscribers, TopicStore};
use crate::broker::engine::redis::wake::{POLL_INTERVAL, Wakes, Watch};

/// Where the subscription is in one topic.
struct Cursor {
    next: u64,
    /// The topic incarnation the cursor belongs to.
    epoch: String,
}

/// The topics a subscription follows, counted in this node's [`Subscribers`] while it
/// follows them (and no longer once the subscription is dropped).
struct Following {
    subscribers: Subscribers,
    topics: BTreeSet<String>,
}

impl Following {
    /// Counts `topic` as followed (written to Redis before this returns).
    async fn add(&mut self, topic: &str) {
        if self.topics.insert(topic.to_owned()) {
            self.subscribers.add(topic).await;
        }
    }

    /// Stops counting `topic`.
    fn remove(&mut self, topic: &str) {
        if self.topics.remove(topic) {
            self.subscribers.remove(topic);
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        for topic in std::mem::take(&mut self.topics) {
            self.subscribers.remove(&topic);
        }
    }
}

/// The subscription's state between batches.
struct Reader {
    store: TopicStore,
    wakes: Wakes,
    spec: SubscribeSpec,
    ends_on: CancellationToken,
    watch: Option<Watch>,
    cursors: BTreeMap<String, Cursor>,
    /// Topics to read at the next look (woken, or not read to the end yet).
    dirty: BTreeSet<String>,
    /// Whether to re-read the catalog at the next look.
    catalog_dirty: bool,
    /// Which cursor the next read starts at (rotates so one busy topic cannot starve
    /// others).
    rotate: usize,
    ended: bool,
    /// The topics of `cursors`, as counted for Stats.
    following: Following,
}

/// The wake channel of topic `name`.
fn wake_channel(name: &str) -> String {
    TopicKeys::new(name).key("wake")
}

/// Opens a subscription: a stream of batches of at most `spec.max_batch` messages, in
/// order and without gaps per topic (a gap left by retention is reported, or ends the
/// stream with DATA_LOSS under [`GapPolicy::EndStream`]). It ends when `ends_on` is
/// cancelled, or with an error.
///
/// The start positions are fixed before this returns (so before the caller answers the
/// Subscribe call): a subscriber from the latest message gets every message published
/// after its call was answered, as on the in-process engine.
pub(crate) async fn subscribe(
    store: TopicStore,
    wakes: Wakes,
    spec: SubscribeSpec,
    ends_on: CancellationToken,
) -> Result<impl Stream<Item = Result<SubscriptionBatch, BrokerError>> + Send + 'static, BrokerError>
{
    let following = Following {
        subscribers: store.subscribers().clone(),
        topics: BTreeSet::new(),
    };
    let mut reader = Reader {
        following,
        store,
        wakes,
        spec,
        ends_on,
        watch: None,
        cursors: BTreeMap::new(),
        dirty: BTreeSet::new(),
        catalog_dirty: true,
        rotate: 0,
        ended: false,
    };
    let ends_on = reader.ends_on.clone();
    tokio::select! {
        // Ending already: the stream ends at once (`next_batch` sees the token).
        _ = ends_on.cancelled() => {}
        opened = reader.open() => opened?,
    }
    Ok(futures::stream::unfold(reader, |mut reader| async move {
        let item = reader.next_batch().await?;
        if item.is_err() {
            reader.ended = true;
        }
        Some((item, reader))
    }))
}

impl Reader {
    /// The next batch; `None` once the subscription ended.
    async fn next_batch(&mut self) -> Option<Result<SubscriptionBatch, BrokerError>> {
        if self.ended || self.ends_on.is_cancelled() {
            return None;
        }
        if self.watch.is_none() {
            let ends_on = self.ends_on.clone();
            let opened = tokio::select! {
                _ = ends_on.cancelled() => return None,
                r = self.open() => r,
            };
            if let Err(e) = opened {
                return Some(Err(e));
            }
        }
        loop {
            let ends_on = self.ends_on.clone();
            let looked = tokio::select! {
                _ = ends_on.cancelled() => return None,
                r = self.look() => r,
            };
            match looked {
                Err(e) => return Some(Err(e)),
                Ok(Some(batch)) => return Some(Ok(batch)),
                Ok(None) => {}
            }
            let watch = self.watch.as_mut().expect("opened above");
            let fired = tokio::select! {
                _ = ends_on.cancelled() => return None,
                fired = watch.wait(POLL_INTERVAL) => fired,
            };
            if fired.is_empty() {
                // The poll: look at everything, in case a wake was lost.
                self.catalog_dirty = true;
                self.dirty.extend(self.cursors.keys().cloned());
            }
            let catalog_channel = catalog("wake");
            for channel in fired {
                if channel == catalog_channel {
                    self.catalog_dirty = true;
                } else if let Some(name) = self
                    .cursors
                    .keys()
                    .find(|n| wake_channel(n) == channel)
                    .cloned()
                {
                    self.dirty.insert(name);
                }
            }
        }
    }

    /// Watches the catalog, then places a cursor in every matching topic as `spec.start`
    /// and `spec.resume_from` say. Watching comes first so no change after the look is
    /// missed.
    async fn open(&mut self) -> Result<(), BrokerError> {
        self.watch = Some(self.wakes.watch(&[catalog("wake")]).await);
        let names = self.matching_names().await?;
        let channels: Vec<String> = names.iter().map(|n| wake_channel(n)).collect();
        if let Some(watch) = self.watch.as_mut() {
            watch.add(&self.wakes, &channels).await;
        }
        for name in names {
            let position = self.store.read(&name, 0, 0).await;
            let read = match position {
                Ok(read) => read,
                // Deleted since the catalog was read.
                Err(BrokerError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            let next = match self.spec.resume_from.get(&name) {
                Some(seq) => (*seq).max(1),
                None => match self.spec.start {
                    Start::Latest => read.next_seq,
                    Start::Earliest => read.first_seq,
                    Start::Sequence(seq) => seq.max(1),
                    Start::Time(t) => match self.store.seq_at(&name, t).await {
                        Ok(seq) => seq,
                        Err(BrokerError::NotFound(_)) => continue,
                        Err(e) => return Err(e),
                    },
                },
            };
            self.following.add(&name).await;
            self.dirty.insert(name.clone());
            self.cursors.insert(
                name,
                Cursor {
                    next,
                    epoch: read.epoch,
                },
            );
        }
        self.catalog_dirty = false;
        Ok(())
    }

    /// The catalog's topics that match the pattern.
    async fn matching_names(&self) -> Result<Vec<String>, BrokerError> {
        let mut names = self.store.names().await?;
        names.retain(|n| self.spec.pattern.matches(n));
        Ok(names)
    }

    /// Picks up topics created since the last look (from their start, or their
    /// `resume_from`) and drops deleted ones.
    async fn refresh_catalog(&mut self) -> Result<(), BrokerError> {
        let names = self.matching_names().await?;
        let new: Vec<String> = names
            .iter()
            .filter(|n| !self.cursors.contains_key(*n))
            .cloned()
            .collect();
        let gone: Vec<String> = self
            .cursors
            .keys()
            .filter(|n| names.binary_search(n).is_err())
            .cloned()
            .collect();
        for name in gone {
            self.drop_topic(&name);
        }
        if !new.is_empty() {
            let channels: Vec<String> = new.iter().map(|n| wake_channel(n)).collect();
            if let Some(watch) = self.watch.as_mut() {
                watch.add(&self.wakes, &channels).await;
            }
            for name in new {
                let next = self.start_of_new(&name);
                self.following.add(&name).await;
                self.dirty.insert(name.clone());
                self.cursors.insert(
                    name,
                    Cursor {
                        next,
                        // Learned at the first read.
                        epoch: String::new(),
                    },
                );
            }
        }
        self.catalog_dirty = false;
        Ok(())
    }

    /// Where a topic created after the subscription opened is read from.
    fn start_of_new(&self, name: &str) -> u64 {
        self.spec.resume_from.get(name).copied().unwrap_or(1).max(1)
    }

    /// Stops following a deleted topic.
    fn drop_topic(&mut self, name: &str) {
        self.following.remove(name);
        self.cursors.remove(name);
        self.dirty.remove(name);
        if let Some(watch) = self.watch.as_mut() {
            watch.remove(&wake_channel(name));
        }
    }

    /// Reads what is available (up to `max_batch` messages) from the topics to look at;
    /// `None` when there is nothing new.
    async fn look(&mut self) -> Result<Option<SubscriptionBatch>, BrokerError> {
        if self.catalog_dirty {
            self.refresh_catalog().await?;
        }
        let names: Vec<String> = self.cursors.keys().cloned().collect();
        let mut batch = SubscriptionBatch::default();
        let mut count = 0;
        let n = names.len();
        for k in 0..n {
            if count >= self.spec.max_batch {
                break;
            }
            let name = &names[(self.rotate + k) % n];
            if !self.dirty.contains(name) {
                continue;
            }
            let room = self.spec.max_batch - count;
            let cursor = &self.cursors[name];
            let mut read = match self.store.read(name, cursor.next, room).await {
                Ok(read) => read,
                Err(BrokerError::NotFound(_)) => {
                    self.drop_topic(name);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let cursor = self.cursors.get_mut(name).expect("read above");
            if cursor.epoch != read.epoch {
                let fresh = cursor.epoch.is_empty();
                cursor.epoch = read.epoch.clone();
                if !fresh {
                    // Deleted and created again: a new topic, read from its start.
                    cursor.next = self.spec.resume_from.get(name).copied().unwrap_or(1).max(1);
                    read = match self.store.read(name, cursor.next, room).await {
                        Ok(read) => read,
                        Err(BrokerError::NotFound(_)) => {
                            self.drop_topic(name);
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                }
            }
            let cursor = self.cursors.get_mut(name).expect("read above");
            if let Some((first_missing, next_available)) = read.gap {
                // Counted for Stats whatever the gap policy, as the in-process engine
                // does; a failure to count does not fail the subscription.
                if let Err(e) = self.store.note_gap(name).await {
                    tracing::debug!(topic = %name, error = %e, "a gap notice was not counted");
                }
                if self.spec.on_gap == GapPolicy::EndStream {
                    return Err(BrokerError::DataLoss(format!(
                        "subscription fell behind retention on topic {name:?}: sequences {first_missing}..{} are gone (next available {next_available})",
                        next_available - 1
                    )));
                }
                batch.gaps.push(GapNotice {
                    topic: name.as_str().into(),
                    first_missing,
                    next_available,
                });
            }
            let got: usize = read.slices.iter().map(BlockSlice::len).sum();
            count += got;
            cursor.next = read.next;
            // A full read may have left more behind; otherwise this topic is done until
            // its next wake.
            if got < room {
                self.dirty.remove(name);
            }
            batch.messages.extend(read.slices);
        }
        self.rotate = self.rotate.wrapping_add(1);
        if batch.messages.is_empty() && batch.gaps.is_empty() {
            Ok(None)
        } else {
            Ok(Some(batch))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use futures::StreamExt;

    use super::*;
    use crate::broker::domain::names::Pattern;
    use crate::broker::domain::topic::{NewMessage, Retention};
    use crate::broker::engine::redis::conn::connect;
    use crate::broker::testing::redis::RedisServer;

    /// A generous bound for anything that should take milliseconds.
    const SOON: Duration = Duration::from_secs(10);

    struct Setup {
        _server: RedisServer,
        store: TopicStore,
        /// A store over another connection, as another node would publish.
        other: TopicStore,
        wakes: Wakes,
        shutdown: CancellationToken,
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    async fn setup() -> Setup {
        let server = RedisServer::start();
        let store = TopicStore::new(connect(&[server.url()]).await.unwrap());
        let other = TopicStore::new(connect(&[server.url()]).await.unwrap());
        let shutdown = CancellationToken::new();
        let wakes = Wakes::start(vec![server.url()], shutdown.clone());
        Setup {
            _server: server,
            store,
            other,
            wakes,
            shutdown,
        }
    }

    impl Setup {
        /// A subscription on this setup's store, ending at its shutdown, opened.
        async fn open(
            &self,
            spec: SubscribeSpec,
        ) -> futures::stream::BoxStream<'static, Result<SubscriptionBatch, BrokerError>> {
            self.open_on(&self.store, spec).await
        }

        /// [`Setup::open`] through `store` (another node's store, say).
        async fn open_on(
            &self,
            store: &TopicStore,
            spec: SubscribeSpec,
        ) -> futures::stream::BoxStream<'static, Result<SubscriptionBatch, BrokerError>> {
            subscribe(
                store.clone(),
                self.wakes.clone(),
                spec,
                self.shutdown.child_token(),
            )
            .await
            .unwrap()
            .boxed()
        }
    }

    fn spec(pattern: &str, start: Start) -> SubscribeSpec {
        SubscribeSpec {
            pattern: Pattern::parse("pattern", pattern).unwrap(),
            start,
            resume_from: HashMap::new(),
            on_gap: GapPolicy::Notify,
            max_batch: 100,
        }
    }

    fn msgs(payloads: &[&str]) -> Vec<NewMessage> {
        payloads
            .iter()
            .map(|p| NewMessage {
                payload: Bytes::copy_from_slice(p.as_bytes()),
                ..NewMessage::default()
            })
            .collect()
    }

    /// (topic, sequence, payload) of every message of a batch.
    fn contents(batch: &SubscriptionBatch) -> Vec<(String, u64, String)> {
        batch
            .messages
            .iter()
            .flat_map(|s| {
                s.messages().map(|m| {
                    (
                        m.topic.to_string(),
                        m.sequence,
                        String::from_utf8(m.entry.payload.to_vec()).unwrap(),
                    )
                })
            })
            .collect()
    }

    /// Collects messages from `stream` until `n` arrived.
    async fn take<S>(stream: &mut S, n: usize) -> Vec<(String, u64, String)>
    where
        S: Stream<Item = Result<SubscriptionBatch, BrokerError>> + Unpin,
    {
        let mut got = Vec::new();
        while got.len() < n {
            let batch = tokio::time::timeout(SOON, stream.next())
                .await
                .expect("a batch in time")
                .expect("the stream goes on")
                .expect("no error");
            got.extend(contents(&batch));
        }
        got
    }

    #[tokio::test]
    async fn a_wildcard_follows_two_topics_in_order_including_a_later_one() {
        let s = setup().await;
        s.store.publish("ev.a", msgs(&["a1", "a2"])).await.unwrap();
        s.store.publish("other", msgs(&["no"])).await.unwrap();
        let mut stream = s.open(spec("ev.*", Start::Earliest)).await;
        assert_eq!(
            take(&mut stream, 2).await,
            [
                ("ev.a".into(), 1, "a1".into()),
                ("ev.a".into(), 2, "a2".into())
            ]
        );
        // Created after the subscription opened: read from its start.
        s.other.publish("ev.b", msgs(&["b1", "b2"])).await.unwrap();
        s.other.publish("ev.a", msgs(&["a3"])).await.unwrap();
        s.other.publish("ev.b", msgs(&["b3"])).await.unwrap();
        s.other.publish("other", msgs(&["no"])).await.unwrap();
        let got = take(&mut stream, 4).await;
        let of = |topic: &str| -> Vec<(u64, String)> {
            got.iter()
                .filter(|m| m.0 == topic)
                .map(|m| (m.1, m.2.clone()))
                .collect()
        };
        assert_eq!(of("ev.a"), [(3, "a3".to_string())]);
        assert_eq!(
            of("ev.b"),
            [(1, "b1".into()), (2, "b2".into()), (3, "b3".to_string())]
        );
        assert_eq!(got.len(), 4, "nothing from topics that do not match");
    }

    #[tokio::test]
    async fn replays_from_a_sequence_a_time_and_resume_positions() {
        let s = setup().await;
        s.store.publish("t", msgs(&["1", "2", "3"])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        s.store.publish("t", msgs(&["4"])).await.unwrap();
        let at = s.store.read("t", 4, 1).await.unwrap().slices[0]
            .block
            .publish_time;

        let mut by_seq = s.open(spec("t", Start::Sequence(2))).await;
        let got = take(&mut by_seq, 3).await;
        assert_eq!(got.iter().map(|m| m.1).collect::<Vec<_>>(), [2, 3, 4]);

        let mut by_time = s.open(spec("t", Start::Time(at))).await;
        assert_eq!(take(&mut by_time, 1).await[0].1, 4);

        let mut resumed = spec("t", Start::Latest);
        resumed.resume_from.insert("t".into(), 3);
        let mut resumed = s.open(resumed).await;
        let got = take(&mut resumed, 2).await;
        assert_eq!(got.iter().map(|m| m.1).collect::<Vec<_>>(), [3, 4]);
    }

    #[tokio::test]
    async fn batches_hold_at_most_max_batch_and_gaps_follow_the_policy() {
        let s = setup().await;
        let small = Retention {
            max_messages: 3,
            ..Retention::default()
        };
        s.store.create("t", small).await.unwrap();
        s.store
            .publish("t", msgs(&["1", "2", "3", "4", "5"]))
            .await
            .unwrap();

        let mut notify = spec("t", Start::Sequence(1));
        notify.max_batch = 2;
        let mut stream = s.open(notify).await;
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(
            first.gaps,
            [GapNotice {
                topic: "t".into(),
                first_missing: 1,
                next_available: 3
            }]
        );
        assert_eq!(
            contents(&first).iter().map(|m| m.1).collect::<Vec<_>>(),
            [3, 4]
        );
        let second = stream.next().await.unwrap().unwrap();
        assert!(second.gaps.is_empty());
        assert_eq!(
            contents(&second).iter().map(|m| m.1).collect::<Vec<_>>(),
            [5]
        );

        let mut end = spec("t", Start::Sequence(1));
        end.on_gap = GapPolicy::EndStream;
        let mut stream = s.open(end).await;
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(
            err,
            BrokerError::DataLoss(
                "subscription fell behind retention on topic \"t\": sequences 1..2 are gone (next available 3)".into()
            )
        );
        assert!(
            stream.next().await.is_none(),
            "the stream ends after the error"
        );
        // Both gap notices are counted, the one that ended a stream too (as in process),
        // and every node's Stats sees them.
        assert_eq!(s.other.counts("t").await.unwrap().gaps, 2);
    }

    /// Stats' subscriber count adds up the subscriptions of every node that follow a
    /// topic (a wildcard one too), is there by their first delivery, drops when one
    /// ends, and leaves out a node that stopped writing for longer than the stale bound.
    #[tokio::test]
    async fn subscribers_are_counted_across_nodes() {
        let s = setup().await;
        s.store.create("t", Retention::default()).await.unwrap();
        s.store.create("u", Retention::default()).await.unwrap();
        s.store.publish("t", msgs(&["1"])).await.unwrap();
        let mut here = s.open(spec("t", Start::Earliest)).await;
        let mut there = s.open_on(&s.other, spec("t", Start::Earliest)).await;
        let mut wild = s.open_on(&s.other, spec(">", Start::Earliest)).await;
        for stream in [&mut here, &mut there, &mut wild] {
            assert_eq!(take(stream, 1).await[0].1, 1);
        }
        assert_eq!(s.store.counts("t").await.unwrap().subscribers, 3);
        assert_eq!(s.other.counts("u").await.unwrap().subscribers, 1);

        drop(wild);
        let start = std::time::Instant::now();
        while s.store.counts("u").await.unwrap().subscribers != 0
            || s.store.counts("t").await.unwrap().subscribers != 2
        {
            assert!(start.elapsed() < SOON, "the drop was not counted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // A node that stopped: its last write is older than the stale bound.
        let mut c = connect(&[s._server.url()]).await.unwrap();
        let old: u64 = {
            let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
            secs * 1000 - crate::broker::engine::redis::topic::subscribers::STALE_MS - 1
        };
        let _: i64 = redis::cmd("HSET")
            .arg(TopicKeys::new("t").key("subs"))
            .arg("gone")
            .arg(format!("7 {old} 1"))
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(s.store.counts("t").await.unwrap().subscribers, 2);
        drop((here, there));
    }

    /// Regression: the start was fixed at the stream's first poll, after the Subscribe
    /// call had been answered, so a subscriber from the latest message missed what was
    /// published in between (seen as a 10 s hang of `tests/topics.rs` under load).
    #[tokio::test]
    async fn a_subscription_from_the_latest_message_starts_when_it_is_opened() {
        let s = setup().await;
        s.store.create("t", Retention::default()).await.unwrap();
        s.store.create("u", Retention::default()).await.unwrap();
        s.store.publish("t", msgs(&["old"])).await.unwrap();
        let mut latest = s.open(spec(">", Start::Latest)).await;
        // Published after the subscription opened and before it was ever polled.
        s.other.publish("t", msgs(&["new-t"])).await.unwrap();
        s.other.publish("u", msgs(&["new-u"])).await.unwrap();
        let mut got = take(&mut latest, 2).await;
        got.sort();
        assert_eq!(
            got,
            vec![
                ("t".to_owned(), 2, "new-t".to_owned()),
                ("u".to_owned(), 1, "new-u".to_owned())
            ]
        );
    }

    /// Opening happens in the call, so a Redis that cannot be read is the call's error
    /// (UNAVAILABLE), not a stream that fails later.
    #[tokio::test]
    async fn a_subscription_that_cannot_open_is_refused_by_the_call() {
        let mut s = setup().await;
        s.store.create("t", Retention::default()).await.unwrap();
        s._server.kill();
        let opened = tokio::time::timeout(
            Duration::from_secs(10),
            subscribe(
                s.store.clone(),
                s.wakes.clone(),
                spec("t", Start::Latest),
                s.shutdown.child_token(),
            ),
        )
        .await
        .expect("an answer in time");
        let Err(err) = opened else {
            panic!("opened against a stopped Redis");
        };
        assert!(matches!(err, BrokerError::Unavailable(_)), "{err}");
    }

    #[tokio::test]
    async fn a_publish_on_another_connection_wakes_the_subscriber_before_its_poll() {
        let s = setup().await;
        s.store.create("live", Retention::default()).await.unwrap();
        let mut stream = s.open(spec("live", Start::Latest)).await;
        // Let it open and settle into its wait (the hub's connect wakes it once).
        let idle = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
        assert!(idle.is_err(), "nothing to deliver yet");
        // Each publish lands at a random point of the subscriber's poll period; by the
        // poll alone half of them would take over POLL_INTERVAL / 2, by the wake none.
        let mut latencies = Vec::new();
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(10..200))).await;
            let sent = Instant::now();
            s.other.publish("live", msgs(&["x"])).await.unwrap();
            let got = take(&mut stream, 1).await;
            latencies.push(sent.elapsed());
            assert_eq!(got[0].1, i + 1);
        }
        latencies.sort();
        let median = latencies[latencies.len() / 2];
        assert!(
            median < POLL_INTERVAL / 2,
            "median wake latency {median:?} (all: {latencies:?})"
        );
    }

    #[tokio::test]
    async fn the_stream_ends_when_cancelled_and_drops_deleted_topics() {
        let s = setup().await;
        s.store.publish("t", msgs(&["1"])).await.unwrap();
        let ends_on = s.shutdown.child_token();
        let mut stream = Box::pin(
            subscribe(
                s.store.clone(),
                s.wakes.clone(),
                spec("t", Start::Earliest),
                ends_on.clone(),
            )
            .await
            .unwrap(),
        );
        assert_eq!(take(&mut stream, 1).await[0].1, 1);
        // Deleted and created again: a new topic, read from its start.
        s.other.delete("t").await.unwrap();
        s.other.publish("t", msgs(&["new"])).await.unwrap();
        let got = take(&mut stream, 1).await;
        assert_eq!((got[0].1, got[0].2.as_str()), (1, "new"));

        let waiting = tokio::spawn(async move { stream.next().await.is_none() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        ends_on.cancel();
        let ended = tokio::time::timeout(SOON, waiting).await.unwrap().unwrap();
        assert!(ended, "the stream ends without another batch");
    }

    #[tokio::test]
    async fn works_on_a_one_node_cluster() {
        let server = RedisServer::start_with(&["--cluster-enabled", "yes"]);
        let port = server.port.to_string();
        let cli = |args: &[&str]| {
            std::process::Command::new("redis-cli")
                .args(["-p", &port])
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        assert!(cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]).contains("OK"));
        let start = Instant::now();
        while !cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
            assert!(start.elapsed() < SOON, "the cluster never got ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let conn = connect(&[server.url()]).await.unwrap();
        assert!(conn.is_cluster());
        let store = TopicStore::new(conn);
        let shutdown = CancellationToken::new();
        let wakes = Wakes::start(vec![server.url()], shutdown.clone());
        store.publish("c.one", msgs(&["1", "2"])).await.unwrap();
        let mut stream = Box::pin(
            subscribe(
                store.clone(),
                wakes,
                spec("c.*", Start::Earliest),
                shutdown.child_token(),
            )
            .await
            .unwrap(),
        );
        assert_eq!(take(&mut stream, 2).await.len(), 2);
        // A topic in another slot, created later, and a publish woken through the
        // cluster connection's pushes.
        store.publish("c.two", msgs(&["a"])).await.unwrap();
        assert_eq!(take(&mut stream, 1).await[0].0, "c.two");
        let mut latencies = Vec::new();
        for seq in 3..7 {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(10..200))).await;
            let sent = Instant::now();
            store.publish("c.one", msgs(&["x"])).await.unwrap();
            assert_eq!(take(&mut stream, 1).await[0].1, seq);
            latencies.push(sent.elapsed());
        }
        latencies.sort();
        assert!(
            latencies[1] < POLL_INTERVAL / 2,
            "wake latencies {latencies:?}"
        );
        store.delete("c.two").await.unwrap();
        assert_eq!(store.names().await.unwrap(), ["c.one"]);
        shutdown.cancel();
    }
}
