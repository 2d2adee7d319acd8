//! Every documented refusal, over real gRPC: the status code, a message naming the field,
//! the limit and the value, and the guarantee that a rejected request changes nothing.

mod common;

use std::collections::HashMap;

use bytes::Bytes;
use common::TestBroker;
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

fn assert_status(err: tonic::Status, code: Code, needles: &[&str]) {
    assert_eq!(err.code(), code, "{err:?}");
    for n in needles {
        assert!(err.message().contains(n), "{:?} lacks {n:?}", err.message());
    }
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
        let err = rpc
            .enqueue(enqueue(name, vec![spec("x")]))
            .await
            .unwrap_err();
        assert_status(err, Code::InvalidArgument, &["queue"]);
        let err = rpc
            .publish(pb::PublishRequest {
                topic: name.into(),
                messages: vec![pb::PublishMessage::default()],
            })
            .await
            .unwrap_err();
        assert_status(err, Code::InvalidArgument, &["topic"]);
    }
    let stats = client.stats().await.unwrap();
    assert!(stats.queues.is_empty() && stats.topics.is_empty());

    let err = rpc
        .subscribe(pb::SubscribeRequest {
            pattern: "a.>.b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        err,
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
    let err = rpc
        .enqueue(enqueue("big", vec![spec("ok"), spec(too_big.clone())]))
        .await
        .unwrap_err();
    assert_status(
        err,
        Code::InvalidArgument,
        &["jobs[1].payload", "1048577 bytes", "limit of 1048576"],
    );
    assert_eq!(stats_of(&client, "big").await.unwrap().pending, 1);

    let err = rpc
        .publish(pb::PublishRequest {
            topic: "big".into(),
            messages: vec![pb::PublishMessage {
                payload: too_big,
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_status(
        err,
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
    let err = rpc
        .enqueue(enqueue("b", (0..1001).map(|_| spec("x")).collect()))
        .await
        .unwrap_err();
    assert_status(
        err,
        Code::InvalidArgument,
        &["jobs", "1001 entries", "limit of 1000"],
    );
    let err = rpc.enqueue(enqueue("b", vec![])).await.unwrap_err();
    assert_status(err, Code::InvalidArgument, &["jobs", "at least 1"]);
    let err = rpc
        .ack(pb::AckRequest {
            acks: (0..1001).map(|_| pb::LeaseAck::default()).collect(),
        })
        .await
        .unwrap_err();
    assert_status(err, Code::InvalidArgument, &["acks", "1001"]);
    let err = rpc
        .lease(pb::LeaseRequest {
            queue: "b".into(),
            max_jobs: 1001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(err, Code::InvalidArgument, &["max_jobs", "1001"]);
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
        let err = rpc.enqueue(enqueue("h", vec![spec])).await.unwrap_err();
        assert_status(err, Code::InvalidArgument, fragments);
    }
    let err = rpc
        .create_queue(pb::CreateQueueRequest {
            name: "h2".into(),
            policy: Some(pb::QueuePolicy {
                max_attempts: 10_001,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_status(
        err,
        Code::InvalidArgument,
        &["policy.max_attempts: 10001 exceeds the limit of 10000"],
    );
    let err = rpc
        .lease(pb::LeaseRequest {
            queue: "h".into(),
            visibility_timeout_ms: 12 * 3600 * 1000 + 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        err,
        Code::InvalidArgument,
        &["visibility_timeout_ms", "43200001"],
    );
    let err = rpc
        .lease(pb::LeaseRequest {
            queue: "h".into(),
            wait_ms: 60_001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(err, Code::InvalidArgument, &["wait_ms", "60001", "60000"]);
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

#[tokio::test]
async fn unknown_and_malformed_leases() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    let err = rpc
        .ack(pb::AckRequest {
            acks: vec![pb::LeaseAck {
                lease_id: "garbage".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_status(
        err,
        Code::InvalidArgument,
        &["acks[0].lease_id", "not a lease id"],
    );
    let err = rpc
        .nack(pb::NackRequest {
            lease_id: "nope/1/ff".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        err,
        Code::FailedPrecondition,
        &["stale", "no longer exists"],
    );
    client.enqueue("l", "x").send().await.unwrap();
    let err = rpc
        .extend_lease(pb::ExtendLeaseRequest {
            lease_id: "l/1/abc".into(),
            visibility_timeout_ms: 1000,
        })
        .await
        .unwrap_err();
    assert_status(err, Code::FailedPrecondition, &["stale"]);
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
    let err = client.rpc().ack(pb::AckRequest { acks }).await.unwrap_err();
    assert_status(
        err,
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
    let err = rpc
        .enqueue(enqueue("small", vec![spec("2"), spec("3")]))
        .await
        .unwrap_err();
    assert_status(err, Code::ResourceExhausted, &["small", "max_depth 2"]);
    assert_eq!(stats_of(&client, "small").await.unwrap().pending, 1);

    client.publish("feed.a", "fits").await.unwrap();
    let err = rpc
        .publish(pb::PublishRequest {
            topic: "feed.a".into(),
            messages: vec![pb::PublishMessage::default()],
        })
        .await
        .unwrap_err();
    assert_status(
        err,
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
    let err = rpc
        .update_queue(pb::UpdateQueueRequest {
            name: "ghost".into(),
            policy: None,
        })
        .await
        .unwrap_err();
    assert_status(err, Code::NotFound, &["ghost"]);
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
    let err = rpc
        .create_queue(pb::CreateQueueRequest {
            name: "q".into(),
            policy: Some(pb::QueuePolicy {
                dead_letter_queue: "q".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_status(
        err,
        Code::InvalidArgument,
        &["policy.dead_letter_queue", "the queue itself"],
    );
    let err = rpc
        .create_queue(pb::CreateQueueRequest {
            name: "q".into(),
            policy: Some(pb::QueuePolicy {
                topic_bindings: vec!["bad..pattern".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_status(err, Code::InvalidArgument, &["policy.topic_bindings[0]"]);
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
        let err = rpc
            .enqueue(enqueue("per-job", vec![spec("fine"), bad]))
            .await
            .unwrap_err();
        assert_status(err, Code::InvalidArgument, &[field, &problem]);
    }
    // The valid first job of each batch was not enqueued either.
    let depth = stats_of(&client, "per-job").await.map_or(0, |q| q.pending);
    assert_eq!(depth, 0);
}
