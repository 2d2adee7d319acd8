//! PublishStream and EnqueueStream over real gRPC: pipelined requests answered in order,
//! a refusal ends the stream and applies nothing after it, durability across a restart,
//! the end of the stream on shutdown, and the client's Publisher and Enqueuer.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use common::{TestBroker, publish_request as publish, within};
use futures::StreamExt;
use sluice::broker::{Broker, BrokerConfig, DirStorage, StoreConfig};
use sluice::client::{ClientError, Job, Message};
use sluice::pb;
use tonic::Code;

fn enqueue(queue: &str, payload: &str, priority: u32) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        queue: queue.into(),
        jobs: vec![pb::JobSpec {
            payload: Bytes::from(payload.to_owned()),
            priority,
            ..Default::default()
        }],
    }
}

async fn topic_messages(rpc: &mut sluice::client::Rpc, topic: &str) -> u64 {
    let stats = rpc
        .stats(pb::StatsRequest {
            topics: vec![topic.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stats.topics.iter().map(|t| t.retained_messages).sum()
}

#[tokio::test]
async fn pipelined_publishes_are_answered_in_request_order() {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    // Every request is sent before the first answer is read.
    let requests: Vec<_> = (0..50)
        .map(|i| publish("pipe", &[&format!("a{i}"), &format!("b{i}")]))
        .collect();
    let mut answers = rpc
        .publish_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    for i in 0..50u64 {
        let answer = within(answers.message()).await.unwrap().unwrap();
        let seqs: Vec<u64> = answer.results.iter().map(|r| r.sequence).collect();
        assert_eq!(seqs, [2 * i + 1, 2 * i + 2], "answer {i}");
    }
    // The client closed its side: the broker ends the stream with OK.
    assert!(within(answers.message()).await.unwrap().is_none());
    assert_eq!(topic_messages(&mut rpc, "pipe").await, 100);
}

#[tokio::test]
async fn a_refused_publish_is_answered_with_its_status_and_the_stream_goes_on() {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    let too_big = "x".repeat(1024 * 1024 + 1);
    let requests = vec![
        publish("refused", &["first"]),
        publish("refused", &["ok", &too_big]),
        publish("refused", &["after"]),
    ];
    let mut answers = rpc
        .publish_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let first = within(answers.message()).await.unwrap().unwrap();
    assert_eq!(first.results[0].sequence, 1);
    assert!(first.refused.is_none());
    let second = within(answers.message()).await.unwrap().unwrap();
    assert!(second.results.is_empty());
    let refusal = second.refused.expect("the oversized batch is refused");
    assert_eq!(Code::from(refusal.code), Code::InvalidArgument);
    assert!(
        refusal.message.contains("messages[1].payload")
            && refusal.message.contains("1048577")
            && refusal.message.contains("1048576"),
        "{}",
        refusal.message
    );
    // Nothing of the refused batch was appended: the next message gets sequence 2.
    let third = within(answers.message()).await.unwrap().unwrap();
    assert_eq!(third.results[0].sequence, 2);
    assert!(within(answers.message()).await.unwrap().is_none());
    assert_eq!(topic_messages(&mut rpc, "refused").await, 2);
}

#[tokio::test]
async fn a_refused_enqueue_is_answered_with_its_status_and_the_stream_goes_on() {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    let requests = vec![
        enqueue("refusing", "first", 0),
        enqueue("refusing", "bad", 10),
        enqueue("refusing", "after", 0),
    ];
    let mut answers = rpc
        .enqueue_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let first = within(answers.message()).await.unwrap().unwrap();
    assert_eq!(first.results.len(), 1);
    let second = within(answers.message()).await.unwrap().unwrap();
    assert!(second.results.is_empty());
    let refusal = second.refused.expect("priority 10 is refused");
    assert_eq!(Code::from(refusal.code), Code::InvalidArgument);
    assert!(
        refusal.message.contains("jobs[0].priority") && refusal.message.contains("10"),
        "{}",
        refusal.message
    );
    let third = within(answers.message()).await.unwrap().unwrap();
    assert_eq!(third.results.len(), 1);
    let leased = rpc
        .lease(pb::LeaseRequest {
            queue: "refusing".into(),
            max_jobs: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let got: Vec<(&str, &[u8])> = leased
        .iter()
        .map(|j| (j.job_id.as_str(), j.payload.as_ref()))
        .collect();
    assert_eq!(
        got,
        [
            (first.results[0].job_id.as_str(), b"first".as_slice()),
            (third.results[0].job_id.as_str(), b"after".as_slice()),
        ]
    );
}

#[tokio::test]
async fn a_full_queue_refuses_one_streamed_enqueue_with_resource_exhausted() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    client
        .create_queue(
            "small",
            pb::QueuePolicy {
                max_depth: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let enqueuer = client.enqueuer();
    enqueuer
        .enqueue_batch("small", vec![Job::new("a"), Job::new("b")])
        .await
        .unwrap();
    let full = enqueuer.enqueue("small", Job::new("c")).await.unwrap_err();
    assert_eq!(full.code(), Some(Code::ResourceExhausted), "{full}");
    assert!(full.to_string().contains("max_depth"), "{full}");
}

#[tokio::test]
async fn publisher_shares_one_stream_among_concurrent_callers() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut events = client.subscribe("shared").raw().await.unwrap();
    let publisher = client.publisher();
    let mut tasks = Vec::new();
    for t in 0..20 {
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                let message = Message::new(format!("{t}-{i}"));
                seqs.push(publisher.publish("shared", message).await.unwrap());
            }
            seqs
        }));
    }
    let mut seqs = HashSet::new();
    for t in tasks {
        for s in within(t).await.unwrap() {
            assert!(seqs.insert(s), "sequence {s} answered twice");
        }
    }
    assert_eq!(seqs, (1..=500).collect::<HashSet<u64>>());
    let mut delivered = HashSet::new();
    while delivered.len() < 500 {
        let d = within(events.next()).await.unwrap().unwrap();
        delivered.insert(String::from_utf8(d.value.to_vec()).unwrap());
    }
    let expected: HashSet<String> = (0..20)
        .flat_map(|t| (0..25).map(move |i| format!("{t}-{i}")))
        .collect();
    assert_eq!(delivered, expected);
}

#[tokio::test]
async fn a_refusal_reaches_only_its_own_caller() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let enqueuer = client.enqueuer();
    let good = {
        let enqueuer = enqueuer.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..50 {
                let job = Job::new(format!("good-{i}"));
                ids.push(enqueuer.enqueue("jobs", job).await.unwrap().job_id);
            }
            ids
        })
    };
    for _ in 0..20 {
        let refused = enqueuer
            .enqueue("jobs", Job::new("bad").priority(10))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some(Code::InvalidArgument), "{refused}");
        assert!(
            refused.to_string().contains("jobs[0].priority"),
            "{refused}"
        );
    }
    let ids = within(good).await.unwrap();
    let leased = client.lease("jobs").max_jobs(100).send().await.unwrap();
    let leased: Vec<&str> = leased.iter().map(|l| l.job_id()).collect();
    assert_eq!(leased, ids, "every good job, in order, and no refused one");
}

#[tokio::test]
async fn streamed_enqueues_are_durable_when_answered() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        Broker::open(
            BrokerConfig::default(),
            Arc::new(DirStorage::open(dir.path()).unwrap()),
            StoreConfig::default(),
        )
        .unwrap()
        .0
    };
    let mut ids = HashSet::new();
    {
        let mut served = TestBroker::serving(open()).await;
        let enqueuer = served.client().await.enqueuer();
        let mut tasks = Vec::new();
        for t in 0..10 {
            let enqueuer = enqueuer.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..30 {
                    let job = Job::new(format!("{t}-{i}"));
                    ids.push(enqueuer.enqueue("durable", job).await.unwrap().job_id);
                }
                ids
            }));
        }
        for t in tasks {
            ids.extend(within(t).await.unwrap());
        }
        served.stop();
        within(&mut served.handle).await.unwrap();
        served.broker().close_storage();
    }
    let reopened = open();
    let listed = reopened.list_jobs("durable", None, 1000, "").unwrap().0;
    let restored: HashSet<String> = listed.iter().map(|j| j.id.to_string()).collect();
    assert_eq!(restored.len(), 300);
    assert_eq!(restored, ids);
    reopened.close_storage();
}

#[tokio::test]
async fn an_open_publish_stream_ends_with_ok_on_shutdown() {
    let mut broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(publish("closing", &["m"])).await.unwrap();
    let mut answers = rpc
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        within(answers.message()).await.unwrap().unwrap().results[0].sequence,
        1
    );
    // Our side stays open; the broker ends the stream itself.
    broker.stop();
    assert!(within(answers.message()).await.unwrap().is_none());
    within(&mut broker.handle).await.unwrap();
    drop(tx);
}

#[tokio::test]
async fn a_publisher_reports_a_broker_that_is_gone_instead_of_waiting() {
    let mut broker = TestBroker::start().await;
    let publisher = broker.client().await.publisher();
    assert_eq!(
        publisher.publish("gone", Message::new("m")).await.unwrap(),
        1
    );
    broker.stop();
    within(&mut broker.handle).await.unwrap();
    let err = within(publisher.publish("gone", Message::new("n")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Status(_) | ClientError::Unanswered { .. }),
        "{err}"
    );
}
