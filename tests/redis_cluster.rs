//! Several Sluice nodes over one Redis: the Redis engine's promises across nodes and
//! across Redis failures.
//!
//! * Cross-node (three in-process nodes over a 3+3 Redis Cluster): a job enqueued on one
//!   node, leased on a second and acked on a third is completed everywhere; a subscriber
//!   on one node receives what two others publish, in order, without gaps; an ordering
//!   key is never leased on two nodes at once; a long poll on one node wakes when
//!   another enqueues.
//! * Failover ledger (the real `sluice` binary, `--redis-replicas 1`, over a 3+3 Redis
//!   Cluster): producers, workers (unary Lease/Ack, and a Consume stream whose acks count
//!   once the stream ends OK) and a publisher spread over three nodes while the Redis
//!   primary of the queue's slot is SIGKILLed (its replica takes over) and one Sluice node
//!   is SIGKILLed; nothing acknowledged is lost, nothing acked is delivered again.
//! * What `--redis-replicas` buys: with the replication link cut before the primary dies,
//!   `--redis-replicas 0` loses acknowledged enqueues once the replica is promoted, and
//!   `--redis-replicas 1` refuses them (UNAVAILABLE) instead, losing nothing acknowledged.
//!
//! Every Redis and Sluice process is the test's own (free ports), stopped by PID.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sluice::broker::testing::redis::{RedisCluster, RedisServer};
use sluice::broker::{RedisConfig, RedisEngine, serve};
use sluice::client::{Client, ClientError, Delivery, Job, StartAt};
use sluice::pb;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use common::rpc::open_consume;
use common::{long_poll, serve_options, within};

/// One Sluice node served in this process from a [`RedisEngine`].
struct Node {
    addr: SocketAddr,
    engine: RedisEngine,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<()>,
}

impl Node {
    /// Connects a Redis engine with `config` and serves it on a free loopback port.
    async fn start(config: RedisConfig) -> Self {
        let engine = RedisEngine::connect(config)
            .await
            .expect("the Redis engine connects");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = engine.clone();
        let handle = tokio::spawn(async move {
            serve(listener, served, serve_options(), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            engine,
            stop: Some(stop),
            handle,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn client(&self) -> Client {
        Client::connect(self.url()).await.unwrap()
    }

    /// Stops serving and ends the engine's background tasks.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.engine.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.handle).await;
    }
}

/// Three nodes over one Redis Cluster, each with its own engine (own connections, own
/// wake-up subscriber, own sweep), as three machines would be.
async fn three_nodes(cluster: &RedisCluster) -> Vec<Node> {
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            Node::start(RedisConfig {
                sweep_interval: Duration::from_millis(20),
                ..RedisConfig::new(cluster.seeds())
            })
            .await,
        );
    }
    nodes
}

/// The job's state as `client`'s node reads it.
async fn state_of(client: &Client, job_id: &str) -> pb::JobState {
    client.get_job(job_id).await.unwrap().state()
}

/// The cross-node promises, over one 3+3 Redis Cluster and three in-process nodes
/// (one cluster for the four parts: starting one costs seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_over_a_redis_cluster_act_as_one_broker() {
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 1))
        .await
        .unwrap();
    let nodes = three_nodes(&cluster).await;
    let (a, b, c) = (
        nodes[0].client().await,
        nodes[1].client().await,
        nodes[2].client().await,
    );

    enqueue_on_a_lease_on_b_ack_on_c(&a, &b, &c).await;
    a_subscriber_on_c_receives_what_a_and_b_publish(&a, &b, &c).await;
    an_ordering_key_is_leased_on_one_node_at_a_time([&a, &b, &c]).await;
    a_long_poll_on_b_wakes_when_a_enqueues(&a, &b).await;
    a_schedule_fires_once_per_tick_across_three_nodes([&a, &b, &c]).await;
    stats_on_any_node_count_every_nodes_work(&a, &b, &c, &cluster).await;

    for node in nodes {
        node.stop().await;
    }
    drop(cluster);
    eprintln!("cross-node test: {:.1} s", started.elapsed().as_secs_f64());
}

async fn enqueue_on_a_lease_on_b_ack_on_c(a: &Client, b: &Client, c: &Client) {
    let enqueued = a.enqueue("xnode", "hello").kind("k").send().await.unwrap();
    let leases = within(b.lease("xnode").wait(Duration::from_secs(5)).send())
        .await
        .unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].job_id(), enqueued.job_id);
    assert_eq!(leases[0].payload().as_ref(), b"hello");
    assert_eq!(state_of(a, &enqueued.job_id).await, pb::JobState::Leased);
    // The ack goes to the third node: a lease is not tied to the node that granted it.
    c.rpc()
        .ack(pb::AckRequest {
            acks: vec![pb::LeaseAck {
                lease_id: leases[0].lease_id().to_owned(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    assert_eq!(state_of(a, &enqueued.job_id).await, pb::JobState::Completed);
    assert_eq!(state_of(b, &enqueued.job_id).await, pb::JobState::Completed);
    // Nothing left to lease on any node.
    for client in [a, b, c] {
        assert!(client.lease("xnode").send().await.unwrap().is_empty());
    }
}

async fn a_subscriber_on_c_receives_what_a_and_b_publish(a: &Client, b: &Client, c: &Client) {
    const TOPIC: &str = "xnode-events";
    const EACH: usize = 100;
    a.rpc()
        .create_topic(pb::CreateTopicRequest {
            name: TOPIC.into(),
            retention: None,
        })
        .await
        .unwrap();
    let mut stream = c
        .subscribe(TOPIC)
        .start(StartAt::Sequence(1))
        .raw()
        .await
        .unwrap();
    // Two publishers, one on A and one on B, interleaving their publishes.
    let publishers: Vec<_> = [("A", a.clone()), ("B", b.clone())]
        .into_iter()
        .map(|(name, client)| {
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for i in 0..EACH {
                    let payload = format!("{name}-{i}");
                    let sequence = client.publish(TOPIC, payload.clone()).await.unwrap();
                    acknowledged.push((sequence, payload));
                }
                acknowledged
            })
        })
        .collect();
    let mut acknowledged: BTreeMap<u64, String> = BTreeMap::new();
    for p in publishers {
        for (sequence, payload) in p.await.unwrap() {
            assert!(
                acknowledged.insert(sequence, payload).is_none(),
                "sequence {sequence} acknowledged twice"
            );
        }
    }
    let received = deliveries(&mut stream, 2 * EACH).await;
    let sequences: Vec<u64> = received.iter().map(|(s, _)| *s).collect();
    let expected: Vec<u64> = (1..=(2 * EACH) as u64).collect();
    assert_eq!(sequences, expected, "in order, without gaps");
    let acknowledged: Vec<(u64, String)> = acknowledged.into_iter().collect();
    assert_eq!(
        received, acknowledged,
        "each under its acknowledged sequence"
    );
    // The publishers really interleaved (else the test says little about ordering).
    let switches = received
        .windows(2)
        .filter(|w| w[0].1.as_bytes()[0] != w[1].1.as_bytes()[0])
        .count();
    eprintln!(
        "topic: {} messages, {switches} switches between publishers",
        received.len()
    );
    assert!(switches > 1, "the publishers did not interleave");
}

/// The next `n` deliveries of a subscription as (sequence, payload), each within 5 s.
async fn deliveries(
    stream: &mut (impl futures::Stream<Item = sluice::client::Result<Delivery<bytes::Bytes>>> + Unpin),
    n: usize,
) -> Vec<(u64, String)> {
    let mut received = Vec::with_capacity(n);
    while received.len() < n {
        let delivery = within(stream.next())
            .await
            .expect("the subscription goes on")
            .expect("a delivery, not an error");
        received.push((
            delivery.sequence,
            String::from_utf8(delivery.value.to_vec()).unwrap(),
        ));
    }
    received
}

/// `used_memory` and `maxmemory` of the Redis server on `port`.
async fn redis_memory(port: u16) -> (u64, u64) {
    let info: String = redis_cmd(port, &["INFO", "memory"]).await;
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("INFO memory has {name}"))
            .trim()
            .parse()
            .unwrap()
    };
    (field("used_memory"), field("maxmemory"))
}

/// Stats on C show what A and B did: a topic's publishes and publish rate, a queue's
/// enqueues and enqueue rate, and Redis's memory over every primary (its `maxmemory`
/// the budget once every primary has one).
async fn stats_on_any_node_count_every_nodes_work(
    a: &Client,
    b: &Client,
    c: &Client,
    cluster: &RedisCluster,
) {
    const TOPIC: &str = "xnode-rates";
    const QUEUE: &str = "xnode-rates";
    for _ in 0..3 {
        a.publish(TOPIC, "a").await.unwrap();
    }
    for _ in 0..4 {
        b.publish(TOPIC, "b").await.unwrap();
    }
    a.enqueue(QUEUE, "a").send().await.unwrap();
    b.enqueue(QUEUE, "b").send().await.unwrap();
    let stats = c.stats().await.unwrap();
    let topic = stats.topics.iter().find(|t| t.name == TOPIC).unwrap();
    assert_eq!(topic.published, 7);
    assert_eq!(
        topic.publish_rate, 0.7,
        "7 publishes in the last 10 s, on two nodes"
    );
    let queue = stats.queues.iter().find(|q| q.name == QUEUE).unwrap();
    assert_eq!((queue.enqueued, queue.enqueue_rate), (2, 0.2));

    let primaries = cluster.primaries();
    let mut each = Vec::new();
    for port in &primaries {
        each.push(redis_memory(*port).await);
    }
    let largest = each.iter().map(|(used, _)| *used).max().unwrap();
    let sum: u64 = each.iter().map(|(used, _)| *used).sum();
    assert!(
        stats.memory_used_bytes > largest && stats.memory_used_bytes < 2 * sum,
        "memory in use is every primary's: {} bytes, primaries {each:?}",
        stats.memory_used_bytes
    );
    assert_eq!(stats.memory_budget_bytes, 0, "no primary has a maxmemory");
    // A limit on some primaries only is no limit on the cluster; on all, their sum.
    const LIMIT: u64 = 512 << 20;
    let limit = LIMIT.to_string();
    let () = redis_cmd(primaries[0], &["CONFIG", "SET", "maxmemory", &limit]).await;
    assert_eq!(c.stats().await.unwrap().memory_budget_bytes, 0);
    for port in &primaries[1..] {
        let () = redis_cmd(*port, &["CONFIG", "SET", "maxmemory", &limit]).await;
    }
    assert_eq!(
        c.stats().await.unwrap().memory_budget_bytes,
        LIMIT * primaries.len() as u64
    );
    for port in &primaries {
        let () = redis_cmd(*port, &["CONFIG", "SET", "maxmemory", "0"]).await;
    }
}

/// One lease of an ordering-keyed job, as its worker saw it.
#[derive(Debug, Clone)]
struct Held {
    key: String,
    index: usize,
    node: usize,
    /// When the lease answer arrived (after the server granted the lease).
    leased: Instant,
    /// When the worker sent its ack (before the server released the key).
    acking: Instant,
}

async fn an_ordering_key_is_leased_on_one_node_at_a_time(clients: [&Client; 3]) {
    const QUEUE: &str = "xnode-ordered";
    const JOBS: usize = 60;
    const KEYS: [&str; 3] = ["alpha", "beta", "gamma"];
    let jobs = (0..JOBS)
        .map(|i| Job::new(format!("{i}")).ordering_key(KEYS[i % KEYS.len()]))
        .collect();
    clients[0].enqueue_batch(QUEUE, jobs).await.unwrap();

    let held = Arc::new(Mutex::new(Vec::<Held>::new()));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for (node, client) in clients.iter().enumerate() {
        for w in 0..2 {
            let client = (*client).clone();
            let held = held.clone();
            let acked = acked.clone();
            let mut rng = fastrand::Rng::with_seed((node * 10 + w) as u64);
            workers.push(tokio::spawn(async move {
                while acked.load(Ordering::SeqCst) < JOBS {
                    let leases = client
                        .lease(QUEUE)
                        .max_jobs(1)
                        .visibility_timeout(Duration::from_secs(30))
                        .wait(Duration::from_millis(200))
                        .send()
                        .await
                        .unwrap();
                    for lease in leases {
                        let leased = Instant::now();
                        let index: usize = std::str::from_utf8(lease.payload())
                            .unwrap()
                            .parse()
                            .unwrap();
                        // Work long enough that a second lease of the key would overlap.
                        tokio::time::sleep(Duration::from_millis(rng.u64(5..25))).await;
                        let acking = Instant::now();
                        held.lock().unwrap().push(Held {
                            key: KEYS[index % KEYS.len()].to_owned(),
                            index,
                            node,
                            leased,
                            acking,
                        });
                        lease.ack().await.unwrap();
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
    }
    within(async {
        for w in workers {
            w.await.unwrap();
        }
    })
    .await;

    let held = held.lock().unwrap().clone();
    assert_eq!(held.len(), JOBS, "each job leased and acked once");
    let mut by_key: HashMap<&str, Vec<&Held>> = HashMap::new();
    for h in &held {
        by_key.entry(h.key.as_str()).or_default().push(h);
    }
    let mut nodes_used = HashSet::new();
    for (key, mut leases) in by_key {
        leases.sort_by_key(|h| h.leased);
        for pair in leases.windows(2) {
            assert!(
                pair[1].leased >= pair[0].acking,
                "key {key}: job {} leased on node {} before job {} (node {}) was acked",
                pair[1].index,
                pair[1].node,
                pair[0].index,
                pair[0].node
            );
        }
        // And in enqueue order.
        let order: Vec<usize> = leases.iter().map(|h| h.index).collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "key {key}: leased out of enqueue order");
        nodes_used.extend(leases.iter().map(|h| h.node));
    }
    eprintln!("ordering keys: {JOBS} jobs leased on nodes {nodes_used:?}");
    assert!(nodes_used.len() > 1, "only one node leased: {nodes_used:?}");
}

async fn a_long_poll_on_b_wakes_when_a_enqueues(a: &Client, b: &Client) {
    const QUEUE: &str = "xnode-poll";
    // The queue exists before the poll, so the poll waits on it.
    a.rpc()
        .create_queue(pb::CreateQueueRequest {
            name: QUEUE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let poll = long_poll(b, QUEUE, Duration::from_secs(10)).await;
    let enqueued_at = Instant::now();
    let job = a.enqueue(QUEUE, "wake").send().await.unwrap();
    let leases = within(poll).await.unwrap().unwrap();
    let waited = enqueued_at.elapsed();
    eprintln!("long poll on B returned {waited:?} after the enqueue on A");
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].job_id(), job.job_id);
    assert!(
        waited < Duration::from_secs(2),
        "the 10 s poll returned {waited:?} after the enqueue"
    );
}

// ---- what --redis-replicas buys ---------------------------------------------------------

/// A TCP proxy between a replica and its primary, so a test can cut the replication link
/// at a moment of its choosing: [`LinkProxy::cut`] closes every connection through it and
/// stops accepting new ones (the replica's reconnects are refused).
struct LinkProxy {
    port: u16,
    cut: tokio_util::sync::CancellationToken,
}

impl LinkProxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = tokio_util::sync::CancellationToken::new();
        let token = cut.clone();
        tokio::spawn(async move {
            loop {
                let mut inbound = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    // Either side closing, or the cut, drops both sockets.
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { port, cut }
    }

    fn cut(&self) {
        self.cut.cancel();
    }
}

/// A command on a connection of its own to the server on `port`.
async fn redis_cmd<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> T {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // A loaded machine's server may take longer than the client's default reply timeout.
    conn.set_response_timeout(Duration::from_secs(10));
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

/// Polls `INFO replication` of the server on `port` (every 20 ms, at most 10 s) until
/// `ready` holds.
async fn wait_replication(port: u16, what: &str, ready: impl Fn(&str) -> bool) {
    let start = Instant::now();
    loop {
        let info: String = redis_cmd(port, &["INFO", "replication"]).await;
        if ready(&info) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "waited 10 s for {what}:\n{info}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A standalone primary and one replica linked to it through a [`LinkProxy`], in sync.
async fn primary_with_proxied_replica() -> (RedisServer, LinkProxy, RedisServer) {
    let primary = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let proxy = LinkProxy::start(primary.port).await;
    let proxy_port = proxy.port.to_string();
    let replica = tokio::task::spawn_blocking(move || {
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &proxy_port])
    })
    .await
    .unwrap();
    wait_replication(primary.port, "the replica to sync", |i| {
        i.contains("state=online")
    })
    .await;
    (primary, proxy, replica)
}

/// A node with `--redis-replicas 1` (each WAIT `timeout`) on a primary whose replica is
/// linked through a [`LinkProxy`]: the node, the primary, the proxy and the replica.
async fn node_with_proxied_replica(
    timeout: Duration,
) -> (Node, RedisServer, LinkProxy, RedisServer) {
    let (primary, proxy, replica) = primary_with_proxied_replica().await;
    let node = Node::start(RedisConfig {
        replicas: 1,
        replica_timeout: timeout,
        ..RedisConfig::new(vec![primary.url()])
    })
    .await;
    (node, primary, proxy, replica)
}

/// What one run of [`cut_link_then_lose_primary`] measured.
#[derive(Debug)]
struct CutOutcome {
    /// Enqueues attempted after the cut.
    attempted: usize,
    /// ... acknowledged.
    acknowledged: usize,
    /// ... refused as UNAVAILABLE (outcome unknown).
    unavailable: usize,
    /// How long the first enqueue after the cut, sent alone, took to be answered.
    lone_answer: Duration,
    /// The slowest refusal (the others were sent at once: a request queues behind the
    /// WAIT in flight on the node's connection, then joins the next one).
    slowest_refusal: Duration,
    /// Acknowledged enqueues (before and after the cut) the promoted replica lacks.
    lost: usize,
    /// Enqueues made before the cut (acknowledged, on the replica by then) it lacks.
    lost_before_cut: usize,
    /// Enqueues after the cut whose retry (same idempotency key) on the promoted replica
    /// found the original: they reached the replica after all.
    retried_duplicates: usize,
}

/// A standalone primary with one replica linked through a [`LinkProxy`]; a node with
/// `--redis-replicas replicas` enqueues 20 jobs, the link is cut, the node enqueues
/// `after` more (concurrently, each with an idempotency key), the primary is SIGKILLed and
/// the replica promoted (`REPLICAOF NO ONE`, as an operator or Sentinel would); a node on
/// the promoted replica then looks for every acknowledged job and retries every
/// enqueue made after the cut with its key.
async fn cut_link_then_lose_primary(replicas: u32, after: usize) -> CutOutcome {
    const BEFORE: usize = 20;
    const QUEUE: &str = "durable";
    let (mut primary, proxy, replica) = primary_with_proxied_replica().await;

    let timeout = Duration::from_millis(500);
    let node = Node::start(RedisConfig {
        replicas,
        replica_timeout: timeout,
        ..RedisConfig::new(vec![primary.url()])
    })
    .await;
    let client = node.client().await;
    let mut acknowledged = Vec::new();
    for i in 0..BEFORE {
        let key = format!("before-{i}");
        // The link is up, but on a loaded machine a replica can miss the 500 ms WAIT: that
        // answer says the outcome is unknown, and the documented remedy is a retry with the
        // same idempotency key (which answers with the same job).
        let mut attempts = 0;
        let job = loop {
            attempts += 1;
            match client
                .enqueue(QUEUE, key.clone())
                .idempotency_key(key.clone())
                .send()
                .await
            {
                Ok(job) => break job,
                Err(e) if attempts < 5 && e.code() == Some(tonic::Code::Unavailable) => continue,
                Err(e) => panic!("enqueue {key} before the cut: {e}"),
            }
        };
        acknowledged.push(job.job_id);
    }
    // Whatever `replicas` is, the jobs before the cut are on the replica before it.
    let synced: i64 = {
        let client = redis::Client::open(primary.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        // WAIT answers when the replica has the fence, or after its own 5 s: more than the
        // client's default reply timeout on a loaded machine.
        conn.set_response_timeout(Duration::from_secs(10));
        let _: () = redis::cmd("SET")
            .arg("test-fence")
            .arg("")
            .query_async(&mut conn)
            .await
            .unwrap();
        redis::cmd("WAIT")
            .arg(1)
            .arg(5000)
            .query_async(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(synced, 1, "the replica has the jobs from before the cut");

    proxy.cut();
    wait_replication(primary.port, "the primary to lose its replica", |i| {
        i.contains("connected_slaves:0")
    })
    .await;

    // The first enqueue after the cut alone (how long one answer takes), the rest at once.
    let attempt = |i: usize| {
        let client = client.clone();
        async move {
            let key = format!("after-{i}");
            let start = Instant::now();
            let result = tokio::time::timeout(
                Duration::from_secs(10),
                client
                    .enqueue(QUEUE, key.clone())
                    .idempotency_key(key)
                    .send(),
            )
            .await
            .expect("an answer within 10 s");
            (result, start.elapsed())
        }
    };
    let lone = attempt(0).await;
    let lone_answer = lone.1;
    let mut attempts = vec![tokio::spawn(async move { lone })];
    attempts.extend((1..after).map(|i| tokio::spawn(attempt(i))));
    let (mut acknowledged_after, mut unavailable, mut slowest_refusal) = (0, 0, Duration::ZERO);
    for attempt in attempts {
        let (result, took) = attempt.await.unwrap();
        match result {
            Ok(job) => {
                acknowledged_after += 1;
                acknowledged.push(job.job_id);
            }
            Err(e) => {
                assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
                unavailable += 1;
                slowest_refusal = slowest_refusal.max(took);
            }
        }
    }

    primary.kill();
    node.stop().await;
    let _: () = redis_cmd(replica.port, &["REPLICAOF", "NO", "ONE"]).await;
    let reader = Node::start(RedisConfig::new(vec![replica.url()])).await;
    let client = reader.client().await;
    let mut lost = 0;
    let mut lost_before_cut = 0;
    for (i, id) in acknowledged.iter().enumerate() {
        match client.get_job(id).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(tonic::Code::NotFound) => {
                lost += 1;
                if i < BEFORE {
                    lost_before_cut += 1;
                }
            }
            Err(e) => panic!("reading job {id} on the promoted replica: {e}"),
        }
    }
    let mut retried_duplicates = 0;
    for i in 0..after {
        let key = format!("after-{i}");
        let job = client
            .enqueue(QUEUE, key.clone())
            .idempotency_key(key)
            .send()
            .await
            .unwrap();
        retried_duplicates += usize::from(job.duplicate);
    }
    reader.stop().await;
    drop(replica);
    CutOutcome {
        attempted: after,
        acknowledged: acknowledged_after,
        unavailable,
        lone_answer,
        slowest_refusal,
        lost,
        lost_before_cut,
        retried_duplicates,
    }
}

/// `--redis-replicas 0` answers once the primary has a change: with the replication link
/// cut, every enqueue is acknowledged, and all of them are gone once the primary dies and
/// its replica is promoted. (The durability table of the README quotes these numbers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_replicas_a_cut_link_loses_acknowledged_enqueues() {
    let started = Instant::now();
    let outcome = cut_link_then_lose_primary(0, 50).await;
    eprintln!(
        "--redis-replicas 0, link cut, primary killed, replica promoted ({:.1} s): {outcome:?}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(outcome.acknowledged, outcome.attempted, "{outcome:?}");
    assert_eq!(outcome.lost_before_cut, 0, "{outcome:?}");
    assert!(
        outcome.lost > 0,
        "expected acknowledged enqueues to be lost: {outcome:?}"
    );
    assert_eq!(outcome.retried_duplicates, 0, "{outcome:?}");
}

/// `--redis-replicas 1` answers once a replica has a change: with the replication link
/// cut, every enqueue is refused as UNAVAILABLE (outcome unknown) within the timeout, and
/// nothing acknowledged is lost when the primary dies and its replica is promoted; the
/// refused enqueues, retried there with their keys, are created.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_one_replica_a_cut_link_refuses_enqueues_and_loses_nothing_acknowledged() {
    let started = Instant::now();
    let outcome = cut_link_then_lose_primary(1, 50).await;
    eprintln!(
        "--redis-replicas 1, link cut, primary killed, replica promoted ({:.1} s): {outcome:?}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(outcome.acknowledged, 0, "{outcome:?}");
    assert_eq!(outcome.unavailable, outcome.attempted, "{outcome:?}");
    // The timeout is 500 ms: a lone request is refused after about that, one sent with
    // others after a few of them; the bounds are generous for a loaded machine.
    assert!(
        outcome.lone_answer >= Duration::from_millis(500)
            && outcome.lone_answer < Duration::from_secs(3),
        "{outcome:?}"
    );
    assert!(
        outcome.slowest_refusal < Duration::from_secs(5),
        "{outcome:?}"
    );
    assert_eq!(outcome.lost, 0, "{outcome:?}");
    assert_eq!(outcome.retried_duplicates, 0, "{outcome:?}");
}

/// A WAIT for replicas holds up only the answers that wait for it. With the replication
/// link cut an enqueue waits out its WAIT (then UNAVAILABLE); meanwhile the same node
/// leases and reads at once. WAIT blocks the connection it travels on, so it has one of its
/// own: on the node's shared connection the lease and the read would have waited behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wait_for_replicas_does_not_hold_up_the_nodes_other_requests() {
    let timeout = Duration::from_secs(3);
    let (node, primary, proxy, _replica) = node_with_proxied_replica(timeout).await;
    let client = node.client().await;
    let job = client.enqueue("ready", "x").send().await.unwrap();
    proxy.cut();
    wait_replication(primary.port, "the primary to lose its replica", |i| {
        i.contains("connected_slaves:0")
    })
    .await;
    let stuck = tokio::spawn({
        let client = client.clone();
        async move { client.enqueue("stuck", "y").send().await }
    });
    // Until the enqueue's WAIT blocks on the primary.
    let start = Instant::now();
    loop {
        let clients: String = redis_cmd(primary.port, &["INFO", "clients"]).await;
        if clients.contains("blocked_clients:1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the WAIT never blocked:\n{clients}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let asked = Instant::now();
    let leased = client.lease("ready").send().await.unwrap();
    let read = client.get_job(&job.job_id).await.unwrap();
    let took = asked.elapsed();
    assert_eq!(leased.len(), 1);
    assert_eq!(read.id, job.job_id);
    assert!(
        took < timeout / 2,
        "a lease and a read took {took:?} while a WAIT (timeout {timeout:?}) was blocked"
    );
    let refused = stuck.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), Some(tonic::Code::Unavailable), "{refused}");
    node.stop().await;
}

/// A Redis user scoped to Sluice's keys and channels, with the dangerous commands taken
/// away, is enough for a node: the ACL the README shows.
#[tokio::test]
async fn the_node_serves_with_a_redis_user_scoped_to_its_keys() {
    let server = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap();
    let acl = [
        "ACL",
        "SETUSER",
        "sluice",
        "on",
        ">pw",
        "~sluice:*",
        "&sluice:*",
        "+@all",
        "-@dangerous",
        "+info",
        "+function|load",
        "+function|list",
    ];
    let _: () = redis_cmd(server.port, &acl).await;
    let url = format!("redis://sluice:pw@127.0.0.1:{}", server.port);
    let node = Node::start(RedisConfig::new(vec![url])).await;
    let client = node.client().await;
    client.enqueue("scoped", "job").send().await.unwrap();
    let poll = long_poll(&client, "scoped-wait", Duration::from_secs(5)).await;
    client.enqueue("scoped-wait", "woken").send().await.unwrap();
    assert_eq!(within(poll).await.unwrap().unwrap().len(), 1);
    let mut leases = client.lease("scoped").send().await.unwrap();
    leases.remove(0).ack().await.unwrap();
    let sequence = client.publish("scoped-topic", "m").await.unwrap();
    assert_eq!(sequence, 1);
    let stats = client.stats().await.unwrap();
    assert!(stats.queues.iter().any(|q| q.name == "scoped"), "{stats:?}");
    node.stop().await;
}

// ---- resharding: a queue's or topic's slot moves to another primary ----------------------

/// `MIGRATE` of `key` from the primary on `from` to the one on `to`: `OK`, `NOKEY`, or the
/// server's refusal (`BUSYKEY` when `to` has the key already).
async fn migrate(from: u16, to: u16, key: &str) -> redis::RedisResult<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{from}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(to)
        .arg(key)
        .arg(0)
        .arg(5000)
        .query_async(&mut conn)
        .await
}

/// A Redis Cluster of 3 primaries (no replicas), a node on it and a client of the node.
async fn node_on_a_cluster() -> (RedisCluster, Node, Client) {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
        .await
        .unwrap();
    let node = Node::start(RedisConfig::new(cluster.seeds())).await;
    let client = node.client().await;
    (cluster, node, client)
}

/// A hash slot on its way from one primary to another, as `redis-cli --cluster reshard`
/// moves it: marked importing and migrating, its keys copied one at a time, then given to
/// the new owner.
struct SlotMove {
    from: u16,
    to: u16,
    slot: String,
    to_id: String,
    primaries: Vec<u16>,
}

impl SlotMove {
    /// Starts moving the slot of hash tag `tag` (`{q:name}`) to another primary and
    /// copies half of its keys (at least `keys` of them must be there).
    async fn halfway(cluster: &RedisCluster, tag: &str, keys: usize) -> SlotMove {
        let from = cluster.primary_for_key(tag);
        let primaries = cluster.primaries();
        let to = *primaries.iter().find(|&&p| p != from).unwrap();
        let slot: i64 = redis_cmd(from, &["CLUSTER", "KEYSLOT", tag]).await;
        let slot = slot.to_string();
        let from_id: String = redis_cmd(from, &["CLUSTER", "MYID"]).await;
        let to_id: String = redis_cmd(to, &["CLUSTER", "MYID"]).await;
        let _: () = redis_cmd(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]).await;
        let _: () = redis_cmd(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]).await;
        let present: Vec<String> =
            redis_cmd(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "10000"]).await;
        assert!(present.len() >= keys, "the slot's keys: {present:?}");
        for key in &present[..present.len() / 2] {
            assert_eq!(migrate(from, to, key).await.unwrap(), "OK", "{key}");
        }
        SlotMove {
            from,
            to,
            slot,
            to_id,
            primaries,
        }
    }

    /// Copies the rest and gives the slot to the new owner. Panics when a key cannot be
    /// copied: a script wrote it on the new owner while the old one still had it.
    async fn finish(&self) {
        loop {
            let left: Vec<String> = redis_cmd(
                self.from,
                &["CLUSTER", "GETKEYSINSLOT", &self.slot, "10000"],
            )
            .await;
            if left.is_empty() {
                break;
            }
            for key in &left {
                if let Err(e) = migrate(self.from, self.to, key).await {
                    panic!("{key} could not move ({e}): a script wrote it on the new owner");
                }
            }
        }
        for &port in &self.primaries {
            let _: () = redis_cmd(
                port,
                &["CLUSTER", "SETSLOT", &self.slot, "NODE", &self.to_id],
            )
            .await;
        }
    }

    /// Keys of the slot on the old owner (none once it moved, unless a script wrote there
    /// after it left).
    async fn left_behind(&self) -> i64 {
        redis_cmd(self.from, &["CLUSTER", "COUNTKEYSINSLOT", &self.slot]).await
    }
}

/// A queue's hash slot moves to another primary while a node serves it. A script must not
/// run on half of a queue meanwhile (it would see keys not yet copied as missing, and a key
/// it wrote on the new owner would stop the copy of the old one with BUSYKEY): an enqueue
/// and a lease sent halfway wait for the migration (or are refused UNAVAILABLE having
/// changed nothing), every key moves, and afterwards every job is there once, the leased
/// ones still leased.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_keeps_its_jobs_while_its_slot_moves_to_another_primary() {
    const QUEUE: &str = "moving";
    let (cluster, node, client) = node_on_a_cluster().await;
    for i in 0..20 {
        client.enqueue(QUEUE, format!("{i}")).send().await.unwrap();
    }
    let held = client.lease(QUEUE).max_jobs(5).send().await.unwrap();
    assert_eq!(held.len(), 5);

    let moving = SlotMove::halfway(&cluster, &format!("{{q:{QUEUE}}}"), 20).await;
    let sent = Instant::now();
    let during = tokio::spawn({
        let client = client.clone();
        async move {
            let answer = client
                .enqueue(QUEUE, "during")
                .idempotency_key("during")
                .send()
                .await;
            (answer, sent.elapsed())
        }
    });
    let leasing = tokio::spawn({
        let client = client.clone();
        async move { client.lease(QUEUE).max_jobs(3).send().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    moving.finish().await;

    // Each request either waited for the migration or was refused having changed nothing.
    let mut leased_during = Vec::new();
    match within(leasing).await.unwrap() {
        Ok(leases) => leased_during = leases,
        Err(e) => assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}"),
    }
    let (during, took) = within(during).await.unwrap();
    eprintln!(
        "an enqueue sent halfway through the move was answered after {took:?} (the move \
         ended 500 ms after it was sent)"
    );
    if let Err(e) = during {
        assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
        client
            .enqueue(QUEUE, "during")
            .idempotency_key("during")
            .send()
            .await
            .unwrap();
    }
    let mut leases: Vec<_> = held.into_iter().chain(leased_during).collect();
    loop {
        let more = client.lease(QUEUE).max_jobs(100).send().await.unwrap();
        if more.is_empty() {
            break;
        }
        leases.extend(more);
    }
    let mut payloads: Vec<String> = Vec::new();
    for lease in leases {
        payloads.push(String::from_utf8(lease.payload().to_vec()).unwrap());
        lease.ack().await.unwrap();
    }
    payloads.sort();
    let mut expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    expected.push("during".into());
    expected.sort();
    assert_eq!(payloads, expected, "every job once, after the move");
    assert_eq!(moving.left_behind().await, 0);
    node.stop().await;
}

/// A topic's hash slot moves to another primary while a node publishes to it: a publish
/// sent halfway waits for the migration (or is refused UNAVAILABLE having stored nothing),
/// a subscriber on another node reads on across the move, and afterwards a subscriber from
/// the start reads every acknowledged message in order, under its sequence, without gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_keeps_its_log_while_its_slot_moves_to_another_primary() {
    const TOPIC: &str = "moving-log";
    let (cluster, node, client) = node_on_a_cluster().await;
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        let payload = format!("m{i}");
        acknowledged.push((
            client.publish(TOPIC, payload.clone()).await.unwrap(),
            payload,
        ));
    }

    // A subscriber on another node, reading live across the move.
    let node_b = Node::start(RedisConfig::new(cluster.seeds())).await;
    let mut live = node_b
        .client()
        .await
        .subscribe(TOPIC)
        .start(StartAt::Sequence(1))
        .raw()
        .await
        .unwrap();
    let mut read_live = deliveries(&mut live, acknowledged.len()).await;

    let moving = SlotMove::halfway(&cluster, &format!("{{t:{TOPIC}}}"), 2).await;
    let during = tokio::spawn({
        let client = client.clone();
        async move { client.publish(TOPIC, "during").await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    moving.finish().await;
    match within(during).await.unwrap() {
        Ok(sequence) => acknowledged.push((sequence, "during".into())),
        Err(e) => assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}"),
    }
    let sequence = client.publish(TOPIC, "after").await.unwrap();
    acknowledged.push((sequence, "after".into()));

    let mut stream = client
        .subscribe(TOPIC)
        .start(StartAt::Sequence(1))
        .raw()
        .await
        .unwrap();
    let received = deliveries(&mut stream, acknowledged.len()).await;
    let expected: Vec<u64> = (1..=acknowledged.len() as u64).collect();
    let sequences: Vec<u64> = received.iter().map(|(s, _)| *s).collect();
    assert_eq!(sequences, expected, "in order, without gaps");
    assert_eq!(
        received, acknowledged,
        "each under its acknowledged sequence"
    );
    let more = acknowledged.len() - read_live.len();
    read_live.extend(deliveries(&mut live, more).await);
    assert_eq!(
        read_live, acknowledged,
        "the live subscriber read across the move"
    );
    assert_eq!(moving.left_behind().await, 0);
    node_b.stop().await;
    node.stop().await;
}

/// How long long polls on `waiter` take to return after `enqueuer` enqueues into `queue`
/// (5 rounds: the poll waits, 20 ms later one job is enqueued; each job acked).
async fn wake_latencies(enqueuer: &Client, waiter: &Client, queue: &str) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let poll = long_poll(waiter, queue, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        enqueuer.enqueue(queue, "wake").send().await.unwrap();
        let sent = Instant::now();
        let leased = within(poll).await.unwrap().unwrap();
        latencies.push(sent.elapsed());
        for lease in leased {
            lease.ack().await.unwrap();
        }
    }
    latencies
}

/// A node keeps waking its waiters within milliseconds after a queue's slot moved to
/// another primary: Redis drops the shard channel subscriptions of a slot that leaves it
/// (a `sunsubscribe` push), and the node subscribes again through the new owner. Without
/// that, every wake of that queue was lost and its long polls returned only at their
/// next look, a quarter of a second later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_polls_still_wake_at_once_after_their_queues_slot_moved() {
    const QUEUE: &str = "wake-moving";
    let (cluster, node, a) = node_on_a_cluster().await;
    let node_b = Node::start(RedisConfig::new(cluster.seeds())).await;
    let b = node_b.client().await;
    let before = wake_latencies(&a, &b, QUEUE).await;
    let moving = SlotMove::halfway(&cluster, &format!("{{q:{QUEUE}}}"), 2).await;
    moving.finish().await;
    let after = wake_latencies(&a, &b, QUEUE).await;
    eprintln!("wake latency before the move {before:?}, after {after:?}");
    // A missed wake costs a poll interval (250 ms, about 230 ms here); a load spike
    // may slow one round, not all five.
    let fastest = after.iter().min().unwrap();
    assert!(
        *fastest < Duration::from_millis(120),
        "no long poll woke at once after the move: {after:?}"
    );
    node_b.stop().await;
    node.stop().await;
}

// ---- failover ledger: the real binary over a Redis Cluster --------------------------------

const LEDGER_QUEUE: &str = "ledger";
/// Leases long enough that a worker's ack retried across a failover normally lands, short
/// enough that a lease whose answer was lost comes back before the drain ends.
const LEDGER_VISIBILITY: Duration = Duration::from_secs(6);

/// A `sluice serve --storage redis` process, SIGKILLed by PID when dropped; its log
/// (stdout) is kept for the test to read.
struct SluiceProcess {
    child: std::process::Child,
    url: String,
    log: Arc<Mutex<Vec<u8>>>,
}

impl SluiceProcess {
    /// A node with `--redis-replicas 1`, as the failover ledger runs them.
    async fn start(seeds: &[String]) -> Self {
        Self::start_with(seeds, 1).await
    }

    async fn start_with(seeds: &[String], replicas: u32) -> Self {
        let mut cmd = node_command(&seeds.join(","));
        cmd.arg("--redis-replicas")
            .arg(replicas.to_string())
            .args(["--redis-timeout-ms", "1000"]);
        Self::spawn(cmd).await
    }

    /// Starts `cmd` (a [`node_command`]) and waits until it serves.
    async fn spawn(mut cmd: std::process::Command) -> Self {
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting the sluice binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        let tee = Tee {
            inner: child.stdout.take().expect("piped stdout"),
            copy: log.clone(),
        };
        let addr = common::serve_addrs(tee, false).await.grpc;
        Self {
            child,
            url: format!("http://{addr}"),
            log,
        }
    }

    /// What the node logged so far.
    fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A payload naming its producer and number.
fn ledger_payload(producer: &str, n: u64) -> String {
    format!("{producer}-{n}")
}

/// Everything acknowledged, as the clients saw it.
#[derive(Default)]
struct FailoverLedger {
    /// Acknowledged enqueues: job id -> payload id.
    enqueued: HashMap<String, String>,
    /// Payload id -> the job id its acknowledged enqueue answered (idempotency keys make
    /// a retry answer the same job).
    job_of: HashMap<String, String>,
    /// Deliveries per job id.
    deliveries: HashMap<String, u32>,
    /// Jobs whose ack was acknowledged.
    acked: HashSet<String>,
    /// Of those, acked on a Consume stream that then ended OK.
    stream_acked: usize,
    /// Leased, ack not (yet) acknowledged.
    in_flight: HashSet<String>,
    /// Jobs of which an ack was refused as stale (the lease was lost: with a node, or
    /// with writes a failed-over Redis primary had not yet replicated), so the job may be
    /// delivered once more, even if that second delivery is acked before the end.
    refused_acks: HashSet<String>,
    /// Acknowledged publishes: sequence -> payload id.
    published: HashMap<u64, String>,
    violations: Vec<String>,
    /// Failed attempts per gRPC code (retried).
    errors: BTreeMap<String, u64>,
}

impl FailoverLedger {
    fn error(&mut self, e: &ClientError) {
        let code = e
            .code()
            .map_or("transport".to_owned(), |c| format!("{c:?}"));
        *self.errors.entry(code).or_default() += 1;
    }
}

/// Whether a failed request may be retried as is: the node or Redis was unreachable, or
/// the answer was lost (outcome unknown).
fn retryable(e: &ClientError) -> bool {
    !matches!(
        e.code(),
        Some(
            tonic::Code::InvalidArgument
                | tonic::Code::NotFound
                | tonic::Code::FailedPrecondition
                | tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
        )
    )
}

/// A client failing over between the nodes, each call with a deadline.
fn any_client(urls: &[String]) -> Client {
    Client::connect_any(urls.to_vec(), sluice::client::ConnectOptions::new()).unwrap()
}

/// Awaits `fut` for at most 5 s; a node killed mid-call must not hang the test.
async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Option<Result<T, ClientError>> {
    tokio::time::timeout(Duration::from_secs(5), fut).await.ok()
}

/// A worker's call as [`bounded`] ended: its value, or `None` when the worker should go
/// round again (a timeout, or a retryable failure, noted in the ledger after a short
/// pause). A refusal that no failover explains fails the test, naming `what`.
async fn or_retry<T>(
    ledger: &Mutex<FailoverLedger>,
    what: &str,
    outcome: Option<Result<T, ClientError>>,
) -> Option<T> {
    match outcome {
        Some(Ok(value)) => Some(value),
        Some(Err(e)) => {
            assert!(retryable(&e), "{what} refused: {e}");
            ledger.lock().unwrap().error(&e);
            tokio::time::sleep(Duration::from_millis(20)).await;
            None
        }
        None => None,
    }
}

/// Enqueues batches of 10 with idempotency keys until `stop`, retrying each batch with the
/// same keys until it is acknowledged (or `give_up` passes).
async fn ledger_producer(
    client: Client,
    name: &'static str,
    ledger: Arc<Mutex<FailoverLedger>>,
    stop: Arc<AtomicBool>,
    give_up: Instant,
) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<String> = (0..10)
            .map(|_| {
                n += 1;
                ledger_payload(name, n)
            })
            .collect();
        loop {
            let jobs = batch
                .iter()
                .map(|p| Job::new(p.clone()).idempotency_key(p.clone()))
                .collect();
            match bounded(client.enqueue_batch(LEDGER_QUEUE, jobs)).await {
                Some(Ok(results)) => {
                    let mut l = ledger.lock().unwrap();
                    for (r, p) in results.iter().zip(&batch) {
                        if let Some(earlier) = l.job_of.insert(p.clone(), r.job_id.clone())
                            && earlier != r.job_id
                        {
                            l.violations.push(format!(
                                "payload {p} acknowledged as job {earlier} and as job {}",
                                r.job_id
                            ));
                        }
                        l.enqueued.insert(r.job_id.clone(), p.clone());
                    }
                    break;
                }
                Some(Err(e)) if retryable(&e) => ledger.lock().unwrap().error(&e),
                Some(Err(e)) => panic!("enqueue refused: {e}"),
                None => {
                    *ledger
                        .lock()
                        .unwrap()
                        .errors
                        .entry("timeout".into())
                        .or_default() += 1
                }
            }
            if Instant::now() > give_up {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Leases and acks until `stop` (or, draining, until every acknowledged enqueue is acked
/// or `give_up` passes). An ack whose outcome is unknown is retried until acknowledged or
/// refused as stale (then the job stays in flight: it may come back).
async fn ledger_worker(
    client: Client,
    name: String,
    ledger: Arc<Mutex<FailoverLedger>>,
    stop: Arc<AtomicBool>,
    drain: bool,
    give_up: Instant,
) {
    loop {
        if Instant::now() > give_up || (!drain && stop.load(Ordering::Relaxed)) {
            return;
        }
        if drain {
            let l = ledger.lock().unwrap();
            if l.enqueued.keys().all(|id| l.acked.contains(id)) {
                return;
            }
        }
        let leased = bounded(
            client
                .lease(LEDGER_QUEUE)
                .max_jobs(20)
                .visibility_timeout(LEDGER_VISIBILITY)
                .wait(Duration::from_millis(200))
                .consumer(name.clone())
                .send(),
        )
        .await;
        let Some(leases) = or_retry(&ledger, "lease", leased).await else {
            continue;
        };
        if leases.is_empty() {
            continue;
        }
        {
            let mut l = ledger.lock().unwrap();
            for lease in &leases {
                let id = lease.job_id().to_owned();
                if l.acked.contains(&id) {
                    l.violations
                        .push(format!("job {id} delivered again after its ack"));
                }
                *l.deliveries.entry(id.clone()).or_default() += 1;
                l.in_flight.insert(id);
            }
        }
        let request = pb::AckRequest {
            acks: leases
                .iter()
                .map(|l| pb::LeaseAck {
                    lease_id: l.lease_id().to_owned(),
                    ..Default::default()
                })
                .collect(),
        };
        loop {
            let acked = bounded(async {
                client
                    .rpc()
                    .ack(request.clone())
                    .await
                    .map_err(ClientError::from)
            })
            .await;
            match acked {
                Some(Ok(_)) => {
                    let mut l = ledger.lock().unwrap();
                    for lease in &leases {
                        l.in_flight.remove(lease.job_id());
                        l.acked.insert(lease.job_id().to_owned());
                    }
                    break;
                }
                // Stale: an earlier attempt may have landed, or the lease was lost.
                Some(Err(e)) if !retryable(&e) => {
                    let mut l = ledger.lock().unwrap();
                    for lease in &leases {
                        l.refused_acks.insert(lease.job_id().to_owned());
                    }
                    break;
                }
                Some(Err(e)) => ledger.lock().unwrap().error(&e),
                None => {}
            }
            if Instant::now() > give_up {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How long a ledger Consume stream runs before it closes and opens another.
const CONSUME_SESSION: Duration = Duration::from_millis(300);

/// Consumes over Consume streams until `stop`, acking each job on the stream with fresh
/// credit. Each stream runs for about [`CONSUME_SESSION`], then asks for no more jobs, acks
/// what still comes, half-closes and reads to the end. A stream's acks have no answer of
/// their own: they count as acknowledged only when the stream then ends with OK (the node
/// confirms them on the replicas first). On any other end (a node or a Redis primary
/// killed, a refusal) they are uncertain and the jobs may come back, as may jobs received
/// and not acked.
async fn ledger_consume_worker(
    client: Client,
    name: String,
    ledger: Arc<Mutex<FailoverLedger>>,
    stop: Arc<AtomicBool>,
    give_up: Instant,
) {
    while !stop.load(Ordering::Relaxed) && Instant::now() < give_up {
        let first = pb::ConsumeRequest {
            queue: LEDGER_QUEUE.into(),
            consumer: name.clone(),
            visibility_timeout_ms: LEDGER_VISIBILITY.as_millis() as u64,
            credits: 10,
            ..Default::default()
        };
        let opened = bounded(async {
            open_consume(&mut client.rpc(), first)
                .await
                .map_err(ClientError::from)
        })
        .await;
        let Some((requests, mut inbound)) = or_retry(&ledger, "consume", opened).await else {
            continue;
        };
        let mut requests = Some(requests);
        let mut stopping = false;
        // Lease id -> job id, for the acks sent on this stream and not yet confirmed.
        let mut unconfirmed: HashMap<String, String> = HashMap::new();
        let closes_at = Instant::now() + CONSUME_SESSION;
        let ended_ok = loop {
            let wait = if stopping {
                Duration::from_millis(100)
            } else {
                closes_at.saturating_duration_since(Instant::now())
            };
            let message = match tokio::time::timeout(wait, inbound.message()).await {
                Ok(message) => message,
                // Nothing for a while: ask for no more jobs, then half-close.
                Err(_) if requests.is_some() => {
                    if stopping {
                        requests = None;
                    } else {
                        stopping = true;
                        let stop = pb::ConsumeRequest {
                            stop: true,
                            ..Default::default()
                        };
                        if requests.as_ref().unwrap().send(stop).await.is_err() {
                            break false;
                        }
                    }
                    continue;
                }
                // Half-closed and no end within the wait: the node is gone.
                Err(_) => match bounded(async { Ok(inbound.message().await) }).await {
                    Some(Ok(message)) => message,
                    _ => break false,
                },
            };
            let response = match message {
                Ok(Some(response)) => response,
                // Ended OK: only after a half-close does that confirm the acks.
                Ok(None) => break requests.is_none(),
                Err(status) => {
                    ledger.lock().unwrap().error(&ClientError::from(status));
                    break false;
                }
            };
            let mut acks = Vec::new();
            {
                let mut l = ledger.lock().unwrap();
                for refused in &response.errors {
                    if let Some(job) = unconfirmed.remove(&refused.lease_id) {
                        l.refused_acks.insert(job);
                    }
                }
                for job in &response.jobs {
                    if l.acked.contains(&job.job_id) {
                        l.violations
                            .push(format!("job {} delivered again after its ack", job.job_id));
                    }
                    *l.deliveries.entry(job.job_id.clone()).or_default() += 1;
                    l.in_flight.insert(job.job_id.clone());
                    if requests.is_some() {
                        unconfirmed.insert(job.lease_id.clone(), job.job_id.clone());
                        acks.push(pb::LeaseAck {
                            lease_id: job.lease_id.clone(),
                            ..Default::default()
                        });
                    }
                }
            }
            if let Some(sender) = &requests
                && !acks.is_empty()
            {
                let more = pb::ConsumeRequest {
                    credits: if stopping { 0 } else { acks.len() as u32 },
                    acks,
                    ..Default::default()
                };
                if sender.send(more).await.is_err() {
                    break false;
                }
            }
        };
        let mut l = ledger.lock().unwrap();
        for job in unconfirmed.into_values() {
            if ended_ok {
                l.in_flight.remove(&job);
                l.acked.insert(job);
                l.stream_acked += 1;
            } else {
                // Its ack may or may not have landed: the job may come back.
                l.refused_acks.insert(job);
            }
        }
    }
}

/// Publishes batches of 10 with idempotency keys until `stop`, retrying each batch with
/// the same keys until acknowledged.
async fn ledger_publisher(
    client: Client,
    topic: String,
    ledger: Arc<Mutex<FailoverLedger>>,
    stop: Arc<AtomicBool>,
    give_up: Instant,
) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<String> = (0..10)
            .map(|_| {
                n += 1;
                ledger_payload("pub", n)
            })
            .collect();
        loop {
            let messages = batch
                .iter()
                .map(|p| sluice::client::Message::new(p.clone()).idempotency_key(p.clone()))
                .collect();
            match bounded(client.publish_batch(&topic, messages)).await {
                Some(Ok(sequences)) => {
                    let mut l = ledger.lock().unwrap();
                    for (result, p) in sequences.into_iter().zip(&batch) {
                        let seq = result.sequence;
                        if let Some(other) = l.published.insert(seq, p.clone())
                            && &other != p
                        {
                            l.violations
                                .push(format!("sequence {seq} named {other} and {p}"));
                        }
                    }
                    break;
                }
                Some(Err(e)) if retryable(&e) => ledger.lock().unwrap().error(&e),
                Some(Err(e)) => panic!("publish refused: {e}"),
                None => {
                    *ledger
                        .lock()
                        .unwrap()
                        .errors
                        .entry("timeout".into())
                        .or_default() += 1
                }
            }
            if Instant::now() > give_up {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Three `sluice serve --storage redis --redis-replicas 1` processes over a 3+3 Redis
/// Cluster, with 2 producers, 3 workers and a publisher spread over them through
/// `connect_any`; at random moments the Redis primary of the queue's (and the topic's)
/// slot is SIGKILLed (its replica takes over; a new replica is then added, as an operator
/// would, since `--redis-replicas 1` refuses writes to a shard without one) and one Sluice
/// node is SIGKILLed. Then: every acknowledged enqueue is acked in the end, no acked job
/// is delivered again, duplicates are bounded by the leases in flight, every idempotency
/// key names one job, and every acknowledged publish is read back under its sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_of_a_redis_primary_and_a_sluice_node_loses_nothing_acknowledged() {
    let started = Instant::now();
    let seed = std::env::var("SLUICE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 1))
        .await
        .unwrap();
    let seeds = cluster.seeds();
    let victim = cluster.primary_for_key(&format!("{{q:{LEDGER_QUEUE}}}"));
    // The topic on the same shard, so the failover hits it too.
    let topic = (0..)
        .map(|i| format!("ledger-events-{i}"))
        .find(|t| cluster.primary_for_key(&format!("{{t:{t}}}")) == victim)
        .unwrap();

    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(SluiceProcess::start(&seeds).await);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let admin = Client::connect(urls[0].clone()).await.unwrap();
    // Every completed job stays readable, so an ack whose outcome the workers never
    // learned can be checked at the end (the default history keeps 1,000).
    admin
        .rpc()
        .create_queue(pb::CreateQueueRequest {
            name: LEDGER_QUEUE.into(),
            policy: Some(pb::QueuePolicy {
                history_limit: 100_000,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    admin
        .rpc()
        .create_topic(pb::CreateTopicRequest {
            name: topic.clone(),
            retention: Some(pb::RetentionPolicy {
                max_messages: 10_000_000,
                max_bytes: 1 << 30,
                max_age_ms: 0,
            }),
        })
        .await
        .unwrap();

    let ledger = Arc::new(Mutex::new(FailoverLedger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let give_up = Instant::now() + Duration::from_secs(40);
    let mut tasks = Vec::new();
    for name in ["p0", "p1"] {
        tasks.push(tokio::spawn(ledger_producer(
            any_client(&urls),
            name,
            ledger.clone(),
            stop.clone(),
            give_up,
        )));
    }
    for w in 0..2 {
        tasks.push(tokio::spawn(ledger_worker(
            any_client(&urls),
            format!("worker-{w}"),
            ledger.clone(),
            stop.clone(),
            false,
            give_up,
        )));
    }
    // A Consume worker too: its acks are confirmed on the replicas lazily.
    tasks.push(tokio::spawn(ledger_consume_worker(
        any_client(&urls),
        "consumer".into(),
        ledger.clone(),
        stop.clone(),
        give_up,
    )));
    tasks.push(tokio::spawn(ledger_publisher(
        any_client(&urls),
        topic.clone(),
        ledger.clone(),
        stop.clone(),
        give_up,
    )));

    // The Redis primary dies at a random moment; its replica takes over, and a new
    // replica joins the promoted one.
    tokio::time::sleep(Duration::from_millis(rng.u64(500..1500))).await;
    let before_redis_kill = ledger.lock().unwrap().enqueued.len();
    let redis_killed = Instant::now();
    let mut cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.kill(victim);
        cluster.wait_for_failover(victim, Duration::from_secs(20));
        cluster
    })
    .await
    .unwrap();
    let failed_over = redis_killed.elapsed();
    let promoted = cluster.primary_for_key(&format!("{{q:{LEDGER_QUEUE}}}"));
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.add_replica(promoted, Duration::from_secs(20));
        cluster
    })
    .await
    .unwrap();
    let replica_back = redis_killed.elapsed();

    // One Sluice node dies at a random moment; its clients go on through the others.
    tokio::time::sleep(Duration::from_millis(rng.u64(200..1000))).await;
    let before_node_kill = ledger.lock().unwrap().enqueued.len();
    let dead_node = rng.usize(0..nodes.len());
    nodes[dead_node].kill();
    tokio::time::sleep(Duration::from_millis(rng.u64(800..1500))).await;
    // Work goes on through the surviving nodes (a generous wait on a loaded machine).
    let progressed = Instant::now();
    while ledger.lock().unwrap().enqueued.len() < before_node_kill + 100
        && progressed.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before_stop = ledger.lock().unwrap().enqueued.len();

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // Leases received whose ack was not acknowledged (still in flight, or refused as
    // stale earlier in the run) may be delivered once more.
    let allowed_duplicates = {
        let mut l = ledger.lock().unwrap();
        let in_flight = std::mem::take(&mut l.in_flight);
        in_flight.union(&l.refused_acks).count()
    };

    // Drain through the surviving nodes: leases lost with an answer come back after
    // their visibility timeout.
    let living: Vec<String> = urls
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != dead_node)
        .map(|(_, u)| u.clone())
        .collect();
    let drain_until = Instant::now() + LEDGER_VISIBILITY + Duration::from_secs(10);
    ledger_worker(
        any_client(&living),
        "drain".into(),
        ledger.clone(),
        stop.clone(),
        true,
        drain_until,
    )
    .await;

    // Every acknowledged publish, replayed from sequence 1 on a surviving node.
    let reader = Client::connect(living[0].clone()).await.unwrap();
    let newest = ledger
        .lock()
        .unwrap()
        .published
        .keys()
        .max()
        .copied()
        .unwrap_or(0);
    let mut replayed: HashMap<u64, String> = HashMap::new();
    let mut stream = reader
        .subscribe(&topic)
        .start(StartAt::Sequence(1))
        .raw()
        .await
        .unwrap();
    let mut last = 0;
    while last < newest {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await
        else {
            break;
        };
        last = d.sequence;
        replayed.insert(d.sequence, String::from_utf8_lossy(&d.value).into_owned());
    }

    // An acknowledged enqueue the workers never saw acked may still have been completed
    // (an ack whose answer was lost, then refused as stale on retry): ask.
    let unacked: Vec<(String, String)> = {
        let l = ledger.lock().unwrap();
        l.enqueued
            .iter()
            .filter(|(id, _)| !l.acked.contains(*id))
            .map(|(id, p)| (id.clone(), p.clone()))
            .collect()
    };
    let mut lost: Vec<(String, pb::JobState)> = Vec::new();
    for (id, payload) in unacked {
        let state = reader
            .get_job(&id)
            .await
            .map_or(pb::JobState::Unspecified, |j| j.state());
        if state != pb::JobState::Completed {
            lost.push((payload, state));
        }
    }
    let l = ledger.lock().unwrap();
    let duplicates: u32 = l.deliveries.values().map(|n| n - 1).sum();
    // Retried publishes carry their idempotency keys, so the log has no holes either.
    let holes: Vec<u64> = (1..=last).filter(|s| !replayed.contains_key(s)).collect();
    let lost_publishes: Vec<u64> = l
        .published
        .iter()
        .filter(|(seq, p)| replayed.get(seq) != Some(p))
        .map(|(seq, _)| *seq)
        .collect();
    eprintln!(
        "failover ledger (seed {seed}, {:.1} s): Redis primary {victim} killed after {} \
         acknowledged enqueues, failed over in {:.1} s, new replica in sync after {:.1} s; \
         sluice node {dead_node} killed after {before_node_kill}; {before_stop} at stop; \
         {} enqueues acknowledged, {} jobs delivered, {} acks acknowledged ({} on Consume \
         streams), {duplicates} \
         duplicate deliveries (allowed {allowed_duplicates}), {} lost, {} violations; \
         {} publishes acknowledged, {} replayed ({} holes), {} lost; retried errors: {:?}",
        started.elapsed().as_secs_f64(),
        before_redis_kill,
        failed_over.as_secs_f64(),
        replica_back.as_secs_f64(),
        l.enqueued.len(),
        l.deliveries.len(),
        l.acked.len(),
        l.stream_acked,
        lost.len(),
        l.violations.len(),
        l.published.len(),
        replayed.len(),
        holes.len(),
        lost_publishes.len(),
        l.errors,
    );
    assert!(l.violations.is_empty(), "{:?}", l.violations);
    assert!(
        lost.is_empty(),
        "acknowledged enqueues not completed: {lost:?}"
    );
    assert!(
        duplicates as usize <= allowed_duplicates,
        "{duplicates} duplicates > {allowed_duplicates} leases whose ack was not acknowledged"
    );
    assert!(
        lost_publishes.is_empty(),
        "acknowledged publishes not read back under their sequence: {lost_publishes:?}"
    );
    assert!(
        before_stop >= before_node_kill + 100,
        "work went on after both kills"
    );
    assert!(
        holes.is_empty(),
        "sequences missing from the replay: {holes:?}"
    );
    assert!(l.enqueued.len() > 100, "too little work to mean anything");
    assert!(
        l.stream_acked > 50,
        "too few acks confirmed on Consume streams to mean anything"
    );
    assert!(l.published.len() > 50, "too few publishes to mean anything");
    drop(l);
    drop(nodes);
    drop(cluster);
}

// ---- Recurring schedules over a cluster ---------------------------------------------------

/// A 1 s schedule made on one node, with every node's sweep trying it (its state in the
/// queue's slot, its name and due index in the catalog's): one job per tick, on the
/// interval, listed and deleted from the other nodes.
async fn a_schedule_fires_once_per_tick_across_three_nodes([a, b, c]: [&Client; 3]) {
    use sluice::client::ScheduleSpec;
    let created = a
        .create_schedule(
            ScheduleSpec::every(Duration::from_secs(1))
                .name("cluster-beat")
                .queue("cluster-beats")
                .kind("beat"),
        )
        .await
        .unwrap();
    let jobs = within(async {
        loop {
            let jobs = b
                .rpc()
                .list_jobs(pb::ListJobsRequest {
                    queue: "cluster-beats".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .jobs;
            if jobs.len() >= 4 {
                return jobs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let mut ticks: Vec<u64> = jobs
        .iter()
        .map(|j| {
            j.idempotency_key
                .strip_prefix("schedule:cluster-beat:")
                .expect("a schedule's key")
                .parse()
                .unwrap()
        })
        .collect();
    ticks.sort_unstable();
    assert!(
        ticks.windows(2).all(|w| w[1] - w[0] == 1_000),
        "one job per tick, none skipped: {ticks:?}"
    );
    assert!(
        ticks
            .iter()
            .all(|t| (t - created.created_unix_ms) % 1_000 == 0)
    );
    let listed = c.list_schedules().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].fired >= 4);
    b.delete_schedule("cluster-beat").await.unwrap();
    assert!(a.list_schedules().await.unwrap().is_empty());
}

/// A node counts the requests of its own upkeep (the sweep) apart from those serving
/// clients, so a cost per job leaves the sweep out (S6 reports it per second per node):
/// an idle node's requests are all its sweep's, and serving clients adds to the other
/// count only.
#[tokio::test]
async fn a_nodes_sweep_requests_are_counted_apart_from_those_serving_clients() {
    let server = RedisServer::start();
    let node = Node::start(RedisConfig {
        sweep_interval: Duration::from_millis(10),
        ..RedisConfig::new(vec![server.url()])
    })
    .await;
    let client = node.client().await;
    client.enqueue("upkeep", "a").send().await.unwrap();
    let counts = || {
        let all = node.engine.redis_requests();
        let background = node.engine.redis_background_requests();
        (all - background, background)
    };
    // Let the first sweeps run, then watch an idle node.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (serving, swept) = counts();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (serving_idle, swept_idle) = counts();
    assert!(
        swept_idle >= swept + 5,
        "the sweep ran every 10 ms: {swept} then {swept_idle} requests"
    );
    assert_eq!(serving_idle, serving, "an idle node serves nobody");
    let mut leases = client.lease("upkeep").send().await.unwrap();
    assert_eq!(leases.len(), 1);
    leases.remove(0).ack().await.unwrap();
    let (serving_after, _) = counts();
    assert!(
        serving_after >= serving_idle + 2,
        "a lease and an ack are requests serving clients: {serving_idle} then {serving_after}"
    );
}

/// A Consume stream's acks are confirmed on the replica lazily, as the in-process engine's
/// are for fsync: with the replication link cut, a worker that acks with fresh credit
/// still gets its next job at once (no WAIT between an ack and the next lease); once the
/// stream would wait, it confirms the ack, and a confirm that cannot happen ends the
/// stream as UNAVAILABLE (the ack's outcome is unknown) instead of passing silently.
#[tokio::test]
async fn a_consume_stream_leases_on_while_its_acks_replicate_and_ends_when_they_cannot() {
    const QUEUE: &str = "lazy";
    let timeout = Duration::from_millis(1500);
    let (node, _primary, proxy, _replica) = node_with_proxied_replica(timeout).await;
    let client = node.client().await;
    let jobs = (0..3).map(|i| Job::new(format!("{i}"))).collect();
    client.enqueue_batch(QUEUE, jobs).await.unwrap();
    let mut consumer = client.consume(QUEUE).prefetch(1).open().await.unwrap();
    let first = within(consumer.next()).await.unwrap().unwrap();

    proxy.cut();
    let acked_at = Instant::now();
    first.ack().await.unwrap();
    let second = within(consumer.next()).await.unwrap().unwrap();
    let next_after = acked_at.elapsed();
    assert!(
        next_after < timeout,
        "the next job waited {next_after:?} for the ack's WAIT (timeout {timeout:?})"
    );
    assert_eq!(second.payload().as_ref(), b"1");

    // Holding `second` with no credit left, the stream would wait: it confirms the ack,
    // which cannot reach the replica.
    let end = within(consumer.next()).await;
    match end {
        Some(Err(e)) => assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}"),
        other => panic!("the stream went on without its ack on the replica: {other:?}"),
    }
    assert!(
        acked_at.elapsed() >= timeout / 2,
        "the stream ended after {:?}, before the WAIT could run out",
        acked_at.elapsed()
    );
    node.stop().await;
}

/// A Consume stream confirms its acks before it ends: a worker that acks with fresh credit
/// (the acks not yet confirmed, the next job already out) and then half-closes the stream
/// sees it end with UNAVAILABLE when the acks cannot reach the replica, not with OK.
#[tokio::test]
async fn a_consume_stream_confirms_its_acks_before_it_ends() {
    const QUEUE: &str = "lazy-end";
    let (node, _primary, proxy, _replica) =
        node_with_proxied_replica(Duration::from_millis(1000)).await;
    let client = node.client().await;
    let jobs = (0..3).map(|i| Job::new(format!("{i}"))).collect();
    client.enqueue_batch(QUEUE, jobs).await.unwrap();
    let first = pb::ConsumeRequest {
        queue: QUEUE.into(),
        credits: 1,
        ..Default::default()
    };
    let (requests, mut inbound) = open_consume(&mut client.rpc(), first).await.unwrap();
    let first = within(inbound.message()).await.unwrap().unwrap().jobs;
    assert_eq!(first.len(), 1);

    proxy.cut();
    requests
        .send(pb::ConsumeRequest {
            credits: 1,
            acks: vec![pb::LeaseAck {
                lease_id: first[0].lease_id.clone(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let next = within(inbound.message()).await.unwrap().unwrap().jobs;
    assert_eq!(
        next.len(),
        1,
        "the next job goes out before the ack is confirmed"
    );
    drop(requests);
    match within(inbound.message()).await {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status}"),
        Ok(end) => panic!("the stream ended without its ack on the replica: {end:?}"),
    }
    node.stop().await;
}

// ---- lease-ahead: Consume streams hold jobs for quick workers ------------------------------

/// A Consume stream's two ends, as `open_consume` returns them.
type ConsumeEnds = (
    tokio::sync::mpsc::Sender<pb::ConsumeRequest>,
    tonic::Streaming<pb::ConsumeResponse>,
);

/// Opens a Consume stream on `queue` with one credit.
async fn consume_one_at_a_time(client: &Client, queue: &str) -> ConsumeEnds {
    let first = pb::ConsumeRequest {
        queue: queue.into(),
        credits: 1,
        ..Default::default()
    };
    open_consume(&mut client.rpc(), first).await.unwrap()
}

/// The next jobs on `inbound` (panics on an error, an end, refusals or 5 s of silence).
async fn next_jobs(inbound: &mut tonic::Streaming<pb::ConsumeResponse>) -> Vec<pb::LeasedJob> {
    let message = within(inbound.message()).await.unwrap().unwrap();
    assert!(message.errors.is_empty(), "{:?}", message.errors);
    message.jobs
}

/// Acks `job` and asks for one more, as a quick worker does.
async fn ack_and_ask(
    requests: &tokio::sync::mpsc::Sender<pb::ConsumeRequest>,
    job: &pb::LeasedJob,
) {
    let ack = pb::ConsumeRequest {
        credits: 1,
        acks: vec![pb::LeaseAck {
            lease_id: job.lease_id.clone(),
            ..Default::default()
        }],
        ..Default::default()
    };
    requests.send(ack).await.unwrap();
}

/// Enqueues jobs with payloads `0..n` to `queue`.
async fn enqueue_numbered(client: &Client, queue: &str, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let jobs = chunk.iter().map(|i| Job::new(i.to_string())).collect();
        client.enqueue_batch(queue, jobs).await.unwrap();
    }
}

/// A private Redis, one node on it that leases up to `lease_ahead` jobs ahead, a client of
/// the node, and `jobs` jobs numbered from 0 waiting in `queue`.
async fn node_with_backlog(
    lease_ahead: usize,
    queue: &str,
    jobs: usize,
) -> (RedisServer, Node, Client) {
    let server = RedisServer::start();
    let node = Node::start(RedisConfig {
        lease_ahead,
        ..RedisConfig::new(vec![server.url()])
    })
    .await;
    let client = node.client().await;
    enqueue_numbered(&client, queue, jobs).await;
    (server, node, client)
}

/// The queue's Stats.
async fn queue_counts(client: &Client, queue: &str) -> pb::QueueStats {
    let stats = common::rpc::stats(&mut client.rpc()).await;
    common::rpc::queue_stats(&stats, queue).clone()
}

/// A worker on a Consume stream with one credit that acks each job and asks for the next
/// at once is served from jobs its node leased ahead: its next job needs no Redis round
/// trip. Each job still comes exactly once, in order, as a first attempt, and the
/// stream's end leaves nothing leased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_consume_worker_is_served_from_jobs_leased_ahead_each_once_in_order() {
    const QUEUE: &str = "ahead-quick";
    const JOBS: usize = 1_000;
    let (_server, node, client) =
        node_with_backlog(RedisConfig::DEFAULT_LEASE_AHEAD, QUEUE, JOBS).await;
    let requests_before = node.engine.redis_requests() - node.engine.redis_background_requests();

    let (requests, mut inbound) = consume_one_at_a_time(&client, QUEUE).await;
    let mut seen = Vec::with_capacity(JOBS);
    while seen.len() < JOBS {
        let jobs = next_jobs(&mut inbound).await;
        assert_eq!(jobs.len(), 1, "one credit, one job");
        let job = &jobs[0];
        assert_eq!(job.attempt, 1, "{job:?}");
        seen.push(String::from_utf8(job.payload.to_vec()).unwrap());
        ack_and_ask(&requests, job).await;
    }
    let expected: Vec<String> = (0..JOBS).map(|i| i.to_string()).collect();
    assert_eq!(seen, expected, "each job once, in order");
    drop(requests);
    let end = within(inbound.message()).await.unwrap();
    assert!(end.is_none(), "a half-closed stream ends OK: {end:?}");

    let (served_ahead, given_back) = node.engine.lease_ahead_counts();
    let serving =
        node.engine.redis_requests() - node.engine.redis_background_requests() - requests_before;
    println!(
        "{JOBS} jobs: {served_ahead} served from jobs leased ahead, {given_back} given back, \
         {serving} Redis requests"
    );
    assert!(
        served_ahead > 0,
        "the quick worker was served from jobs leased ahead"
    );
    let counts = queue_counts(&client, QUEUE).await;
    assert_eq!(
        (
            counts.completed,
            counts.leased,
            counts.pending,
            counts.failed
        ),
        (JOBS as u64, 0, 0, 0)
    );
    node.stop().await;
}

/// Serves `queue` to a quick worker until some jobs came from what the node leased ahead;
/// returns the last job, not acked.
async fn until_served_ahead(
    node: &Node,
    (requests, inbound): &mut ConsumeEnds,
    limit: usize,
) -> pb::LeasedJob {
    let before = node.engine.lease_ahead_counts().0;
    for _ in 0..limit {
        let mut jobs = next_jobs(inbound).await;
        assert_eq!(jobs.len(), 1, "one credit, one job");
        if node.engine.lease_ahead_counts().0 > before {
            return jobs.remove(0);
        }
        ack_and_ask(requests, &jobs[0]).await;
    }
    panic!("no job came from jobs leased ahead within {limit} jobs");
}

/// Jobs leased ahead go back, unleased and uncounted, whenever the worker does not take
/// them: after it stops asking for 50 ms, when the queue is paused (no more of them go
/// out), when it half-closes and when its connection drops. Each time the jobs held are
/// visible again as first attempts, nothing counts as failed, and the acks the worker sent
/// are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_leased_ahead_go_back_unleased_whenever_the_worker_does_not_take_them() {
    const QUEUE: &str = "ahead-back";
    const JOBS: usize = 3_000;
    let (_server, node, client) =
        node_with_backlog(RedisConfig::DEFAULT_LEASE_AHEAD, QUEUE, JOBS).await;
    let mut rpc = client.rpc();
    let mut acked = 0;
    // Counts the worker's acks so far from Stats (acks on a stream have no answer).
    let settled = |want_leased: u64| {
        let client = client.clone();
        async move {
            common::eventually_within(Duration::from_secs(5), || {
                let client = client.clone();
                async move {
                    let counts = queue_counts(&client, QUEUE).await;
                    if counts.leased == want_leased {
                        Ok(counts)
                    } else {
                        Err(format!("{} leased, want {want_leased}", counts.leased))
                    }
                }
            })
            .await
        }
    };

    // 1. The worker keeps its job and asks for nothing: the held jobs go back.
    let mut ends = consume_one_at_a_time(&client, QUEUE).await;
    let kept = until_served_ahead(&node, &mut ends, JOBS / 4).await;
    let counts = settled(1).await;
    acked += counts.completed;
    assert!(
        node.engine.lease_ahead_counts().1 > 0,
        "some were given back"
    );
    assert_eq!(counts.failed, 0, "{counts:?}");
    assert_eq!(
        counts.pending + counts.completed + 1,
        JOBS as u64,
        "{counts:?}"
    );

    // 2. It goes on quickly, then the queue is paused: the held jobs go back and no more
    // come, whatever credits the worker sends.
    ack_and_ask(&ends.0, &kept).await;
    let kept = until_served_ahead(&node, &mut ends, JOBS / 4).await;
    rpc.pause_queue(pb::PauseQueueRequest { name: QUEUE.into() })
        .await
        .unwrap();
    // Well within the 50 ms the held jobs would wait for a credit: the pause, not the
    // wait, sends them back.
    tokio::time::sleep(Duration::from_millis(20)).await;
    ack_and_ask(&ends.0, &kept).await;
    let late = tokio::time::timeout(Duration::from_millis(300), ends.1.message()).await;
    assert!(
        late.is_err(),
        "nothing goes out of a paused queue: {late:?}"
    );
    let counts = settled(0).await;
    assert_eq!(counts.failed, 0, "{counts:?}");
    rpc.resume_queue(pb::ResumeQueueRequest { name: QUEUE.into() })
        .await
        .unwrap();

    // 3. It goes on, then half-closes: held jobs back, its acks applied, the stream ends OK.
    let last = until_served_ahead(&node, &mut ends, JOBS / 4).await;
    ack_and_ask(&ends.0, &last).await;
    let (requests, mut inbound) = ends;
    drop(requests);
    // The answer to the last credit may still come before the end.
    loop {
        match within(inbound.message()).await {
            Ok(Some(message)) => {
                assert!(message.errors.is_empty(), "{:?}", message.errors)
            }
            Ok(None) => break,
            Err(status) => panic!("the stream ends OK: {status}"),
        }
    }
    // The jobs delivered after the last ack are put back as failed attempts (the worker
    // held them); none of the held-ahead ones count.
    let counts = settled(0).await;
    assert!(counts.completed > acked, "{counts:?}");
    let failed_by_close = counts.failed;
    assert!(
        failed_by_close <= 1,
        "only a job the worker held counts: {counts:?}"
    );

    // 4. A connection that drops while jobs are held ahead: the same, from the node.
    let other = node.client().await;
    let mut ends = consume_one_at_a_time(&other, QUEUE).await;
    let kept = until_served_ahead(&node, &mut ends, JOBS / 4).await;
    ack_and_ask(&ends.0, &kept).await;
    drop(ends);
    drop(other);
    let counts = settled(0).await;
    assert!(counts.failed <= failed_by_close + 1, "{counts:?}");

    // Whatever was given back comes again as a first attempt unless the worker held it.
    let mut first_attempts = 0;
    let mut again = 0;
    loop {
        let jobs = common::rpc::lease(&mut rpc, QUEUE, "checker", 500).await;
        if jobs.is_empty() {
            break;
        }
        for job in &jobs {
            if job.attempt == 1 {
                first_attempts += 1;
            } else {
                again += 1;
            }
        }
        common::rpc::ack(&mut rpc, &jobs).await;
    }
    let counts = queue_counts(&client, QUEUE).await;
    assert_eq!(counts.completed, JOBS as u64, "{counts:?}");
    // A job released by one stream's end may have been acked by the next stream already.
    assert!(
        again <= counts.failed,
        "only jobs a worker held come back as retries: {again} retries, {counts:?}"
    );
    assert!(first_attempts > 0);
    node.stop().await;
}

/// A worker that takes longer than a few Redis round trips per job gets no jobs held
/// ahead: it would gain little, and the jobs would wait on the node instead of going to
/// another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consume_worker_gets_no_jobs_held_ahead() {
    const QUEUE: &str = "ahead-slow";
    let (_server, node, client) =
        node_with_backlog(RedisConfig::DEFAULT_LEASE_AHEAD, QUEUE, 20).await;
    let (requests, mut inbound) = consume_one_at_a_time(&client, QUEUE).await;
    for _ in 0..10 {
        let jobs = next_jobs(&mut inbound).await;
        assert_eq!(jobs.len(), 1);
        tokio::time::sleep(Duration::from_millis(40)).await;
        ack_and_ask(&requests, &jobs[0]).await;
    }
    assert_eq!(node.engine.lease_ahead_counts(), (0, 0));
    let counts = queue_counts(&client, QUEUE).await;
    assert_eq!(
        counts.leased, 1,
        "only the worker's job is leased: {counts:?}"
    );
    node.stop().await;
}

/// `--redis-lease-ahead 0` leases only what the credits ask for, however quick the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_ahead_0_leases_only_what_the_credits_ask_for() {
    const QUEUE: &str = "ahead-off";
    let (_server, node, client) = node_with_backlog(0, QUEUE, 300).await;
    let (requests, mut inbound) = consume_one_at_a_time(&client, QUEUE).await;
    for _ in 0..300 {
        let jobs = next_jobs(&mut inbound).await;
        assert_eq!(jobs.len(), 1);
        ack_and_ask(&requests, &jobs[0]).await;
    }
    assert_eq!(node.engine.lease_ahead_counts(), (0, 0));
    node.stop().await;
}

/// A node SIGKILLed while it holds jobs leased ahead for a quick worker loses none of
/// them: they are leased in Redis, so they expire at their visibility timeout and come
/// again from another node (as a second attempt, as any lease of a dead node does), and
/// every job is completed in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_held_ahead_by_a_killed_node_come_back_after_their_visibility_timeout() {
    const QUEUE: &str = "ahead-kill";
    const JOBS: usize = 2_000;
    let (server, survivor, checker) =
        node_with_backlog(RedisConfig::DEFAULT_LEASE_AHEAD, QUEUE, JOBS).await;
    let mut doomed = SluiceProcess::start_with(&[server.url()], 0).await;
    let worker = Client::connect(doomed.url.clone()).await.unwrap();
    let first = pb::ConsumeRequest {
        queue: QUEUE.into(),
        credits: 1,
        visibility_timeout_ms: 1_000,
        ..Default::default()
    };
    let (requests, mut inbound) = open_consume(&mut worker.rpc(), first).await.unwrap();
    // Work quickly until the doomed node holds jobs beside the one its worker has.
    let mut leased_at_kill = 0;
    for n in 1..JOBS {
        let jobs = next_jobs(&mut inbound).await;
        if n % 10 == 0 {
            leased_at_kill = queue_counts(&checker, QUEUE).await.leased;
            if leased_at_kill > 1 {
                break;
            }
        }
        ack_and_ask(&requests, &jobs[0]).await;
    }
    assert!(leased_at_kill > 1, "the node never held jobs ahead");
    doomed.kill();

    // Another node's worker finishes the queue; what the dead node held comes back.
    let mut rpc = checker.rpc();
    let mut retries = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let drained = loop {
        let jobs = common::rpc::lease(&mut rpc, QUEUE, "survivor", 500).await;
        retries += jobs.iter().filter(|j| j.attempt > 1).count() as u64;
        if !jobs.is_empty() {
            common::rpc::ack(&mut rpc, &jobs).await;
        }
        let counts = queue_counts(&checker, QUEUE).await;
        if counts.completed == JOBS as u64 {
            break counts;
        }
        assert!(
            Instant::now() < deadline,
            "not every job completed: {counts:?}"
        );
        if jobs.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    println!("{leased_at_kill} leased when the node died; {retries} came again; {drained:?}");
    assert_eq!((drained.leased, drained.pending, drained.dead), (0, 0, 0));
    assert!(
        retries >= leased_at_kill,
        "the {leased_at_kill} jobs leased to the dead node came again: {retries} retries"
    );
    survivor.stop().await;
}

/// `sluice serve --storage redis --redis <seed>` on a free port, logging at the tests'
/// level.
fn node_command(seed: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--storage", "redis"])
        .args(["--redis", seed])
        .env("SLUICE_LOG", common::SERVE_LOG);
    cmd
}

/// A reader that keeps a copy of what is read through it.
struct Tee<R> {
    inner: R,
    copy: Arc<Mutex<Vec<u8>>>,
}

impl<R: std::io::Read> std::io::Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// What a node that refuses to start prints, stdout and stderr together.
fn refusal(mut cmd: std::process::Command) -> String {
    let out = cmd.output().expect("running the sluice binary");
    assert_eq!(out.status.code(), Some(1), "the node refuses to start");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A managed Redis needs a password, given in the `--redis` URL: the real binary serves
/// with it, and neither its log nor its refusal of a wrong one shows it.
#[tokio::test]
async fn the_binary_uses_a_redis_password_and_never_shows_it() {
    let server = RedisServer::start();
    server.config_set("requirepass", "s3cret-pw");
    let port = server.port;
    let node = SluiceProcess::spawn(node_command(&format!(
        "redis://:s3cret-pw@127.0.0.1:{port}"
    )))
    .await;
    let client = Client::connect(node.url.clone()).await.unwrap();
    client
        .enqueue("behind-a-password", "x")
        .send()
        .await
        .unwrap();
    let log = node.log();
    assert!(
        log.contains(&format!("redis://:***@127.0.0.1:{port}")),
        "{log}"
    );
    assert!(!log.contains("s3cret-pw"), "{log}");

    let text = refusal(node_command(&format!("redis://:wrong-pw@127.0.0.1:{port}")));
    assert!(!text.contains("wrong-pw"), "{text}");
    assert!(
        text.contains(&format!("redis://:***@127.0.0.1:{port}")),
        "{text}"
    );
    assert!(text.to_lowercase().contains("auth"), "{text}");

    // Given in the environment, `--help` does not show it either.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--help"])
        .env(
            "SLUICE_REDIS",
            format!("redis://:s3cret-pw@127.0.0.1:{port}"),
        )
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("SLUICE_REDIS"), "{help}");
    assert!(!help.contains("s3cret-pw"), "{help}");
}

/// A Redis that takes TLS only (as managed ones often do): a `rediss://` seed reaches it
/// when its certificate chains to a trusted root (the system's, or `SSL_CERT_FILE` for a
/// private CA), commands and the wake-up subscriber both; an untrusted certificate stops
/// the node at start, saying so.
#[tokio::test]
async fn the_binary_reaches_redis_over_tls() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sluice-redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p.to_string_lossy().into_owned()
    };
    let (ca_file, cert_file, key_file) = (
        path("ca.pem", ca.pem()),
        path("redis.pem", cert.pem()),
        path("redis.key", key.serialize_pem()),
    );
    let tls_port = sluice::broker::testing::redis::free_port().to_string();
    let _server = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert_file,
        "--tls-key-file",
        &key_file,
        "--tls-ca-cert-file",
        &ca_file,
        "--tls-auth-clients",
        "no",
    ]);
    let node_trusting = |ca: Option<&str>| {
        let mut cmd = node_command(&format!("rediss://127.0.0.1:{tls_port}"));
        cmd.env_remove("SSL_CERT_DIR").env_remove("SSL_CERT_FILE");
        if let Some(ca) = ca {
            cmd.env("SSL_CERT_FILE", ca);
        }
        cmd
    };

    let text = refusal(node_trusting(None)).to_lowercase();
    assert!(text.contains("certificate"), "{text}");
    // A scheme that does not match the server is refused naming the other one.
    let plain = refusal(node_command(&format!("redis://127.0.0.1:{tls_port}")));
    assert!(plain.contains("give rediss://"), "{plain}");
    let plain_server = RedisServer::start();
    let tls = refusal(node_command(&format!(
        "rediss://127.0.0.1:{}",
        plain_server.port
    )));
    assert!(tls.contains("give redis://"), "{tls}");

    let node = SluiceProcess::spawn(node_trusting(Some(&ca_file))).await;
    let client = Client::connect(node.url.clone()).await.unwrap();
    client
        .rpc()
        .create_queue(pb::CreateQueueRequest {
            name: "over-tls".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let poll = long_poll(&client, "over-tls", Duration::from_secs(10)).await;
    let job = client.enqueue("over-tls", "secret").send().await.unwrap();
    let leases = within(poll).await.unwrap().unwrap();
    assert_eq!(leases[0].job_id(), job.job_id);
    // The wake-up subscriber connected over TLS too (it would warn until it did).
    let log = node.log();
    assert!(!log.contains("wake-up subscriber"), "{log}");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Redis Cluster whose nodes need a password: the seeds' password reaches every node
/// the client discovers (queues on different shards), and the wake-up subscriber's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_protected_cluster_serves_every_shard() {
    let cluster = RedisCluster::start(3, 0);
    // Enough queues that every shard holds some (asked before the password is set).
    let queues: Vec<String> = (0..12).map(|i| format!("pw-{i}")).collect();
    let shards: HashSet<u16> = queues
        .iter()
        .map(|q| cluster.primary_for_key(&format!("sluice:{{q:{q}}}")))
        .collect();
    assert_eq!(shards.len(), 3, "the queues span every shard");
    for port in cluster.primaries() {
        let _: String = redis_cmd(port, &["CONFIG", "SET", "requirepass", "s3cret-pw"]).await;
    }
    let seeds: Vec<String> = cluster
        .seeds()
        .iter()
        .map(|s| s.replacen("redis://", "redis://:s3cret-pw@", 1))
        .collect();
    let node = Node::start(RedisConfig::new(seeds)).await;
    let client = node.client().await;
    for q in &queues {
        let job = client.enqueue(q, "x").send().await.unwrap();
        let mut leased = client.lease(q).send().await.unwrap();
        let lease = leased.pop().expect("the job is leased");
        assert_eq!(lease.job_id(), job.job_id, "{q}");
        lease.ack().await.unwrap();
    }
    // A long poll is woken by the (authenticated) subscriber.
    let poll = long_poll(&client, &queues[0], Duration::from_secs(10)).await;
    let job = client.enqueue(&queues[0], "wake").send().await.unwrap();
    let leases = within(poll).await.unwrap().unwrap();
    assert_eq!(leases[0].job_id(), job.job_id);
    node.stop().await;
}

/// A Redis that may evict keys under memory pressure would drop acknowledged jobs
/// silently: the real binary refuses to start on one, naming the policy and the fix; and
/// when a running node's Redis is switched to evicting, the node's log says so within a
/// few slow sweeps (and says when it is fixed).
#[tokio::test]
async fn the_binary_refuses_a_redis_that_evicts_keys() {
    let server = RedisServer::start();
    server.config_set("maxmemory-policy", "allkeys-lru");
    let text = refusal(node_command(&server.url()));
    assert!(text.contains("maxmemory-policy is allkeys-lru"), "{text}");
    assert!(text.contains("noeviction"), "{text}");

    server.config_set("maxmemory-policy", "noeviction");
    let node = SluiceProcess::spawn(node_command(&server.url())).await;
    let client = Client::connect(node.url.clone()).await.unwrap();
    client.enqueue("kept", "x").send().await.unwrap();
    server.config_set("maxmemory-policy", "volatile-lru");
    logged(&node, "maxmemory-policy is volatile-lru").await;
    server.config_set("maxmemory-policy", "noeviction");
    logged(&node, "noeviction again").await;
}

/// Waits up to 10 s for `node`'s log to hold `what`.
async fn logged(node: &SluiceProcess, what: &str) {
    common::eventually(|| async {
        let log = node.log();
        match log.contains(what) {
            true => Ok(()),
            false => Err(format!("the log does not say {what:?} yet: {log}")),
        }
    })
    .await
}

/// A queue a node knows can vanish under it: deleted through another node, or lost with
/// Redis's data (a restart without persistence). Nothing was stored by the enqueue that
/// finds it gone, so the node makes the queue again and enqueues, as a first use would,
/// instead of refusing the request.
#[tokio::test]
async fn an_enqueue_to_a_queue_that_vanished_makes_it_again() {
    let server = RedisServer::start();
    let config = || RedisConfig::new(vec![server.url()]);
    let (a, b) = (Node::start(config()).await, Node::start(config()).await);
    let (a_client, b_client) = (a.client().await, b.client().await);
    a_client.enqueue("vanishing", "one").send().await.unwrap();

    b_client
        .rpc()
        .delete_queue(pb::DeleteQueueRequest {
            name: "vanishing".into(),
        })
        .await
        .unwrap();
    a_client.enqueue("vanishing", "two").send().await.unwrap();
    let leased = b_client
        .lease("vanishing")
        .max_jobs(10)
        .send()
        .await
        .unwrap();
    assert_eq!(leased.len(), 1, "only the job enqueued after the delete");
    assert_eq!(&leased[0].payload()[..], b"two");
    b_client.ack_batch(leased).await.unwrap();

    // Redis loses everything, its functions library too.
    let () = redis_cmd(server.port, &["FLUSHALL"]).await;
    let () = redis_cmd(server.port, &["FUNCTION", "FLUSH"]).await;
    a_client.enqueue("vanishing", "three").send().await.unwrap();
    let leased = a_client
        .lease("vanishing")
        .max_jobs(10)
        .send()
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(&leased[0].payload()[..], b"three");
    a_client.ack_batch(leased).await.unwrap();
    a.stop().await;
    b.stop().await;
}

/// Redis dies under a serving node and comes back empty (no persistence): while it is
/// down requests are UNAVAILABLE naming Redis, within a bounded time, and streams and
/// long polls end or answer rather than hang; once it is back the same node serves
/// again without a restart, its queues made again on first use.
#[tokio::test]
async fn a_node_serves_again_after_its_redis_restarts_empty() {
    let mut server = RedisServer::start();
    let node = Node::start(RedisConfig::new(vec![server.url()])).await;
    let client = node.client().await;
    client.enqueue("phoenix", "before").send().await.unwrap();
    let mut rpc = client.rpc();
    let (_tx, mut consume) =
        common::rpc::consume_with_credits(&mut rpc, "phoenix-stream", 10).await;
    let poll = long_poll(&client, "phoenix-poll", Duration::from_secs(20)).await;

    server.kill();
    let started = Instant::now();
    let err = client.enqueue("phoenix", "down").send().await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
    assert!(err.to_string().contains("redis"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let status = within(consume.message())
        .await
        .expect_err("the consume stream ends with an error");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    let err = within(poll)
        .await
        .unwrap()
        .expect_err("the long poll fails");
    assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");

    server.restart();
    common::eventually(|| client.enqueue("phoenix", "after").send()).await;
    // What Redis held is gone with it (no persistence: README, "What survives what").
    let leased = client.lease("phoenix").max_jobs(10).send().await.unwrap();
    let payloads: Vec<_> = leased.iter().map(|l| l.payload().clone()).collect();
    assert_eq!(payloads, [&b"after"[..]]);
    client.ack_batch(leased).await.unwrap();
    let (_tx, mut consume) =
        common::rpc::consume_with_credits(&mut rpc, "phoenix-stream", 10).await;
    client
        .enqueue("phoenix-stream", "streamed")
        .send()
        .await
        .unwrap();
    let jobs = next_jobs(&mut consume).await;
    assert_eq!(&jobs[0].payload[..], b"streamed");
    node.stop().await;
}

/// `--max-queues` holds across nodes: three nodes creating queues at once (first
/// enqueues to distinct names) make no more than the limit between them, as one node would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_queues_holds_across_nodes_creating_at_once() {
    let server = RedisServer::start();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let mut config = RedisConfig::new(vec![server.url()]);
        config.limits.max_queues = 8;
        nodes.push(Node::start(config).await);
    }
    let mut tasks = Vec::new();
    for i in 0..45 {
        let client = nodes[i % 3].client().await;
        tasks.push(tokio::spawn(async move {
            client.enqueue(&format!("race-{i}"), "x").send().await
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(err) => assert_eq!(err.code(), Some(tonic::Code::ResourceExhausted), "{err}"),
        }
    }
    // Each queue takes two places: itself and its dead-letter queue.
    assert_eq!(accepted, 4);
    let queues = nodes[1]
        .client()
        .await
        .rpc()
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap()
        .into_inner()
        .queues;
    assert_eq!(queues.len(), 4, "{queues:?}");
    for node in nodes {
        node.stop().await;
    }
}

/// A node starts and serves while the first of its cluster seeds is down (a Redis node
/// that died, as one of a list of seeds may have): its commands and its wake-up
/// subscriber both reach the cluster through the seeds that answer.
#[tokio::test]
async fn a_node_starts_while_its_first_seed_is_down() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
        .await
        .unwrap();
    let mut seeds = vec![format!(
        "redis://127.0.0.1:{}",
        sluice::broker::testing::redis::free_port()
    )];
    seeds.extend(cluster.seeds());
    let node = Node::start(RedisConfig::new(seeds)).await;
    let client = node.client().await;
    let poll = long_poll(&client, "first-seed-down", Duration::from_secs(10)).await;
    client.enqueue("first-seed-down", "x").send().await.unwrap();
    let leased = within(poll).await.unwrap().unwrap();
    assert_eq!(leased.len(), 1);
    node.stop().await;
}
