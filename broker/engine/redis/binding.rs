//! Topic bindings on Redis: every message published to a topic that a queue's
//! `topic_bindings` pattern matches becomes a job on that queue, as the in-process
//! engine's publish makes it (kind = the topic, the message's payload and headers plus
//! `x-sluice-topic-sequence`, priority 0, the queue's max attempts, no idempotency or
//! ordering key).
//!
//! A topic and a queue are two slots, so a publish cannot enqueue atomically as the
//! in-process engine does. Instead [`pump_bindings`] copies after the fact: per bound
//! topic it reads the messages after the binding's cursor (kept in the queue's slot, see
//! `queue/binding.rs`), then one script on the queue's slot enqueues them and moves the
//! cursor only if it still is what was read. Each message thus becomes one job however
//! many nodes pump at once and wherever a node stops; a pump that loses the race reads
//! the new cursor and goes on from there.
//!
//! # Where a binding starts
//!
//! As in the in-process engine, a binding takes the messages published after it was
//! made. The first pump that sees a pattern (the engine pumps right after a policy
//! change) starts it: each topic it matches that exists then gets a cursor at its next
//! sequence. A topic with no cursor under a started pattern was created after the
//! binding, so its messages are pumped from sequence 1; so are those of a topic deleted
//! and created again (its epoch changed). A topic created in the same moment as the
//! binding started may be taken from its start.
//!
//! # Differences from the in-process engine
//!
//! * Jobs arrive after the publish returns (on the engine's publish wake-up or periodic
//!   sweep), not atomically with it; a full queue does not refuse the publish: the pump
//!   takes what fits and the rest waits in the topic (while retention keeps it).
//! * Messages retention drops before they are pumped are skipped: counted in the queue's
//!   `trimmed` binding counter ([`QueueStore::bind_state`]) and logged as a warning.
//! * A binding removed and added again between two pumps keeps its cursor (it takes the
//!   messages published while it was removed); nodes that pump with different pattern
//!   lists for one queue (a policy change in flight) may copy a message twice.

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::names::Pattern;
use crate::broker::engine::local::HEADER_TOPIC_SEQUENCE;

use super::queue::QueueStore;
use super::queue::binding::{BoundMessage, Pumped, cursor, parse_cursor};
use super::topic::{TopicRead, TopicStore};

/// Messages read from a topic per script call.
const BATCH: usize = 100;

/// Copies the messages of every topic that one of `patterns` (the queue's
/// `topic_bindings`) matches into `queue` as jobs, from each binding's cursor on; starts
/// new patterns, and forgets removed patterns and the cursors of topics no pattern
/// matches any more. Returns how many jobs it enqueued. NotFound if the queue does not
/// exist (and has bindings to start).
pub(crate) async fn pump_bindings(
    queues: &QueueStore,
    topics: &TopicStore,
    queue: &str,
    patterns: &[Pattern],
) -> Result<u64, BrokerError> {
    let state = queues.bind_state(queue).await?;
    if patterns.is_empty() && state == Default::default() {
        return Ok(0);
    }
    let bound = |topic: &str| patterns.iter().any(|p| p.matches(topic));
    let names = topics.names().await?;
    let new: Vec<&str> = patterns
        .iter()
        .map(Pattern::as_str)
        .filter(|p| !state.started.contains(*p))
        .collect();
    let mut drop: Vec<String> = state
        .started
        .iter()
        .filter(|p| !patterns.iter().any(|q| q.as_str() == p.as_str()))
        .map(|p| format!("p:{p}"))
        .collect();
    drop.extend(
        state
            .cursors
            .keys()
            .filter(|t| !bound(t))
            .map(|t| format!("c:{t}")),
    );
    let mut expected = state.cursors;
    if !new.is_empty() || !drop.is_empty() {
        let mut starts = Vec::new();
        for topic in &names {
            let starts_here = patterns
                .iter()
                .any(|p| new.contains(&p.as_str()) && p.matches(topic));
            if !starts_here || expected.contains_key(topic) {
                continue;
            }
            match topics.read(topic, u64::MAX, 0).await {
                Ok(r) => starts.push((topic.clone(), cursor(&r.epoch, r.next_seq))),
                Err(BrokerError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        queues.bind_sync(queue, &starts, &new, &drop).await?;
        // A start cursor is set only where there was none: if another pump set one
        // first, the compare-and-set below fails and reads it.
        expected.extend(starts);
    }
    let mut total = 0;
    for topic in names.iter().filter(|t| bound(t)) {
        total += pump_topic(queues, topics, queue, topic, expected.remove(topic)).await?;
    }
    Ok(total)
}

/// Pumps one topic from the cursor `expected` (as stored; `None` = from its start) until
/// it is caught up or the queue is full.
async fn pump_topic(
    queues: &QueueStore,
    topics: &TopicStore,
    queue: &str,
    topic: &str,
    mut expected: Option<String>,
) -> Result<u64, BrokerError> {
    let mut total = 0;
    loop {
        let (epoch, from) = match expected.as_deref().and_then(parse_cursor) {
            Some((epoch, seq)) => (Some(epoch.to_owned()), seq),
            None => (None, 1),
        };
        let Some(mut batch) = read_batch(topics, topic, from).await? else {
            return Ok(total);
        };
        if from != 1 && epoch.as_deref() != Some(batch.epoch.as_str()) {
            // Deleted and created again since the cursor was set: all of this
            // incarnation came after the binding.
            let Some(again) = read_batch(topics, topic, 1).await? else {
                return Ok(total);
            };
            batch = again;
        }
        let trimmed = batch.gap.map_or(0, |(missing, next)| next - missing);
        let messages: Vec<BoundMessage> = batch
            .slices
            .iter()
            .flat_map(|s| s.messages())
            .map(|m| {
                let mut headers = m.entry.headers().cloned().unwrap_or_default();
                headers.insert(HEADER_TOPIC_SEQUENCE.into(), m.sequence.to_string());
                BoundMessage {
                    sequence: m.sequence,
                    payload: m.entry.payload.clone(),
                    headers,
                }
            })
            .collect();
        if messages.is_empty() && trimmed == 0 {
            return Ok(total);
        }
        let pumped = queues
            .bind_pump(
                queue,
                topic,
                expected.as_deref(),
                &batch.epoch,
                batch.next,
                trimmed,
                &messages,
            )
            .await?;
        match pumped {
            Pumped::Moved => expected = queues.bind_cursor(queue, topic).await?,
            Pumped::Taken { taken, full } => {
                total += taken;
                if trimmed > 0 {
                    tracing::warn!(
                        "topic binding {topic:?} -> queue {queue:?}: {trimmed} messages \
                         (from sequence {}) left the topic by retention before they were \
                         copied; skipped",
                        batch.gap.map_or(0, |(missing, _)| missing)
                    );
                }
                if full {
                    return Ok(total);
                }
                expected = Some(cursor(&batch.epoch, batch.next));
                if messages.len() < BATCH {
                    return Ok(total);
                }
            }
        }
    }
}

/// Reads a batch from `from`; `None` if the topic is gone.
async fn read_batch(
    topics: &TopicStore,
    topic: &str,
    from: u64,
) -> Result<Option<TopicRead>, BrokerError> {
    match topics.read(topic, from, BATCH).await {
        Ok(r) => Ok(Some(r)),
        Err(BrokerError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::broker::domain::limits::Headers;
    use crate::broker::domain::queue::{Delivery, QueuePolicy};
    use crate::broker::domain::topic::{NewMessage, Retention};
    use crate::broker::engine::redis::conn::connect;
    use crate::broker::testing::redis::RedisServer;

    async fn stores() -> (RedisServer, QueueStore, TopicStore) {
        let server = RedisServer::start();
        let conn = connect(&[server.url()]).await.expect("connect");
        (server, QueueStore::new(conn.clone()), TopicStore::new(conn))
    }

    fn patterns(list: &[&str]) -> Vec<Pattern> {
        list.iter()
            .map(|p| Pattern::parse("topic_bindings", p).unwrap())
            .collect()
    }

    async fn bound_queue(q: &QueueStore, name: &str, bindings: &[&str], max_depth: u64) {
        let policy = QueuePolicy {
            topic_bindings: bindings.iter().map(|b| b.to_string()).collect(),
            max_depth,
            ..QueuePolicy::default_for(name)
        };
        q.create(name, &policy).await.unwrap();
    }

    fn msg(payload: &str) -> NewMessage {
        NewMessage {
            payload: Bytes::from(payload.to_owned()),
            ..NewMessage::default()
        }
    }

    async fn publish(t: &TopicStore, topic: &str, payloads: &[&str]) {
        t.publish(topic, payloads.iter().map(|p| msg(p)).collect())
            .await
            .unwrap();
    }

    async fn drain(q: &QueueStore, queue: &str) -> Vec<Delivery> {
        q.lease(queue, 100, None, "w", "a").await.unwrap()
    }

    /// (kind, payload, sequence header) of each delivery.
    fn seen(d: &[Delivery]) -> Vec<(String, String, String)> {
        d.iter()
            .map(|d| {
                (
                    d.kind.to_string(),
                    String::from_utf8(d.payload.to_vec()).unwrap(),
                    d.headers[HEADER_TOPIC_SEQUENCE].clone(),
                )
            })
            .collect()
    }

    /// A binding takes what is published after it starts, once each, even with two pumps
    /// racing; jobs look as the in-process engine makes them; the cursor stays.
    #[tokio::test]
    async fn redis_binding_copies_each_publish_once_with_concurrent_pumps() {
        let (_srv, q, t) = stores().await;
        bound_queue(&q, "jobs", &["orders.*"], 1000).await;
        let p = patterns(&["orders.*"]);
        publish(&t, "orders.eu", &["before"]).await;
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 0);
        let headers: Headers = [("h".to_owned(), "v".to_owned())].into();
        t.publish(
            "orders.eu",
            vec![
                NewMessage {
                    headers: headers.clone(),
                    ..msg("m1")
                },
                msg("m2"),
                msg("m3"),
            ],
        )
        .await
        .unwrap();
        publish(&t, "other", &["not bound"]).await;
        let pumps: Vec<_> = (0..2)
            .map(|_| {
                let (q, t, p) = (q.clone(), t.clone(), p.clone());
                tokio::spawn(async move { pump_bindings(&q, &t, "jobs", &p).await })
            })
            .collect();
        let mut total = 0;
        for pump in pumps {
            total += pump.await.unwrap().unwrap();
        }
        assert_eq!(total, 3);
        let got = drain(&q, "jobs").await;
        assert_eq!(
            seen(&got),
            [("m1", 2), ("m2", 3), ("m3", 4)].map(|(p, s)| (
                "orders.eu".to_owned(),
                p.to_owned(),
                s.to_string()
            ))
        );
        assert_eq!(got[0].headers.get("h"), Some(&"v".to_owned()));
        assert_eq!(got[0].headers.len(), 2);
        assert!(got.iter().all(|d| d.priority == 0));
        assert_eq!(q.counts("jobs").await.unwrap().enqueued, 3);
        let epoch = t.read("orders.eu", 1, 0).await.unwrap().epoch;
        let state = q.bind_state("jobs").await.unwrap();
        assert_eq!(
            state.cursors,
            [("orders.eu".to_owned(), cursor(&epoch, 5))].into()
        );
        assert_eq!(state.started, ["orders.*".to_owned()].into());
        // Again: nothing new.
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 0);
        publish(&t, "orders.eu", &["m4"]).await;
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 1);
        assert_eq!(seen(&drain(&q, "jobs").await)[0].2, "5");
    }

    /// Many batches, four pumps racing: every message becomes exactly one job.
    #[tokio::test]
    async fn redis_binding_racing_pumps_over_many_batches() {
        let (_srv, q, t) = stores().await;
        bound_queue(&q, "jobs", &["feed"], 10_000).await;
        let p = patterns(&["feed"]);
        pump_bindings(&q, &t, "jobs", &p).await.unwrap();
        let payloads: Vec<String> = (0..250).map(|i| i.to_string()).collect();
        for chunk in payloads.chunks(50) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            publish(&t, "feed", &refs).await;
        }
        let pumps: Vec<_> = (0..4)
            .map(|_| {
                let (q, t, p) = (q.clone(), t.clone(), p.clone());
                tokio::spawn(async move { pump_bindings(&q, &t, "jobs", &p).await })
            })
            .collect();
        let mut total = 0;
        for pump in pumps {
            total += pump.await.unwrap().unwrap();
        }
        assert_eq!(total, 250);
        let mut sequences = Vec::new();
        loop {
            let got = drain(&q, "jobs").await;
            if got.is_empty() {
                break;
            }
            sequences.extend(seen(&got).into_iter().map(|g| g.2.parse::<u64>().unwrap()));
        }
        assert_eq!(sequences, (1..=250).collect::<Vec<_>>());
    }

    /// A topic created after the binding started is taken from its first message, as is
    /// a topic deleted and created again.
    #[tokio::test]
    async fn redis_binding_takes_topics_created_later_from_the_start() {
        let (_srv, q, t) = stores().await;
        bound_queue(&q, "jobs", &["orders.>"], 1000).await;
        let p = patterns(&["orders.>"]);
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 0);
        publish(&t, "orders.us", &["u1", "u2"]).await;
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 2);
        let got = seen(&drain(&q, "jobs").await);
        assert_eq!(
            got.iter().map(|g| g.2.as_str()).collect::<Vec<_>>(),
            ["1", "2"]
        );
        t.delete("orders.us").await.unwrap();
        publish(&t, "orders.us", &["again"]).await;
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 1);
        let got = seen(&drain(&q, "jobs").await);
        assert_eq!(got[0].1, "again");
        assert_eq!(got[0].2, "1");
    }

    /// Messages retention dropped before they were pumped are skipped and counted.
    #[tokio::test]
    async fn redis_binding_skips_and_counts_what_retention_dropped() {
        let (_srv, q, t) = stores().await;
        bound_queue(&q, "jobs", &["feed"], 1000).await;
        let p = patterns(&["feed"]);
        t.create(
            "feed",
            Retention {
                max_messages: 2,
                ..Retention::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 0);
        publish(&t, "feed", &["1", "2", "3", "4", "5"]).await;
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 2);
        let got = seen(&drain(&q, "jobs").await);
        assert_eq!(
            got.iter().map(|g| g.1.as_str()).collect::<Vec<_>>(),
            ["4", "5"]
        );
        assert_eq!(q.bind_state("jobs").await.unwrap().trimmed, 3);
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 0);
        assert_eq!(q.bind_state("jobs").await.unwrap().trimmed, 3);
    }

    /// A full queue takes what fits; the rest waits in the topic for room.
    #[tokio::test]
    async fn redis_binding_waits_for_room_in_a_full_queue() {
        let (_srv, q, t) = stores().await;
        bound_queue(&q, "jobs", &["feed"], 2).await;
        let p = patterns(&["feed"]);
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 0);
        publish(&t, "feed", &["1", "2", "3"]).await;
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 2);
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 0);
        let got = drain(&q, "jobs").await;
        q.ack(
            "jobs",
            got.iter().map(|d| (d.lease_id.clone(), None)).collect(),
        )
        .await
        .unwrap();
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 1);
        assert_eq!(seen(&drain(&q, "jobs").await)[0].1, "3");
    }

    /// A removed binding is forgotten (pattern and cursors); added again, it starts at
    /// the topic's next message.
    #[tokio::test]
    async fn redis_binding_removed_and_added_again_starts_afresh() {
        let (_srv, q, t) = stores().await;
        bound_queue(&q, "jobs", &["feed"], 1000).await;
        let p = patterns(&["feed"]);
        publish(&t, "feed", &["0"]).await;
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 0);
        publish(&t, "feed", &["1"]).await;
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 1);
        assert_eq!(pump_bindings(&q, &t, "jobs", &[]).await.unwrap(), 0);
        assert_eq!(q.bind_state("jobs").await.unwrap(), Default::default());
        publish(&t, "feed", &["while unbound"]).await;
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 0);
        publish(&t, "feed", &["3"]).await;
        assert_eq!(pump_bindings(&q, &t, "jobs", &p).await.unwrap(), 1);
        let got = seen(&drain(&q, "jobs").await);
        assert_eq!(
            got.iter().map(|g| g.1.as_str()).collect::<Vec<_>>(),
            ["1", "3"]
        );
        // A missing queue with bindings to start is NotFound.
        let err = pump_bindings(&q, &t, "nope", &p).await.unwrap_err();
        assert!(matches!(err, BrokerError::NotFound(_)), "{err}");
    }
}
