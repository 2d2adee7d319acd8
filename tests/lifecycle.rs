//! Server lifecycle: health, reflection, and a graceful shutdown that ends open streams.

mod common;

use std::time::Duration;

use common::{TestBroker, channel, health, long_poll, within};
use futures::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn health_reports_serving() {
    let broker = TestBroker::start().await;
    for service in ["", "sluice.v1.Broker"] {
        let status = health(&broker.url(), service).await;
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_the_broker_service() {
    let broker = TestBroker::start().await;
    let mut reflection = ServerReflectionClient::new(channel(&broker.url()).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"sluice.v1.Broker".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn shutdown_ends_subscriptions_and_long_polls_and_serve_returns() {
    let mut broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut sub = client
        .subscribe("events.>")
        .reconnect(false)
        .raw()
        .await
        .unwrap();
    let poll = long_poll(&client, "jobs", Duration::from_secs(60)).await;
    client.publish("events.a", "before").await.unwrap();
    assert_eq!(
        within(sub.next()).await.unwrap().unwrap().value.as_ref(),
        b"before"
    );

    broker.stop();
    // The subscription ends (no more items), the long poll returns empty, serve returns.
    assert!(within(sub.next()).await.is_none());
    let leased = within(poll).await.unwrap().unwrap();
    assert!(leased.is_empty());
    within(&mut broker.handle).await.unwrap();
}

#[tokio::test]
async fn watch_stats_streams_fresh_figures_until_cancelled() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut watch = client
        .rpc()
        .watch_stats(sluice::pb::WatchStatsRequest {
            filter: None,
            interval_ms: 100,
        })
        .await
        .unwrap()
        .into_inner();
    let first = within(watch.message()).await.unwrap().unwrap();
    assert!(first.queues.is_empty());
    client.enqueue("watched", "x").send().await.unwrap();
    let seen = within(async {
        loop {
            let s = watch.message().await.unwrap().unwrap();
            if let Some(q) = s.queues.iter().find(|q| q.name == "watched") {
                return (q.pending, s.taken_at_unix_ms);
            }
        }
    })
    .await;
    assert_eq!(seen.0, 1);
    assert!(seen.1 >= first.taken_at_unix_ms);
    let err = client
        .rpc()
        .watch_stats(sluice::pb::WatchStatsRequest {
            filter: None,
            interval_ms: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("interval_ms"), "{}", err.message());
}

#[tokio::test]
async fn watchers_share_one_stats_snapshot_per_tick() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    for i in 0..20 {
        client
            .enqueue(&format!("shared.{i}"), "x")
            .send()
            .await
            .unwrap();
    }
    let open = |interval_ms: u32, queues: Vec<String>| {
        let mut rpc = client.rpc();
        async move {
            rpc.watch_stats(sluice::pb::WatchStatsRequest {
                filter: Some(sluice::pb::StatsRequest {
                    queues,
                    topics: Vec::new(),
                }),
                interval_ms,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let mut watchers = Vec::new();
    for _ in 0..20 {
        watchers.push((open(100, Vec::new()).await, 20));
    }
    // Other intervals and a filter read the same snapshots.
    watchers.push((open(300, Vec::new()).await, 20));
    watchers.push((open(200, vec!["shared.3".into()]).await, 1));
    if !common::checked_on_this_engine("the in-process count of shared snapshots") {
        return;
    }
    let before = broker.broker().stats_snapshots_computed();
    let started = std::time::Instant::now();
    let frames =
        futures::future::join_all(watchers.into_iter().map(|(mut watch, queues)| async move {
            let mut taken = Vec::new();
            for _ in 0..5 {
                let frame = within(watch.message()).await.unwrap().unwrap();
                assert_eq!(frame.queues.len(), queues);
                taken.push(frame.taken_at_unix_ms);
            }
            taken
        }))
        .await;
    let elapsed = started.elapsed();
    let computed = broker.broker().stats_snapshots_computed() - before;
    let sent: usize = frames.iter().map(Vec::len).sum();
    println!(
        "{} watchers got {sent} frames in {elapsed:?} from {computed} computed snapshots",
        frames.len()
    );
    // One snapshot per 100 ms tick at most, however many watchers (one per frame before).
    let ticks = (elapsed.as_millis() / 100) as u64 + 2;
    assert!(
        computed <= ticks,
        "{computed} snapshots in {elapsed:?} (at most {ticks} ticks)"
    );
    for taken in &frames {
        assert!(
            taken.windows(2).all(|w| w[1] > w[0]),
            "a frame repeated: {taken:?}"
        );
    }
}
