//! The admin CLI, run as the real `sluice` binary against a broker served in-process,
//! checking its human tables and its `--json` output.

#[path = "ops_common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::process::Output;
use std::time::Duration;

use bytes::Bytes;
use common::Harness;
use common::test_broker::{SERVE_LOG, eventually, serve_addrs};
use serde_json::Value;
use sluice::pb;

/// Runs `sluice <args>` with `SLUICE_SERVER` pointing at the harness.
async fn sluice(h: &Harness, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env("SLUICE_SERVER", h.url())
        .env_remove("SLUICE_JSON")
        .env("SLUICE_LOG", "warn")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap_or_else(|_| panic!("sluice {args:?} did not finish"))
        .expect("run the sluice binary")
}

/// Runs a command that must succeed; returns its stdout.
async fn ok(h: &Harness, args: &[&str]) -> String {
    let out = sluice(h, args).await;
    assert!(
        out.status.success(),
        "sluice {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Runs a `--json` command; returns its single JSON document.
async fn json(h: &Harness, args: &[&str]) -> Value {
    let text = ok(h, args).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("sluice {args:?}: bad JSON {e}: {text}"))
}

/// The rows of a human table as header -> cell maps. Headers are single words; the last
/// column (a payload) may contain spaces.
fn table(text: &str) -> Vec<HashMap<String, String>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .expect("a header line")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    lines
        .map(|line| {
            let mut cells: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            assert!(
                cells.len() >= header.len(),
                "row {line:?} has fewer cells than {header:?}"
            );
            let last = cells.split_off(header.len() - 1).join(" ");
            cells.push(last);
            header.iter().cloned().zip(cells).collect()
        })
        .collect()
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_produces_consumes_and_reports() {
    let h = Harness::start(200).await;

    // enqueue: human and JSON, with and without an idempotency key.
    let out = ok(
        &h,
        &[
            "enqueue",
            "ops.cli",
            "hello",
            "--kind",
            "greet",
            "--priority",
            "3",
        ],
    )
    .await;
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words[..2], ["enqueued", "job"]);
    assert!(is_uuid(words[2]), "{out}");
    assert_eq!(words[3..], ["in", "ops.cli"]);
    let keyed = [
        "enqueue",
        "ops.cli",
        "second",
        "--idempotency-key",
        "k1",
        "--json",
    ];
    let first = json(&h, &keyed).await;
    assert_eq!(first["duplicate"], false);
    let again = json(&h, &keyed).await;
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["job_id"], first["job_id"]);
    ok(
        &h,
        &[
            "enqueue",
            "ops.cli",
            "third",
            "--header",
            "content-type=text/plain",
        ],
    )
    .await;
    ok(&h, &["enqueue", "ops.cli", "later", "--delay-ms", "600000"]).await;

    // queues: the table and the JSON agree with what was enqueued.
    let rows = table(&ok(&h, &["queues"]).await);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["QUEUE"], "ops.cli");
    assert_eq!(row["PENDING"], "3");
    assert_eq!(row["SCHEDULED"], "1");
    assert_eq!(row["LEASED"], "0");
    assert_eq!(row["STATUS"], "active");
    let queues = json(&h, &["queues", "--json"]).await;
    let q = &queues["queues"][0];
    assert_eq!(q["name"], "ops.cli");
    assert_eq!(q["policy"]["dead_letter_queue"], "ops.cli.dlq");
    assert_eq!(q["stats"]["pending"], 3);
    assert_eq!(q["stats"]["enqueued"], 4);

    // limit: set on the queue, shown in the table and the JSON, removed with zeros.
    let out = ok(
        &h,
        &["limit", "ops.cli", "--rate", "10", "--max-in-flight", "3"],
    )
    .await;
    assert_eq!(out.trim(), "ops.cli: 10/s burst 10, 3 in flight");
    let rows = table(&ok(&h, &["queues"]).await);
    assert_eq!(rows[0]["LIMITS"], "10/s burst 10, 3 in flight");
    let queues = json(&h, &["queues", "--json"]).await;
    let q = &queues["queues"][0];
    assert_eq!(q["policy"]["limits"]["rate_limit"]["burst"], 10);
    assert_eq!(q["stats"]["max_in_flight"], 3);
    assert_eq!(q["stats"]["rate_limit_per_second"], 10);
    let removed = json(
        &h,
        &[
            "limit",
            "ops.cli",
            "--rate",
            "0",
            "--max-in-flight",
            "0",
            "--json",
        ],
    )
    .await;
    assert_eq!(removed["limits"]["rate_limit"], Value::Null);
    assert_eq!(removed["limits"]["max_in_flight"], Value::Null);

    // lease --ack: the priority-3 job first, then FIFO.
    let out = ok(
        &h,
        &[
            "lease",
            "ops.cli",
            "--max",
            "2",
            "--ack",
            "--consumer",
            "cli-worker",
        ],
    )
    .await;
    assert!(out.ends_with("acked 2 job(s)\n"), "{out}");
    let rows = table(out.trim_end_matches("acked 2 job(s)\n"));
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["KIND"], "greet");
    assert_eq!(rows[0]["PAYLOAD"], "hello");
    assert_eq!(rows[0]["PRIO"], "3");
    assert_eq!(rows[1]["PAYLOAD"], "second");
    let leased = json(&h, &["lease", "ops.cli", "--json"]).await;
    let jobs = leased["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["payload"], "third");
    assert_eq!(jobs[0]["headers"]["content-type"], "text/plain");
    assert_eq!(jobs[0]["attempt"], 1);
    assert_eq!(jobs[0]["acked"], false);
    let empty = ok(&h, &["lease", "ops.cli"]).await;
    assert_eq!(empty, "no job visible in ops.cli\n");

    // consumers: who did what.
    let consumers = json(&h, &["consumers", "ops.cli", "--json"]).await;
    let by_name: HashMap<&str, &Value> = consumers["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c))
        .collect();
    assert_eq!(by_name["cli-worker"]["done"], 2);
    assert_eq!(by_name["cli-worker"]["leases_held"], 0);
    assert_eq!(by_name["sluice-cli"]["leases_held"], 1);
    let rows = table(&ok(&h, &["consumers", "ops.cli"]).await);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["CONSUMER"], "cli-worker");
    assert_eq!(rows[0]["DONE"], "2");

    // stats once, in both forms, and --watch as a stream of JSON lines.
    let stats = json(&h, &["stats", "--json"]).await;
    let q = &stats["queues"][0];
    assert_eq!(
        (
            &q["completed"],
            &q["leased"],
            &q["scheduled"],
            &q["pending"]
        ),
        (
            &Value::from(2),
            &Value::from(1),
            &Value::from(1),
            &Value::from(0)
        )
    );
    // Memory is shown to a caller without tokens (as to an admin of `>`): the payload
    // bytes of the jobs still held, in both forms.
    let used = stats["memory_used_bytes"].as_u64().unwrap();
    assert!(used > 0, "{stats}");
    let text = ok(&h, &["stats"]).await;
    let rows = table(text.split("\n\n").next().unwrap());
    assert_eq!(rows[0]["QUEUE"], "ops.cli");
    assert_eq!(rows[0]["COMPLETED"], "2");
    assert!(text.contains("no topics"));
    let memory = text.lines().find(|l| l.starts_with("memory: ")).unwrap();
    assert_eq!(
        memory
            .trim_start_matches("memory: ")
            .split(' ')
            .next()
            .unwrap()
            .replace(',', ""),
        used.to_string(),
        "{memory}"
    );
    assert!(memory.ends_with(" bytes in use, no budget"), "{memory}");
    let watched = ok(
        &h,
        &[
            "stats",
            "--watch",
            "--count",
            "2",
            "--interval-ms",
            "100",
            "--json",
        ],
    )
    .await;
    let frames: Vec<Value> = watched
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(frames.len(), 2);
    assert!(frames[1]["taken_at_unix_ms"].as_u64() > frames[0]["taken_at_unix_ms"].as_u64());
    let human_watch = ok(
        &h,
        &["stats", "--watch", "--count", "2", "--interval-ms", "100"],
    )
    .await;
    assert_eq!(human_watch.matches("sluice stats at ").count(), 2);

    // publish and subscribe.
    let out = ok(&h, &["publish", "ops.news", "{\"n\":1}", "--key", "k1"]).await;
    assert_eq!(out, "published to ops.news at sequence 1\n");
    let second = json(&h, &["publish", "ops.news", "two", "--json"]).await;
    assert_eq!(second["sequence"], 2);
    let lines = ok(
        &h,
        &[
            "subscribe",
            "ops.>",
            "--from",
            "earliest",
            "--count",
            "2",
            "--json",
        ],
    )
    .await;
    let messages: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["topic"], "ops.news");
    assert_eq!(messages[0]["sequence"], 1);
    assert_eq!(messages[0]["key"], "k1");
    assert_eq!(messages[0]["payload"], "{\"n\":1}");
    assert_eq!(messages[1]["payload"], "two");
    let out = ok(
        &h,
        &["subscribe", "ops.news", "--from", "2", "--count", "1"],
    )
    .await;
    assert_eq!(out, "ops.news#2 two\n");

    // A live subscription sees a message published after it started.
    let live = tokio::spawn({
        let url = h.url();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args(["subscribe", "ops.live", "--count", "1", "--server", &url])
                .kill_on_drop(true)
                .output()
                .await
                .unwrap()
        }
    });
    let mut c = h.rpc().await;
    // Wait until the subscriber (a separate process that needs time to start) is
    // attached: the topic's subscriber count says when.
    eventually(|| {
        let mut c = c.clone();
        async move {
            let s = c
                .stats(pb::StatsRequest {
                    queues: vec![],
                    topics: vec!["ops.live".into()],
                })
                .await
                .unwrap()
                .into_inner();
            if s.topics.first().is_some_and(|t| t.subscribers > 0) {
                return Ok(());
            }
            if s.topics.is_empty() {
                c.create_topic(pb::CreateTopicRequest {
                    name: "ops.live".into(),
                    retention: None,
                })
                .await
                .unwrap();
            }
            Err("the subscriber has not attached")
        }
    })
    .await;
    c.publish(pb::PublishRequest {
        topic: "ops.live".into(),
        messages: vec![pb::PublishMessage {
            payload: Bytes::from_static(b"fresh"),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), live)
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "ops.live#1 fresh\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_marks_a_queue_only_consumers_name() {
    let h = Harness::start(200).await;
    ok(&h, &["enqueue", "ops.mail", "hello"]).await;
    // A worker with a typo in its queue name.
    let empty = ok(&h, &["lease", "ops.mial"]).await;
    assert_eq!(empty, "no job visible in ops.mial\n");

    for command in [&["queues"][..], &["stats"][..]] {
        let out = sluice(&h, command).await;
        assert!(out.status.success(), "sluice {command:?} failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let rows = table(text.split("\n\n").next().unwrap());
        let status: HashMap<&str, &str> = rows
            .iter()
            .map(|r| (r["QUEUE"].as_str(), r["STATUS"].as_str()))
            .collect();
        assert_eq!(status["ops.mail"], "active", "{command:?}");
        assert_eq!(status["ops.mial"], "active,consumer-created", "{command:?}");
        // The note goes to stderr, so stdout stays a table.
        let note = String::from_utf8(out.stderr).unwrap();
        assert!(
            note.contains("check the worker's queue name for a typo"),
            "{note}"
        );
    }
    let stats = json(&h, &["stats", "--json", "--queue", "ops.mial"]).await;
    assert_eq!(stats["queues"][0]["created_by_consumer"], true);

    // The first enqueue names it: no longer flagged, and no note.
    ok(&h, &["enqueue", "ops.mial", "now it is real"]).await;
    let out = sluice(&h, &["queues"]).await;
    let rows = table(&String::from_utf8(out.stdout).unwrap());
    assert!(rows.iter().all(|r| r["STATUS"] == "active"));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sets_shows_and_deletes_a_schema() {
    let h = Harness::start(200).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("signup.json");
    std::fs::write(&file, r#"{"required": ["email"]}"#).unwrap();
    let file = file.to_str().unwrap();
    let set = ok(
        &h,
        &[
            "schema",
            "set",
            "--queue",
            "ops.signups",
            "--json-schema",
            file,
        ],
    )
    .await;
    assert_eq!(set, "queue \"ops.signups\": schema revision 1 set\n");
    let again = json(
        &h,
        &[
            "schema",
            "set",
            "--json",
            "--queue",
            "ops.signups",
            "--json-schema",
            file,
        ],
    )
    .await;
    assert_eq!(again["revision"], 1);
    assert_eq!(again["created"], false);

    let refused = sluice(&h, &["enqueue", "ops.signups", r#"{"name": "x"}"#]).await;
    assert!(!refused.status.success());
    let err = String::from_utf8(refused.stderr).unwrap();
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("rule: required"),
        "{err}"
    );
    ok(&h, &["enqueue", "ops.signups", r#"{"email": "a@b.c"}"#]).await;

    let got = json(&h, &["schema", "get", "--json", "--queue", "ops.signups"]).await;
    assert_eq!(got["current_revision"], 1);
    assert_eq!(got["history"][0]["kind"], "json_schema");
    assert_eq!(
        got["history"][0]["schema"]["text"],
        r#"{"required": ["email"]}"#
    );
    let queues = json(&h, &["queues", "--json"]).await;
    let signups = queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "ops.signups")
        .unwrap();
    assert_eq!(signups["stats"]["schema_revision"], 1);

    let deleted = ok(&h, &["schema", "delete", "--queue", "ops.signups"]).await;
    assert!(deleted.contains("schema revision 1 deleted"), "{deleted}");
    let gone = sluice(&h, &["schema", "delete", "--queue", "ops.signups"]).await;
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("NOT_FOUND"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_dead_jobs_redrive_purge_and_errors() {
    let h = Harness::start(200).await;
    let mut c = h.rpc().await;

    // 12 poison jobs end in ops.fail.dlq.
    c.enqueue(pb::EnqueueRequest {
        queue: "ops.fail".into(),
        jobs: (0..12)
            .map(|i| pb::JobSpec {
                payload: Bytes::from(format!("bad {i}")),
                kind: "poison".into(),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .unwrap();
    let leased = c
        .lease(pb::LeaseRequest {
            queue: "ops.fail".into(),
            max_jobs: 12,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(leased.len(), 12);
    for j in &leased {
        c.nack(pb::NackRequest {
            lease_id: j.lease_id.clone(),
            error: "boom".into(),
            dead_letter: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }

    // jobs --state dead lists the dead records of the original queue.
    let text = ok(&h, &["jobs", "ops.fail", "--state", "dead"]).await;
    let rows = table(&text);
    assert_eq!(rows.len(), 12);
    assert!(rows.iter().all(|r| r["STATE"] == "dead"
        && r["KIND"] == "poison"
        && r["ATTEMPTS"] == "1/5"
        && r["LAST-ERROR"] == "boom"));
    let dead = json(&h, &["jobs", "ops.fail", "--state", "dead", "--json"]).await;
    let dead = dead["jobs"].as_array().unwrap();
    assert_eq!(dead.len(), 12);
    assert!(dead.iter().all(|j| j["state"] == "dead"
        && j["last_error"] == "boom"
        && j["dead_letter_queue"] == "ops.fail.dlq"));
    assert_eq!(dead[0]["payload"], "bad 0");
    let limited = json(
        &h,
        &[
            "jobs",
            "ops.fail.dlq",
            "--state",
            "pending",
            "--limit",
            "5",
            "--json",
        ],
    )
    .await;
    let limited = limited["jobs"].as_array().unwrap();
    assert_eq!(limited.len(), 5);
    assert_eq!(limited[0]["headers"]["x-sluice-original-queue"], "ops.fail");

    // redrive at 10 jobs a second: about 1.2 s, with progress on stderr.
    let out = sluice(&h, &["redrive", "ops.fail.dlq", "--rate", "10"]).await;
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "redrove 12 job(s) from ops.fail.dlq\n"
    );
    let progress = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = progress.lines().collect();
    assert!(!lines.is_empty(), "no progress shown");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("redriving ops.fail.dlq: ") && l.ends_with("/12 moved")),
        "{progress}"
    );
    let moved: Vec<u64> = lines
        .iter()
        .map(|l| {
            l.trim_start_matches("redriving ops.fail.dlq: ")
                .trim_end_matches("/12 moved")
                .parse()
                .unwrap()
        })
        .collect();
    assert!(moved.windows(2).all(|w| w[0] <= w[1]), "{progress}");
    assert!(moved.iter().all(|m| *m <= 12));
    let stats = json(
        &h,
        &[
            "stats",
            "--json",
            "--queue",
            "ops.fail",
            "--queue",
            "ops.fail.dlq",
        ],
    )
    .await;
    let pending: HashMap<&str, u64> = stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| (q["name"].as_str().unwrap(), q["pending"].as_u64().unwrap()))
        .collect();
    assert_eq!(pending["ops.fail"], 12);
    assert_eq!(pending["ops.fail.dlq"], 0);
    let none = json(&h, &["redrive", "ops.fail.dlq", "--json"]).await;
    assert_eq!(none["redriven"], 0);

    // delete-job takes one pending job out; a second delete finds nothing.
    let live = json(&h, &["jobs", "ops.fail", "--json"]).await;
    let victim = live["jobs"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        ok(&h, &["delete-job", "ops.fail", &victim]).await,
        format!("deleted job {victim} (pending) from ops.fail\n")
    );
    let again = sluice(&h, &["delete-job", "ops.fail", &victim, "--json"]).await;
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8(again.stderr).unwrap();
    assert!(err.starts_with("sluice: NOT_FOUND: job_id "), "{err}");

    // purge, then purge again.
    assert_eq!(
        ok(&h, &["purge", "ops.fail"]).await,
        "purged 11 job(s) from ops.fail\n"
    );
    assert_eq!(
        json(&h, &["purge", "ops.fail", "--json"]).await["purged"],
        0
    );

    // Errors: a missing queue, a bad argument, an unreachable broker.
    let missing = sluice(&h, &["jobs", "ops.nosuch"]).await;
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8(missing.stderr).unwrap();
    assert!(err.contains("does not exist"), "{err}");
    // In Sluice's words: the code as gRPC names it, then the broker's message, without
    // tonic's generic sentence for the code.
    assert_eq!(
        err, "sluice: NOT_FOUND: queue \"ops.nosuch\" does not exist\n",
        "{err}"
    );
    let bad = sluice(&h, &["jobs", "ops.fail", "--state", "bogus"]).await;
    assert_eq!(bad.status.code(), Some(2));
    let unreachable = sluice(&h, &["queues", "--server", "http://127.0.0.1:1"]).await;
    assert_eq!(unreachable.status.code(), Some(1));
    let err = String::from_utf8(unreachable.stderr).unwrap();
    assert!(
        err.contains("cannot connect to http://127.0.0.1:1"),
        "{err}"
    );
    // The cause, not tonic's bare "transport error".
    assert!(err.to_lowercase().contains("connection refused"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_http_flag_and_sigterm() {
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("SLUICE_HTTP", "127.0.0.1:0")
        .env("SLUICE_STORAGE", "memory")
        .env("SLUICE_LOG", SERVE_LOG)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Both ports are the ones the process bound, read from its start-up log.
    let stdout = server.stdout.take().unwrap().into_owned_fd().unwrap();
    let addrs = serve_addrs(std::fs::File::from(stdout), true).await;
    let http_addr = addrs.http.unwrap();
    assert_eq!(common::http_get(http_addr, "/healthz").await.body, "ok\n");

    let url = format!("http://{}", addrs.grpc);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["enqueue", "ops.bin", "x", "--json", "--server", &url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let metrics = common::http_get(http_addr, "/metrics").await.body;
    assert!(
        metrics
            .lines()
            .any(|l| l == "sluice_jobs_enqueued_total{queue=\"ops.bin\"} 1"),
        "{metrics}"
    );

    // SIGTERM stops gRPC and HTTP together, and the process exits cleanly.
    let pid = server.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("the server exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(tokio::net::TcpStream::connect(http_addr).await.is_err());
}

#[tokio::test]
async fn http_on_a_public_address_needs_insecure() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "0.0.0.0:0"])
        .env_remove("SLUICE_INSECURE")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("--http 0.0.0.0:0 is not a loopback address"),
        "{err}"
    );
}

/// A log that is not written to a terminal (a pipe here; a file or a collector in
/// production) is plain text: no colour codes, whatever the terminal settings.
#[tokio::test]
async fn serve_log_on_a_pipe_has_no_colour_codes() {
    use tokio::io::AsyncBufReadExt as _;
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0", "--storage", "memory"])
        .env("SLUICE_LOG", SERVE_LOG)
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let mut log = String::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push_str(&line);
            log.push('\n');
            if line.contains("sluice serving gRPC") {
                break;
            }
        }
    })
    .await
    .expect("the broker logs its address within 20 s");
    assert!(log.contains("sluice serving gRPC"), "{log}");
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_schedules() {
    let h = Harness::start(200).await;
    let created = json(
        &h,
        &[
            "schedules",
            "create",
            "ops-nightly",
            "--queue",
            "ops.reports",
            "--cron",
            "0 3 * * *",
            "--tz",
            "Europe/Paris",
            "--kind",
            "report",
            "--json",
        ],
    )
    .await;
    let nightly = &created["schedules"][0];
    assert_eq!(nightly["trigger"], "cron 0 3 * * * Europe/Paris");
    assert_eq!(nightly["missed_ticks"], "run_once");
    assert!(nightly["next_fire_unix_ms"].as_u64().unwrap() > 0);
    ok(
        &h,
        &[
            "schedules",
            "create",
            "ops-beat",
            "--queue",
            "ops.beats",
            "--every-ms",
            "1000",
            "--skip-overlap",
            "--payload",
            "hi",
            "--header",
            "team=ops",
        ],
    )
    .await;
    let beat = eventually(|| async {
        let listed = json(&h, &["schedules", "list", "--json"]).await;
        let beat = listed["schedules"][0].clone();
        if beat["fired"].as_u64() >= Some(1) {
            Ok(beat)
        } else {
            Err(format!("not fired yet: {beat}"))
        }
    })
    .await;
    assert_eq!(beat["name"], "ops-beat");
    assert_eq!(
        (&beat["overlap"], &beat["payload"]),
        (&"skip".into(), &"hi".into())
    );
    assert_eq!(beat["headers"]["team"], "ops");
    assert!(is_uuid(beat["last_job_id"].as_str().unwrap()));
    let text = ok(&h, &["schedules", "list"]).await;
    assert!(text.starts_with("SCHEDULE "), "{text}");
    assert!(
        text.contains("every 1.0s") && text.contains("run-once,skip-overlap"),
        "{text}"
    );

    let paused = json(&h, &["schedules", "pause", "ops-beat", "--json"]).await;
    assert_eq!(paused["schedules"][0]["paused"], true);
    assert_eq!(paused["schedules"][0]["next_fire_unix_ms"], 0);
    ok(&h, &["schedules", "resume", "ops-beat"]).await;
    let updated = json(
        &h,
        &[
            "schedules",
            "update",
            "ops-beat",
            "--queue",
            "ops.beats",
            "--every-ms",
            "2000",
            "--json",
        ],
    )
    .await;
    assert_eq!(updated["schedules"][0]["trigger"], "every 2.0s");
    assert!(
        updated["schedules"][0]["fired"].as_u64() >= Some(1),
        "progress kept"
    );

    let refused = sluice(
        &h,
        &[
            "schedules",
            "create",
            "bad",
            "--queue",
            "q",
            "--cron",
            "0 3 * * *",
            "--tz",
            "Mars/Olympus",
        ],
    )
    .await;
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("INVALID_ARGUMENT: cron.time_zone: \"Mars/Olympus\""),
        "{stderr}"
    );
    let usage = sluice(&h, &["schedules", "create", "bad", "--queue", "q"]).await;
    assert_eq!(usage.status.code(), Some(2), "no trigger is a usage error");

    ok(&h, &["schedules", "delete", "ops-beat"]).await;
    ok(&h, &["schedules", "delete", "ops-nightly"]).await;
    assert_eq!(ok(&h, &["schedules", "list"]).await, "no schedules\n");
}
