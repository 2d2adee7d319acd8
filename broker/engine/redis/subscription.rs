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
use crate::broker::engine::redis::topic::TopicStore;
use crate::broker::engine::redis::wake::{POLL_INTERVAL, Wakes, Watch};

/// Where the subscription is in one topic.
struct Cursor {
    next: u64,
    /// The topic incarnation the cursor belongs to.
    epoch: String,
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
}

/// The wake channel of topic `name`.
fn wake_channel(name: &str) -> String {
    TopicKeys::new(name).key("wake")
}

/// Opens a subscription: a stream of batches of at most `spec.max_batch` messages, in
/// order and without gaps per topic (a gap left by retention is reported, or ends the
/// stream with DATA_LOSS under [`GapPolicy::EndStream`]). It ends when `ends_on` is
/// cancelled, or with an error.
pub(crate) fn subscribe(
    store: TopicStore,
    wakes: Wakes,
    spec: SubscribeSpec,
    ends_on: CancellationToken,
) -> impl Stream<Item = Result<SubscriptionBatch, BrokerError>> + Send + 'static {
    let reader = Reader {
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
    futures::stream::unfold(reader, |mut reader| async move {
        let item = reader.next_batch().await?;
        if item.is_err() {
            reader.ended = true;
        }
        Some((item, reader))
    })
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

    fn drop_topic(&mut self, name: &str) {
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
