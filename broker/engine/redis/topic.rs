//! Topics kept in Redis: each topic a stream under `{t:<name>}` with explicit ids
//! `<seq>-1` (seq from 1, gap-free), a meta hash with its sequences and retention, and
//! publish idempotency keys (`SET PX`, for [`PUBLISH_DEDUP_WINDOW_MS`]).
//!
//! Every operation is one Lua script over the topic's keys (the layout and the binary
//! searches that replace a time index are described in `topic/common.lua`), so a publish
//! of a batch is atomic and its sequences are consecutive. A publish wakes the topic's
//! subscribers on every node through the shard channel `<base>:wake`; creating and
//! deleting a topic also changes the catalog set `keys::catalog("topics")` (another slot,
//! so a second command) and wakes `keys::catalog("wake")`.
//!
//! The catalog is updated after the topic's own script, and the two are not one
//! transaction: a publish that races a delete of the same topic can leave the catalog
//! without a topic that exists again. [`TopicStore::sweep`] puts an existing topic back.

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use redis::{Script, Value};

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::Headers;
use crate::broker::domain::names::validate_name;
use crate::broker::domain::rate::WINDOW_SECS;
use crate::broker::domain::topic::{
    Appended, BlockEntry, BlockSlice, MessageBlock, NewMessage, PUBLISH_DEDUP_WINDOW_MS, Retention,
    validate_retention,
};
use crate::broker::engine::local::stats::TopicCounts;
use crate::broker::engine::redis::conn::{RedisConn, unavailable};
use crate::broker::engine::redis::keys::{TopicKeys, catalog};
use crate::broker::engine::redis::wake;

/// Builds a topic script: the shared helpers, then the script's own body.
macro_rules! topic_script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("topic/common.lua"),
                include_str!(concat!("topic/", $file))
            ))
        })
    };
}

static PUBLISH: LazyLock<Script> = topic_script!("publish.lua");
static CREATE: LazyLock<Script> = topic_script!("create.lua");
static DELETE: LazyLock<Script> = topic_script!("delete.lua");
static READ: LazyLock<Script> = topic_script!("read.lua");
static SEQ_AT: LazyLock<Script> = topic_script!("seq_at.lua");
static STATS: LazyLock<Script> = topic_script!("stats.lua");
static SWEEP: LazyLock<Script> = topic_script!("sweep.lua");
static SUBS_PUT: LazyLock<Script> = topic_script!("subs_put.lua");
static GAP: LazyLock<Script> = topic_script!("gap.lua");

pub(crate) mod subscribers;
pub(crate) use subscribers::Subscribers;

/// What [`TopicStore::read`] found.
#[derive(Debug, Default)]
pub(crate) struct TopicRead {
    /// Set when the cursor was below the oldest retained message: (first missing, next
    /// available).
    pub(crate) gap: Option<(u64, u64)>,
    /// The messages read, in sequence order, as blocks of one publish time each.
    pub(crate) slices: Vec<BlockSlice>,
    /// Where the reader goes on from.
    pub(crate) next: u64,
    /// The oldest retained sequence (= `next_seq` when none is retained).
    pub(crate) first_seq: u64,
    /// The sequence the next published message gets.
    pub(crate) next_seq: u64,
    /// The topic's incarnation: it changes when the topic is deleted and created again
    /// (its sequences then start over at 1).
    pub(crate) epoch: String,
}

/// The topics of a Redis engine. Cheap to clone.
#[derive(Clone)]
pub(crate) struct TopicStore {
    conn: RedisConn,
    /// This node's subscriptions per topic, written to Redis for Stats.
    subscribers: Subscribers,
}

/// A fresh incarnation nonce for a topic being created.
fn epoch() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// The error for a change that Redis did not confirm: when the request may have reached
/// Redis before the connection failed or timed out, the text says the change may have
/// happened (a publish retried with its idempotency keys is then safe).
fn unconfirmed(doing: &str, e: redis::RedisError) -> BrokerError {
    if (e.is_timeout() || e.is_connection_dropped() || e.is_io_error())
        && !e.is_connection_refusal()
    {
        unavailable(&format!("{doing} (it may or may not have happened)"), e)
    } else {
        unavailable(doing, e)
    }
}

/// The error for a topic that does not exist (the in-process engine's wording).
fn not_found(name: &str) -> BrokerError {
    BrokerError::NotFound(format!("topic {name:?} does not exist"))
}

impl TopicStore {
    /// Topics over `conn`.
    pub(crate) fn new(conn: RedisConn) -> Self {
        Self {
            subscribers: Subscribers::new(conn.clone()),
            conn,
        }
    }

    /// This node's count of open subscriptions per topic.
    pub(crate) fn subscribers(&self) -> &Subscribers {
        &self.subscribers
    }

    /// Counts a gap notice a subscription of this node sent for topic `name` (nothing if
    /// the topic is gone).
    pub(crate) async fn note_gap(&self, name: &str) -> Result<(), BrokerError> {
        let mut c = self.conn.clone();
        let keys = TopicKeys::new(name);
        let _: i64 = GAP
            .key(keys.base())
            .key(keys.slot_guard())
            .invoke_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("counting a gap of topic {name:?}"), e))?;
        Ok(())
    }

    /// Adds `name` to the catalog and wakes the nodes' subscriptions to look at it.
    async fn catalog_add(&self, name: &str) -> Result<(), BrokerError> {
        let mut c = self.conn.clone();
        let added: i64 = redis::cmd("SADD")
            .arg(catalog("topics"))
            .arg(name)
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("adding topic {name:?} to the catalog"), e))?;
        if added > 0 {
            wake::publish(&self.conn, &catalog("wake")).await?;
        }
        Ok(())
    }

    /// Creates a topic or changes its retention (applied at once); returns the effective
    /// retention.
    pub(crate) async fn create(
        &self,
        name: &str,
        retention: Retention,
    ) -> Result<Retention, BrokerError> {
        validate_name("name", name)?;
        validate_retention(&retention)?;
        let keys = TopicKeys::new(name);
        let mut c = self.conn.clone();
        let _created: i64 = CREATE
            .key(keys.base())
            .key(keys.slot_guard())
            .arg(epoch())
            .arg(retention.max_messages)
            .arg(retention.max_bytes)
            .arg(retention.max_age_ms)
            .invoke_async(&mut c)
            .await
            .map_err(|e| unconfirmed(&format!("creating topic {name:?}"), e))?;
        // Also when it existed: a publish racing a delete may have left it out.
        self.catalog_add(name).await?;
        Ok(retention)
    }

    /// Deletes a topic and its log.
    pub(crate) async fn delete(&self, name: &str) -> Result<(), BrokerError> {
        validate_name("name", name)?;
        let keys = TopicKeys::new(name);
        let mut c = self.conn.clone();
        let existed: i64 = DELETE
            .key(keys.base())
            .key(keys.slot_guard())
            .invoke_async(&mut c)
            .await
            .map_err(|e| unconfirmed(&format!("deleting topic {name:?}"), e))?;
        let _: i64 = redis::cmd("SREM")
            .arg(catalog("topics"))
            .arg(name)
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("removing topic {name:?} from the catalog"), e))?;
        if existed == 0 {
            return Err(not_found(name));
        }
        wake::publish(&self.conn, &catalog("wake")).await
    }

    /// Every topic's name, sorted.
    pub(crate) async fn names(&self) -> Result<Vec<String>, BrokerError> {
        let mut c = self.conn.clone();
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(catalog("topics"))
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable("listing topics", e))?;
        names.sort();
        Ok(names)
    }

    /// Appends `messages` to topic `name` (created with the default retention if it does
    /// not exist, as the in-process engine does) as one atomic script, and wakes its
    /// subscribers. A message whose idempotency key was published in the last
    /// [`PUBLISH_DEDUP_WINDOW_MS`] (or earlier in the same batch) is not stored again and
    /// answers the original sequence. Batch and entry size limits are the caller's.
    #[cfg(test)]
    pub(crate) async fn publish(
        &self,
        name: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, BrokerError> {
        self.publish_checked(name, &messages, 0).await
    }

    /// [`TopicStore::publish`] of a batch checked against schema revision
    /// `schema_revision` (0: none): refused with [`BrokerError::SchemaStale`], writing
    /// nothing, when the topic's current revision is another.
    pub(crate) async fn publish_checked(
        &self,
        name: &str,
        messages: &[NewMessage],
        schema_revision: u32,
    ) -> Result<Vec<Appended>, BrokerError> {
        validate_name("topic", name)?;
        if messages.is_empty() {
            return Err(BrokerError::invalid(
                "messages",
                "must hold at least 1 entry",
            ));
        }
        let keys = TopicKeys::new(name);
        let defaults = Retention::default();
        let mut invocation = PUBLISH.key(keys.base());
        invocation
            .key(keys.slot_guard())
            .arg(epoch())
            .arg(defaults.max_messages)
            .arg(defaults.max_bytes)
            .arg(defaults.max_age_ms)
            .arg(PUBLISH_DEDUP_WINDOW_MS)
            .arg(schema_revision);
        for m in messages {
            match &m.idempotency_key {
                Some(k) => invocation.arg(format!("={k}")),
                None => invocation.arg(""),
            };
            invocation.arg(&m.key).arg(m.headers.len());
            for (k, v) in &m.headers {
                invocation.arg(k).arg(v);
            }
            invocation.arg(&m.payload[..]);
        }
        let mut c = self.conn.clone();
        let out: Vec<i64> = invocation
            .invoke_async(&mut c)
            .await
            .map_err(|e| match e.code() {
                Some("SLUICE_SCHEMA") => BrokerError::SchemaStale {
                    revision: e.detail().and_then(|d| d.trim().parse().ok()).unwrap_or(0),
                },
                _ => unconfirmed(&format!("publishing to topic {name:?}"), e),
            })?;
        if out.first() == Some(&1) {
            self.catalog_add(name).await?;
        }
        Ok(out[1..]
            .iter()
            .map(|&s| Appended {
                sequence: s.unsigned_abs(),
                duplicate: s < 0,
            })
            .collect())
    }

    /// Reads up to `max` messages from sequence `from_seq`; a cursor below the oldest
    /// retained message reports a gap and reads on from the oldest one, and a cursor past
    /// the end reads nothing and stays where it is (as `domain::topic::Topic::read`).
    pub(crate) async fn read(
        &self,
        name: &str,
        from_seq: u64,
        max: usize,
    ) -> Result<TopicRead, BrokerError> {
        let keys = TopicKeys::new(name);
        let mut c = self.conn.clone();
        let count = max.min(u32::MAX as usize);
        let out: Value = READ
            .key(keys.base())
            .key(keys.slot_guard())
            .arg(from_seq)
            .arg(count)
            .invoke_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("reading topic {name:?}"), e))?;
        let bad = |what: &str| {
            BrokerError::Unavailable(format!(
                "redis: reading topic {name:?}: unexpected reply ({what})"
            ))
        };
        let parts = match out {
            Value::Nil => return Err(not_found(name)),
            Value::Array(parts) if parts.len() == 4 => parts,
            _ => return Err(bad("not a 4-part array")),
        };
        let first_seq = number(&parts[0]).ok_or_else(|| bad("first"))?;
        let next_seq = number(&parts[1]).ok_or_else(|| bad("next"))?;
        let epoch = text(&parts[2]).ok_or_else(|| bad("epoch"))?;
        let Value::Array(entries) = &parts[3] else {
            return Err(bad("entries"));
        };
        let (gap, start) = if from_seq < first_seq {
            (Some((from_seq, first_seq)), first_seq)
        } else {
            (None, from_seq)
        };
        let topic: Arc<str> = Arc::from(name);
        let slices = blocks(&topic, entries).ok_or_else(|| bad("stream entry"))?;
        let read: u64 = slices.iter().map(|s| s.len() as u64).sum();
        Ok(TopicRead {
            gap,
            slices,
            next: start + read,
            first_seq,
            next_seq,
            epoch,
        })
    }

    /// The sequence of the first retained message published at or after `unix_ms` (the
    /// next sequence if there is none).
    pub(crate) async fn seq_at(&self, name: &str, unix_ms: u64) -> Result<u64, BrokerError> {
        let keys = TopicKeys::new(name);
        let mut c = self.conn.clone();
        let seq: Option<u64> = SEQ_AT
            .key(keys.base())
            .key(keys.slot_guard())
            .arg(unix_ms)
            .invoke_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("finding a time in topic {name:?}"), e))?;
        seq.ok_or_else(|| not_found(name))
    }

    /// The topic's counters, for the whole cluster: `subscribers` adds up every node's
    /// open subscriptions (as of its last write, see [`subscribers`]), `gaps` counts the
    /// gap notices of every node, `published` every message since the topic was created,
    /// `publish_rate` the messages of the last [`WINDOW_SECS`] seconds a second (every
    /// node's publishes, counted by the publish script).
    pub(crate) async fn counts(&self, name: &str) -> Result<TopicCounts, BrokerError> {
        let keys = TopicKeys::new(name);
        let mut c = self.conn.clone();
        let out: Option<(u64, u64, u64, u64, u64, u64)> = STATS
            .key(keys.base())
            .key(keys.slot_guard())
            .arg(subscribers::STALE_MS)
            .invoke_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("reading the counters of topic {name:?}"), e))?;
        let (first, next, bytes, subscribers, gaps, in_window) =
            out.ok_or_else(|| not_found(name))?;
        let retained = next - first;
        Ok(TopicCounts {
            name: name.to_owned(),
            first_sequence: if retained == 0 { 0 } else { first },
            last_sequence: next - 1,
            retained_messages: retained,
            retained_bytes: bytes,
            published: next - 1,
            publish_rate: in_window as f64 / WINDOW_SECS as f64,
            subscribers: subscribers.min(u64::from(u32::MAX)) as u32,
            gaps,
        })
    }

    /// Applies retention now (so age evicts without publishes), and puts an existing
    /// topic back into the catalog if a race left it out. A topic that does not exist is
    /// not an error: there is nothing to sweep.
    pub(crate) async fn sweep(&self, name: &str) -> Result<(), BrokerError> {
        let keys = TopicKeys::new(name);
        let mut c = self.conn.clone();
        let exists: i64 = SWEEP
            .key(keys.base())
            .key(keys.slot_guard())
            .invoke_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("applying the retention of topic {name:?}"), e))?;
        if exists == 1 {
            self.catalog_add(name).await?;
        }
        Ok(())
    }
}

/// A reply value as a decimal number.
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => text(v)?.parse().ok(),
    }
}

/// A reply value as text.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Bytes of a bulk string.
fn bytes_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        _ => None,
    }
}

/// One stream entry (`[id, [field, value, ...]]`) as (sequence, time, entry).
fn parse_entry(v: &Value) -> Option<(u64, u64, BlockEntry)> {
    let Value::Array(pair) = v else { return None };
    let [id, Value::Array(fields)] = pair.as_slice() else {
        return None;
    };
    let id = text(id)?;
    let seq: u64 = id.strip_suffix("-1")?.parse().ok()?;
    let mut time = None;
    let mut payload = Bytes::new();
    let mut key = String::new();
    let mut headers = Headers::new();
    for kv in fields.chunks_exact(2) {
        let name = bytes_of(&kv[0])?;
        let value = bytes_of(&kv[1])?;
        match name {
            b"t" => time = std::str::from_utf8(value).ok()?.parse().ok(),
            b"c" => {}
            b"p" => payload = Bytes::copy_from_slice(value),
            b"k" => key = String::from_utf8(value.to_vec()).ok()?,
            _ => {
                let header = name.strip_prefix(b"h.")?;
                headers.insert(
                    String::from_utf8(header.to_vec()).ok()?,
                    String::from_utf8(value.to_vec()).ok()?,
                );
            }
        }
    }
    Some((seq, time?, BlockEntry::new(key, headers, payload)))
}

/// Groups consecutive entries of one publish time into blocks (a publish is one time),
/// each handed out whole.
fn blocks(topic: &Arc<str>, entries: &[Value]) -> Option<Vec<BlockSlice>> {
    let mut slices = Vec::new();
    let mut run: Vec<BlockEntry> = Vec::new();
    let mut run_start = 0;
    let mut run_time = 0;
    let mut flush = |run: &mut Vec<BlockEntry>, start: u64, time: u64| {
        if run.is_empty() {
            return;
        }
        let block = MessageBlock::new(topic.clone(), start, time, std::mem::take(run));
        let end = block.entries.len();
        slices.push(BlockSlice {
            block: Arc::new(block),
            start: 0,
            end,
        });
    };
    for v in entries {
        let (seq, time, entry) = parse_entry(v)?;
        if run.is_empty() || time != run_time || seq != run_start + run.len() as u64 {
            flush(&mut run, run_start, run_time);
            run_start = seq;
            run_time = time;
        }
        run.push(entry);
    }
    flush(&mut run, run_start, run_time);
    Some(slices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::engine::redis::conn::connect;
    use crate::broker::testing::redis::RedisServer;

    async fn store(server: &RedisServer) -> TopicStore {
        TopicStore::new(connect(&[server.url()]).await.expect("connects"))
    }

    fn msg(payload: &str) -> NewMessage {
        NewMessage {
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            ..NewMessage::default()
        }
    }

    fn keyed(payload: &str, idempotency_key: &str) -> NewMessage {
        NewMessage {
            idempotency_key: Some(idempotency_key.into()),
            ..msg(payload)
        }
    }

    fn sequences(read: &TopicRead) -> Vec<u64> {
        read.slices
            .iter()
            .flat_map(|s| s.messages().map(|m| m.sequence))
            .collect()
    }

    fn payloads(read: &TopicRead) -> Vec<String> {
        read.slices
            .iter()
            .flat_map(|s| {
                s.messages()
                    .map(|m| String::from_utf8(m.entry.payload.to_vec()).unwrap())
            })
            .collect()
    }

    #[tokio::test]
    async fn a_publish_past_maxmemory_is_resource_exhausted_and_writes_nothing() {
        let server = RedisServer::start();
        let s = store(&server).await;
        s.publish("t", vec![msg("a")]).await.unwrap();
        server.config_set("maxmemory", "1");
        let err = s.publish("t", vec![msg("b"), msg("c")]).await.unwrap_err();
        assert!(matches!(err, BrokerError::ResourceExhausted(_)), "{err}");
        let text = err.to_string();
        assert!(text.contains("maxmemory"), "{text}");
        assert!(text.contains("publishing to topic \"t\""), "{text}");
        // Reads still answer, and nothing of the refused batch is there.
        let counts = s.counts("t").await.unwrap();
        assert_eq!((counts.published, counts.retained_messages), (1, 1));
        server.config_set("maxmemory", "0");
        let next = s.publish("t", vec![msg("b")]).await.unwrap();
        assert_eq!(
            next[0].sequence, 2,
            "no sequence was used by the refused batch"
        );
    }

    #[tokio::test]
    async fn a_publish_to_a_redis_that_cannot_persist_is_refused_and_writes_nothing() {
        let server = RedisServer::start();
        let s = store(&server).await;
        s.publish("t", vec![msg("a")]).await.unwrap();
        server.fail_persistence();
        let err = s.publish("t", vec![msg("b")]).await.unwrap_err();
        assert!(matches!(err, BrokerError::Unavailable(_)), "{err}");
        let text = err.to_string();
        assert!(text.contains("redis cannot persist writes"), "{text}");
        assert!(
            text.contains("publishing to topic \"t\" was refused and changed nothing"),
            "{text}"
        );
        assert_eq!(s.counts("t").await.unwrap().published, 1);
    }

    #[tokio::test]
    async fn publishes_read_back_in_order_with_explicit_gap_free_ids() {
        let server = RedisServer::start();
        let s = store(&server).await;
        let headers: Headers = [("h".to_string(), "v".to_string())].into();
        let first = s
            .publish(
                "orders",
                vec![
                    msg("a"),
                    NewMessage {
                        key: "k".into(),
                        headers: headers.clone(),
                        ..msg("b")
                    },
                    msg("c"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            first.iter().map(|a| a.sequence).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(first.iter().all(|a| !a.duplicate));
        let second = s.publish("orders", vec![msg("d"), msg("e")]).await.unwrap();
        assert_eq!(
            second.iter().map(|a| a.sequence).collect::<Vec<_>>(),
            [4, 5]
        );
        // Publishing created the topic and put it in the catalog.
        assert_eq!(s.names().await.unwrap(), ["orders"]);

        let read = s.read("orders", 1, 10).await.unwrap();
        assert_eq!(read.gap, None);
        assert_eq!(sequences(&read), [1, 2, 3, 4, 5]);
        assert_eq!(payloads(&read), ["a", "b", "c", "d", "e"]);
        assert_eq!((read.next, read.first_seq, read.next_seq), (6, 1, 6));
        // One block per publish (one publish time each, unless both fell in one ms).
        assert!(read.slices.len() <= 2);
        let b = read.slices[0].messages().nth(1).unwrap();
        assert_eq!((b.entry.key(), b.entry.headers()), ("k", Some(&headers)));
        assert_eq!(&**b.topic, "orders");

        // Reads resume anywhere, stop at `max`, and stay put past the end.
        let middle = s.read("orders", 2, 2).await.unwrap();
        assert_eq!((sequences(&middle), middle.next), (vec![2, 3], 4));
        let ahead = s.read("orders", 9, 10).await.unwrap();
        assert!(ahead.slices.is_empty());
        assert_eq!(ahead.next, 9);

        // The stream's ids are the sequences themselves.
        let mut c = s.conn.clone();
        let ids: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(TopicKeys::new("orders").key("log"))
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .unwrap();
        let ids: Vec<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["1-1", "2-1", "3-1", "4-1", "5-1"]);

        assert_eq!(
            s.read("missing", 1, 10).await.unwrap_err(),
            BrokerError::NotFound("topic \"missing\" does not exist".into())
        );
        assert!(matches!(
            s.publish("orders", vec![]).await,
            Err(BrokerError::InvalidArgument { .. })
        ));
        assert!(matches!(
            s.publish("bad name", vec![msg("x")]).await,
            Err(BrokerError::InvalidArgument { .. })
        ));
    }

    #[tokio::test]
    async fn idempotency_keys_answer_the_original_sequence() {
        let server = RedisServer::start();
        let s = store(&server).await;
        let out = s
            .publish("t", vec![keyed("a", "k1"), keyed("again", "k1"), msg("b")])
            .await
            .unwrap();
        assert_eq!(
            out,
            [
                Appended {
                    sequence: 1,
                    duplicate: false
                },
                Appended {
                    sequence: 1,
                    duplicate: true
                },
                Appended {
                    sequence: 2,
                    duplicate: false
                },
            ]
        );
        let out = s
            .publish("t", vec![keyed("x", "k2"), keyed("a", "k1")])
            .await
            .unwrap();
        assert_eq!(
            out,
            [
                Appended {
                    sequence: 3,
                    duplicate: false
                },
                Appended {
                    sequence: 1,
                    duplicate: true
                },
            ]
        );
        // A duplicate-only publish stores nothing.
        let out = s.publish("t", vec![keyed("a", "k1")]).await.unwrap();
        assert!(out[0].duplicate);
        let read = s.read("t", 1, 10).await.unwrap();
        assert_eq!(payloads(&read), ["a", "b", "x"]);

        // A topic deleted and created again is a new topic: its keys are forgotten.
        s.delete("t").await.unwrap();
        assert!(s.names().await.unwrap().is_empty());
        let out = s.publish("t", vec![keyed("a", "k1")]).await.unwrap();
        assert_eq!(
            out,
            [Appended {
                sequence: 1,
                duplicate: false
            }]
        );
        assert_eq!(
            s.delete("nope").await.unwrap_err(),
            BrokerError::NotFound("topic \"nope\" does not exist".into())
        );
    }

    #[tokio::test]
    async fn retention_trims_by_count_bytes_and_age() {
        let server = RedisServer::start();
        let s = store(&server).await;
        let by_count = Retention {
            max_messages: 3,
            ..Retention::default()
        };
        assert_eq!(s.create("count", by_count).await.unwrap(), by_count);
        s.publish("count", vec![msg("1"), msg("2")]).await.unwrap();
        s.publish("count", vec![msg("3"), msg("4"), msg("5")])
            .await
            .unwrap();
        let read = s.read("count", 1, 10).await.unwrap();
        assert_eq!(read.gap, Some((1, 3)));
        assert_eq!(sequences(&read), [3, 4, 5]);
        let counts = s.counts("count").await.unwrap();
        assert_eq!(
            (
                counts.first_sequence,
                counts.last_sequence,
                counts.retained_messages,
                counts.retained_bytes
            ),
            (3, 5, 3, 3)
        );
        // Lowering the limit applies at once.
        let one = Retention {
            max_messages: 1,
            ..by_count
        };
        s.create("count", one).await.unwrap();
        assert_eq!(sequences(&s.read("count", 1, 10).await.unwrap()), [5]);

        let by_bytes = Retention {
            max_bytes: 5,
            ..Retention::default()
        };
        s.create("bytes", by_bytes).await.unwrap();
        s.publish("bytes", vec![msg("aaa"), msg("bbb")])
            .await
            .unwrap();
        let counts = s.counts("bytes").await.unwrap();
        assert_eq!((counts.retained_messages, counts.retained_bytes), (1, 3));
        s.publish("bytes", vec![msg("cc")]).await.unwrap();
        assert_eq!(
            payloads(&s.read("bytes", 1, 10).await.unwrap()),
            ["bbb", "cc"]
        );

        let by_age = Retention {
            max_age_ms: 50,
            ..Retention::default()
        };
        s.create("age", by_age).await.unwrap();
        s.publish("age", vec![msg("old"), msg("old")])
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(80)).await;
        s.sweep("age").await.unwrap();
        let counts = s.counts("age").await.unwrap();
        assert_eq!(
            (
                counts.first_sequence,
                counts.last_sequence,
                counts.retained_messages
            ),
            (0, 2, 0)
        );
        let read = s.read("age", 1, 10).await.unwrap();
        assert_eq!(
            (read.gap, read.first_seq, read.next_seq),
            (Some((1, 3)), 3, 3)
        );
        // Sequences go on where they were.
        let out = s.publish("age", vec![msg("new")]).await.unwrap();
        assert_eq!(out[0].sequence, 3);

        let invalid = Retention {
            max_messages: 0,
            ..Retention::default()
        };
        assert!(matches!(
            s.create("x", invalid).await,
            Err(BrokerError::InvalidArgument { .. })
        ));
        // Sweeping a topic that does not exist has nothing to do.
        s.sweep("gone").await.unwrap();
    }

    #[tokio::test]
    async fn replay_from_a_sequence_and_from_a_time() {
        let server = RedisServer::start();
        let s = store(&server).await;
        s.publish("t", vec![msg("a"), msg("b")]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        s.publish("t", vec![msg("c")]).await.unwrap();
        let all = s.read("t", 1, 10).await.unwrap();
        assert_eq!(all.slices.len(), 2, "two publishes, two times");
        let t1 = all.slices[0].block.publish_time;
        let t2 = all.slices[1].block.publish_time;
        assert!(t2 > t1);
        assert_eq!(s.seq_at("t", 0).await.unwrap(), 1);
        assert_eq!(s.seq_at("t", t1).await.unwrap(), 1);
        assert_eq!(s.seq_at("t", t1 + 1).await.unwrap(), 3);
        assert_eq!(s.seq_at("t", t2).await.unwrap(), 3);
        assert_eq!(s.seq_at("t", t2 + 1).await.unwrap(), 4);
        let from = s
            .read("t", s.seq_at("t", t2).await.unwrap(), 10)
            .await
            .unwrap();
        assert_eq!(payloads(&from), ["c"]);
        assert_eq!(payloads(&s.read("t", 2, 10).await.unwrap()), ["b", "c"]);
        assert!(matches!(
            s.seq_at("missing", 0).await,
            Err(BrokerError::NotFound(_))
        ));
    }

    /// Random publishes and retention changes, against the in-process topic (which
    /// evicts one message at a time, checked by its own model test): the same
    /// sequences, retained counts and bytes, gaps and reads. Age is left out (Redis's
    /// clock is not the test's).
    #[tokio::test]
    async fn count_and_byte_retention_match_the_in_process_topic() {
        use crate::broker::domain::topic::Topic;
        let server = RedisServer::start();
        let s = store(&server).await;
        for seed in 0..4 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let name = format!("m{seed}");
            let mut retention = Retention {
                max_messages: rng.u64(1..20),
                max_bytes: rng.u64(1..40),
                ..Retention::default()
            };
            let mut model = Topic::new(&name, retention);
            s.create(&name, retention).await.unwrap();
            let now = 1_700_000_000_000;
            for step in 0..60 {
                let at = format!("seed {seed} step {step}");
                if rng.u32(0..8) == 0 {
                    retention.max_messages = rng.u64(1..20);
                    retention.max_bytes = rng.u64(1..40);
                    model.set_retention(retention, now);
                    s.create(&name, retention).await.unwrap();
                } else {
                    let batch: Vec<NewMessage> = (0..rng.usize(1..8))
                        .map(|_| {
                            let n = rng.usize(0..6);
                            let key = (rng.u32(0..4) == 0).then(|| format!("k{}", rng.u32(0..5)));
                            NewMessage {
                                payload: Bytes::from(vec![b'a' + n as u8; n]),
                                idempotency_key: key,
                                ..NewMessage::default()
                            }
                        })
                        .collect();
                    let (expected, _) = model.append(now, batch.clone());
                    let got = s.publish(&name, batch).await.unwrap();
                    assert_eq!(got, expected, "{at}");
                }
                let counts = s.counts(&name).await.unwrap();
                let (retained, bytes) = model.retained();
                assert_eq!(
                    (counts.retained_messages, counts.retained_bytes),
                    (retained, bytes),
                    "{at}"
                );
                assert_eq!(counts.last_sequence, model.next_seq() - 1, "{at}");
                let from = rng.u64(1..model.next_seq() + 2);
                let max = rng.usize(1..12);
                let want = model.read(from, max);
                let got = s.read(&name, from, max).await.unwrap();
                let seqs = |slices: &[BlockSlice]| -> Vec<(u64, Bytes)> {
                    slices
                        .iter()
                        .flat_map(|s| s.messages().map(|m| (m.sequence, m.entry.payload.clone())))
                        .collect()
                };
                assert_eq!(
                    seqs(&got.slices),
                    seqs(&want.slices),
                    "{at}: read({from}, {max})"
                );
                assert_eq!((got.gap, got.next), (want.gap, want.next), "{at}");
            }
        }
    }

    #[tokio::test]
    async fn a_redis_that_is_gone_is_unavailable() {
        let mut server = RedisServer::start();
        let s = store(&server).await;
        s.publish("t", vec![msg("a")]).await.unwrap();
        server.kill();
        // Whether the connection is found broken (the script may have run: the text
        // says so) or refused depends on when the kill is noticed.
        let err = s.publish("t", vec![msg("b")]).await.unwrap_err();
        assert!(
            matches!(&err, BrokerError::Unavailable(text) if text.starts_with("redis: publishing to topic \"t\"")),
            "{err:?}"
        );
    }
}
