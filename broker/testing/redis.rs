//! `redis-server` processes for tests: each on a free loopback port with its own
//! directory, stopped by PID when dropped. Tests never touch a Redis they did not start
//! (in particular not the one on 6379).
//!
//! [`RedisServer`] is one server; [`RedisCluster`] is a Redis Cluster of such servers
//! (primaries and their replicas) that a test can crash a primary of and watch fail over.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `redis-server` process. Dropping it kills it (SIGKILL by PID) and removes its
/// directory.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    /// The `redis-server` arguments after the common ones (for [`RedisServer::restart`]).
    extra: Vec<String>,
}

/// A port nobody listens on right now (the OS picks it; it is free again once the
/// probe closes).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl RedisServer {
    /// Starts a standalone server (no persistence) and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `--replicaof 127.0.0.1
    /// <port>`).
    pub fn start_with(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_in(|_| extra.clone())
    }

    /// Starts a server whose extra arguments depend on its own directory (a cluster
    /// node's `nodes.conf` goes there), chosen afresh on each try.
    fn start_in(extra: impl Fn(&Path) -> Vec<String>) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let dir =
                std::env::temp_dir().join(format!("sluice-redis-{}-{port}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("a directory for redis-server");
            let extra = extra(&dir);
            let mut server = Self {
                child: Some(spawn(port, &dir, &extra)),
                port,
                dir,
                extra,
            };
            if server.wait_ready(Duration::from_secs(10)) {
                return server;
            }
            // Lost the port to someone else between the probe and the bind: try another.
            server.kill();
        }
        panic!("redis-server did not start on a free port in 5 tries");
    }

    /// Starts the server again on the same port, directory and arguments, after a
    /// [`RedisServer::kill`] (it is killed first if still running): empty without
    /// persistence, as a restarted Redis that kept nothing; with the AOF on, with what it
    /// wrote. Waits until it answers PING.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn(self.port, &self.dir, &self.extra));
        assert!(
            self.wait_ready(Duration::from_secs(10)),
            "redis-server restarts on port {}",
            self.port
        );
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if !self.is_running() {
                return false;
            }
            if cli(self.port, &["PING"]).is_some_and(|o| o.starts_with("PONG")) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Whether the process is still alive (not killed, not exited).
    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `CONFIG SET <name> <value>` on this server (e.g. `maxmemory` to make it refuse
    /// writes); panics if the server refuses it.
    pub fn config_set(&self, name: &str, value: &str) {
        config_set(self.port, name, value);
    }

    /// Makes this server unable to persist, as a full or lost disk would: it gets a save
    /// point, its directory goes away and a snapshot fails, so from then on it refuses
    /// writes with `MISCONF` (`stop-writes-on-bgsave-error`, on by default) and still
    /// answers reads. Returns once a write is refused.
    pub fn fail_persistence(&self) {
        self.config_set("save", "3600 1");
        let _ = std::fs::remove_dir_all(&self.dir);
        cli(self.port, &["BGSAVE"]);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let reply = cli(self.port, &["SET", "sluice-test-probe", "1"]).unwrap_or_default();
            if reply.starts_with("MISCONF") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis on port {} still accepts writes", self.port);
    }

    /// Kills the process now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-server` on `port` without persistence, in `dir`, with `extra` arguments.
fn spawn(port: u16, dir: &Path, extra: &[String]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        // Later arguments override earlier ones, so `extra` may turn on the AOF.
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed and on PATH")
}

/// `CONFIG SET <name> <value>` on the server at `port`; panics if it refuses.
fn config_set(port: u16, name: &str, value: &str) {
    let reply = cli(port, &["CONFIG", "SET", name, value]);
    assert!(
        reply.as_deref().is_some_and(|r| r.starts_with("OK")),
        "CONFIG SET {name} {value} on port {port}: {reply:?}"
    );
}

/// `redis-cli -p <port> <args>`: its stdout, or `None` when it could not run or failed.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The number of hash slots of a Redis Cluster.
const SLOTS: u32 = 16384;

/// A Redis Cluster on loopback: `primaries` primaries with `replicas_per_primary` replicas
/// each, every one a [`RedisServer`] with the AOF on and its own `nodes.conf`. Dropping it
/// kills every process by PID and removes their directories.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    port: u16,
    primary: bool,
    failed: bool,
    /// Slot ranges, inclusive.
    slots: Vec<(u32, u32)>,
}

/// Parses `CLUSTER NODES`: per line a node's id, `ip:port@cport`, flags, primary, ping,
/// pong, epoch, link state and the slots it owns. Importing / migrating entries (`[...]`) are not owned slots.
fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let addr = fields.get(1)?;
            let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = fields.get(2)?;
            let slots = fields
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(NodeLine {
                port,
                primary: flags.contains("master"),
                failed: flags.contains("fail") && !flags.contains("fail?"),
                slots,
            })
        })
        .collect()
}

impl RedisCluster {
    /// Starts `primaries` primaries (at least 3, as a cluster needs a majority of primaries
    /// to fail one over) with `replicas_per_primary` replicas each, creates the cluster with
    /// `redis-cli --cluster create`, and waits until every node says `cluster_state:ok`,
    /// every slot is served and every replica is in sync with its primary.
    pub fn start(primaries: usize, replicas_per_primary: usize) -> Self {
        assert!(primaries >= 3, "a Redis Cluster needs at least 3 primaries");
        let total = primaries * (1 + replicas_per_primary);
        let nodes: Vec<RedisServer> = (0..total).map(|_| Self::start_node()).collect();
        let cluster = Self { nodes };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas_per_primary.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli is installed and on PATH");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_until(
            Duration::from_secs(30),
            "the new cluster to be ready",
            |c| c.healthy() && c.replicas_in_sync(replicas_per_primary),
        );
        cluster
    }

    /// One cluster-enabled server, not yet part of any cluster.
    fn start_node() -> RedisServer {
        RedisServer::start_in(|dir| {
            vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                dir.join("nodes.conf").display().to_string(),
                // Failures are detected after 1 s, so a failover test takes seconds.
                "--cluster-node-timeout".into(),
                "1000".into(),
                // The bus port is chosen explicitly (Redis 7.0): the default,
                // port + 10000, can be taken or above 65535 for an ephemeral port.
                "--cluster-port".into(),
                free_port().to_string(),
                "--appendonly".into(),
                "yes".into(),
            ]
        })
    }

    /// Starts a new node and makes it a replica of the primary on `primary_port` (as an
    /// operator replaces a crashed node: after a failover the promoted replica has no
    /// replica of its own). Waits (at most `limit`, else panics) until the new replica is
    /// in sync and every living node says `cluster_state:ok`; returns its port.
    pub fn add_replica(&mut self, primary_port: u16, limit: Duration) -> u16 {
        let node = Self::start_node();
        let port = node.port;
        self.nodes.push(node);
        let id = cli(primary_port, &["CLUSTER", "MYID"])
            .map(|s| s.trim().to_owned())
            .expect("CLUSTER MYID answers");
        let bus = cli(primary_port, &["CONFIG", "GET", "cluster-port"])
            .and_then(|s| s.lines().nth(1).map(str::to_owned))
            .expect("CONFIG GET cluster-port answers");
        let met = cli(
            port,
            &[
                "CLUSTER",
                "MEET",
                "127.0.0.1",
                &primary_port.to_string(),
                &bus,
            ],
        );
        assert!(
            met.as_deref().is_some_and(|s| s.starts_with("OK")),
            "CLUSTER MEET: {met:?}"
        );
        // REPLICATE needs the new node to know the primary (the handshake takes a moment).
        self.wait_until(limit, "the new node to replicate the primary", |_| {
            cli(port, &["CLUSTER", "REPLICATE", &id]).is_some_and(|s| s.starts_with("OK"))
        });
        self.wait_until(limit, "the new replica to be in sync", |c| {
            cli(port, &["INFO", "replication"]).is_some_and(|i| i.contains("master_link_status:up"))
                && c.healthy()
        });
        port
    }

    /// `redis://127.0.0.1:<port>` of every node still running, primaries and replicas.
    pub fn seeds(&self) -> Vec<String> {
        self.living()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// `CONFIG SET <name> <value>` on the cluster's node at `port` only (nodes keep their
    /// own configuration); panics if it refuses.
    pub fn config_set(&self, port: u16, name: &str, value: &str) {
        config_set(port, name, value);
    }

    /// The ports of the primaries that serve slots now (as a living node sees them).
    pub fn primaries(&self) -> Vec<u16> {
        self.view()
            .into_iter()
            .filter(|n| n.primary && !n.failed && !n.slots.is_empty())
            .map(|n| n.port)
            .collect()
    }

    /// The port of the primary that serves `key`'s slot now (`CLUSTER KEYSLOT`, then the
    /// slot's owner in `CLUSTER NODES`).
    pub fn primary_for_key(&self, key: &str) -> u16 {
        let port = self.living_port();
        let slot: u32 = cli(port, &["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.trim().parse().ok())
            .expect("CLUSTER KEYSLOT answers a number");
        self.view()
            .into_iter()
            .find(|n| {
                n.primary && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no primary serves slot {slot} of key {key:?}"))
    }

    /// Kills the node on `port` (SIGKILL by PID), as a crash would.
    pub fn kill(&mut self, port: u16) {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port}"))
            .kill();
    }

    /// Waits (at most `limit`, else panics) until the primary on `dead_port` serves no
    /// slot any more (a replica took them over), every slot is served by a living primary
    /// and every living node says `cluster_state:ok`.
    pub fn wait_for_failover(&mut self, dead_port: u16, limit: Duration) {
        self.wait_until(
            limit,
            "a replica to take over the dead primary's slots",
            |c| {
                let view = c.view();
                let dead_serves = view
                    .iter()
                    .any(|n| n.port == dead_port && n.primary && !n.slots.is_empty());
                !dead_serves && c.healthy()
            },
        );
    }

    /// Polls `ready` every 50 ms for at most `limit`; panics naming `what` and the cluster's
    /// view when it never holds.
    fn wait_until(&self, limit: Duration, what: &str, ready: impl Fn(&Self) -> bool) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if ready(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let view = cli(self.living_port(), &["CLUSTER", "NODES"]).unwrap_or_default();
        panic!("waited {limit:?} for {what}; CLUSTER NODES:\n{view}");
    }

    /// Every living node says `cluster_state:ok` and every slot is served by a primary
    /// that is not marked failed.
    fn healthy(&self) -> bool {
        let all_ok = self.living().all(|port| {
            cli(port, &["CLUSTER", "INFO"]).is_some_and(|info| {
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_slots_ok:{SLOTS}"))
            })
        });
        if !all_ok {
            return false;
        }
        let mut covered = BTreeSet::new();
        for node in self.view() {
            if node.primary && !node.failed {
                for (a, b) in node.slots {
                    covered.extend(a..=b);
                }
            }
        }
        covered.len() == SLOTS as usize
    }

    /// Every primary has `replicas` replicas whose link to it is up (so a failover finds a
    /// replica with the data).
    fn replicas_in_sync(&self, replicas: usize) -> bool {
        self.living().all(|port| {
            let Some(info) = cli(port, &["INFO", "replication"]) else {
                return false;
            };
            if info.contains("role:master") {
                // `slaveN:ip=...,state=online,...` lines: count the online ones.
                let online = info
                    .lines()
                    .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                    .count();
                online == replicas
            } else {
                info.contains("master_link_status:up")
            }
        })
    }

    /// `CLUSTER NODES` as the first living node sees it.
    fn view(&self) -> Vec<NodeLine> {
        cli(self.living_port(), &["CLUSTER", "NODES"])
            .map(|t| parse_nodes(&t))
            .unwrap_or_default()
    }

    /// The ports of the nodes not killed.
    fn living(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
    }

    fn living_port(&self) -> u16 {
        self.living()
            .next()
            .expect("a node of the cluster still runs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// 3 primaries + 3 replicas: keys written on every shard (and confirmed on its replica
    /// with WAIT) are all read back through a cluster client after one primary crashed
    /// and its replica took over.
    #[test]
    fn a_cluster_fails_a_crashed_primary_over_and_keeps_its_keys() {
        let mut cluster = RedisCluster::start(3, 1);
        assert_eq!(cluster.seeds().len(), 6);
        let primaries = cluster.primaries();
        assert_eq!(primaries.len(), 3, "three primaries serve slots");

        // Ten keys per shard, each written on the primary that owns it.
        let mut by_primary: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        let mut i = 0;
        while by_primary.values().map(Vec::len).sum::<usize>() < 30 {
            let key = format!("key-{i}");
            i += 1;
            let owner = cluster.primary_for_key(&key);
            let keys = by_primary.entry(owner).or_default();
            if keys.len() < 10 {
                keys.push(key);
            }
        }
        assert_eq!(by_primary.len(), 3, "every shard holds keys");
        for (&port, keys) in &by_primary {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
            let mut conn = client.get_connection().unwrap();
            for key in keys {
                let _: () = redis::cmd("SET")
                    .arg(key)
                    .arg(key)
                    .query(&mut conn)
                    .unwrap();
            }
            // The replica has them before the crash (replication is asynchronous).
            let acked: i64 = redis::cmd("WAIT")
                .arg(1)
                .arg(5000)
                .query(&mut conn)
                .unwrap();
            assert_eq!(acked, 1, "the replica of {port} confirms the writes");
        }

        let victim = primaries[0];
        cluster.kill(victim);
        cluster.wait_for_failover(victim, Duration::from_secs(30));
        let now = cluster.primaries();
        assert_eq!(now.len(), 3, "a replica replaced the dead primary");
        assert!(!now.contains(&victim));
        let moved = cluster.primary_for_key(&by_primary[&victim][0]);
        assert_ne!(moved, victim);

        let client = redis::cluster::ClusterClient::new(cluster.seeds()).unwrap();
        let mut conn = client.get_connection().unwrap();
        for keys in by_primary.values() {
            for key in keys {
                let value: Option<String> = redis::cmd("GET").arg(key).query(&mut conn).unwrap();
                assert_eq!(value.as_deref(), Some(key.as_str()), "key {key}");
            }
        }
    }
}
