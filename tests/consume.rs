//! The streaming Consume RPC: credit-based flow control, acks on the stream, refusals,
//! release of unsettled jobs when the stream closes.

mod common;

use std::time::Duration;

use common::{TestBroker, eventually, long_poll, wait_for_consumer, within};
use futures::StreamExt;
use sluice::client::{ClientError, Job};
use sluice::pb;
use tonic::Code;

async fn enqueue_n(client: &sluice::client::Client, queue: &str, n: usize) {
    let jobs = (0..n).map(|i| Job::new(format!("{i}"))).collect();
    client.enqueue_batch(queue, jobs).await.unwrap();
}

#[tokio::test]
async fn credits_bound_the_jobs_in_flight_and_acks_on_the_stream_complete_them() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    enqueue_n(&client, "c", 10).await;
    let mut consumer = client
        .consume("c")
        .prefetch(3)
        .consumer("s1")
        .open()
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(within(consumer.next()).await.unwrap().unwrap());
    }
    // No fourth job while three are unsettled.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), consumer.next())
            .await
            .is_err()
    );
    held.remove(0).ack().await.unwrap();
    held.push(within(consumer.next()).await.unwrap().unwrap());
    for lease in held.drain(..) {
        lease.ack().await.unwrap();
    }
    for _ in 0..6 {
        within(consumer.next())
            .await
            .unwrap()
            .unwrap()
            .ack()
            .await
            .unwrap();
    }
    // Acks travel asynchronously; wait until the broker has applied them.
    eventually(|| async {
        match client.stats().await.unwrap().queues[0].completed {
            10 => Ok(()),
            n => Err(format!("{n} of 10 jobs completed")),
        }
    })
    .await;
    let consumers = client
        .rpc()
        .list_consumers(pb::ListConsumersRequest { queue: "c".into() })
        .await
        .unwrap()
        .into_inner()
        .consumers;
    assert_eq!((consumers[0].name.as_str(), consumers[0].done), ("s1", 10));
}

#[tokio::test]
async fn an_idle_stream_waits_for_work_and_nacks_stay_exact() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut consumer = client
        .consume("idle")
        .consumer("idle-stream")
        .open()
        .await
        .unwrap();
    // Listed once it has looked at the (empty) queue: from then on it waits for work.
    wait_for_consumer(&client, "idle", "idle-stream").await;
    client.enqueue("idle", "late").send().await.unwrap();
    let lease = within(consumer.next()).await.unwrap().unwrap();
    assert_eq!(lease.payload().as_ref(), b"late");
    let outcome = lease
        .nack_after("try again", Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(outcome.state, pb::JobState::Retrying);
    let again = within(consumer.next()).await.unwrap().unwrap();
    assert_eq!(again.attempt(), 2);
    assert_eq!(
        again.dead_letter("poison").await.unwrap().state,
        pb::JobState::Dead
    );
}

#[tokio::test]
async fn a_stream_without_credits_does_not_hold_up_other_waiters() {
    // A wake-up goes to one waiter: a stream whose only credit is in use must not be that
    // waiter, or the long poll below would sleep through the job until its wait ran out.
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut consumer = client.consume("nc").prefetch(1).open().await.unwrap();
    client.enqueue("nc", "first").send().await.unwrap();
    let held = within(consumer.next()).await.unwrap().unwrap();
    assert_eq!(held.payload().as_ref(), b"first");
    let waiter = long_poll(&client, "nc", Duration::from_secs(30)).await;
    client.enqueue("nc", "second").send().await.unwrap();
    let leases = within(waiter).await.unwrap().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].payload().as_ref(), b"second");
    held.ack().await.unwrap();
}

#[tokio::test]
async fn a_stale_ack_on_the_stream_is_refused_and_changes_nothing() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    client
        .create_queue(
            "st",
            pb::QueuePolicy {
                backoff: Some(pb::BackoffPolicy {
                    delays_ms: vec![0],
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    client.enqueue("st", "x").send().await.unwrap();
    let mut consumer = client
        .consume("st")
        .prefetch(1)
        .visibility_timeout(Duration::from_millis(150))
        .open()
        .await
        .unwrap();
    let stale = within(consumer.next()).await.unwrap().unwrap();
    let live = client
        .lease("st")
        .wait(Duration::from_secs(5))
        .send()
        .await
        .unwrap()
        .remove(0);
    assert_eq!(live.attempt(), 2);
    let stale_id = stale.lease_id().to_owned();
    stale.ack().await.unwrap();
    match within(consumer.next()).await.unwrap() {
        Err(ClientError::Refused {
            lease_id,
            code,
            message,
        }) => {
            assert_eq!(lease_id, stale_id);
            assert_eq!(code, Code::FailedPrecondition);
            assert!(message.contains("stale"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    live.ack().await.unwrap();
}

#[tokio::test]
async fn closing_the_stream_releases_unsettled_jobs_at_once() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    enqueue_n(&client, "rel", 5).await;
    let mut consumer = client.consume("rel").prefetch(5).open().await.unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(within(consumer.next()).await.unwrap().unwrap());
    }
    drop(consumer);
    let released = eventually(|| async {
        let leases = client.lease("rel").max_jobs(10).send().await.unwrap();
        match leases.is_empty() {
            true => Err("the closed stream's jobs are not released"),
            false => Ok(leases),
        }
    })
    .await;
    // Released with the default 30 s visibility timeout still far away.
    assert_eq!(released.len(), 5);
    assert!(released.iter().all(|l| l.attempt() == 2));
    client.ack_batch(released).await.unwrap();
    drop(held);
}

#[tokio::test]
async fn the_first_request_must_name_the_queue() {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    let first = pb::ConsumeRequest {
        credits: 1,
        ..Default::default()
    };
    let err = rpc
        .consume(futures::stream::iter([first]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("queue"), "{}", err.message());
}

#[tokio::test]
async fn shutdown_ends_consume_streams() {
    let mut broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut consumer = client
        .consume("sd")
        .consumer("sd-stream")
        .open()
        .await
        .unwrap();
    wait_for_consumer(&client, "sd", "sd-stream").await;
    broker.stop();
    assert!(within(consumer.next()).await.is_none());
    within(&mut broker.handle).await.unwrap();
}

/// Deleting a queue ends its Consume streams with NOT_FOUND naming it (as RabbitMQ cancels
/// a deleted queue's consumers), on every node, rather than leaving them waiting on a
/// queue no enqueue reaches; a new stream consumes from the new queue of that name.
#[tokio::test]
async fn deleting_a_queue_ends_its_consume_streams() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut consumer = client.consume("gone").prefetch(5).open().await.unwrap();
    enqueue_n(&client, "gone", 1).await;
    let first = within(consumer.next()).await.unwrap().unwrap();
    assert_eq!(&first.payload()[..], b"0");
    broker
        .rpc()
        .await
        .delete_queue(pb::DeleteQueueRequest {
            name: "gone".into(),
        })
        .await
        .unwrap();
    let ended = within(consumer.next()).await.expect("an end, not silence");
    let err = ended.expect_err("the stream ends with an error");
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert!(err.to_string().contains("\"gone\""), "{err}");
    assert!(within(consumer.next()).await.is_none(), "and then nothing");

    enqueue_n(&client, "gone", 1).await;
    let mut again = client.consume("gone").prefetch(5).open().await.unwrap();
    let job = within(again.next()).await.unwrap().unwrap();
    assert_eq!(job.attempt(), 1, "a job of the new queue");
    job.ack().await.unwrap();
    // The first stream's lease went with the old queue.
    let stale = first.ack().await.unwrap_err();
    assert!(
        matches!(
            stale.code(),
            Some(Code::NotFound | Code::FailedPrecondition)
        ),
        "{stale}"
    );
}
