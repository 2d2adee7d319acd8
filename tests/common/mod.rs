//! Starts a real broker on 127.0.0.1:0 inside the test process.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice::broker::testing::redis::RedisServer;
use sluice::broker::{
    Broker, BrokerConfig, Engine, HttpOptions, RedisConfig, RedisEngine, ServeOptions, serve,
    serve_http_with,
};
use sluice::client::{Client, ClientError, Lease, Rpc};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod rpc;
pub mod storage;

/// The server options of the tests: a short drain, so stopping a broker never holds a
/// test up for long.
/// Connects to a `sluice serve --listen 127.0.0.1:0` child with a piped stdout once it
/// logs the address it listens on (it binds before logging).
///
/// Each call has a deadline: once the broker is killed, its port is free, and another
/// test's listener may take it; a call that reconnects there must fail, as it would
/// against a dead broker, rather than wait forever for an answer that never comes.
pub async fn connect_child(
    child: &mut std::process::Child,
) -> sluice::pb::broker_client::BrokerClient<tonic::transport::Channel> {
    let stdout = child.stdout.take().expect("the broker's stdout is piped");
    let addr = serve_addrs(stdout, false).await.grpc;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("a valid URL")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect to the broker");
    sluice::pb::broker_client::BrokerClient::new(channel)
}

/// A PublishRequest of one message per payload to `topic`.
pub fn publish_request(topic: &str, payloads: &[&str]) -> sluice::pb::PublishRequest {
    sluice::pb::PublishRequest {
        topic: topic.into(),
        messages: payloads
            .iter()
            .map(|p| sluice::pb::PublishMessage {
                payload: bytes::Bytes::from(p.to_string()),
                ..Default::default()
            })
            .collect(),
    }
}

pub fn serve_options() -> ServeOptions {
    ServeOptions {
        drain_timeout: Duration::from_secs(2),
        ..ServeOptions::default()
    }
}

/// Which engine [`TestBroker::start`], [`TestBroker::start_with`] and
/// [`TestBroker::start_serving`] serve: `SLUICE_TEST_ENGINE=redis` runs the same tests
/// against the Redis engine, each broker on a `redis-server` of its own (on a free port,
/// killed with the broker); anything else (the default) is the in-process engine. Tests
/// that build a [`Broker`] themselves (a data directory, hooked storage) always run on it.
pub fn engine_under_test() -> &'static str {
    match std::env::var("SLUICE_TEST_ENGINE").as_deref() {
        Ok("redis") => "redis",
        _ => "local",
    }
}

/// Whether a check that only the in-process engine passes applies: `false` (and a note
/// on stderr naming `what`) under `SLUICE_TEST_ENGINE=redis`. Each use is a difference the
/// README lists under "The Redis engine"; the rest of the test still runs.
pub fn checked_on_this_engine(what: &str) -> bool {
    let local = engine_under_test() == "local";
    if !local {
        eprintln!("not checked on the Redis engine: {what}");
    }
    local
}

/// A broker serving gRPC on an ephemeral loopback port.
pub struct TestBroker {
    pub addr: SocketAddr,
    /// The in-process engine, when that is what is served.
    local: Option<Broker>,
    /// The Redis engine and its server, when that is what is served.
    redis: Option<(RedisEngine, RedisServer)>,
    stop: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<()>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(BrokerConfig::default()).await
    }

    pub async fn start_with(config: BrokerConfig) -> Self {
        Self::start_engine(config, serve_options()).await
    }

    /// The engine under test ([`engine_under_test`]) with `config`, served with `options`.
    async fn start_engine(config: BrokerConfig, options: ServeOptions) -> Self {
        if engine_under_test() != "redis" {
            return Self::serving_with(Broker::new(config), options).await;
        }
        let server = RedisServer::start();
        let engine = RedisEngine::connect(RedisConfig {
            limits: config.limits,
            sweep_interval: config.tick_interval.max(Duration::from_millis(10)),
            ..RedisConfig::new(vec![server.url()])
        })
        .await
        .expect("the Redis engine connects to its own redis-server");
        let mut served = Self::serve_engine(engine.clone(), options).await;
        served.redis = Some((engine, server));
        served
    }

    /// The in-process engine this serves; panics when the Redis engine is under test
    /// (a test that looks inside the in-process engine runs on it only).
    pub fn broker(&self) -> &Broker {
        self.local.as_ref().unwrap_or_else(|| {
            panic!("this test looks inside the in-process engine, but SLUICE_TEST_ENGINE=redis")
        })
    }

    /// Serves an existing broker (e.g. one opened on a data directory).
    pub async fn serving(broker: Broker) -> Self {
        Self::serving_with(broker, serve_options()).await
    }

    /// A new broker (default configuration) served with `options` (TLS, tokens, limits).
    pub async fn start_serving(options: ServeOptions) -> Self {
        Self::start_engine(BrokerConfig::default(), options).await
    }

    /// Serves an existing broker with these server options (TLS, tokens, limits).
    pub async fn serving_with(broker: Broker, options: ServeOptions) -> Self {
        let mut served = Self::serve_engine(broker.clone(), options).await;
        served.local = Some(broker);
        served
    }

    /// Serves any engine (e.g. one of several Redis-engine nodes a test made itself).
    pub async fn serving_engine<E: Engine>(engine: E, options: ServeOptions) -> Self {
        Self::serve_engine(engine, options).await
    }

    async fn serve_engine<E: Engine>(engine: E, options: ServeOptions) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            serve(listener, engine, options, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            local: None,
            redis: None,
            stop: Some(stop),
            handle,
        }
    }

    /// Another node serving the same Redis, with its own caches (the Redis engine only;
    /// `None` on the in-process engine).
    pub async fn second_node(&self) -> Option<TestBroker> {
        let (_, server) = self.redis.as_ref()?;
        let engine = RedisEngine::connect(RedisConfig::new(vec![server.url()]))
            .await
            .expect("a second node connects to the same redis-server");
        Some(Self::serve_engine(engine, serve_options()).await)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.url()).await.unwrap()
    }

    pub async fn rpc(&self) -> Rpc {
        self.client().await.rpc()
    }

    /// Triggers shutdown and returns the server task to await.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Serves the operations HTTP server of whichever engine this serves, on an ephemeral
    /// loopback port, until the engine shuts down; returns its address.
    pub async fn serve_http(&self, options: HttpOptions) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let forever = std::future::pending();
        match (&self.local, &self.redis) {
            (Some(broker), _) => {
                tokio::spawn(serve_http_with(listener, broker.clone(), options, forever))
            }
            (None, Some((engine, _))) => {
                tokio::spawn(serve_http_with(listener, engine.clone(), options, forever))
            }
            (None, None) => unreachable!("a TestBroker serves one engine or the other"),
        };
        addr
    }
}

/// A plain gRPC channel to `url`, for the services beside the broker's (health,
/// reflection).
pub async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// What gRPC health at `url` says of `service` ("" for the whole server).
pub async fn health(
    url: &str,
    service: &str,
) -> tonic_health::pb::health_check_response::ServingStatus {
    tonic_health::pb::health_client::HealthClient::new(channel(url).await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Awaits `fut` for at most 10 s, so a broken test fails instead of hanging.
pub async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("timed out after 10 s")
}

/// Polls `check` until it returns `Ok`, and returns that value: for a test to wait on
/// state it can observe (a stats field, a job's state, a consumer registered) rather than
/// sleep. Fails after 10 s with `check`'s last `Err`.
pub async fn eventually<T, E, F>(check: impl FnMut() -> F) -> T
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    eventually_within(Duration::from_secs(10), check).await
}

/// [`eventually`] with a deadline of `limit`, for state that background work (compaction,
/// a child process) reaches more slowly.
pub async fn eventually_within<T, E, F>(limit: Duration, mut check: impl FnMut() -> F) -> T
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    // Polled often at first, so a wait that ends at once costs next to nothing, then less
    // often, so a slow one does not busy the machine.
    let mut interval = Duration::from_millis(1);
    loop {
        match check().await {
            Ok(value) => return value,
            Err(why) => assert!(
                tokio::time::Instant::now() < deadline,
                "not within {limit:?}: {why}"
            ),
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(20));
    }
}

/// A long-polling Lease of one job from `queue`, waiting up to `wait`, on a task of its
/// own so the test can change the queue meanwhile. Returns once the poll is waiting: each
/// poll leases under a name of its own, and a lease registers its waker before it looks
/// at the queue and names its consumer, so once `ListConsumers` shows that name a job
/// made visible reaches the poll through its wake-up, not through its first look.
pub async fn long_poll(
    client: &Client,
    queue: &str,
    wait: Duration,
) -> JoinHandle<Result<Vec<Lease>, ClientError>> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!("long-poll-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let poll = tokio::spawn({
        let client = client.clone();
        let queue = queue.to_owned();
        let name = name.clone();
        async move { client.lease(&queue).consumer(name).wait(wait).send().await }
    });
    wait_for_consumer(client, queue, &name).await;
    poll
}

/// Waits (up to 10 s) until `ListConsumers` of `queue` shows a consumer named `name`: it
/// has leased, or is waiting in a long poll or a consume stream with credits.
pub async fn wait_for_consumer(client: &Client, queue: &str, name: &str) {
    eventually(|| async {
        let listed = client
            .rpc()
            .list_consumers(sluice::pb::ListConsumersRequest {
                queue: queue.to_owned(),
            })
            .await;
        match listed {
            Ok(listed) if listed.get_ref().consumers.iter().any(|c| c.name == name) => Ok(()),
            _ => Err(format!("consumer {name:?} did not appear on {queue:?}")),
        }
    })
    .await
}

/// The `SLUICE_LOG` filter a `sluice serve` process needs for [`serve_addrs`]: the
/// addresses it bound are in its `info` start-up lines.
pub const SERVE_LOG: &str = "info";

/// Where a `sluice serve` process started with `--listen 127.0.0.1:0` (and `--http
/// 127.0.0.1:0`) listens, as its start-up log says.
#[derive(Clone, Copy, Debug)]
pub struct ServeAddrs {
    pub grpc: SocketAddr,
    pub http: Option<SocketAddr>,
}

/// Reads the addresses a `sluice serve` process bound from its log on `stdout` (which must
/// be piped, with `SLUICE_LOG` at [`SERVE_LOG`]): the port is the one the process holds,
/// never one released by the test and bound again. Waits for the HTTP line too when
/// `http` is set; panics if the process ends (its stdout closes) or 20 s pass first. The
/// rest of the log is read and dropped, so a full pipe never blocks the broker.
pub async fn serve_addrs(stdout: impl std::io::Read + Send + 'static, http: bool) -> ServeAddrs {
    let (found, addrs) = oneshot::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        let mut found = Some(found);
        let (mut grpc, mut http_addr) = (None, None);
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            if line.contains("sluice serving gRPC") {
                grpc = logged_addr(&line);
            } else if line.contains("sluice serving HTTP") {
                http_addr = logged_addr(&line);
            }
            if let Some(grpc) = grpc
                && (!http || http_addr.is_some())
                && let Some(found) = found.take()
            {
                let _ = found.send(ServeAddrs {
                    grpc,
                    http: http_addr,
                });
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), addrs)
        .await
        .expect("the broker did not log its listening address within 20 s")
        .expect("the broker exited before logging its listening address")
}

/// The `addr=` field of a log line, written `addr=Some(127.0.0.1:5)` or `addr=127.0.0.1:5`.
fn logged_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    let rest = rest.strip_prefix("Some(").unwrap_or(rest);
    let end = rest
        .find(|c: char| c == ')' || c.is_whitespace())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// `line` without terminal colour codes (`ESC [ ... m`). The broker writes none to a pipe
/// (colour only on a terminal); this keeps the parsing independent of that.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
