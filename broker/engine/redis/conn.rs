//! The connection to Redis: one standalone server or a Redis Cluster, behind one
//! `redis::aio::ConnectionLike` so scripts and commands are written once.
//!
//! Which of the two it is comes from the server itself (`INFO cluster`), so
//! `--redis redis://127.0.0.1:7000` works whether that address is a standalone server or
//! one seed of a cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::broker::domain::error::BrokerError;

/// A cheap-clone connection (both kinds multiplex requests over their sockets and
/// reconnect by themselves). Clones share one count of the requests sent.
#[derive(Clone)]
pub(crate) struct RedisConn {
    link: Link,
    /// Requests sent to Redis, each one network round trip: a command, or a pipeline of
    /// several (see [`RedisConn::requests`]).
    requests: Arc<Requests>,
}

/// The requests a connection and its clones sent: all of them, and those sent by the
/// node's own upkeep ([`background`]).
#[derive(Default)]
struct Requests {
    all: AtomicU64,
    background: AtomicU64,
}

impl Requests {
    /// Counts one request (in the background count too inside [`background`]).
    fn count(&self) {
        self.all.fetch_add(1, Ordering::Relaxed);
        if BACKGROUND.try_with(|_| ()).is_ok() {
            self.background.fetch_add(1, Ordering::Relaxed);
        }
    }
}

tokio::task_local! {
    /// Set while the node's upkeep runs (see [`background`]).
    static BACKGROUND: ();
}

/// Runs `work`, the node's own upkeep (the sweep), counting its requests apart from those
/// serving clients ([`RedisConn::background_requests`]): upkeep costs requests per second
/// per node, whatever the job rate, so a cost per job leaves it out and names it apart.
pub(crate) async fn background<F: Future>(work: F) -> F::Output {
    BACKGROUND.scope((), work).await
}

/// The two kinds of connection.
#[derive(Clone)]
enum Link {
    /// A standalone server.
    Single(ConnectionManager),
    /// A Redis Cluster: commands are routed by their keys' slots.
    Cluster(ClusterConnection),
}

impl RedisConn {
    fn new(link: Link) -> Self {
        Self {
            link,
            requests: Arc::default(),
        }
    }

    /// Whether this is a cluster (scripts must then keep every key in one slot).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.link, Link::Cluster(_))
    }

    /// Sends `pipe` (`count` commands) as one request: on a cluster to the primary of
    /// `slot` when given (a pipeline without keys would go to any node), else as
    /// `query_async` routes it.
    pub(crate) async fn pipeline_to(
        &mut self,
        pipe: Pipeline,
        count: usize,
        slot: Option<Slot>,
    ) -> RedisResult<Vec<Value>> {
        match (&mut self.link, slot) {
            (Link::Cluster(c), Some(slot)) => {
                self.requests.count();
                let route =
                    SingleNodeRoutingInfo::SpecificNode(Route::with_slot(slot, SlotAddr::Master));
                c.route_pipeline(pipe, 0, count, route).await
            }
            _ => pipe.query_async(self).await,
        }
    }

    /// Redis's memory over every primary (each shard's data lives on its primary; replicas
    /// hold copies): the bytes in use (`used_memory`, summed) and the limit (`maxmemory`,
    /// summed; 0 when any primary has none, as the cluster then has no overall limit).
    pub(crate) async fn memory(&mut self) -> RedisResult<RedisMemory> {
        let texts = self.info_of_primaries("memory").await?;
        let mut memory = RedisMemory::default();
        let mut unlimited = false;
        for text in &texts {
            memory.servers += 1;
            memory.used_bytes += info_field(text, "used_memory").unwrap_or(0);
            match info_field(text, "maxmemory") {
                Some(max) if max > 0 => memory.limit_bytes += max,
                _ => unlimited = true,
            }
        }
        if unlimited {
            memory.limit_bytes = 0;
        }
        Ok(memory)
    }

    /// The eviction policies (`maxmemory_policy` of `INFO memory`) of the primaries that
    /// would delete keys under memory pressure, each once; empty when every primary has
    /// `noeviction` (or does not say). An evicted job hash, lease or message is an
    /// acknowledged write lost without a trace, so the node refuses such a Redis.
    pub(crate) async fn eviction_policies(&mut self) -> RedisResult<Vec<String>> {
        let texts = self.info_of_primaries("memory").await?;
        Ok(evicting_policies(&texts))
    }

    /// The fewest replicas connected to any primary (`connected_slaves` of
    /// `INFO replication`, which a cluster routes to every primary).
    pub(crate) async fn fewest_replicas(&mut self) -> RedisResult<u64> {
        let texts = self.info_of_primaries("replication").await?;
        Ok(texts
            .iter()
            .map(|text| info_field(text, "connected_slaves").unwrap_or(0))
            .min()
            .unwrap_or(0))
    }

    /// `INFO <section>` of every primary: on a cluster `INFO` goes to each of them and
    /// comes back as a map of their replies by address; on one server it is its text.
    async fn info_of_primaries(&mut self, section: &str) -> RedisResult<Vec<String>> {
        let reply: Value = redis::cmd("INFO").arg(section).query_async(self).await?;
        let mut texts = Vec::new();
        info_texts(&reply, &mut texts);
        Ok(texts)
    }

    /// How many requests this connection and its clones have sent: its round trips to
    /// Redis (a pipeline, such as a WAIT with its fence write, is one).
    pub(crate) fn requests(&self) -> u64 {
        self.requests.all.load(Ordering::Relaxed)
    }

    /// How many of [`RedisConn::requests`] the node's upkeep sent ([`background`]).
    pub(crate) fn background_requests(&self) -> u64 {
        self.requests.background.load(Ordering::Relaxed)
    }

    /// A connection of its own to the same Redis (`seeds`, as this one was made), whose
    /// requests count with this one's: for a command that blocks the connection it
    /// travels on (`WAIT`), so the requests multiplexed on this one do not queue behind it.
    pub(crate) async fn sibling(
        &self,
        seeds: &[String],
        response_timeout: Duration,
    ) -> Result<RedisConn, BrokerError> {
        let mut sibling = connect_with(seeds, response_timeout).await?;
        sibling.requests = self.requests.clone();
        Ok(sibling)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.requests.count();
        match &mut self.link {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.requests.count();
        match &mut self.link {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// The shortest wait (ms) of the cluster client before it sends a request again after a
/// redirection it cannot follow yet: `TRYAGAIN` while a slot migrates, a primary down until
/// its replica is promoted. The library's default, 1,280 ms, held every request of a
/// migration or a failover for at least that long after the cluster was ready again; its
/// later waits still grow (10 ms x 2^attempt), so 16 attempts still span minutes.
pub(crate) const MIN_RETRY_WAIT_MS: u64 = 100;

/// The oldest Redis the engine runs on: its queues are a Functions library (`FCALL`) and
/// its wake-ups sharded pub/sub (`SPUBLISH`), both new in 7.0.
const MIN_REDIS_MAJOR: u32 = 7;

/// `url` as it may be shown in a log line or an error: a password in its user info
/// (`redis://user:secret@host`, `redis://:secret@host`) replaced by `***`. A managed Redis
/// needs one, and `--redis` is how it is given; it must not reach logs, terminals or
/// error messages. A user name alone (no `:`) is no secret and stays.
pub(crate) fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The last `@` ends the user info, even in a password that was not percent-encoded.
    let Some((user_info, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match user_info.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// [`redacted_url`] of each seed, comma separated, as `--redis` takes them.
pub fn redacted_seeds(seeds: &[String]) -> String {
    seeds
        .iter()
        .map(|s| redacted_url(s))
        .collect::<Vec<_>>()
        .join(",")
}

/// The refusal of a seed Redis's client cannot use (not a Redis URL, a cluster client
/// that cannot be built): INVALID_ARGUMENT naming it as `shown` (a [`redacted_url`] or
/// [`redacted_seeds`]).
pub(crate) fn invalid_seed(shown: &str, e: redis::RedisError) -> BrokerError {
    BrokerError::invalid(
        "redis",
        format!(
            "{shown:?} cannot be used as Redis seeds ({e}): give \
             redis://[user:password@]host:port, rediss:// for TLS, several comma-separated \
             for a cluster's seeds"
        ),
    )
}

/// The refusal of the first seed when connecting to it or asking it `INFO` failed
/// (`doing`). A reply that does not parse as Redis's protocol means something else
/// listens there: said so, since the parser's own text (unexpected bytes, over several
/// lines) does not. A scheme that does not match the server fails without naming TLS (a
/// TLS-only Redis resets a plain connection; a plain one never answers a handshake), so
/// those failures name the other scheme.
fn probe_failed(shown: &str, doing: &str, e: redis::RedisError) -> BrokerError {
    let tls = shown.starts_with("rediss://");
    let hint = if e.is_connection_refusal() {
        None
    } else if !tls && e.is_connection_dropped() {
        Some(
            "a Redis that takes TLS only drops plain connections: if this one does, give rediss://",
        )
    } else if tls && (e.is_timeout() || e.to_string().contains("timed out")) {
        Some(
            "a Redis without TLS never answers a TLS handshake: if this one has none, give redis://",
        )
    } else {
        None
    };
    if let Some(hint) = hint {
        return BrokerError::Unavailable(format!("redis: {doing} {shown}: {e} ({hint})"));
    }
    match e.kind() {
        redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType => {
            let detail = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            BrokerError::invalid(
                "redis",
                format!(
                    "the server at {shown} did not answer in Redis's protocol ({detail}): is \
                     it a Redis server? (one that takes TLS only needs rediss://)"
                ),
            )
        }
        _ => unavailable(&format!("{doing} {shown}"), e),
    }
}

/// Refuses a server older than Redis 7.0 (by `redis_version` in `INFO server`; Valkey
/// reports the Redis version it matches there too), naming the version found.
fn check_version(addr: &str, info_server: &str) -> Result<(), BrokerError> {
    let Some(version) = info_text(info_server, "redis_version") else {
        return Ok(());
    };
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(m) if m < MIN_REDIS_MAJOR => Err(BrokerError::invalid(
            "redis",
            format!(
                "{addr} runs Redis {version}; Sluice needs Redis {MIN_REDIS_MAJOR}.0 or later \
                 (its queues are a Functions library called with FCALL, its wake-ups \
                 sharded pub/sub)"
            ),
        )),
        _ => Ok(()),
    }
}

/// Redis's memory, over every primary ([`RedisConn::memory`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RedisMemory {
    /// Bytes Redis uses, summed over the primaries.
    pub(crate) used_bytes: u64,
    /// The primaries' `maxmemory`, summed; 0 when any has none.
    pub(crate) limit_bytes: u64,
    /// How many primaries answered.
    pub(crate) servers: usize,
}

/// The texts in an `INFO` reply: one server's, or each primary's of a cluster's map.
fn info_texts(reply: &Value, out: &mut Vec<String>) {
    match reply {
        Value::BulkString(bytes) => out.push(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => out.push(text.clone()),
        Value::VerbatimString { text, .. } => out.push(text.clone()),
        Value::Map(pairs) => {
            for (_, value) in pairs {
                info_texts(value, out);
            }
        }
        Value::Array(values) => {
            for value in values {
                info_texts(value, out);
            }
        }
        _ => {}
    }
}

/// A numeric `name:value` line of an `INFO` text.
fn info_field(text: &str, name: &str) -> Option<u64> {
    info_text(text, name)?.parse().ok()
}

/// The value of field `name` (matched whole) in an `INFO` text, trimmed.
fn info_text<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim())
    })
}

/// The policies other than `noeviction` named in `INFO memory` texts, each once.
fn evicting_policies(texts: &[String]) -> Vec<String> {
    let mut policies: Vec<String> = Vec::new();
    for text in texts {
        match info_text(text, "maxmemory_policy") {
            Some(policy) if policy != "noeviction" && !policies.iter().any(|p| p == policy) => {
                policies.push(policy.to_string())
            }
            _ => {}
        }
    }
    policies
}

/// The refusal of a Redis whose primaries evict keys (`policies`, from
/// [`RedisConn::eviction_policies`]).
pub(crate) fn evicting_refusal(policies: &[String]) -> BrokerError {
    BrokerError::FailedPrecondition(format!(
        "redis maxmemory-policy is {}, which deletes keys when Redis reaches its maxmemory: \
         Sluice would lose jobs and messages it has acknowledged; set maxmemory-policy \
         noeviction on every primary (CONFIG SET maxmemory-policy noeviction, and in \
         redis.conf), so a full Redis refuses writes (RESOURCE_EXHAUSTED) instead",
        policies.join(", ")
    ))
}

/// The error a user sees when Redis cannot be reached or refuses a command: UNAVAILABLE,
/// naming what was being done. Two refusals of a write say that nothing changed: Redis
/// refuses a function that may write before it runs, and a script (`EVAL`) at its first
/// write, never midway. Past its `maxmemory` that is RESOURCE_EXHAUSTED; when it cannot
/// persist (`MISCONF`: its AOF or snapshot failed, such as on a full disk) it stays
/// UNAVAILABLE, as it lasts until Redis's disk is fixed; so does a script refused while its
/// slot migrates (`TRYAGAIN`, see `keys::slot_guard`). A command the Redis user may not
/// run (`NOPERM`) is FAILED_PRECONDITION naming it: no retry helps until an admin grants it.
pub(crate) fn unavailable(doing: &str, e: redis::RedisError) -> BrokerError {
    match e.code() {
        Some("OOM") => BrokerError::ResourceExhausted(format!(
            "redis is out of memory (used memory above its maxmemory): {doing} was refused \
             and changed nothing; free memory or raise maxmemory"
        )),
        Some("MISCONF") => BrokerError::Unavailable(format!(
            "redis cannot persist writes ({}): {doing} was refused and changed nothing; \
             free disk space on the Redis host (or fix its AOF or snapshot) and retry",
            e.detail().unwrap_or("MISCONF").trim()
        )),
        Some("NOPERM") => BrokerError::FailedPrecondition(format!(
            "the Redis user of --redis may not run a command Sluice needs ({}): {doing} was \
             refused and changed nothing; grant it what the README's \"Many nodes\" section \
             shows (such as ACL SETUSER <user> ~sluice:* &sluice:* +@all -@dangerous +info \
             +function|load +function|list)",
            e.detail().unwrap_or("NOPERM").trim()
        )),
        Some("READONLY") => BrokerError::Unavailable(format!(
            "redis answered READONLY: the server --redis names is now a read-only replica \
             (a failover demoted it?): {doing} was refused and changed nothing; point --redis \
             at the current primary"
        )),
        // Only after the cluster client's own retries: the slot stayed in migration.
        Some("TRYAGAIN") => BrokerError::Unavailable(format!(
            "redis cluster is moving this queue's or topic's hash slot to another primary \
             (resharding): {doing} was refused and changed nothing; retry once the \
             migration ends"
        )),
        _ => BrokerError::Unavailable(format!("redis: {doing}: {e}")),
    }
}

/// Connects to `seeds` (`redis://host:port` URLs; several only for a cluster), replies
/// waited for up to 2 s.
#[cfg(test)]
pub(crate) async fn connect(seeds: &[String]) -> Result<RedisConn, BrokerError> {
    connect_with(seeds, Duration::from_secs(2)).await
}

/// What [`probe`] found: the seed that answered, and whether it is a Redis Cluster node.
pub(crate) struct Probed {
    /// The seed's client.
    pub(crate) client: redis::Client,
    /// The seed as it may be shown ([`redacted_url`]).
    pub(crate) shown: String,
    /// Whether it runs in cluster mode (`INFO cluster`).
    pub(crate) cluster: bool,
}

/// Finds the first of `seeds` that answers (every one must be a Redis URL, though a
/// standalone server uses only the first: a typo in another would otherwise surface only
/// when the cluster needs that seed), refusing a Redis older than 7.0. A cluster's seeds
/// are tried in turn, so a node starts while some of them are down (the cluster client
/// then learns the rest from the one that answered): the seeds must not be a single point
/// of failure. A standalone server answering after the first seed did not is refused:
/// several seeds name one cluster, and using another standalone server would be another
/// Redis, with other data.
pub(crate) async fn probe(seeds: &[String]) -> Result<Probed, BrokerError> {
    if seeds.is_empty() {
        return Err(BrokerError::invalid("redis", "no Redis address given"));
    }
    let clients = seeds
        .iter()
        .map(|seed| {
            redis::Client::open(seed.as_str()).map_err(|e| invalid_seed(&redacted_url(seed), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut first_failure = None;
    for (seed, client) in clients.into_iter().enumerate() {
        let shown = redacted_url(&seeds[seed]);
        match probe_one(&client, &shown).await {
            Ok(cluster) if seed > 0 && !cluster => {
                return Err(BrokerError::invalid(
                    "redis",
                    format!(
                        "{} did not answer and {shown} is a standalone server: several \
                         seeds must be nodes of one Redis Cluster",
                        redacted_url(&seeds[0])
                    ),
                ));
            }
            Ok(cluster) => {
                if seed > 0 {
                    tracing::warn!(
                        answered = %shown,
                        "redis: {} earlier seed(s) did not answer; using {shown}",
                        seed
                    );
                }
                return Ok(Probed {
                    client,
                    shown,
                    cluster,
                });
            }
            // Down or unreachable: the next seed may answer.
            Err(e @ BrokerError::Unavailable(_)) => {
                first_failure.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    let failure = first_failure.expect("every seed failed");
    Err(match (failure, seeds.len()) {
        (failure, 1) => failure,
        (BrokerError::Unavailable(m), n) => BrokerError::Unavailable(format!(
            "{m} (and none of the other {} seeds answered)",
            n - 1
        )),
        (failure, _) => failure,
    })
}

/// Asks one seed `INFO server` (its version) and `INFO cluster`: whether it is a cluster
/// node.
async fn probe_one(client: &redis::Client, shown: &str) -> Result<bool, BrokerError> {
    let mut probe = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| probe_failed(shown, "connecting to", e))?;
    let mut info = async |section: &str| -> Result<String, BrokerError> {
        redis::cmd("INFO")
            .arg(section)
            .query_async(&mut probe)
            .await
            .map_err(|e| probe_failed(shown, &format!("INFO {section} on"), e))
    };
    check_version(shown, &info("server").await?)?;
    let cluster = info("cluster").await?.contains("cluster_enabled:1");
    if !cluster {
        // A cluster client finds the primaries from any node; a standalone server is the
        // one every write goes to.
        check_primary(shown, &info("replication").await?)?;
    }
    Ok(cluster)
}

/// Refuses a standalone server that is a replica (`role:slave` in `INFO replication`):
/// it refuses every write (`READONLY`), so a node on it could serve nothing. A managed
/// Redis's reader endpoint is the usual way to get here.
fn check_primary(addr: &str, info_replication: &str) -> Result<(), BrokerError> {
    if info_text(info_replication, "role") != Some("slave") {
        return Ok(());
    }
    let host = info_text(info_replication, "master_host").unwrap_or("?");
    let port = info_text(info_replication, "master_port").unwrap_or("?");
    Err(BrokerError::invalid(
        "redis",
        format!(
            "{addr} is a read-only replica (of {host}:{port}); Sluice writes on every queue \
             and topic operation: point --redis at the primary"
        ),
    ))
}

/// [`connect`] where a reply may take up to `response_timeout` (a `WAIT` for replicas
/// takes up to its own timeout, so this must be longer than that); past it the request is
/// UNAVAILABLE.
pub(crate) async fn connect_with(
    seeds: &[String],
    response_timeout: Duration,
) -> Result<RedisConn, BrokerError> {
    let Probed {
        client,
        shown,
        cluster,
    } = probe(seeds).await?;
    if cluster {
        let cluster = ClusterClientBuilder::new(seeds.to_vec())
            .response_timeout(response_timeout)
            .min_retry_wait(MIN_RETRY_WAIT_MS)
            .build()
            .map_err(|e| invalid_seed(&redacted_seeds(seeds), e))?;
        let conn = cluster
            .get_async_connection()
            .await
            .map_err(|e| unavailable("connecting to the cluster", e))?;
        Ok(RedisConn::new(Link::Cluster(conn)))
    } else {
        // A few quick reconnect attempts: a request to a Redis that is down fails in about
        // a second (UNAVAILABLE) instead of waiting out the library's default of six.
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(3);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| unavailable(&format!("connecting to {shown}"), e))?;
        Ok(RedisConn::new(Link::Single(conn)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::testing::redis::RedisServer;

    #[test]
    fn a_redis_older_than_7_is_refused_naming_its_version() {
        let old = "# Server\r\nredis_version:6.2.14\r\nredis_mode:standalone\r\n";
        let err = check_version("redis://127.0.0.1:6380", old).unwrap_err();
        assert!(matches!(err, BrokerError::InvalidArgument { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("Redis 6.2.14"), "{text}");
        assert!(text.contains("Redis 7.0 or later"), "{text}");
        assert!(text.contains("redis://127.0.0.1:6380"), "{text}");
        for ok in [
            "redis_version:7.0.15",
            "redis_version:7.2.4",
            "redis_version:8.0.0",
            "",
        ] {
            assert!(check_version("a", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn info_fields_are_read_by_exact_name() {
        let text = "# Memory\r\nused_memory:1024\r\nused_memory_human:1.00K\r\nmaxmemory:0\r\n";
        assert_eq!(info_field(text, "used_memory"), Some(1024));
        assert_eq!(info_field(text, "maxmemory"), Some(0));
        assert_eq!(info_field(text, "used_memory_human"), None, "not a number");
        assert_eq!(info_field(text, "used"), None);
        // A cluster's reply: each primary's text under its address.
        let map = Value::Map(vec![
            (
                Value::BulkString(b"127.0.0.1:1".to_vec()),
                Value::VerbatimString {
                    format: redis::VerbatimFormat::Text,
                    text: "used_memory:1\r\n".into(),
                },
            ),
            (
                Value::BulkString(b"127.0.0.1:2".to_vec()),
                Value::BulkString(b"used_memory:2\r\n".to_vec()),
            ),
        ]);
        let mut texts = Vec::new();
        info_texts(&map, &mut texts);
        assert_eq!(texts, ["used_memory:1\r\n", "used_memory:2\r\n"]);
    }

    #[test]
    fn a_password_in_a_redis_url_is_never_shown() {
        for (url, shown) in [
            ("redis://:s3cret@host:6379", "redis://:***@host:6379"),
            (
                "redis://app:s3cret@host:6379/0",
                "redis://app:***@host:6379/0",
            ),
            (
                "rediss://app:p@ss:w0rd@host:6380",
                "rediss://app:***@host:6380",
            ),
            ("redis://app@host:6379", "redis://app@host:6379"),
            ("redis://host:6379", "redis://host:6379"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redacted_url(url), shown, "{url}");
        }
        assert_eq!(
            redacted_seeds(&["redis://:a@h1:1".into(), "redis://h2:2".into()]),
            "redis://:***@h1:1,redis://h2:2"
        );
    }

    /// What `connect` answers `seeds` with, which must be a refusal.
    async fn refusal(seeds: &[String], why: &str) -> BrokerError {
        connect(seeds)
            .await
            .err()
            .unwrap_or_else(|| panic!("{why} is refused"))
    }

    #[tokio::test]
    async fn a_password_protected_server_takes_the_urls_password_and_never_shows_it() {
        let server = RedisServer::start();
        server.config_set("requirepass", "s3cret-pw");
        let port = server.port;
        let mut conn = connect(&[format!("redis://:s3cret-pw@127.0.0.1:{port}")])
            .await
            .expect("the password in the URL is used");
        assert!(conn.memory().await.is_ok());
        for (url, why) in [
            (format!("redis://:wrong-pw@127.0.0.1:{port}"), "wrong"),
            (server.url(), "none"),
        ] {
            let err = refusal(&[url], &format!("a {why} password")).await;
            assert!(matches!(err, BrokerError::Unavailable(_)), "{err}");
            let text = err.to_string();
            assert!(!text.contains("wrong-pw"), "{text}");
            assert!(
                text.to_lowercase().contains("auth"),
                "names authentication: {text}"
            );
        }
    }

    #[tokio::test]
    async fn every_seed_must_be_a_redis_url() {
        let server = RedisServer::start();
        let err = refusal(
            &[server.url(), "http://elsewhere:7000".into()],
            "a seed that is no Redis URL",
        )
        .await;
        assert!(matches!(err, BrokerError::InvalidArgument { .. }), "{err}");
        assert!(
            err.to_string().contains("\"http://elsewhere:7000\""),
            "{err}"
        );
    }

    #[test]
    fn a_replica_is_no_primary() {
        let replica = "# Replication\r\nrole:slave\r\nmaster_host:10.0.0.5\r\nmaster_port:6379\r\n";
        let err = check_primary("redis://10.0.0.6:6379", replica).unwrap_err();
        assert!(matches!(err, BrokerError::InvalidArgument { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("redis://10.0.0.6:6379 is a read-only replica (of 10.0.0.5:6379)")
                && text.contains("point --redis at the primary"),
            "{text}"
        );
        assert!(check_primary("a", "# Replication\r\nrole:master\r\n").is_ok());
        assert!(check_primary("a", "").is_ok());
    }

    #[tokio::test]
    async fn a_standalone_replica_is_refused_and_a_demoted_primary_refuses_writes_clearly() {
        let primary = RedisServer::start();
        let port = primary.port.to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
        let err = refusal(&[replica.url()], "a replica as the server").await;
        assert!(
            err.to_string()
                .contains(&format!("is a read-only replica (of 127.0.0.1:{port})")),
            "{err}"
        );
        // A primary demoted while a node uses it: writes are refused READONLY.
        let mut conn = connect(&[primary.url()]).await.unwrap();
        let other = RedisServer::start();
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(other.port)
            .query_async(&mut conn)
            .await
            .unwrap();
        let refused = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async::<()>(&mut conn)
            .await
            .unwrap_err();
        let err = unavailable("an enqueue", refused);
        assert!(
            matches!(&err, BrokerError::Unavailable(m) if m.contains("redis answered READONLY")
                && m.contains("an enqueue was refused and changed nothing")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_command_the_redis_user_may_not_run_is_refused_naming_it() {
        let server = RedisServer::start();
        let mut admin = connect(&[server.url()]).await.unwrap();
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("limited")
            .arg("on")
            .arg(">pw")
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .arg("-function")
            .query_async(&mut admin)
            .await
            .unwrap();
        let url = format!("redis://limited:pw@127.0.0.1:{}", server.port);
        let mut limited = connect(&[url]).await.unwrap();
        let refused = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("#!lua name=t\nredis.register_function('t', function() return 1 end)")
            .query_async::<()>(&mut limited)
            .await
            .unwrap_err();
        let err = unavailable("defining queue \"q\"", refused);
        assert!(
            matches!(&err, BrokerError::FailedPrecondition(m)
                if m.contains("function|load") && m.contains("may not run a command")
                    && m.contains("refused and changed nothing")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn replicas_are_counted_on_the_primary() {
        let primary = RedisServer::start();
        let mut conn = connect(&[primary.url()]).await.unwrap();
        assert_eq!(conn.fewest_replicas().await.unwrap(), 0);
        let port = primary.port.to_string();
        let _replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while conn.fewest_replicas().await.unwrap() < 1 {
            assert!(std::time::Instant::now() < deadline, "the replica connects");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn one_servers_memory_is_its_used_memory_and_maxmemory() {
        let server = RedisServer::start();
        let mut conn = connect(&[server.url()]).await.unwrap();
        let memory = conn.memory().await.unwrap();
        assert_eq!((memory.servers, memory.limit_bytes), (1, 0), "{memory:?}");
        assert!(memory.used_bytes > 100_000, "{memory:?}");
        server.config_set("maxmemory", &(64 << 20).to_string());
        assert_eq!(conn.memory().await.unwrap().limit_bytes, 64 << 20);
    }

    /// What a new user gets wrong first: a seed without a scheme, and an address where
    /// something other than Redis listens (here an HTTP server). Both refusals say what
    /// was expected, on one line.
    #[tokio::test]
    async fn a_seed_that_is_not_a_redis_url_or_not_redis_is_refused_saying_what_is_expected() {
        let err = refusal(&["127.0.0.1:6379".into()], "a seed without a scheme").await;
        assert!(matches!(err, BrokerError::InvalidArgument { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("\"127.0.0.1:6379\" cannot be used as Redis seeds"),
            "{text}"
        );
        assert!(text.contains("redis://[user:password@]host:port"), "{text}");

        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = http.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut socket, _)) = http.accept().await {
                let _ = socket
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
        });
        let err = refusal(&[format!("redis://127.0.0.1:{port}")], "an HTTP server").await;
        let text = err.to_string();
        assert!(
            text.contains("did not answer in Redis's protocol"),
            "{text}"
        );
        assert!(text.contains("is it a Redis server?"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    /// Seeds that do not answer are passed over for one that does, when it is a cluster
    /// node; a standalone server behind a seed that did not answer is another Redis, and
    /// refused; when none answers, the refusal says so.
    #[tokio::test]
    async fn seeds_that_do_not_answer_are_passed_over_for_a_cluster_node_only() {
        use crate::broker::testing::redis::{RedisCluster, free_port};
        let dead = format!("redis://127.0.0.1:{}", free_port());
        let cluster = RedisCluster::start(3, 0);
        let mut seeds = vec![dead.clone()];
        seeds.extend(cluster.seeds());
        let probed = probe(&seeds).await.expect("a cluster node answers");
        assert_eq!(probed.shown, seeds[1]);
        assert!(probed.cluster);
        let mut conn = connect(&seeds).await.expect("connects past the dead seed");
        assert_eq!(conn.memory().await.unwrap().servers, 3);

        let server = RedisServer::start();
        let err = refusal(&[dead.clone(), server.url()], "a standalone fallback").await;
        assert!(matches!(err, BrokerError::InvalidArgument { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("is a standalone server"), "{text}");
        assert!(text.contains(&dead), "{text}");

        let also_dead = format!("redis://127.0.0.1:{}", free_port());
        let err = refusal(&[dead.clone(), also_dead], "no seed answering").await;
        assert!(matches!(err, BrokerError::Unavailable(_)), "{err}");
        let text = err.to_string();
        assert!(text.contains(&dead), "{text}");
        assert!(
            text.contains("none of the other 1 seeds answered"),
            "{text}"
        );
    }

    #[test]
    fn eviction_policies_are_those_other_than_noeviction_each_once() {
        let texts: Vec<String> = [
            "# Memory\r\nmaxmemory:0\r\nmaxmemory_policy:noeviction\r\n",
            "maxmemory_policy:allkeys-lru\r\n",
            "maxmemory_policy:volatile-ttl\r\n",
            "maxmemory_policy:allkeys-lru\r\n",
            "used_memory:1\r\n",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(evicting_policies(&texts), ["allkeys-lru", "volatile-ttl"]);
        assert!(evicting_policies(&texts[..1]).is_empty());
        assert!(
            evicting_policies(&texts[4..]).is_empty(),
            "not said: not refused"
        );
    }

    /// A Redis that evicts keys would drop acknowledged jobs silently: the engine refuses
    /// it at start, naming the policy and the setting that fixes it, on one server and on
    /// a cluster where only one primary evicts (volatile policies too: idempotency keys
    /// carry a TTL, and evicting one early lets a retry enqueue twice).
    #[tokio::test]
    async fn a_redis_that_evicts_keys_is_refused_at_start() {
        use crate::broker::engine::redis::{RedisConfig, RedisEngine};
        use crate::broker::testing::redis::RedisCluster;
        let refused = |result: Result<RedisEngine, BrokerError>, policy: &str| {
            let err = result.err().expect("an evicting Redis is refused");
            assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err}");
            let text = err.to_string();
            assert!(text.contains(policy), "{text}");
            assert!(text.contains("maxmemory-policy noeviction"), "{text}");
            assert!(text.contains("acknowledged"), "{text}");
        };
        let server = RedisServer::start();
        server.config_set("maxmemory-policy", "allkeys-lru");
        refused(
            RedisEngine::connect(RedisConfig::new(vec![server.url()])).await,
            "allkeys-lru",
        );
        server.config_set("maxmemory-policy", "noeviction");
        let engine = RedisEngine::connect(RedisConfig::new(vec![server.url()]))
            .await
            .expect("noeviction is served");
        engine.shutdown();

        let cluster = RedisCluster::start(3, 0);
        let primaries = cluster.primaries();
        cluster.config_set(primaries[1], "maxmemory-policy", "volatile-lru");
        refused(
            RedisEngine::connect(RedisConfig::new(cluster.seeds())).await,
            "volatile-lru",
        );
    }

    #[tokio::test]
    async fn requests_count_round_trips_with_a_pipeline_once_across_clones() {
        let server = RedisServer::start();
        let mut conn = connect(&[server.url()]).await.unwrap();
        let before = conn.requests();
        let () = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
        let (a, b): (String, String) = redis::pipe()
            .cmd("GET")
            .arg("k")
            .cmd("GET")
            .arg("k")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("v", "v"));
        assert_eq!(conn.requests() - before, 2);
        let mut clone = conn.clone();
        let _: String = redis::cmd("GET")
            .arg("k")
            .query_async(&mut clone)
            .await
            .unwrap();
        assert_eq!(conn.requests() - before, 3);
        assert_eq!(conn.background_requests(), 0);

        // The upkeep's requests count in both, a clone's and a pipeline's too.
        let mut upkeep = conn.clone();
        background(async move {
            let _: String = redis::cmd("GET")
                .arg("k")
                .query_async(&mut upkeep)
                .await
                .unwrap();
            let _: (String, String) = redis::pipe()
                .cmd("GET")
                .arg("k")
                .cmd("GET")
                .arg("k")
                .query_async(&mut upkeep)
                .await
                .unwrap();
        })
        .await;
        assert_eq!(conn.requests() - before, 5);
        assert_eq!(conn.background_requests(), 2);
        // Outside the scope, and in a task spawned from it, a request serves clients.
        let mut after = conn.clone();
        background(async move {
            tokio::spawn(async move {
                let _: String = redis::cmd("GET")
                    .arg("k")
                    .query_async(&mut after)
                    .await
                    .unwrap();
            })
            .await
            .unwrap();
        })
        .await;
        assert_eq!(conn.requests() - before, 6);
        assert_eq!(conn.background_requests(), 2);
    }
}
