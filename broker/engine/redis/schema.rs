//! Message schemas kept in Redis, and each node's cache of compiled validators.
//!
//! A target's revisions live in one hash under the target's own hash tag
//! (`sluice:{q:<name>}:schema` or `sluice:{t:<name>}:schema`, see `schema/set.lua`), so
//! the queue's enqueue script and the topic's publish script read its `cur` field in the
//! same slot. Each node validates a batch with its cached revision and passes that
//! revision to the script; the script refuses the batch (writing nothing) when `cur`
//! differs, and the node reloads the schema and tries again. So a schema set through one
//! node applies on every node to each batch written after the set returned, and the
//! price on the hot path is one `HGET` inside the script that writes anyway.
//!
//! The set `sluice:{sluice}:schemas` (`q:<name>`, `t:<name>`) lists targets that ever had
//! a schema, for Stats and ListQueues.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use dashmap::DashMap;
use prost::Message as _;
use redis::Script;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::Headers;
use crate::broker::domain::schema::{
    ActiveSchema, HISTORY_LIMIT, SchemaDefinition, SchemaHistory, SchemaRevision, SchemaTarget,
    TargetKind,
};
use crate::broker::engine::redis::conn::{RedisConn, unavailable};
use crate::broker::engine::redis::keys::{QueueKeys, TopicKeys, catalog};
use crate::pb;

static SET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("schema/set.lua")));
static DELETE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("schema/delete.lua")));

/// How often a write is retried after the script found a newer schema than the node's.
/// One reload normally suffices; more means the schema changes faster than batches go.
const STALE_RETRIES: usize = 3;

/// A target's schema as this node last read it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cached {
    /// The revision the scripts must find current (0: none).
    pub(crate) revision: u32,
    /// Its compiled form.
    pub(crate) active: Option<ActiveSchema>,
}

impl Cached {
    /// Refuses a batch of which a payload fails the cached schema.
    pub(crate) fn check<'a>(
        &self,
        target: &SchemaTarget,
        entries: &str,
        batch: impl Iterator<Item = (&'a [u8], &'a Headers)>,
    ) -> Result<(), BrokerError> {
        match &self.active {
            Some(schema) => schema.check_batch(target, entries, batch),
            None => Ok(()),
        }
    }
}

/// Schemas in Redis, with this node's compiled cache.
#[derive(Clone)]
pub(crate) struct SchemaStore {
    conn: RedisConn,
    /// A target missing here is taken to have none until a script says otherwise.
    cache: Arc<DashMap<SchemaTarget, Arc<Cached>>>,
}

fn key(target: &SchemaTarget) -> String {
    match target.kind {
        TargetKind::Queue => QueueKeys::new(&target.name).key("schema"),
        TargetKind::Topic => TopicKeys::new(&target.name).key("schema"),
    }
}

fn member(target: &SchemaTarget) -> String {
    match target.kind {
        TargetKind::Queue => format!("q:{}", target.name),
        TargetKind::Topic => format!("t:{}", target.name),
    }
}

fn from_member(m: &str) -> Option<SchemaTarget> {
    match m.split_once(':')? {
        ("q", name) => Some(SchemaTarget::queue(name)),
        ("t", name) => Some(SchemaTarget::topic(name)),
        _ => None,
    }
}

/// A schema as stored: the API's revision message with only its schema set, so the same
/// schema always encodes to the same bytes (set.lua compares them).
fn encode(definition: &SchemaDefinition) -> Vec<u8> {
    pb::SchemaRevision::from(SchemaRevision {
        revision: 0,
        created_at: 0,
        definition: definition.clone(),
    })
    .encode_to_vec()
}

fn decode(bytes: &[u8]) -> Result<SchemaDefinition, BrokerError> {
    use pb::schema_revision::Schema;
    let stored = pb::SchemaRevision::decode(bytes).map_err(|e| {
        BrokerError::Unavailable(format!("redis: a stored schema is unreadable: {e}"))
    })?;
    match stored.schema {
        Some(Schema::JsonSchema(j)) => Ok(SchemaDefinition::JsonSchema { text: j.text }),
        Some(Schema::Protobuf(p)) => Ok(SchemaDefinition::Protobuf {
            descriptor_set: p.descriptor_set,
            message_type: p.message_type,
        }),
        None => Err(BrokerError::Unavailable(
            "redis: a stored schema has no schema".into(),
        )),
    }
}

impl SchemaStore {
    /// Schemas over `conn`.
    pub(crate) fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            cache: Arc::default(),
        }
    }

    /// This node's view of `target`'s schema (no Redis round trip).
    pub(crate) fn cached(&self, target: &SchemaTarget) -> Arc<Cached> {
        self.cache
            .get(target)
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Runs `write` with this node's schema of `target` (`write` checks the batch and
    /// passes the revision to its script). When the script reports a newer schema
    /// ([`BrokerError::SchemaStale`]), or the batch failed a cached schema that is no
    /// longer current (a replacement or a delete through another node may accept it),
    /// reloads the schema and runs `write` again.
    pub(crate) async fn with_current<T, F, Fut>(
        &self,
        target: &SchemaTarget,
        mut write: F,
    ) -> Result<T, BrokerError>
    where
        F: FnMut(Arc<Cached>) -> Fut,
        Fut: Future<Output = Result<T, BrokerError>>,
    {
        for _ in 0..STALE_RETRIES {
            let cached = self.cached(target);
            match write(cached.clone()).await {
                Err(BrokerError::SchemaStale { .. }) => self.reload(target).await?,
                // Only a refusal pays this read: a valid batch is confirmed by its script.
                Err(refused @ BrokerError::SchemaViolation { .. }) => {
                    if self.current_revision(target).await? == cached.revision {
                        return Err(refused);
                    }
                    self.reload(target).await?;
                }
                other => return other,
            }
        }
        write(self.cached(target)).await
    }

    /// `target`'s current revision as stored (0: none).
    async fn current_revision(&self, target: &SchemaTarget) -> Result<u32, BrokerError> {
        let mut c = self.conn.clone();
        let cur: Option<u32> = redis::cmd("HGET")
            .arg(key(target))
            .arg("cur")
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("reading the schema of {target}"), e))?;
        Ok(cur.unwrap_or(0))
    }

    /// Reads `target`'s current schema from Redis and caches it compiled.
    async fn reload(&self, target: &SchemaTarget) -> Result<(), BrokerError> {
        let history = self.read(target).await?.unwrap_or_default();
        let cached = match history.current() {
            Some(r) => Cached {
                revision: r.revision,
                active: Some(ActiveSchema::compile(r)?),
            },
            None => Cached::default(),
        };
        self.cache.insert(target.clone(), Arc::new(cached));
        Ok(())
    }

    /// A target's history as stored; `None` if it never had a schema.
    async fn read(&self, target: &SchemaTarget) -> Result<Option<SchemaHistory>, BrokerError> {
        let mut c = self.conn.clone();
        let fields: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(key(target))
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("reading the schema of {target}"), e))?;
        if fields.is_empty() {
            return Ok(None);
        }
        let number = |f: &str| -> u64 {
            fields
                .get(f)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let mut revisions = Vec::new();
        for (field, value) in &fields {
            let Some(n) = field.strip_prefix("r:").and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            revisions.push(SchemaRevision {
                revision: n,
                created_at: number(&format!("t:{n}")),
                definition: decode(value)?,
            });
        }
        revisions.sort_by_key(|r| r.revision);
        Ok(Some(SchemaHistory {
            revisions,
            current: number("cur") as u32,
        }))
    }

    /// SetSchema.
    pub(crate) async fn set(
        &self,
        target: &SchemaTarget,
        definition: SchemaDefinition,
    ) -> Result<(u32, bool), BrokerError> {
        let validator = definition.compile()?;
        let mut c = self.conn.clone();
        // Listed first: a target in the list without a schema shows revision 0, while
        // one with a schema but missing from the list would hide it from Stats.
        redis::cmd("SADD")
            .arg(catalog("schemas"))
            .arg(member(target))
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| unavailable(&format!("listing the schema of {target}"), e))?;
        let (revision, created): (u32, u8) = SET
            .key(key(target))
            .arg(encode(&definition))
            .arg(HISTORY_LIMIT)
            .invoke_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("setting the schema of {target}"), e))?;
        self.cache.insert(
            target.clone(),
            Arc::new(Cached {
                revision,
                active: Some(ActiveSchema {
                    revision,
                    definition: Arc::new(definition),
                    validator,
                }),
            }),
        );
        Ok((revision, created == 1))
    }

    /// GetSchema.
    pub(crate) async fn get(&self, target: &SchemaTarget) -> Result<SchemaHistory, BrokerError> {
        self.read(target)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("{target} has no schema")))
    }

    /// DeleteSchema.
    pub(crate) async fn delete(&self, target: &SchemaTarget) -> Result<u32, BrokerError> {
        let mut c = self.conn.clone();
        let deleted: u32 = DELETE
            .key(key(target))
            .invoke_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("deleting the schema of {target}"), e))?;
        self.cache.insert(target.clone(), Arc::default());
        if deleted == 0 {
            return Err(BrokerError::NotFound(format!("{target} has no schema")));
        }
        Ok(deleted)
    }

    /// The current revision of every target that has a schema.
    pub(crate) async fn revisions(&self) -> Result<HashMap<SchemaTarget, u32>, BrokerError> {
        let mut c = self.conn.clone();
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(catalog("schemas"))
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable("listing schemas", e))?;
        let mut out = HashMap::new();
        for target in members.iter().filter_map(|m| from_member(m)) {
            let cur = self.current_revision(&target).await?;
            if cur > 0 {
                out.insert(target, cur);
            }
        }
        Ok(out)
    }
}
