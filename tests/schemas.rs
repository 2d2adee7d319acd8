//! Message schemas over real gRPC, on either engine (`SLUICE_TEST_ENGINE=redis`): set,
//! get and history; a batch with one bad entry writes nothing (unary and producer
//! streams); a replaced schema applies to new messages only; bad schemas are refused; on
//! the Redis engine, a schema set through one node is enforced by another at once; and
//! the write-ahead log keeps every revision across a restart.

mod common;

use bytes::Bytes;
use common::rpc::{assert_refused, assert_status, list_queues, queue_stats, stats, topic_stats};
use common::{TestBroker, publish_request as messages};
use sluice::broker::{Broker, BrokerConfig, DirStorage, StoreConfig};
use sluice::client::Rpc;
use sluice::pb;
use tonic::Code;

const USER: &str = r#"{
  "type": "object",
  "required": ["user"],
  "properties": {
    "user": {
      "type": "object",
      "required": ["email"],
      "properties": {"email": {"type": "string", "format": "email"}}
    }
  }
}"#;

const GOOD: &str = r#"{"user": {"email": "ada@example.com"}}"#;
const BAD_EMAIL: &str = r#"{"user": {"email": "not-an-email"}}"#;

fn queue(name: &str) -> Option<pb::SchemaTarget> {
    Some(pb::SchemaTarget {
        target: Some(pb::schema_target::Target::Queue(name.into())),
    })
}

fn topic(name: &str) -> Option<pb::SchemaTarget> {
    Some(pb::SchemaTarget {
        target: Some(pb::schema_target::Target::Topic(name.into())),
    })
}

fn json_schema(target: Option<pb::SchemaTarget>, text: &str) -> pb::SetSchemaRequest {
    pb::SetSchemaRequest {
        target,
        schema: Some(pb::set_schema_request::Schema::JsonSchema(pb::JsonSchema {
            text: text.into(),
        })),
    }
}

async fn set(rpc: &mut Rpc, req: pb::SetSchemaRequest) -> pb::SetSchemaResponse {
    rpc.set_schema(req).await.expect("schema set").into_inner()
}

fn jobs(name: &str, payloads: &[&str]) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        queue: name.into(),
        jobs: payloads
            .iter()
            .map(|p| pb::JobSpec {
                payload: Bytes::from(p.to_string()),
                ..Default::default()
            })
            .collect(),
    }
}

/// Jobs enqueued into queue `name` so far.
async fn enqueued(rpc: &mut Rpc, name: &str) -> u64 {
    queue_stats(&stats(rpc).await, name).enqueued
}

/// The newest sequence of topic `name`.
async fn published(rpc: &mut Rpc, name: &str) -> u64 {
    topic_stats(&stats(rpc).await, name).last_sequence
}

/// A broker whose queue `signups` and topic `user.registered` carry [`USER`].
async fn with_user_schemas() -> (TestBroker, Rpc) {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    set(&mut rpc, json_schema(queue("signups"), USER)).await;
    set(&mut rpc, json_schema(topic("user.registered"), USER)).await;
    (broker, rpc)
}

#[tokio::test]
async fn set_get_and_history() {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    let first = set(&mut rpc, json_schema(topic("user.registered"), USER)).await;
    assert_eq!((first.revision, first.created), (1, true));
    let again = set(&mut rpc, json_schema(topic("user.registered"), USER)).await;
    assert_eq!(
        (again.revision, again.created),
        (1, false),
        "same text: no new revision"
    );
    let second = set(
        &mut rpc,
        json_schema(topic("user.registered"), r#"{"type":"object"}"#),
    )
    .await;
    assert_eq!((second.revision, second.created), (2, true));

    let got = rpc
        .get_schema(pb::GetSchemaRequest {
            target: topic("user.registered"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.current_revision, 2);
    let revisions: Vec<u32> = got.history.iter().map(|r| r.revision).collect();
    assert_eq!(revisions, [1, 2]);
    assert!(got.history.iter().all(|r| r.created_unix_ms > 0));
    match &got.history[0].schema {
        Some(pb::schema_revision::Schema::JsonSchema(j)) => assert_eq!(j.text, USER),
        other => panic!("revision 1 is the JSON Schema: {other:?}"),
    }

    // Stats shows the current revision.
    rpc.publish(messages("user.registered", &[GOOD]))
        .await
        .unwrap();
    let s = stats(&mut rpc).await;
    assert_eq!(topic_stats(&s, "user.registered").schema_revision, 2);
    let mut watched = rpc
        .watch_stats(pb::WatchStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let frame = watched.message().await.unwrap().expect("a frame");
    assert_eq!(topic_stats(&frame, "user.registered").schema_revision, 2);
    drop(watched);

    // Deleting keeps the history and numbering goes on.
    let deleted = rpc
        .delete_schema(pb::DeleteSchemaRequest {
            target: topic("user.registered"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted_revision, 2);
    rpc.publish(messages("user.registered", &["not json at all"]))
        .await
        .expect("no schema: anything goes");
    assert_refused(
        rpc.delete_schema(pb::DeleteSchemaRequest {
            target: topic("user.registered"),
        })
        .await,
        Code::NotFound,
        &["topic \"user.registered\" has no schema"],
    );
    let third = set(&mut rpc, json_schema(topic("user.registered"), USER)).await;
    assert_eq!(third.revision, 3);
    let info = rpc
        .create_topic(pb::CreateTopicRequest {
            name: "user.registered".into(),
            retention: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.schema_revision, 3);
    assert_refused(
        rpc.get_schema(pb::GetSchemaRequest {
            target: queue("never.had.one"),
        })
        .await,
        Code::NotFound,
        &["queue \"never.had.one\" has no schema"],
    );
}

#[tokio::test]
async fn a_batch_with_one_bad_entry_writes_nothing() {
    let (_broker, mut rpc) = with_user_schemas().await;
    rpc.enqueue(jobs("signups", &[GOOD])).await.unwrap();
    rpc.publish(messages("user.registered", &[GOOD]))
        .await
        .unwrap();

    let status = rpc
        .enqueue(jobs("signups", &[GOOD, GOOD, BAD_EMAIL]))
        .await
        .unwrap_err();
    assert_status(
        status,
        Code::InvalidArgument,
        &[
            "jobs[2].payload",
            "schema revision 1 of queue \"signups\"",
            "\"/user/email\"",
            "rule: format \"email\"",
        ],
    );
    assert_eq!(
        enqueued(&mut rpc, "signups").await,
        1,
        "nothing of the batch"
    );

    let status = rpc
        .publish(messages("user.registered", &[r#"{"user": {}}"#, GOOD]))
        .await
        .unwrap_err();
    assert_status(
        status,
        Code::InvalidArgument,
        &["messages[0].payload", "\"/user\"", "rule: required"],
    );
    assert_eq!(published(&mut rpc, "user.registered").await, 1);

    // A payload that says it is something else is not checked.
    let mut other = jobs("signups", &["plain text"]);
    other.jobs[0]
        .headers
        .insert("content-type".into(), "text/plain".into());
    rpc.enqueue(other).await.expect("text/plain is not checked");
    let mut json = jobs("signups", &["plain text"]);
    json.jobs[0]
        .headers
        .insert("content-type".into(), "application/json".into());
    assert_refused(
        rpc.enqueue(json).await,
        Code::InvalidArgument,
        &["JSON syntax"],
    );
}

#[tokio::test]
async fn producer_streams_are_checked_too() {
    let (_broker, mut rpc) = with_user_schemas().await;

    let requests = vec![
        jobs("signups", &[GOOD]),
        jobs("signups", &[GOOD, BAD_EMAIL]),
        jobs("signups", &[GOOD]),
    ];
    let answers: Vec<_> = rpc
        .enqueue_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner()
        .collect_answers()
        .await;
    assert_eq!(answers.len(), 3);
    assert!(answers[0].refused.is_none() && answers[2].refused.is_none());
    let refused = answers[1]
        .refused
        .as_ref()
        .expect("the bad batch is refused");
    assert_eq!(refused.code, Code::InvalidArgument as i32);
    assert!(
        refused.message.contains("jobs[1].payload"),
        "{}",
        refused.message
    );
    assert!(
        refused.message.contains("/user/email"),
        "{}",
        refused.message
    );
    assert_eq!(enqueued(&mut rpc, "signups").await, 2);

    let requests = vec![
        messages("user.registered", &[BAD_EMAIL]),
        messages("user.registered", &[GOOD]),
    ];
    let answers: Vec<_> = rpc
        .publish_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner()
        .collect_answers()
        .await;
    let refused = answers[0].refused.as_ref().expect("refused");
    assert!(
        refused.message.contains("messages[0].payload"),
        "{}",
        refused.message
    );
    assert!(answers[1].refused.is_none());
    assert_eq!(published(&mut rpc, "user.registered").await, 1);
}

/// Reads a response stream to its end.
trait CollectAnswers<T> {
    async fn collect_answers(self) -> Vec<T>;
}

impl<T> CollectAnswers<T> for tonic::Streaming<T> {
    async fn collect_answers(mut self) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(answer) = self.message().await.expect("stream answers") {
            out.push(answer);
        }
        out
    }
}

#[tokio::test]
async fn a_replaced_schema_applies_to_new_messages_only() {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    set(
        &mut rpc,
        json_schema(queue("orders"), r#"{"required": ["id"]}"#),
    )
    .await;
    rpc.enqueue(jobs("orders", &[r#"{"id": 1}"#]))
        .await
        .unwrap();
    set(
        &mut rpc,
        json_schema(queue("orders"), r#"{"required": ["id", "total"]}"#),
    )
    .await;
    assert_refused(
        rpc.enqueue(jobs("orders", &[r#"{"id": 2}"#])).await,
        Code::InvalidArgument,
        &["schema revision 2", "rule: required"],
    );
    rpc.enqueue(jobs("orders", &[r#"{"id": 3, "total": 9}"#]))
        .await
        .unwrap();
    // The job stored under revision 1 is still there, as it was.
    let leased = common::rpc::lease(&mut rpc, "orders", "w", 10).await;
    let payloads: Vec<&[u8]> = leased.iter().map(|j| &j.payload[..]).collect();
    assert_eq!(
        payloads,
        [&br#"{"id": 1}"#[..], br#"{"id": 3, "total": 9}"#]
    );
    let queues = list_queues(&mut rpc).await;
    let orders = queues.iter().find(|q| q.name == "orders").unwrap();
    assert_eq!(orders.schema_revision, 2);
    let paused = rpc
        .pause_queue(pb::PauseQueueRequest {
            name: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.schema_revision, 2);
    // The schema belongs to the name: a deleted and re-created queue keeps it.
    rpc.delete_queue(pb::DeleteQueueRequest {
        name: "orders".into(),
    })
    .await
    .unwrap();
    assert_refused(
        rpc.enqueue(jobs("orders", &[r#"{"id": 4}"#])).await,
        Code::InvalidArgument,
        &["schema revision 2"],
    );
}

#[tokio::test]
async fn bad_schemas_are_refused_and_change_nothing() {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    for (req, needles) in [
        (
            json_schema(queue("q"), "{"),
            vec!["json_schema.text", "is not JSON"],
        ),
        (
            json_schema(queue("q"), r#"{"type": 12}"#),
            vec!["json_schema.text", "is not a valid JSON Schema"],
        ),
        (json_schema(None, "{}"), vec!["target", "must name a queue"]),
        (json_schema(queue("bad name!"), "{}"), vec!["target.queue"]),
        (
            pb::SetSchemaRequest {
                target: queue("q"),
                schema: None,
            },
            vec!["schema", "must be set"],
        ),
        (
            pb::SetSchemaRequest {
                target: queue("q"),
                schema: Some(pb::set_schema_request::Schema::Protobuf(
                    pb::ProtobufSchema {
                        descriptor_set: Bytes::from_static(b"\xff\xffnope"),
                        message_type: "a.B".into(),
                    },
                )),
            },
            vec!["protobuf.descriptor_set"],
        ),
        (
            json_schema(queue("q"), &format!("\"{}\"", "x".repeat(300_000))),
            vec!["json_schema.text", "exceeds the limit of 262144 bytes"],
        ),
    ] {
        assert_refused(rpc.set_schema(req).await, Code::InvalidArgument, &needles);
    }
    assert_refused(
        rpc.get_schema(pb::GetSchemaRequest { target: queue("q") })
            .await,
        Code::NotFound,
        &["no schema"],
    );
}

#[tokio::test]
async fn protobuf_schemas_check_payloads() {
    let broker = TestBroker::start().await;
    let mut rpc = broker.rpc().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("shop.proto"),
        "syntax = \"proto3\"; package shop.v1; message Order { string id = 1; uint32 count = 2; }",
    )
    .unwrap();
    let set_proto = protox::compile(["shop.proto"], [dir.path()]).unwrap();
    let descriptor_set = Bytes::from(prost::Message::encode_to_vec(&set_proto));
    set(
        &mut rpc,
        pb::SetSchemaRequest {
            target: queue("orders"),
            schema: Some(pb::set_schema_request::Schema::Protobuf(
                pb::ProtobufSchema {
                    descriptor_set,
                    message_type: "shop.v1.Order".into(),
                },
            )),
        },
    )
    .await;
    // id = "a", count = 2.
    let good = Bytes::from_static(&[0x0a, 0x01, b'a', 0x10, 0x02]);
    // Field 7, which Order does not have.
    let unknown = Bytes::from_static(&[0x38, 0x01]);
    let req = |payload: Bytes| pb::EnqueueRequest {
        queue: "orders".into(),
        jobs: vec![pb::JobSpec {
            payload,
            ..Default::default()
        }],
    };
    rpc.enqueue(req(good)).await.expect("an Order passes");
    assert_refused(
        rpc.enqueue(req(unknown)).await,
        Code::InvalidArgument,
        &["jobs[0].payload", "rule: unknown field"],
    );
}

#[tokio::test]
async fn a_schema_set_on_one_node_is_enforced_on_another_at_once() {
    let a = TestBroker::start().await;
    let Some(b) = a.second_node().await else {
        eprintln!("the in-process engine has one node: nothing to check");
        return;
    };
    let (mut on_a, mut on_b) = (a.rpc().await, b.rpc().await);
    // B has seen the queue and topic without a schema.
    on_b.enqueue(jobs("signups", &["anything"])).await.unwrap();
    on_b.publish(messages("user.registered", &["anything"]))
        .await
        .unwrap();

    set(&mut on_a, json_schema(queue("signups"), USER)).await;
    set(&mut on_a, json_schema(topic("user.registered"), USER)).await;
    assert_refused(
        on_b.enqueue(jobs("signups", &[BAD_EMAIL])).await,
        Code::InvalidArgument,
        &["schema revision 1", "/user/email"],
    );
    assert_refused(
        on_b.publish(messages("user.registered", &[BAD_EMAIL]))
            .await,
        Code::InvalidArgument,
        &["schema revision 1", "/user/email"],
    );
    on_b.enqueue(jobs("signups", &[GOOD])).await.unwrap();

    // A replacement set on A: B's cached revision 1 is stale at once.
    set(
        &mut on_a,
        json_schema(queue("signups"), r#"{"required": ["tenant"]}"#),
    )
    .await;
    assert_refused(
        on_b.enqueue(jobs("signups", &[GOOD])).await,
        Code::InvalidArgument,
        &["schema revision 2", "rule: required"],
    );
    // A looser replacement set on A: B accepts at once what its cached revision refused.
    set(
        &mut on_a,
        json_schema(queue("signups"), r#"{"required": ["user"]}"#),
    )
    .await;
    on_b.enqueue(jobs("signups", &[BAD_EMAIL])).await.unwrap();
    // And a delete on A lets B write anything again.
    on_a.delete_schema(pb::DeleteSchemaRequest {
        target: queue("signups"),
    })
    .await
    .unwrap();
    on_b.enqueue(jobs("signups", &["anything"])).await.unwrap();
    assert_eq!(enqueued(&mut on_a, "signups").await, 4);
}

#[tokio::test]
async fn the_log_keeps_every_revision_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        let storage = DirStorage::open(dir.path()).unwrap();
        Broker::open(
            BrokerConfig::default(),
            std::sync::Arc::new(storage),
            StoreConfig::default(),
        )
        .unwrap()
        .0
    };
    {
        let mut served = TestBroker::serving(open()).await;
        let mut rpc = served.rpc().await;
        set(
            &mut rpc,
            json_schema(queue("signups"), r#"{"type": "object"}"#),
        )
        .await;
        set(&mut rpc, json_schema(queue("signups"), USER)).await;
        set(&mut rpc, json_schema(topic("user.registered"), USER)).await;
        rpc.delete_schema(pb::DeleteSchemaRequest {
            target: topic("user.registered"),
        })
        .await
        .unwrap();
        served.broker().shutdown();
        served.broker().close_storage();
        served.stop();
        let _ = served.handle.await;
    }
    // Twice: the first restart reads the log, the second the snapshot it wrote.
    for _ in 0..2 {
        let mut served = TestBroker::serving(open()).await;
        let mut rpc = served.rpc().await;
        let got = rpc
            .get_schema(pb::GetSchemaRequest {
                target: queue("signups"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.current_revision, 2);
        assert_eq!(got.history.len(), 2);
        assert_refused(
            rpc.enqueue(jobs("signups", &[BAD_EMAIL])).await,
            Code::InvalidArgument,
            &["schema revision 2", "/user/email"],
        );
        let topic_schema = rpc
            .get_schema(pb::GetSchemaRequest {
                target: topic("user.registered"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(topic_schema.current_revision, 0, "deleted stays deleted");
        assert_eq!(topic_schema.history.len(), 1);
        rpc.publish(messages("user.registered", &["free text"]))
            .await
            .unwrap();
        served.broker().shutdown();
        served.broker().close_storage();
        served.stop();
        let _ = served.handle.await;
    }
}

#[tokio::test]
async fn the_rust_client_sets_reads_and_deletes_schemas() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let schema = client.topic_schema("user.registered");
    let set = schema.set_json_schema(USER).await.unwrap();
    assert_eq!((set.revision, set.created), (1, true));
    assert!(!schema.set_json_schema(USER).await.unwrap().created);
    let err = client
        .publish("user.registered", BAD_EMAIL)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/user/email"), "{err}");
    assert_eq!(schema.get().await.unwrap().current_revision, 1);
    assert_eq!(schema.delete().await.unwrap(), 1);
    client.publish("user.registered", BAD_EMAIL).await.unwrap();
    let err = client.queue_schema("nothing").get().await.unwrap_err();
    assert!(err.to_string().contains("has no schema"), "{err}");
}
