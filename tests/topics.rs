//! Topics over real gRPC: fan-out, wildcards, replay, bindings, slow subscribers, resume.

mod common;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::rpc::create_topic_keeping;
use common::{TestBroker, eventually, within};
use futures::{Stream, StreamExt};
use sluice::client::{ClientError, Delivery, Message, StartAt};
use sluice::pb;
use tonic::Code;

async fn next_n<S>(stream: &mut S, n: usize) -> Vec<Delivery<Bytes>>
where
    S: Stream<Item = sluice::client::Result<Delivery<Bytes>>> + Unpin,
{
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(within(stream.next()).await.unwrap().unwrap());
    }
    out
}

fn payloads(ds: &[Delivery<Bytes>]) -> Vec<String> {
    ds.iter()
        .map(|d| String::from_utf8(d.value.to_vec()).unwrap())
        .collect()
}

#[tokio::test]
async fn fan_out_reaches_every_subscriber_in_order() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(client.subscribe("news").raw().await.unwrap());
    }
    let batch = (0..5)
        .map(|i| Message::new(format!("m{i}")).key("k"))
        .collect();
    let results = client.publish_batch("news", batch).await.unwrap();
    assert_eq!(
        results.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    for sub in &mut subs {
        let got = next_n(sub, 5).await;
        assert_eq!(payloads(&got), ["m0", "m1", "m2", "m3", "m4"]);
        assert_eq!(
            got.iter().map(|d| d.sequence).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert!(
            got.iter()
                .all(|d| d.topic == "news" && d.key == "k" && d.publish_time_unix_ms > 0)
        );
    }
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.topics[0].subscribers, 3);
}

#[tokio::test]
async fn wildcards_match_one_token_or_the_rest() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut users = client.subscribe("user.*").raw().await.unwrap();
    let mut todos = client.subscribe("todo.>").raw().await.unwrap();
    let mut all = client.subscribe(">").raw().await.unwrap();
    for topic in [
        "user.registered",
        "user.a.b",
        "todo.completed",
        "todo.x.y",
        "other",
    ] {
        client.publish(topic, topic.to_string()).await.unwrap();
    }
    assert_eq!(payloads(&next_n(&mut users, 1).await), ["user.registered"]);
    assert_eq!(
        payloads(&next_n(&mut todos, 2).await),
        ["todo.completed", "todo.x.y"]
    );
    assert_eq!(next_n(&mut all, 5).await.len(), 5);
    // Nothing else arrives for the narrower patterns.
    client.publish("user.deleted", "last").await.unwrap();
    assert_eq!(payloads(&next_n(&mut users, 1).await), ["last"]);
}

#[tokio::test]
async fn replay_from_earliest_sequence_and_time() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    for i in 1..=3 {
        client.publish("log", format!("old{i}")).await.unwrap();
    }
    // Publish times are whole milliseconds: the old messages fall strictly before the
    // cut and the new one strictly after it (time passing is what replay by time needs).
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.publish("log", "new4").await.unwrap();

    let mut earliest = client
        .subscribe("log")
        .start(StartAt::Earliest)
        .raw()
        .await
        .unwrap();
    assert_eq!(
        payloads(&next_n(&mut earliest, 4).await),
        ["old1", "old2", "old3", "new4"]
    );
    let mut from_seq = client
        .subscribe("log")
        .start(StartAt::Sequence(3))
        .raw()
        .await
        .unwrap();
    assert_eq!(payloads(&next_n(&mut from_seq, 2).await), ["old3", "new4"]);
    let mut from_time = client
        .subscribe("log")
        .start(StartAt::Time(cut))
        .raw()
        .await
        .unwrap();
    assert_eq!(payloads(&next_n(&mut from_time, 1).await), ["new4"]);
    let mut latest = client.subscribe("log").raw().await.unwrap();
    client.publish("log", "new5").await.unwrap();
    let got = next_n(&mut latest, 1).await;
    assert_eq!((payloads(&got)[0].as_str(), got[0].sequence), ("new5", 5));
}

#[tokio::test]
async fn a_topic_created_after_a_wildcard_subscription_is_delivered_from_its_start() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut sub = client.subscribe("late.*").raw().await.unwrap();
    client.publish("late.topic", "first").await.unwrap();
    let got = next_n(&mut sub, 1).await;
    assert_eq!((got[0].topic.as_str(), got[0].sequence), ("late.topic", 1));
}

#[tokio::test]
async fn bound_queues_receive_every_matching_publish_as_jobs() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    for (queue, pattern) in [("emails", "user.*"), ("audit", ">")] {
        client
            .create_queue(
                queue,
                pb::QueuePolicy {
                    topic_bindings: vec![pattern.into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    client
        .publish_message(
            "user.registered",
            Message::new(r#"{"id":1}"#).header("content-type", "application/json"),
        )
        .await
        .unwrap();
    client.publish("todo.completed", "t").await.unwrap();

    let emails = client.lease("emails").max_jobs(10).send().await.unwrap();
    assert_eq!(emails.len(), 1);
    assert_eq!(emails[0].kind(), "user.registered");
    assert_eq!(emails[0].payload().as_ref(), br#"{"id":1}"#);
    assert_eq!(emails[0].headers()["content-type"], "application/json");
    assert_eq!(emails[0].headers()["x-sluice-topic-sequence"], "1");
    let audit = client.lease("audit").max_jobs(10).send().await.unwrap();
    let kinds: Vec<&str> = audit.iter().map(|l| l.kind()).collect();
    assert_eq!(kinds, ["user.registered", "todo.completed"]);
    client.ack_batch(emails).await.unwrap();
    client.ack_batch(audit).await.unwrap();
}

#[tokio::test]
async fn a_slow_subscriber_never_blocks_publishers_or_a_fast_subscriber_and_sees_a_gap() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_topic_keeping(&mut client.rpc(), "firehose", 100).await;
    // The slow subscriber never reads until the end; small batches fill its buffers fast.
    let mut slow = client
        .subscribe("firehose")
        .max_batch(1)
        .raw()
        .await
        .unwrap();
    let mut fast = client.subscribe("firehose").raw().await.unwrap();
    let total = 5_000u64;
    // On the Redis engine every subscriber reads from Redis after the publish, so with a
    // retention this small a burst of 100-message publishes may trim past even a fast
    // one; it then sees a gap notice, never a message out of order.
    let gap_free =
        common::checked_on_this_engine("a fast subscriber outruns a 100-message retention");
    let reader = tokio::spawn(async move {
        let mut last = 0;
        while last < total {
            let d = match fast.next().await.unwrap() {
                Err(ClientError::Gap { .. }) if !gap_free => continue,
                item => item.unwrap(),
            };
            if gap_free {
                assert_eq!(
                    d.sequence,
                    last + 1,
                    "fast subscriber saw every message in order"
                );
            } else {
                assert!(d.sequence > last, "fast subscriber saw messages in order");
            }
            last = d.sequence;
        }
        last
    });
    let publish = async {
        for chunk in 0..(total / 100) {
            // 1 KiB payloads, so the slow reader's transport buffers fill long before the
            // end and retention (100 messages) overtakes it.
            let batch = (0..100)
                .map(|i| Message::new(format!("{:01024}", chunk * 100 + i)))
                .collect();
            client.publish_batch("firehose", batch).await.unwrap();
        }
    };
    within(publish).await;
    assert_eq!(within(reader).await.unwrap(), total);

    // The slow one gets what was buffered, then an explicit gap notice, then the rest.
    let mut gap = None;
    let mut last_seq = 0;
    while last_seq < total {
        match within(slow.next()).await.unwrap() {
            Ok(d) => {
                assert!(d.sequence > last_seq);
                last_seq = d.sequence;
            }
            Err(ClientError::Gap {
                first_missing,
                next_available,
                ..
            }) => {
                assert_eq!(first_missing, last_seq + 1);
                gap = Some((first_missing, next_available));
            }
            Err(e) => panic!("{e}"),
        }
    }
    let (first_missing, next_available) = gap.expect("a gap notice");
    assert!(next_available > first_missing);
    let stats = client.stats().await.unwrap();
    assert!(stats.topics[0].gaps >= 1);
    assert_eq!(stats.topics[0].retained_messages, 100);
}

#[tokio::test]
async fn gap_policy_end_stream_ends_with_data_loss() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_topic_keeping(&mut client.rpc(), "strict", 2).await;
    for i in 0..5 {
        client.publish("strict", format!("{i}")).await.unwrap();
    }
    let mut sub = client
        .subscribe("strict")
        .start(StartAt::Sequence(1))
        .end_on_gap()
        .raw()
        .await
        .unwrap();
    let err = within(sub.next()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(Code::DataLoss), "{err}");
    assert!(err.to_string().contains("fell behind retention"), "{err}");
}

#[tokio::test]
async fn publish_idempotency_and_topic_admin() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    let m = || Message::new("x").idempotency_key("evt-1");
    let a = client.publish_batch("idem", vec![m(), m()]).await.unwrap();
    assert_eq!((a[0].sequence, a[0].duplicate), (1, false));
    assert_eq!((a[1].sequence, a[1].duplicate), (1, true));
    let info = create_topic_keeping(&mut rpc, "idem", 10).await;
    assert_eq!(info.retention.unwrap().max_messages, 10);
    rpc.delete_topic(pb::DeleteTopicRequest {
        name: "idem".into(),
    })
    .await
    .unwrap();
    assert!(client.stats().await.unwrap().topics.is_empty());
}

/// A TCP proxy whose connections can be cut, to simulate a network failure.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let cuts = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut_rx = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }

    fn cut_connections(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

#[tokio::test]
async fn the_client_subscription_resumes_after_a_connection_loss_without_missing_messages() {
    let broker = TestBroker::start().await;
    let proxy = Proxy::start(broker.addr).await;
    let via_proxy = sluice::client::Client::connect(format!("http://{}", proxy.addr))
        .await
        .unwrap();
    let direct = broker.client().await;
    let mut sub = via_proxy.subscribe("resume.*").raw().await.unwrap();
    direct.publish("resume.a", "1").await.unwrap();
    assert_eq!(payloads(&next_n(&mut sub, 1).await), ["1"]);

    proxy.cut_connections();
    // Published while the subscriber is disconnected: to a topic it saw and to one it
    // has not seen yet.
    direct.publish("resume.a", "2").await.unwrap();
    direct.publish("resume.b", "3").await.unwrap();
    direct.publish("resume.a", "4").await.unwrap();

    let got = next_n(&mut sub, 3).await;
    let mut seen: Vec<(String, u64)> = got.iter().map(|d| (d.topic.clone(), d.sequence)).collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("resume.a".to_string(), 2),
            ("resume.a".to_string(), 3),
            ("resume.b".to_string(), 1)
        ]
    );
}

#[tokio::test]
async fn a_subscription_reads_on_demand_in_bounded_batches_and_closes_when_dropped() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = broker.rpc().await;
    // Two topics under one pattern, so batches are read from both logs in turn.
    let mut stream = rpc
        .subscribe(pb::SubscribeRequest {
            pattern: "burst.*".into(),
            start: pb::StartPosition::Earliest as i32,
            max_batch: 7,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Published while nobody reads the stream: it is read when the transport asks.
    for round in 0..10 {
        for topic in ["burst.a", "burst.b"] {
            let batch = (0..5)
                .map(|i| Message::new(format!("{topic}/{}", round * 5 + i)))
                .collect();
            client.publish_batch(topic, batch).await.unwrap();
        }
    }
    let mut next = std::collections::HashMap::from([("burst.a", 1u64), ("burst.b", 1u64)]);
    let mut received = 0;
    while received < 100 {
        let response = within(stream.message()).await.unwrap().unwrap();
        assert!(response.gaps.is_empty());
        assert!(!response.messages.is_empty());
        assert!(response.messages.len() <= 7, "max_batch bounds every batch");
        for m in response.messages {
            let expected = next.get_mut(m.topic.as_str()).unwrap();
            assert_eq!(m.sequence, *expected, "in sequence order per topic");
            assert_eq!(m.payload, format!("{}/{}", m.topic, m.sequence - 1));
            *expected += 1;
            received += 1;
        }
    }
    assert_eq!(next["burst.a"], 51);
    assert_eq!(next["burst.b"], 51);

    // Live messages after the replay arrive too.
    client.publish("burst.a", "live").await.unwrap();
    let live = within(stream.message()).await.unwrap().unwrap();
    assert_eq!(live.messages[0].payload, "live");
    assert_eq!(live.messages[0].sequence, 51);

    // Dropping the stream (the client going away) deregisters the subscription.
    drop(stream);
    eventually(|| async {
        let stats = client.stats().await.unwrap();
        match stats.topics.iter().all(|t| t.subscribers == 0) {
            true => Ok(()),
            false => Err(format!("subscribers remain: {:?}", stats.topics)),
        }
    })
    .await;
}
