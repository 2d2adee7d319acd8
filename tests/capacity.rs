//! Issue 17, item 10: broker-wide capacity. `--max-topics` caps how many topics exist, and
//! `--max-memory-bytes` caps the payload bytes the broker retains (topic logs and jobs):
//! past either, Publish and Enqueue (and CreateTopic) are RESOURCE_EXHAUSTED naming the
//! limit, and nothing already accepted is dropped. Brokers are configured through the
//! `sluice serve` flags of a real `sluice serve` process.

mod common;

use bytes::Bytes;
use common::rpc::{assert_status, create_topic_keeping};
use common::{SERVE_LOG, serve_addrs, within};
use futures::StreamExt;
use sluice::client::{Client, ClientError, StartAt};
use sluice::pb;
use tonic::Code;

/// A `sluice serve` process (memory storage) started with these flags, killed on drop: the
/// flags are parsed exactly as a user's would be.
struct Served {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Served {
    async fn client(&self) -> Client {
        Client::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to the broker")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(flags: &[&str]) -> Served {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--storage", "memory", "--listen", "127.0.0.1:0"])
        .args(flags)
        .env("SLUICE_LOG", SERVE_LOG)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sluice serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let addr = serve_addrs(stdout, false).await.grpc;
    Served { child, addr }
}

/// (budget, in use) as Stats shows them.
async fn memory(client: &Client) -> (u64, u64) {
    let s = client.stats().await.unwrap();
    (s.memory_budget_bytes, s.memory_used_bytes)
}

/// The broker's refusal inside a client error.
fn refusal(e: ClientError) -> tonic::Status {
    match e {
        ClientError::Status(status) => status,
        other => panic!("expected a refusal from the broker, got {other:?}"),
    }
}

fn kb(tag: u8) -> Bytes {
    Bytes::from(vec![tag; 1_000])
}

/// 50 topics tried with `--max-topics 10`: the 11th is refused, by Publish and by
/// CreateTopic, and nothing of it is created. On the old code there was no such flag
/// (and no limit below 100,000): all 50 were created.
#[tokio::test]
async fn topics_past_max_topics_are_refused() {
    let broker = serve(&["--max-topics", "10"]).await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    let mut created = 0;
    for i in 0..50 {
        match client.publish(&format!("t{i}"), "m").await {
            Ok(_) => created += 1,
            Err(e) => {
                assert_status(
                    refusal(e),
                    Code::ResourceExhausted,
                    &[
                        &format!("topic: cannot create topic \"t{i}\""),
                        "maximum of 10 topics",
                    ],
                );
            }
        }
    }
    assert_eq!(created, 10);
    let err = rpc
        .create_topic(pb::CreateTopicRequest {
            name: "another".into(),
            retention: None,
        })
        .await
        .unwrap_err();
    assert_status(
        err,
        Code::ResourceExhausted,
        &[
            "name: cannot create topic \"another\"",
            "maximum of 10 topics",
        ],
    );
    assert_eq!(client.stats().await.unwrap().topics.len(), 10);
    // Publishing to a topic that exists goes on.
    client.publish("t0", "again").await.unwrap();
}

/// Publishing past a 10,000-byte budget is refused naming the budget and the use; the
/// messages accepted before are all still there; eviction by retention frees the budget.
/// A publish to a topic with bound queues counts every copy.
#[tokio::test]
async fn publishing_past_the_memory_budget_is_refused_and_keeps_what_was_accepted() {
    let broker = serve(&["--max-memory-bytes", "10000"]).await;
    let client = broker.client().await;
    for i in 0..10 {
        client.publish("log", kb(i)).await.unwrap();
    }
    assert_eq!(memory(&client).await, (10_000, 10_000));
    let err = client.publish("log", kb(10)).await.unwrap_err();
    assert_status(
        refusal(err),
        Code::ResourceExhausted,
        &[
            "messages: 1000 payload bytes exceed the memory budget (--max-memory-bytes) of 10000 bytes: 10000 bytes are in use",
        ],
    );
    let mut earliest = client
        .subscribe("log")
        .start(StartAt::Earliest)
        .raw()
        .await
        .unwrap();
    for i in 0..10u8 {
        let d = within(earliest.next()).await.unwrap().unwrap();
        assert_eq!((d.sequence, d.value), (u64::from(i) + 1, kb(i)));
    }
    let stats = client.stats().await.unwrap();
    assert_eq!(
        stats.topics[0].last_sequence, 10,
        "the refused one appended nothing"
    );

    // Retention evicts, and what it evicts leaves the budget.
    let mut rpc = client.rpc();
    create_topic_keeping(&mut rpc, "log", 4).await;
    assert_eq!(memory(&client).await, (10_000, 4_000));
    for i in 0..20 {
        client.publish("log", kb(i)).await.unwrap();
    }
    assert_eq!(memory(&client).await.1, 4_000);

    // Each queue bound to the topic keeps a copy: 1 message = 3,000 bytes here.
    client
        .create_queue(
            "copies",
            pb::QueuePolicy {
                topic_bindings: vec!["feed".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    client
        .create_queue(
            "copies2",
            pb::QueuePolicy {
                topic_bindings: vec!["feed".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    client.publish("feed", kb(1)).await.unwrap();
    assert_eq!(memory(&client).await.1, 7_000);
    client.publish("feed", kb(2)).await.unwrap();
    let err = client.publish("feed", kb(3)).await.unwrap_err();
    assert_status(
        refusal(err),
        Code::ResourceExhausted,
        &[
            "messages: 3000 payload bytes exceed",
            "10000 bytes are in use",
        ],
    );
    let copies = client.stats().await.unwrap();
    assert!(copies.queues.iter().all(|q| q.pending == 2), "{copies:?}");
}

/// Enqueueing past the budget is refused likewise (unary and on an EnqueueStream); the
/// jobs accepted are all delivered; a finished job frees its bytes when it leaves history.
#[tokio::test]
async fn enqueueing_past_the_memory_budget_is_refused_until_jobs_finish() {
    let broker = serve(&["--max-memory-bytes", "10000"]).await;
    let client = broker.client().await;
    client
        .create_queue(
            "work",
            pb::QueuePolicy {
                history_limit: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for i in 0..10 {
        client.enqueue("work", kb(i)).send().await.unwrap();
    }
    let err = client.enqueue("work", kb(10)).send().await.unwrap_err();
    assert_status(
        refusal(err),
        Code::ResourceExhausted,
        &[
            "jobs: 1000 payload bytes exceed the memory budget (--max-memory-bytes) of 10000 bytes: 10000 bytes are in use",
        ],
    );
    let streamed = client
        .enqueuer()
        .enqueue("work", sluice::client::Job::new(kb(11)))
        .await
        .unwrap_err();
    assert_eq!(refusal(streamed).code(), Code::ResourceExhausted);

    let leases = client.lease("work").max_jobs(20).send().await.unwrap();
    let mut got: Vec<Bytes> = leases.iter().map(|l| l.payload().clone()).collect();
    got.sort();
    assert_eq!(
        got,
        (0..10).map(kb).collect::<Vec<_>>(),
        "every accepted job"
    );
    assert_eq!(
        memory(&client).await.1,
        10_000,
        "leased jobs still hold theirs"
    );
    for lease in leases {
        lease.ack().await.unwrap();
    }
    // Only the newest finished job is kept in history.
    assert_eq!(memory(&client).await, (10_000, 1_000));
    for i in 0..9 {
        client.enqueue("work", kb(i)).send().await.unwrap();
    }
    assert!(client.enqueue("work", kb(9)).send().await.is_err());
}

/// Without a budget (`0`) nothing is refused, and use is still shown.
#[tokio::test]
async fn a_zero_budget_is_no_budget() {
    let broker = serve(&["--max-memory-bytes", "0"]).await;
    let client = broker.client().await;
    for i in 0..20 {
        client.publish("log", kb(i)).await.unwrap();
    }
    assert_eq!(memory(&client).await, (0, 20_000));
}
