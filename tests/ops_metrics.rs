//! `/metrics`, `/healthz`, the dashboard's JSON and event stream, and the figures of
//! `Stats` / `WatchStats` / `ListConsumers`, checked against known activity over real gRPC
//! and HTTP.

#[path = "ops_common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use common::test_broker::rpc::{self, queue_stats, topic_stats};
use common::{Harness, http_get, http_open};
use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use sluice::pb;

// ---- a careful OpenMetrics text parser ------------------------------------------------

#[derive(Debug)]
struct Family {
    kind: String,
    help: String,
}

#[derive(Debug, Clone)]
struct Sample {
    family: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug)]
struct Exposition {
    families: HashMap<String, Family>,
    samples: Vec<Sample>,
}

fn parse_value(s: &str) -> f64 {
    match s {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => s
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value {s:?}")),
    }
}

/// Parses `name{k="v",...} value`, with OpenMetrics label escapes.
fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    assert!(
        !name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit()),
        "bad metric name in {line:?}"
    );
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices();
        let mut key = String::new();
        let mut consumed = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    consumed = Some(i + 1);
                    break;
                }
                ',' => {}
                '=' => {
                    assert_eq!(
                        chars.next().map(|x| x.1),
                        Some('"'),
                        "unquoted label in {line:?}"
                    );
                    let mut value = String::new();
                    loop {
                        match chars.next().map(|x| x.1) {
                            Some('\\') => match chars.next().map(|x| x.1) {
                                Some('n') => value.push('\n'),
                                Some(e @ ('\\' | '"')) => value.push(e),
                                other => panic!("bad escape {other:?} in {line:?}"),
                            },
                            Some('"') => break,
                            Some(c) => value.push(c),
                            None => panic!("unterminated label value in {line:?}"),
                        }
                    }
                    assert!(
                        labels.insert(std::mem::take(&mut key), value).is_none(),
                        "duplicate label in {line:?}"
                    );
                }
                c if c.is_ascii_alphanumeric() || c == '_' => key.push(c),
                c => panic!("unexpected {c:?} in labels of {line:?}"),
            }
        }
        rest = &after[consumed.unwrap_or_else(|| panic!("unclosed labels in {line:?}"))..];
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(
        fields
            .next()
            .unwrap_or_else(|| panic!("no value in {line:?}")),
    );
    assert!(
        fields.next().is_none(),
        "timestamps are not expected: {line:?}"
    );
    (name.to_owned(), labels, value)
}

/// Whether `sample` is a valid sample name of a family `family` of type `kind`.
fn belongs(kind: &str, family: &str, sample: &str) -> bool {
    let suffix = sample.strip_prefix(family);
    matches!(
        (kind, suffix),
        ("counter", Some("_total" | "_created"))
            | ("gauge" | "unknown", Some(""))
            | (
                "histogram",
                Some("_bucket" | "_count" | "_sum" | "_created")
            )
            | ("info", Some("_info"))
    )
}

fn parse_exposition(text: &str) -> Exposition {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "exposition must end with # EOF"
    );
    let mut families: HashMap<String, Family> = HashMap::new();
    let mut samples = Vec::new();
    let mut current: Option<String> = None;
    let mut helps: HashMap<String, String> = HashMap::new();
    for line in &lines[..lines.len() - 1] {
        assert!(
            !line.is_empty(),
            "blank lines are not allowed in OpenMetrics"
        );
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a text");
            helps.insert(name.to_owned(), help.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(
                [
                    "counter",
                    "gauge",
                    "histogram",
                    "info",
                    "summary",
                    "unknown",
                    "stateset",
                    "gaugehistogram"
                ]
                .contains(&kind),
                "unknown metric type {kind}"
            );
            let help = helps.get(name).cloned().unwrap_or_default();
            assert!(!help.is_empty(), "family {name} has no HELP");
            assert!(
                families
                    .insert(
                        name.to_owned(),
                        Family {
                            kind: kind.to_owned(),
                            help
                        }
                    )
                    .is_none(),
                "family {name} declared twice"
            );
            current = Some(name.to_owned());
        } else if line.starts_with('#') {
            assert!(line.starts_with("# UNIT "), "unexpected comment {line:?}");
        } else {
            let (name, labels, value) = parse_sample(line);
            let family = current
                .clone()
                .unwrap_or_else(|| panic!("sample before any TYPE: {line:?}"));
            let kind = &families[&family].kind;
            assert!(
                belongs(kind, &family, &name),
                "sample {name} does not belong to {kind} family {family}"
            );
            samples.push(Sample {
                family,
                name,
                labels,
                value,
            });
        }
    }
    Exposition { families, samples }
}

impl Exposition {
    /// The value of the sample `name` with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one sample {name}{labels:?}, found {}",
            found.len()
        );
        found[0].value
    }

    /// Histogram buckets `(le, cumulative count)` of one series, in exposition order.
    fn buckets(&self, family: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        self.samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| (parse_value(&s.labels["le"]), s.value))
            .collect()
    }
}

// ---- helpers --------------------------------------------------------------------------

fn job(payload: &str) -> pb::JobSpec {
    pb::JobSpec {
        payload: Bytes::from(payload.to_owned()),
        ..Default::default()
    }
}

fn message(payload: &str) -> pb::PublishMessage {
    pb::PublishMessage {
        payload: Bytes::from(payload.to_owned()),
        ..Default::default()
    }
}

// ---- tests ------------------------------------------------------------------------------

/// Whether the exposition has a sample `name` for queue `queue`.
fn has_queue_sample(m: &Exposition, name: &str, queue: &str) -> bool {
    m.samples
        .iter()
        .any(|s| s.name == name && s.labels.get("queue").map(String::as_str) == Some(queue))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_rate_and_in_flight_limits_and_consumer_created_queues() {
    let h = Harness::start(100).await;
    let mut c = h.rpc().await;
    // Two leases at once at most; 1 job a second in bursts of 3.
    common::create_limited_queue(&mut c, "ops.limited").await;
    c.enqueue(pb::EnqueueRequest {
        queue: "ops.limited".into(),
        jobs: (0..6).map(|i| job(&format!("job {i}"))).collect(),
    })
    .await
    .unwrap();
    c.enqueue(pb::EnqueueRequest {
        queue: "ops.free".into(),
        jobs: vec![job("free")],
    })
    .await
    .unwrap();
    // max_in_flight cuts the lease short at 2 (the bucket had 3 tokens).
    let held = rpc::lease(&mut c, "ops.limited", "limited-worker", 10).await;
    assert_eq!(held.len(), 2);
    // A worker whose queue name has a typo.
    assert!(
        rpc::lease(&mut c, "ops.limitd", "typo-worker", 1)
            .await
            .is_empty()
    );

    // The held-back time grows while a lease waits behind max_in_flight.
    let m = common::test_broker::eventually(|| async {
        let m = parse_exposition(&http_get(h.http, "/metrics").await.body);
        let q = [("queue", "ops.limited")];
        if m.value("sluice_queue_in_flight_limited_seconds_total", &q) > 0.0 {
            Ok(m)
        } else {
            Err("max_in_flight has held nothing back yet")
        }
    })
    .await;
    let q = [("queue", "ops.limited")];
    assert_eq!(m.value("sluice_queue_max_in_flight", &q), 2.0);
    assert_eq!(m.value("sluice_queue_in_flight", &q), 2.0);
    assert_eq!(m.value("sluice_queue_rate_limit_per_second", &q), 1.0);
    assert_eq!(m.value("sluice_queue_rate_limit_burst", &q), 3.0);
    // Two of the three tokens were taken; the bucket refills one a second.
    let tokens = m.value("sluice_queue_rate_limit_tokens", &q);
    assert!((1.0..=3.0).contains(&tokens), "{tokens} tokens");
    // max_in_flight (room 2) cut the lease short, not the rate limit (3 tokens).
    assert_eq!(m.value("sluice_queue_rate_limited_seconds_total", &q), 0.0);
    assert_eq!(m.value("sluice_queue_created_by_consumer", &q), 0.0);
    // A queue without limits has no limit gauges (absent: no limit, never a limit of 0),
    // and held-back counters that stay at 0.
    for name in [
        "sluice_queue_max_in_flight",
        "sluice_queue_in_flight",
        "sluice_queue_rate_limit_per_second",
        "sluice_queue_rate_limit_burst",
        "sluice_queue_rate_limit_tokens",
    ] {
        assert!(
            !has_queue_sample(&m, name, "ops.free"),
            "{name} of ops.free"
        );
    }
    let free = [("queue", "ops.free")];
    assert_eq!(
        m.value("sluice_queue_rate_limited_seconds_total", &free),
        0.0
    );
    assert_eq!(
        m.value("sluice_queue_in_flight_limited_seconds_total", &free),
        0.0
    );
    assert_eq!(m.value("sluice_queue_created_by_consumer", &free), 0.0);
    // The typo's queue is flagged until a producer names it.
    let typo = [("queue", "ops.limitd")];
    assert_eq!(m.value("sluice_queue_created_by_consumer", &typo), 1.0);
    for (family, kind) in [
        ("sluice_queue_max_in_flight", "gauge"),
        ("sluice_queue_rate_limit_tokens", "gauge"),
        ("sluice_queue_rate_limited_seconds", "counter"),
        ("sluice_queue_in_flight_limited_seconds", "counter"),
        ("sluice_queue_created_by_consumer", "gauge"),
    ] {
        assert_eq!(m.families[family].kind, kind, "{family}");
        assert!(!m.families[family].help.is_empty(), "{family}");
    }
    c.enqueue(pb::EnqueueRequest {
        queue: "ops.limitd".into(),
        jobs: vec![job("named now")],
    })
    .await
    .unwrap();
    let m = parse_exposition(&http_get(h.http, "/metrics").await.body);
    assert_eq!(m.value("sluice_queue_created_by_consumer", &typo), 0.0);

    // An ack frees a slot: the in-flight gauge follows.
    rpc::ack(&mut c, &held[..1]).await;
    let m = parse_exposition(&http_get(h.http, "/metrics").await.body);
    assert_eq!(m.value("sluice_queue_in_flight", &q), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_happened() {
    let h = Harness::start(100).await;
    let mut c = h.rpc().await;

    // 10 jobs enqueued; 4 leased; 3 acked; 1 nacked as poison (dead-lettered).
    c.enqueue(pb::EnqueueRequest {
        queue: "ops.metrics".into(),
        jobs: (0..10).map(|i| job(&format!("job {i}"))).collect(),
    })
    .await
    .unwrap();
    // Two delayed jobs stay scheduled.
    c.enqueue(pb::EnqueueRequest {
        queue: "ops.later".into(),
        jobs: vec![
            pb::JobSpec {
                delay_ms: 600_000,
                ..job("later 1")
            },
            pb::JobSpec {
                delay_ms: 600_000,
                ..job("later 2")
            },
        ],
    })
    .await
    .unwrap();
    let leased = rpc::lease(&mut c, "ops.metrics", "metrics-worker", 4).await;
    assert_eq!(leased.len(), 4);
    // Held a little, so lease-to-ack lands above the first bucket.
    tokio::time::sleep(Duration::from_millis(30)).await;
    rpc::ack(&mut c, &leased[..3]).await;
    // A repeat ack is not a second completion.
    rpc::ack(&mut c, &leased[..1]).await;
    c.nack(pb::NackRequest {
        lease_id: leased[3].lease_id.clone(),
        error: "poison".into(),
        dead_letter: true,
        ..Default::default()
    })
    .await
    .unwrap();

    // A live subscriber receives 5 messages; one replayed message from before it opened
    // is not a latency.
    c.publish(pb::PublishRequest {
        topic: "ops.events".into(),
        messages: vec![message("before")],
    })
    .await
    .unwrap();
    // Publish times are whole milliseconds: make "before" strictly older than the
    // subscription.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut sub = c
        .subscribe(pb::SubscribeRequest {
            pattern: "ops.>".into(),
            start: pb::StartPosition::Earliest as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    let first = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    received += first.messages.len();
    c.publish(pb::PublishRequest {
        topic: "ops.events".into(),
        messages: (0..5).map(|i| message(&format!("m{i}"))).collect(),
    })
    .await
    .unwrap();
    while received < 6 {
        let batch = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        received += batch.messages.len();
    }
    assert_eq!(received, 6);

    let res = http_get(h.http, "/metrics").await;
    assert_eq!(res.status, 200);
    assert_eq!(
        res.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let m = parse_exposition(&res.body);

    let q = [("queue", "ops.metrics")];
    assert_eq!(m.value("sluice_jobs_enqueued_total", &q), 10.0);
    assert_eq!(m.value("sluice_jobs_completed_total", &q), 3.0);
    assert_eq!(m.value("sluice_job_deliveries_failed_total", &q), 1.0);
    assert_eq!(m.value("sluice_jobs_dead_lettered_total", &q), 1.0);
    assert_eq!(m.value("sluice_jobs_cancelled_total", &q), 0.0);
    let state = |s| [("queue", "ops.metrics"), ("state", s)];
    assert_eq!(m.value("sluice_queue_jobs", &state("pending")), 6.0);
    assert_eq!(m.value("sluice_queue_jobs", &state("leased")), 0.0);
    assert_eq!(m.value("sluice_queue_jobs", &state("scheduled")), 0.0);
    assert_eq!(m.value("sluice_queue_jobs", &state("retrying")), 0.0);
    assert_eq!(m.value("sluice_queue_consumers", &q), 1.0);
    assert_eq!(m.value("sluice_queue_paused", &q), 0.0);
    assert!(m.value("sluice_queue_oldest_pending_age_seconds", &q) >= 0.0);
    let later = [("queue", "ops.later"), ("state", "scheduled")];
    assert_eq!(m.value("sluice_queue_jobs", &later), 2.0);
    // The dead letter landed in the default dead-letter queue.
    let dlq = [("queue", "ops.metrics.dlq")];
    assert_eq!(m.value("sluice_jobs_enqueued_total", &dlq), 1.0);
    assert_eq!(
        m.value(
            "sluice_queue_jobs",
            &[("queue", "ops.metrics.dlq"), ("state", "pending")]
        ),
        1.0
    );
    assert_eq!(m.value("sluice_queues", &[]), 3.0);

    // Lease-to-ack: three acks, each held at least 30 ms.
    assert_eq!(m.value("sluice_lease_to_ack_seconds_count", &q), 3.0);
    assert!(m.value("sluice_lease_to_ack_seconds_sum", &q) >= 0.09);
    let buckets = m.buckets("sluice_lease_to_ack_seconds", &q);
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
    );
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 3.0));
    assert_eq!(
        buckets.iter().find(|(le, _)| *le == 0.025).unwrap().1,
        0.0,
        "no ack came within 25 ms of its lease"
    );

    let t = [("topic", "ops.events")];
    assert_eq!(m.value("sluice_topic_messages_published_total", &t), 6.0);
    assert_eq!(m.value("sluice_topic_retained_messages", &t), 6.0);
    assert_eq!(m.value("sluice_topic_retained_bytes", &t), 6.0 + 5.0 * 2.0);
    assert_eq!(m.value("sluice_topic_first_sequence", &t), 1.0);
    assert_eq!(m.value("sluice_topic_last_sequence", &t), 6.0);
    assert_eq!(m.value("sluice_topic_subscribers", &t), 1.0);
    assert_eq!(m.value("sluice_topic_subscriber_gaps_total", &t), 0.0);
    // Only the 5 live deliveries count as publish-to-deliver latency.
    assert_eq!(m.value("sluice_publish_to_deliver_seconds_count", &t), 5.0);
    let buckets = m.buckets("sluice_publish_to_deliver_seconds", &t);
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 5.0));

    assert_eq!(
        m.value(
            "sluice_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    for name in [
        "sluice_queue_jobs",
        "sluice_jobs_enqueued",
        "sluice_lease_to_ack_seconds",
    ] {
        assert!(!m.families[name].help.is_empty());
    }
    assert_eq!(m.families["sluice_jobs_completed"].kind, "counter");

    // Deleted queues and topics leave the exposition, histograms included.
    drop(sub);
    c.delete_queue(pb::DeleteQueueRequest {
        name: "ops.metrics".into(),
    })
    .await
    .unwrap();
    c.delete_topic(pb::DeleteTopicRequest {
        name: "ops.events".into(),
    })
    .await
    .unwrap();
    let after = parse_exposition(&http_get(h.http, "/metrics").await.body);
    let mentions = |label: &str, value: &str| {
        after
            .samples
            .iter()
            .filter(|s| s.labels.get(label).map(String::as_str) == Some(value))
            .count()
    };
    assert_eq!(mentions("queue", "ops.metrics"), 0);
    assert_eq!(mentions("topic", "ops.events"), 0);
    assert!(mentions("queue", "ops.later") > 0);
    assert_eq!(m.families["sluice_lease_to_ack_seconds"].kind, "histogram");
    assert!(m.samples.iter().all(|s| s.family.starts_with("sluice_")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_watch_and_consumers_report_every_figure() {
    let h = Harness::start(100).await;
    let mut c = h.rpc().await;

    c.enqueue(pb::EnqueueRequest {
        queue: "ops.stats".into(),
        jobs: (0..6).map(|i| job(&format!("j{i}"))).collect(),
    })
    .await
    .unwrap();
    c.enqueue(pb::EnqueueRequest {
        queue: "ops.stats".into(),
        jobs: vec![pb::JobSpec {
            delay_ms: 600_000,
            ..job("later")
        }],
    })
    .await
    .unwrap();
    let a = rpc::lease(&mut c, "ops.stats", "worker-a", 3).await;
    let b = rpc::lease(&mut c, "ops.stats", "worker-b", 1).await;
    rpc::ack(&mut c, &a[..2]).await;
    let nacked = c
        .nack(pb::NackRequest {
            lease_id: b[0].lease_id.clone(),
            error: "try later".into(),
            retry_delay_ms: 600_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nacked.state, pb::JobState::Retrying as i32);

    // A topic that keeps 2 messages; a subscriber from sequence 1 finds a gap.
    rpc::create_topic_keeping(&mut c, "ops.small", 2).await;
    c.publish(pb::PublishRequest {
        topic: "ops.small".into(),
        messages: (0..5).map(|i| message(&format!("m{i}"))).collect(),
    })
    .await
    .unwrap();
    let mut sub = c
        .subscribe(pb::SubscribeRequest {
            pattern: "ops.small".into(),
            start: pb::StartPosition::Sequence as i32,
            start_sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let batch = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(batch.gaps.len(), 1);
    assert_eq!(batch.gaps[0].first_missing, 1);
    assert_eq!(batch.gaps[0].next_available, 4);

    // Let the oldest pending job age measurably.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let s = rpc::stats(&mut c).await;
    let q = queue_stats(&s, "ops.stats");
    assert_eq!(q.enqueued, 7);
    assert_eq!(q.pending, 2, "6 ready - 4 leased");
    assert_eq!(q.scheduled, 1);
    assert_eq!(q.leased, 1, "worker-a still holds one");
    assert_eq!(q.retrying, 1);
    assert_eq!(q.completed, 2);
    assert_eq!(q.failed, 1);
    assert_eq!(q.dead, 0);
    assert_eq!(q.cancelled, 0);
    assert_eq!(q.consumers, 2);
    assert!(
        q.oldest_pending_age_ms >= 120,
        "oldest pending age {} ms",
        q.oldest_pending_age_ms
    );
    assert!(q.enqueue_rate > 0.0 && q.ack_rate > 0.0);
    let t = topic_stats(&s, "ops.small");
    assert_eq!(
        (t.first_sequence, t.last_sequence, t.retained_messages),
        (4, 5, 2)
    );
    assert_eq!(t.retained_bytes, 4);
    assert_eq!(t.subscribers, 1);
    assert_eq!(t.gaps, 1);
    assert_eq!(t.published, 5);
    assert!(t.publish_rate > 0.0);

    // Filters name what they include.
    let only = c
        .stats(pb::StatsRequest {
            queues: vec!["ops.stats".into()],
            topics: vec!["nope".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only.queues.len(), 1);
    assert!(only.topics.is_empty());

    let consumers = c
        .list_consumers(pb::ListConsumersRequest {
            queue: "ops.stats".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .consumers;
    let names: Vec<&str> = consumers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["worker-a", "worker-b"]);
    let (wa, wb) = (&consumers[0], &consumers[1]);
    assert_eq!((wa.leases_held, wa.done, wa.failed), (1, 2, 0));
    assert_eq!((wb.leases_held, wb.done, wb.failed), (0, 0, 1));
    assert!(wa.address.starts_with("127.0.0.1:"));
    assert!(wa.last_seen_unix_ms > 0 && wa.last_seen_unix_ms <= s.taken_at_unix_ms);

    // WatchStats: fresh frames at the asked period, reflecting changes between them.
    let mut watch = c
        .watch_stats(pb::WatchStatsRequest {
            filter: Some(pb::StatsRequest {
                queues: vec!["ops.stats".into()],
                topics: vec![],
            }),
            interval_ms: 100,
        })
        .await
        .unwrap()
        .into_inner();
    let f1 = watch.next().await.unwrap().unwrap();
    c.enqueue(pb::EnqueueRequest {
        queue: "ops.stats".into(),
        jobs: vec![job("one more")],
    })
    .await
    .unwrap();
    // The enqueue shows in a later frame; frames keep their period meanwhile.
    assert_eq!(queue_stats(&f1, "ops.stats").enqueued, 7);
    let mut previous = f1.taken_at_unix_ms;
    let mut frames = 0;
    loop {
        let f = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("a frame within 5 s")
            .unwrap()
            .unwrap();
        assert!(
            f.taken_at_unix_ms >= previous + 90,
            "frames closer than the period"
        );
        previous = f.taken_at_unix_ms;
        frames += 1;
        if queue_stats(&f, "ops.stats").enqueued == 8 {
            break;
        }
        assert!(frames < 20, "the enqueue never showed in WatchStats");
    }
    let too_fast = c
        .watch_stats(pb::WatchStatsRequest {
            filter: None,
            interval_ms: 50,
        })
        .await
        .unwrap_err();
    assert_eq!(too_fast.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_dashboard_feeds_and_shutdown() {
    let h = Harness::start(100).await;
    let mut c = h.rpc().await;

    let health = http_get(h.http, "/healthz").await;
    assert_eq!(
        (health.status.as_u16(), health.body.as_str()),
        (200, "ok\n")
    );

    let page = http_get(h.http, "/").await;
    assert_eq!(page.status, 200);
    assert!(
        page.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.body.contains("<canvas id=\"depth-chart\""));
    for outside in [
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
        "https://",
    ] {
        assert!(
            !page.body.contains(outside),
            "the page must not load anything from elsewhere ({outside})"
        );
    }

    // The event stream sends the current frame at once, then one per sample.
    let res = http_open(h.http, "/api/events").await;
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let mut text = String::new();
    c.enqueue(pb::EnqueueRequest {
        queue: "ops.dash".into(),
        jobs: (0..4).map(|i| job(&format!("d{i}"))).collect(),
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let frame: serde_json::Value = loop {
        let chunk = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("a frame with the new queue within 5 s")
            .unwrap()
            .unwrap();
        if let Ok(data) = chunk.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
        // Events are `event: stats\ndata: {json}\n\n`.
        let found = text.split("\n\n").filter_map(|event| {
            let data = event.lines().find_map(|l| l.strip_prefix("data: "))?;
            assert!(event.contains("event: stats"));
            let v: serde_json::Value = serde_json::from_str(data).ok()?;
            let has = v["queues"]
                .as_array()?
                .iter()
                .any(|q| q["name"] == "ops.dash" && q["pending"] == 4);
            has.then_some(v)
        });
        if let Some(v) = found.last() {
            break v;
        }
    };
    assert_eq!(frame["interval_ms"], 100);
    assert_eq!(frame["sample"]["pending"], 4);

    let latest: serde_json::Value =
        serde_json::from_str(&http_get(h.http, "/api/stats").await.body).unwrap();
    assert_eq!(latest["queues"][0]["name"], "ops.dash");
    let history: serde_json::Value =
        serde_json::from_str(&http_get(h.http, "/api/history").await.body).unwrap();
    let history = history.as_array().unwrap();
    assert!(!history.is_empty());
    assert!(
        history
            .windows(2)
            .all(|w| w[0]["t"].as_u64() < w[1]["t"].as_u64())
    );

    // Shutdown ends the open event stream and both servers.
    h.broker.shutdown();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect()).await;
    assert!(rest.is_ok(), "the event stream ends on shutdown");
    let mut h = h;
    tokio::time::timeout(Duration::from_secs(6), &mut h.http_task)
        .await
        .expect("serve_http returns on shutdown")
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(6), &mut h.grpc.handle)
        .await
        .expect("serve returns on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_shutdown_stops_only_http() {
    let h = Harness::start(100).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(sluice::broker::serve_http(
        listener,
        h.broker.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    assert_eq!(http_get(addr, "/healthz").await.status, 200);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(6), server)
        .await
        .expect("serve_http returns on its shutdown")
        .unwrap()
        .unwrap();
    // The broker, its gRPC server and the harness's own HTTP server go on.
    assert!(!h.broker.shutdown_token().is_cancelled());
    let mut c = h.rpc().await;
    c.stats(pb::StatsRequest::default()).await.unwrap();
    assert_eq!(http_get(h.http, "/healthz").await.status, 200);
}
