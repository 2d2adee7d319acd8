//! `Client::connect_any`: one client over several brokers spreads its requests over them
//! and keeps working when one stops.

mod common;

use std::time::Duration;

use common::{TestBroker, eventually_within};
use sluice::client::{Client, ConnectOptions};

/// Jobs of queue `q` a broker took (asked of that broker alone).
async fn enqueued(broker: &TestBroker) -> u64 {
    let stats = broker.client().await.stats().await.unwrap();
    stats
        .queues
        .iter()
        .find(|q| q.name == "q")
        .map_or(0, |q| q.enqueued)
}

#[tokio::test]
async fn requests_reach_every_broker_and_survive_one_stopping() {
    let first = TestBroker::start().await;
    let mut second = TestBroker::start().await;
    let client = Client::connect_any([first.url(), second.url()], ConnectOptions::new()).unwrap();

    for _ in 0..100 {
        client.enqueue("q", "job").send().await.unwrap();
    }
    let (a, b) = (enqueued(&first).await, enqueued(&second).await);
    assert_eq!(a + b, 100);
    assert!(a > 0 && b > 0, "both brokers served requests: {a} and {b}");

    second.stop();
    // Requests may still be sent to the stopped broker until the probe sees it refuse
    // connections (about half a second); from then on every one goes to the first.
    eventually_within(Duration::from_secs(5), || async {
        for _ in 0..20 {
            client.enqueue("q", "job").send().await?;
        }
        Ok::<_, sluice::client::ClientError>(())
    })
    .await;
    let before = enqueued(&first).await;
    for _ in 0..20 {
        client.enqueue("q", "job").send().await.unwrap();
    }
    assert_eq!(enqueued(&first).await, before + 20);
}

#[tokio::test]
async fn no_urls_is_refused() {
    let err = Client::connect_any(Vec::<String>::new(), ConnectOptions::new()).unwrap_err();
    assert!(err.to_string().contains("at least one broker URL"), "{err}");
}
