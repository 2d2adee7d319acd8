//! Every documented refusal, over real gRPC: the status code, a message naming the field,
//! the limit and the value, and the guarantee that a rejected request changes nothing.
//! Each refusal is its own `assert_refused(request, code, message parts)`, alike on
//! purpose: a case reads as the request and what the broker must answer to it.

mod common;

use std::collections::HashMap;

use bytes::Bytes;
use common::TestBroker;
use common::rpc::{assert_refused, assert_status, list_queues};
use sluice::broker::BrokerConfig;
use sluice::client::{Client, Job};
use sluice::pb;
use tonic::Code;

async fn stats_of(client: &Client, queue: &str) -> Option<pb::QueueStats> {
    client
        .stats()
        .await
        .unwrap()
        .queues
        .into_iter()
        .find(|q| q.name == queue)
}

fn enqueue(queue: &str, jobs: Vec<pb::JobSpec>) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        queue: queue.into(),
        jobs,
    }
}

fn spec(payload: impl Into<Bytes>) -> pb::JobSpec {
    pb::JobSpec {
        payload: payload.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_names_are_invalid_and_create_nothing() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    for name in ["", "a..b", "has space", "wild.*", &"x".repeat(256)] {
        assert_refused(
            rpc.enqueue(enqueue(name, vec![spec("x")])).await,
            Code::InvalidArgument,
            &["queue"],
        );
        assert_refused(
            rpc.publish(pb::PublishRequest {
                topic: name.into(),
                messages: vec![pb::PublishMessage::default()],
            })
            .await,
            Code::InvalidArgument,
            &["topic"],
        );
    }
    let stats = client.stats().await.unwrap();
    assert!(stats.queues.is_empty() && stats.topics.is_empty());

    assert_refused(
        rpc.subscribe(pb::SubscribeRequest {
            pattern: "a.>.b".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["pattern", "'>' must be the last token"],
    );
}

#[tokio::test]
async fn oversize_payload_rejects_the_whole_batch() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    client.enqueue("big", "seed").send().await.unwrap();
    let too_big = Bytes::from(vec![0u8; 1024 * 1024 + 1]);
    assert_refused(
        rpc.enqueue(enqueue("big", vec![spec("ok"), spec(too_big.clone())]))
            .await,
        Code::InvalidArgument,
        &["jobs[1].payload", "1048577 bytes", "limit of 1048576"],
    );
    assert_eq!(stats_of(&client, "big").await.unwrap().pending, 1);

    assert_refused(
        rpc.publish(pb::PublishRequest {
            topic: "big".into(),
            messages: vec![pb::PublishMessage {
                payload: too_big,
                ..Default::default()
            }],
        })
        .await,
        Code::InvalidArgument,
        &["messages[0].payload", "1048577"],
    );
    // Exactly at the limit is fine.
    client
        .enqueue("big", vec![0u8; 1024 * 1024])
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn oversize_and_empty_batches_are_invalid() {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    assert_refused(
        rpc.enqueue(enqueue("b", (0..1001).map(|_| spec("x")).collect()))
            .await,
        Code::InvalidArgument,
        &["jobs", "1001 entries", "limit of 1000"],
    );
    assert_refused(
        rpc.enqueue(enqueue("b", vec![])).await,
        Code::InvalidArgument,
        &["jobs", "at least 1"],
    );
    assert_refused(
        rpc.ack(pb::AckRequest {
            acks: (0..1001).map(|_| pb::LeaseAck::default()).collect(),
        })
        .await,
        Code::InvalidArgument,
        &["acks", "1001"],
    );
    assert_refused(
        rpc.lease(pb::LeaseRequest {
            queue: "b".into(),
            max_jobs: 1001,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["max_jobs", "1001"],
    );
}

#[tokio::test]
async fn header_priority_and_timing_limits() {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    let many: HashMap<String, String> = (0..65).map(|i| (format!("h{i}"), "v".into())).collect();
    let long_value = HashMap::from([("k".to_string(), "v".repeat(4097))]);
    let refused: [(pb::JobSpec, &[&str]); 5] = [
        (
            pb::JobSpec {
                headers: many,
                ..Default::default()
            },
            &["jobs[0].headers", "65 headers", "limit of 64"],
        ),
        (
            pb::JobSpec {
                headers: long_value,
                ..Default::default()
            },
            &["jobs[0].headers[\"k\"]", "4097", "4096"],
        ),
        (
            pb::JobSpec {
                priority: 10,
                ..Default::default()
            },
            &["jobs[0].priority: 10 exceeds the limit of 9"],
        ),
        (
            pb::JobSpec {
                delay_ms: 10,
                run_at_unix_ms: 10,
                ..Default::default()
            },
            &["delay_ms", "exclusive"],
        ),
        (
            pb::JobSpec {
                max_attempts: 10_001,
                ..Default::default()
            },
            &["jobs[0].max_attempts: 10001 exceeds the limit of 10000"],
        ),
    ];
    for (spec, fragments) in refused {
        assert_refused(
            rpc.enqueue(enqueue("h", vec![spec])).await,
            Code::InvalidArgument,
            fragments,
        );
    }
    assert_refused(
        rpc.create_queue(pb::CreateQueueRequest {
            name: "h2".into(),
            policy: Some(pb::QueuePolicy {
                max_attempts: 10_001,
                ..Default::default()
            }),
        })
        .await,
        Code::InvalidArgument,
        &["policy.max_attempts: 10001 exceeds the limit of 10000"],
    );
    assert_refused(
        rpc.lease(pb::LeaseRequest {
            queue: "h".into(),
            visibility_timeout_ms: 12 * 3600 * 1000 + 1,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["visibility_timeout_ms", "43200001"],
    );
    assert_refused(
        rpc.lease(pb::LeaseRequest {
            queue: "h".into(),
            wait_ms: 60_001,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["wait_ms", "60001", "60000"],
    );
    // Nothing above created the queue's jobs.
    assert!(
        broker
            .client()
            .await
            .stats()
            .await
            .unwrap()
            .queues
            .iter()
            .all(|q| q.enqueued == 0)
    );
}

/// A malformed lease id is refused with what is wrong with it, not only that it is wrong.
#[tokio::test]
async fn a_malformed_lease_id_is_refused_with_the_reason() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    for (lease_id, why) in [
        ("garbage", "it has 1 of the 3 parts"),
        ("q/seven/ff", "the seq is not a number"),
        ("q/7/xyz", "the nonce is not hexadecimal"),
        ("/7/ff", "the queue name is empty"),
    ] {
        assert_refused(
            rpc.nack(pb::NackRequest {
                lease_id: lease_id.into(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["lease_id", "not a lease id", why],
        );
    }
}

#[tokio::test]
async fn unknown_and_malformed_leases() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    assert_refused(
        rpc.ack(pb::AckRequest {
            acks: vec![pb::LeaseAck {
                lease_id: "garbage".into(),
                ..Default::default()
            }],
        })
        .await,
        Code::InvalidArgument,
        &["acks[0].lease_id", "not a lease id"],
    );
    assert_refused(
        rpc.nack(pb::NackRequest {
            lease_id: "nope/1/ff".into(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        &["stale", "no longer exists"],
    );
    client.enqueue("l", "x").send().await.unwrap();
    assert_refused(
        rpc.extend_lease(pb::ExtendLeaseRequest {
            lease_id: "l/1/abc".into(),
            visibility_timeout_ms: 1000,
        })
        .await,
        Code::FailedPrecondition,
        &["stale"],
    );
}

#[tokio::test]
async fn a_batch_ack_with_one_stale_lease_acks_nothing() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    client
        .enqueue_batch("s", vec![Job::new("a"), Job::new("b")])
        .await
        .unwrap();
    let leases = client.lease("s").max_jobs(2).send().await.unwrap();
    let mut acks: Vec<pb::LeaseAck> = leases
        .iter()
        .map(|l| pb::LeaseAck {
            lease_id: l.lease_id().into(),
            ..Default::default()
        })
        .collect();
    acks[1].lease_id = format!("s/2/{:x}", 12345u64);
    assert_refused(
        client.rpc().ack(pb::AckRequest { acks }).await,
        Code::FailedPrecondition,
        &["1 of 2 leases are stale", "nothing was acked"],
    );
    let q = stats_of(&client, "s").await.unwrap();
    assert_eq!((q.leased, q.completed), (2, 0));
    client.ack_batch(leases).await.unwrap();
}

#[tokio::test]
async fn a_full_queue_is_resource_exhausted_for_enqueue_and_bound_publish() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    client
        .create_queue(
            "small",
            pb::QueuePolicy {
                max_depth: 2,
                topic_bindings: vec!["feed.>".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    client.enqueue("small", "1").send().await.unwrap();
    assert_refused(
        rpc.enqueue(enqueue("small", vec![spec("2"), spec("3")]))
            .await,
        Code::ResourceExhausted,
        &["small", "max_depth 2"],
    );
    assert_eq!(stats_of(&client, "small").await.unwrap().pending, 1);

    client.publish("feed.a", "fits").await.unwrap();
    if !common::checked_on_this_engine("a publish into a full bound queue is refused") {
        return;
    }
    assert_refused(
        rpc.publish(pb::PublishRequest {
            topic: "feed.a".into(),
            messages: vec![pb::PublishMessage::default()],
        })
        .await,
        Code::ResourceExhausted,
        &["nothing published", "small"],
    );
    let stats = client.stats().await.unwrap();
    let topic = stats.topics.iter().find(|t| t.name == "feed.a").unwrap();
    assert_eq!(
        topic.last_sequence, 1,
        "the refused publish appended nothing"
    );
}

#[tokio::test]
async fn not_found_and_already_exists() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    let err = client
        .get_job(&uuid::Uuid::now_v7().to_string())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    let err = client.get_job("not-a-uuid").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert_refused(
        rpc.update_queue(pb::UpdateQueueRequest {
            name: "ghost".into(),
            policy: None,
        })
        .await,
        Code::NotFound,
        &["ghost"],
    );
    let err = rpc
        .delete_topic(pb::DeleteTopicRequest {
            name: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = rpc
        .list_jobs(pb::ListJobsRequest {
            queue: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_refused(
        rpc.create_queue(pb::CreateQueueRequest {
            name: "q".into(),
            policy: Some(pb::QueuePolicy {
                dead_letter_queue: "q".into(),
                ..Default::default()
            }),
        })
        .await,
        Code::InvalidArgument,
        &["policy.dead_letter_queue", "the queue itself"],
    );
    assert_refused(
        rpc.create_queue(pb::CreateQueueRequest {
            name: "q".into(),
            policy: Some(pb::QueuePolicy {
                topic_bindings: vec!["bad..pattern".into()],
                ..Default::default()
            }),
        })
        .await,
        Code::InvalidArgument,
        &["policy.topic_bindings[0]"],
    );
    assert!(client.stats().await.unwrap().queues.is_empty());
}

/// Per-job limits name the job's index and the field, and refuse the whole batch.
#[tokio::test]
async fn per_job_limits_name_the_job_and_refuse_the_whole_batch() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    let long = "k".repeat(256);
    let year_ms: u64 = 365 * 24 * 3600 * 1000;
    let cases: Vec<(pb::JobSpec, &str, String)> = vec![
        (
            pb::JobSpec {
                delay_ms: year_ms + 1,
                ..spec("x")
            },
            "jobs[1].delay_ms",
            format!("{} ms exceeds the limit of {year_ms} ms", year_ms + 1),
        ),
        (
            pb::JobSpec {
                kind: long.clone(),
                ..spec("x")
            },
            "jobs[1].kind",
            "256 bytes exceeds the limit of 255 bytes".into(),
        ),
        (
            pb::JobSpec {
                idempotency_key: long.clone(),
                ..spec("x")
            },
            "jobs[1].idempotency_key",
            "256 bytes exceeds the limit of 255 bytes".into(),
        ),
        (
            pb::JobSpec {
                ordering_key: long.clone(),
                ..spec("x")
            },
            "jobs[1].ordering_key",
            "256 bytes exceeds the limit of 255 bytes".into(),
        ),
    ];
    for (bad, field, problem) in cases {
        assert_refused(
            rpc.enqueue(enqueue("per-job", vec![spec("fine"), bad]))
                .await,
            Code::InvalidArgument,
            &[field, &problem],
        );
    }
    // The valid first job of each batch was not enqueued either.
    let depth = stats_of(&client, "per-job").await.map_or(0, |q| q.pending);
    assert_eq!(depth, 0);
}

fn broker_config(limits: impl FnOnce(&mut sluice::broker::Limits)) -> BrokerConfig {
    let mut config = BrokerConfig::default();
    limits(&mut config.limits);
    config
}

/// Lease one job of `queue` and nack it as poison, so it is dead-lettered.
async fn dead_letter_one(rpc: &mut sluice::client::Rpc, queue: &str) {
    let jobs = common::rpc::lease(rpc, queue, "", 1).await;
    rpc.nack(pb::NackRequest {
        lease_id: jobs[0].lease_id.clone(),
        error: "poison".into(),
        dead_letter: true,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Issue 17, items 1 and 10: dead-letter queues, the queues named by policies and redrive
/// targets all count against `--max-queues`. A queue's dead-letter queue takes its slot
/// when a policy names it (an auto-created queue takes two), so dead letters, which are
/// never refused, never pass the limit. On the old code, 5 queues were created and their
/// dead letters forced 5 dead-letter queues more: 10 queues under `--max-queues 5`.
#[tokio::test]
async fn dead_letter_queues_and_redrive_targets_count_against_max_queues() {
    let broker = TestBroker::start_with(broker_config(|l| l.max_queues = 5)).await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    let mut created = Vec::new();
    for i in 0..10 {
        let name = format!("q{i}");
        match rpc.enqueue(enqueue(&name, vec![spec("x")])).await {
            Ok(_) => created.push(name),
            Err(err) => {
                assert_status(
                    err,
                    Code::ResourceExhausted,
                    &[
                        &format!(
                            "queue: cannot create queue \"{name}\" with its dead-letter queue \"{name}.dlq\""
                        ),
                        "maximum of 5 queues (4 in use",
                    ],
                );
                break;
            }
        }
    }
    for name in &created {
        dead_letter_one(&mut rpc, name).await;
    }
    let queues = list_queues(&mut rpc).await.len();
    assert!(queues <= 5, "{queues} queues under --max-queues 5");
    assert_eq!(created, ["q0", "q1"]);
    assert_eq!(queues, 4, "q0, q1 and their dead-letter queues");

    // A policy naming a dead-letter queue that does not exist takes its slot at once.
    let create = |name: &str, dlq: &str| pb::CreateQueueRequest {
        name: name.into(),
        policy: Some(pb::QueuePolicy {
            dead_letter_queue: dlq.into(),
            ..Default::default()
        }),
    };
    assert_refused(
        rpc.create_queue(create("z", "graveyard")).await,
        Code::ResourceExhausted,
        &["name: cannot create queue \"z\" with its dead-letter queue \"graveyard\""],
    );
    rpc.create_queue(create("z", "q0.dlq")).await.unwrap();
    assert_refused(
        rpc.update_queue(pb::UpdateQueueRequest {
            name: "z".into(),
            policy: Some(pb::QueuePolicy {
                dead_letter_queue: "graveyard".into(),
                ..Default::default()
            }),
        })
        .await,
        Code::ResourceExhausted,
        &[
            "policy.dead_letter_queue: cannot create dead-letter queue \"graveyard\"",
            "maximum of 5",
        ],
    );
    let z = list_queues(&mut rpc)
        .await
        .into_iter()
        .find(|q| q.name == "z")
        .unwrap();
    assert_eq!(
        z.policy.unwrap().dead_letter_queue,
        "q0.dlq",
        "the refused update changed nothing"
    );

    // Redrive into a queue that no longer exists must find room for it first.
    rpc.delete_queue(pb::DeleteQueueRequest { name: "q0".into() })
        .await
        .unwrap();
    rpc.create_queue(create("w", "q1.dlq")).await.unwrap();
    assert_eq!(list_queues(&mut rpc).await.len(), 5);
    assert_refused(
        rpc.redrive(pb::RedriveRequest {
            dead_letter_queue: "q0.dlq".into(),
            ..Default::default()
        })
        .await,
        Code::ResourceExhausted,
        &["dead_letter_queue: cannot create queues q0", "maximum of 5"],
    );
    assert_eq!(
        stats_of(&client, "q0.dlq").await.unwrap().pending,
        1,
        "nothing moved"
    );
    assert_eq!(list_queues(&mut rpc).await.len(), 5);
    // Once there is room, it goes home.
    rpc.delete_queue(pb::DeleteQueueRequest { name: "w".into() })
        .await
        .unwrap();
    let done = rpc
        .redrive(pb::RedriveRequest {
            dead_letter_queue: "q0.dlq".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.redriven, 1);
    assert_eq!(stats_of(&client, "q0").await.unwrap().pending, 1);
}

/// Concurrent redrives into queues that no longer exist count against `--max-queues`
/// together: four redrives at once, each needing two places (the origin and its default
/// dead-letter queue) with four free (of 6: "dl" and the "dl.dlq" its policy names take
/// two), make exactly two of them; the others are refused and move nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_redrives_hold_max_queues_between_them() {
    let broker = TestBroker::start_with(broker_config(|l| l.max_queues = 6)).await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    for i in 0..4 {
        let name = format!("o{i}");
        rpc.create_queue(pb::CreateQueueRequest {
            name: name.clone(),
            policy: Some(pb::QueuePolicy {
                dead_letter_queue: "dl".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
        rpc.enqueue(enqueue(&name, vec![spec("x")])).await.unwrap();
        dead_letter_one(&mut rpc, &name).await;
        rpc.delete_queue(pb::DeleteQueueRequest { name })
            .await
            .unwrap();
    }
    let letters = common::rpc::list_jobs(&mut rpc, "dl").await;
    assert_eq!(letters.len(), 4);
    let mut tasks = Vec::new();
    for letter in letters {
        let mut rpc = client.rpc();
        tasks.push(tokio::spawn(async move {
            rpc.redrive(pb::RedriveRequest {
                dead_letter_queue: "dl".into(),
                job_ids: vec![letter.id],
                ..Default::default()
            })
            .await
        }));
    }
    let mut redriven = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(done) => redriven += done.into_inner().redriven,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status}"),
        }
    }
    assert_eq!(redriven, 2);
    let queues = list_queues(&mut rpc).await;
    assert_eq!(queues.len(), 3, "dl and two origins: {queues:?}");
    assert_eq!(
        stats_of(&client, "dl").await.unwrap().pending,
        2,
        "the rest stay"
    );
}

/// Issue 17, item 9: every duration and count of a policy or request has a maximum. Each
/// field is tried at its limit + 1 and at u64::MAX (or u32::MAX where the field is 32-bit):
/// INVALID_ARGUMENT naming the field, the limit and the value, and nothing changes. On the
/// old code backoff `initial_ms`/`max_ms` of u64::MAX were accepted (the retry wrapped to
/// "now"), as were retention, depth, WatchStats interval and Redrive rate and size.
#[tokio::test]
async fn every_duration_and_count_is_range_checked() {
    const H12: u64 = 12 * 3600 * 1000;
    const DAY: u64 = 24 * 3600 * 1000;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    rpc.create_queue(pb::CreateQueueRequest {
        name: "t".into(),
        policy: None,
    })
    .await
    .unwrap();
    client.enqueue("t", "job").send().await.unwrap();
    let lease_id = rpc
        .lease(pb::LeaseRequest {
            queue: "t".into(),
            max_jobs: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs[0]
        .lease_id
        .clone();
    let before = list_queues(&mut rpc).await[0].policy.clone();

    // (field, limit, value)
    type Case = (&'static str, u64, u64);
    // (field, limit, the policy that sets it to a value)
    type PolicyCase = (&'static str, u64, fn(u64) -> pb::QueuePolicy);
    let policy_cases: [PolicyCase; 7] = [
        ("policy.visibility_timeout_ms", H12, |v| pb::QueuePolicy {
            visibility_timeout_ms: v,
            ..Default::default()
        }),
        ("policy.backoff.initial_ms", H12, |v| pb::QueuePolicy {
            backoff: Some(pb::BackoffPolicy {
                initial_ms: v,
                max_ms: v,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ("policy.backoff.max_ms", H12, |v| pb::QueuePolicy {
            backoff: Some(pb::BackoffPolicy {
                initial_ms: 1,
                max_ms: v,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ("policy.backoff.delays_ms[1]", H12, |v| pb::QueuePolicy {
            backoff: Some(pb::BackoffPolicy {
                delays_ms: vec![1, v],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ("policy.dedup_window_ms", 7 * DAY, |v| pb::QueuePolicy {
            dedup_window_ms: v,
            ..Default::default()
        }),
        ("policy.max_depth", 1_000_000_000, |v| pb::QueuePolicy {
            max_depth: v,
            ..Default::default()
        }),
        ("policy.history_limit", 100_000, |v| pb::QueuePolicy {
            history_limit: v as u32,
            ..Default::default()
        }),
    ];
    let mut tried = 0;
    for (field, limit, policy) in policy_cases {
        let max = if field == "policy.history_limit" {
            u32::MAX as u64
        } else {
            u64::MAX
        };
        for value in [limit + 1, max] {
            for update in [false, true] {
                let result = if update {
                    rpc.update_queue(pb::UpdateQueueRequest {
                        name: "t".into(),
                        policy: Some(policy(value)),
                    })
                    .await
                    .map(drop)
                } else {
                    rpc.create_queue(pb::CreateQueueRequest {
                        name: "t2".into(),
                        policy: Some(policy(value)),
                    })
                    .await
                    .map(drop)
                };
                let err = result.expect_err(&format!("{field} = {value} was accepted"));
                assert_status(
                    err,
                    Code::InvalidArgument,
                    &[
                        &format!("{field}: {value}"),
                        &format!("exceeds the limit of {limit}"),
                    ],
                );
                tried += 1;
            }
        }
    }
    let schedule = pb::QueuePolicy {
        backoff: Some(pb::BackoffPolicy {
            delays_ms: vec![1; 101],
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_refused(
        rpc.update_queue(pb::UpdateQueueRequest {
            name: "t".into(),
            policy: Some(schedule),
        })
        .await,
        Code::InvalidArgument,
        &["policy.backoff.delays_ms: 101 exceeds the limit of 100"],
    );

    let mut request_cases: Vec<Case> = Vec::new();
    for (field, limit) in [
        ("jobs[0].delay_ms", 365 * DAY),
        ("retention.max_messages", 1_000_000_000),
        ("retention.max_bytes", 1 << 40),
        ("retention.max_age_ms", 365 * DAY),
        ("visibility_timeout_ms", H12),
        ("wait_ms", 60_000),
        ("retry_delay_ms", H12),
        ("max_jobs", 1_000_000_000),
    ] {
        request_cases.push((field, limit, limit + 1));
        request_cases.push((field, limit, u64::MAX));
    }
    for (field, limit, value) in request_cases {
        let result = match field {
            "jobs[0].delay_ms" => rpc
                .enqueue(enqueue(
                    "t",
                    vec![pb::JobSpec {
                        delay_ms: value,
                        ..Default::default()
                    }],
                ))
                .await
                .map(drop),
            f if f.starts_with("retention.") => {
                let mut retention = pb::RetentionPolicy::default();
                match f {
                    "retention.max_messages" => retention.max_messages = value,
                    "retention.max_bytes" => retention.max_bytes = value,
                    _ => retention.max_age_ms = value,
                }
                rpc.create_topic(pb::CreateTopicRequest {
                    name: "t".into(),
                    retention: Some(retention),
                })
                .await
                .map(drop)
            }
            "visibility_timeout_ms" => rpc
                .extend_lease(pb::ExtendLeaseRequest {
                    lease_id: lease_id.clone(),
                    visibility_timeout_ms: value,
                })
                .await
                .map(drop),
            "wait_ms" => rpc
                .lease(pb::LeaseRequest {
                    queue: "t".into(),
                    wait_ms: value,
                    ..Default::default()
                })
                .await
                .map(drop),
            "retry_delay_ms" => rpc
                .nack(pb::NackRequest {
                    lease_id: lease_id.clone(),
                    retry_delay_ms: value,
                    ..Default::default()
                })
                .await
                .map(drop),
            _ => rpc
                .redrive(pb::RedriveRequest {
                    dead_letter_queue: "t".into(),
                    max_jobs: value,
                    ..Default::default()
                })
                .await
                .map(drop),
        };
        let err = result.expect_err(&format!("{field} = {value} was accepted"));
        assert_status(
            err,
            Code::InvalidArgument,
            &[
                &format!("{field}: {value}"),
                &format!("exceeds the limit of {limit}"),
            ],
        );
        tried += 1;
    }
    // 32-bit fields at limit + 1 and u32::MAX.
    for value in [100_001u32, u32::MAX] {
        assert_refused(
            rpc.redrive(pb::RedriveRequest {
                dead_letter_queue: "t".into(),
                rate_per_second: value,
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &[&format!(
                "rate_per_second: {value} exceeds the limit of 100000"
            )],
        );
    }
    for value in [3_600_001u32, u32::MAX] {
        assert_refused(
            rpc.watch_stats(pb::WatchStatsRequest {
                interval_ms: value,
                filter: None,
            })
            .await
            .map(drop),
            Code::InvalidArgument,
            &[&format!(
                "interval_ms: {value} ms exceeds the limit of 3600000 ms"
            )],
        );
    }
    assert_eq!(tried, 28 + 16);

    // Nothing changed: the policy, the lease (still live), no new queue or topic.
    let queues = list_queues(&mut rpc).await;
    assert_eq!(queues.len(), 1, "only t: no dead-letter queue made, no t2");
    assert_eq!(queues[0].policy, before);
    let stats = stats_of(&client, "t").await.unwrap();
    assert_eq!((stats.leased, stats.retrying, stats.enqueued), (1, 0, 1));
    assert!(client.stats().await.unwrap().topics.is_empty());
}

/// `--max-queues` holds when many requests create queues at once: each auto-created queue
/// takes two places (itself and its dead-letter queue), so 40 concurrent first enqueues to
/// distinct queues under `--max-queues 6` make exactly 3 queues and their 3 dead-letter
/// queues; every other request is RESOURCE_EXHAUSTED naming the limit and stores nothing.
/// (On Redis, counting and creating are two steps; the catalog lock makes them one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_queues_holds_under_concurrent_creation() {
    let broker = TestBroker::start_with(broker_config(|l| l.max_queues = 6)).await;
    let client = broker.client().await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client.enqueue(&format!("c{i}"), "x").send().await
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(err) => {
                assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
                assert!(err.to_string().contains("6"), "{err}");
            }
        }
    }
    let mut rpc = client.rpc();
    let queues = list_queues(&mut rpc).await;
    assert_eq!(accepted, 3, "{queues:?}");
    assert_eq!(queues.len(), 3, "{queues:?}");
    let stats = client.stats().await.unwrap();
    let pending: u64 = stats.queues.iter().map(|q| q.pending).sum();
    assert_eq!(pending, 3, "one job in each queue made: {:?}", stats.queues);
}
