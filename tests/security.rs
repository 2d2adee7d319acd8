//! SPEC §7: bearer tokens with per-action name patterns (deny by default), TLS and mutual
//! TLS, the connection cap, and the `sluice serve` / admin CLI flags that set them up.
//! Brokers run on 127.0.0.1:0 in-process, and the binary for the flag tests.

mod common;

use std::ffi::OsStr;
use std::process::Output;
use std::time::Duration;

use bytes::Bytes;
use common::rpc::{ConsumeStream, assert_refused, open_consume};
use common::{SERVE_LOG, TestBroker, eventually, health, serve_addrs, serve_options, within};
use futures::StreamExt;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use sluice::broker::{Authenticator, Tokens, hash_token};
use sluice::broker::{ServeOptions, TlsSettings};
use sluice::client::{Client, ConnectOptions, Rpc};
use sluice::pb;
use tonic::Code;

const PRODUCER: &str = "producer-token";
const WORKER: &str = "worker-token";
const OPS: &str = "ops-token";
const TEAM: &str = "team-token";

/// One `[[token]]` table of a tokens file: `name`, the hash of `secret`, and its grant
/// lines.
fn token_table(name: &str, secret: &str, grants: &[&str]) -> String {
    format!(
        "[[token]]\nname = {name:?}\nsha256 = \"{}\"\n{}\n",
        hash_token(secret),
        grants.join("\n")
    )
}

/// The tokens of a file made of `tables`.
fn tokens_of(tables: &[String]) -> Tokens {
    Tokens::parse(&tables.join("\n")).unwrap()
}

fn tokens() -> Tokens {
    tokens_of(&[
        token_table(
            "producer",
            PRODUCER,
            &[r#"publish = ["user.*"]"#, r#"enqueue = ["emails"]"#],
        ),
        token_table(
            "worker",
            WORKER,
            &[r#"consume = ["emails"]"#, r#"subscribe = ["user.>"]"#],
        ),
        token_table(
            "ops",
            OPS,
            &[
                r#"admin = [">"]"#,
                r#"consume = ["audit"]"#,
                r#"enqueue = ["audit"]"#,
            ],
        ),
        token_table(
            "team",
            TEAM,
            &[r#"admin = ["team.>"]"#, r#"subscribe = ["team.>"]"#],
        ),
    ])
}

/// A broker that admits only the callers `auth` knows.
async fn broker_with_auth(auth: Authenticator) -> TestBroker {
    TestBroker::start_serving(ServeOptions {
        auth: Some(auth),
        ..serve_options()
    })
    .await
}

async fn broker_with_tokens() -> TestBroker {
    broker_with_auth(Authenticator::from_tokens(tokens())).await
}

async fn rpc_with(b: &TestBroker, token: &str) -> Rpc {
    Client::connect_with(b.url(), ConnectOptions::new().token(token))
        .await
        .unwrap()
        .rpc()
}

fn job(payload: &'static str) -> pb::JobSpec {
    pb::JobSpec {
        payload: Bytes::from_static(payload.as_bytes()),
        ..Default::default()
    }
}

fn enqueue(queue: &str) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        queue: queue.into(),
        jobs: vec![job("x")],
    }
}

fn lease(queue: &str) -> pb::LeaseRequest {
    pb::LeaseRequest {
        queue: queue.into(),
        max_jobs: 10,
        ..Default::default()
    }
}

fn publish(topic: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        topic: topic.into(),
        messages: vec![pb::PublishMessage {
            payload: Bytes::from_static(b"m"),
            ..Default::default()
        }],
    }
}

/// Every broker RPC, called once with empty or minimal requests; returns each outcome.
/// One call per RPC, alike on purpose: the test asserts every RPC by name.
async fn call_every_rpc(rpc: &mut Rpc) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let one = |r: pb::ConsumeRequest| futures::stream::iter([r]);
    let mut outcomes = Vec::new();
    macro_rules! call {
        ($name:literal, $call:expr) => {
            outcomes.push(($name, $call.await.map(drop)))
        };
    }
    call!("Publish", rpc.publish(publish("user.a")));
    call!(
        "PublishStream",
        rpc.publish_stream(futures::stream::iter([publish("user.a")]))
    );
    call!(
        "Subscribe",
        rpc.subscribe(pb::SubscribeRequest {
            pattern: "user.*".into(),
            ..Default::default()
        })
    );
    call!(
        "CreateTopic",
        rpc.create_topic(pb::CreateTopicRequest {
            name: "t".into(),
            ..Default::default()
        })
    );
    call!(
        "DeleteTopic",
        rpc.delete_topic(pb::DeleteTopicRequest { name: "t".into() })
    );
    call!("Enqueue", rpc.enqueue(enqueue("emails")));
    call!(
        "EnqueueStream",
        rpc.enqueue_stream(futures::stream::iter([enqueue("emails")]))
    );
    call!("Lease", rpc.lease(lease("emails")));
    call!(
        "Ack",
        rpc.ack(pb::AckRequest {
            acks: vec![pb::LeaseAck {
                lease_id: "emails/1/1".into(),
                result: Bytes::new(),
            }],
        })
    );
    call!(
        "Nack",
        rpc.nack(pb::NackRequest {
            lease_id: "emails/1/1".into(),
            ..Default::default()
        })
    );
    call!(
        "Consume",
        rpc.consume(one(pb::ConsumeRequest {
            queue: "emails".into(),
            credits: 1,
            ..Default::default()
        }))
    );
    call!(
        "ExtendLease",
        rpc.extend_lease(pb::ExtendLeaseRequest {
            lease_id: "emails/1/1".into(),
            visibility_timeout_ms: 1000,
        })
    );
    call!(
        "GetJob",
        rpc.get_job(pb::GetJobRequest {
            id: uuid::Uuid::now_v7().to_string(),
            queue: "emails".into(),
        })
    );
    call!(
        "CancelJob",
        rpc.cancel_job(pb::CancelJobRequest {
            id: uuid::Uuid::now_v7().to_string(),
            queue: "emails".into(),
        })
    );
    call!(
        "DeleteJob",
        rpc.delete_job(pb::DeleteJobRequest {
            queue: "emails".into(),
            job_id: uuid::Uuid::now_v7().to_string(),
        })
    );
    call!(
        "ListJobs",
        rpc.list_jobs(pb::ListJobsRequest {
            queue: "emails".into(),
            ..Default::default()
        })
    );
    call!(
        "JobHistory",
        rpc.job_history(pb::JobHistoryRequest {
            queue: "emails".into(),
            limit: 10,
        })
    );
    call!(
        "CreateQueue",
        rpc.create_queue(pb::CreateQueueRequest {
            name: "q".into(),
            ..Default::default()
        })
    );
    call!(
        "UpdateQueue",
        rpc.update_queue(pb::UpdateQueueRequest {
            name: "q".into(),
            ..Default::default()
        })
    );
    call!(
        "PurgeQueue",
        rpc.purge_queue(pb::PurgeQueueRequest { name: "q".into() })
    );
    call!(
        "PauseQueue",
        rpc.pause_queue(pb::PauseQueueRequest { name: "q".into() })
    );
    call!(
        "ResumeQueue",
        rpc.resume_queue(pb::ResumeQueueRequest { name: "q".into() })
    );
    call!(
        "DeleteQueue",
        rpc.delete_queue(pb::DeleteQueueRequest { name: "q".into() })
    );
    call!(
        "Redrive",
        rpc.redrive(pb::RedriveRequest {
            dead_letter_queue: "emails.dlq".into(),
            ..Default::default()
        })
    );
    call!("ListQueues", rpc.list_queues(pb::ListQueuesRequest {}));
    call!("Stats", rpc.stats(pb::StatsRequest::default()));
    call!(
        "WatchStats",
        rpc.watch_stats(pb::WatchStatsRequest::default())
    );
    call!(
        "ListConsumers",
        rpc.list_consumers(pb::ListConsumersRequest {
            queue: "emails".into(),
        })
    );
    call!(
        "CreateSchedule",
        rpc.create_schedule(schedule("s", "emails"))
    );
    call!(
        "UpdateSchedule",
        rpc.update_schedule(schedule("s", "emails"))
    );
    call!(
        "DeleteSchedule",
        rpc.delete_schedule(pb::DeleteScheduleRequest { name: "s".into() })
    );
    call!(
        "PauseSchedule",
        rpc.pause_schedule(pb::PauseScheduleRequest { name: "s".into() })
    );
    call!(
        "ResumeSchedule",
        rpc.resume_schedule(pb::ResumeScheduleRequest { name: "s".into() })
    );
    call!(
        "ListSchedules",
        rpc.list_schedules(pb::ListSchedulesRequest::default())
    );
    call!("SetSchema", rpc.set_schema(set_schema("emails")));
    call!(
        "GetSchema",
        rpc.get_schema(pb::GetSchemaRequest {
            target: queue_target("emails"),
        })
    );
    call!(
        "DeleteSchema",
        rpc.delete_schema(pb::DeleteSchemaRequest {
            target: queue_target("emails"),
        })
    );
    outcomes
}

/// A schedule `name` enqueueing into `queue` every minute.
fn schedule(name: &str, queue: &str) -> pb::ScheduleSpec {
    pb::ScheduleSpec {
        name: name.into(),
        trigger: Some(pb::schedule_spec::Trigger::IntervalMs(60_000)),
        job: Some(pb::ScheduleJob {
            queue: queue.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn queue_target(queue: &str) -> Option<pb::SchemaTarget> {
    Some(pb::SchemaTarget {
        target: Some(pb::schema_target::Target::Queue(queue.into())),
    })
}

fn set_schema(queue: &str) -> pb::SetSchemaRequest {
    pb::SetSchemaRequest {
        target: queue_target(queue),
        schema: Some(pb::set_schema_request::Schema::JsonSchema(pb::JsonSchema {
            text: "{}".into(),
        })),
    }
}

#[tokio::test]
async fn managing_a_schedule_needs_admin_on_its_queue() {
    let b = broker_with_tokens().await;
    let mut team = rpc_with(&b, TEAM).await;
    let mut producer = rpc_with(&b, PRODUCER).await;
    let mut ops = rpc_with(&b, OPS).await;
    team.create_schedule(schedule("team-sweep", "team.jobs"))
        .await
        .unwrap();
    assert_refused(
        team.create_schedule(schedule("steal", "emails")).await,
        Code::PermissionDenied,
        &["job.queue", "token \"team\"", "\"emails\""],
    );
    // Enqueue rights on the queue are not enough.
    assert_refused(
        producer.create_schedule(schedule("mine", "emails")).await,
        Code::PermissionDenied,
        &["token \"producer\"", "admin"],
    );
    ops.create_schedule(schedule("ops-report", "emails"))
        .await
        .unwrap();
    // Another queue's schedule: neither changed nor shown.
    for refused in [
        team.pause_schedule(pb::PauseScheduleRequest {
            name: "ops-report".into(),
        })
        .await
        .map(drop),
        team.delete_schedule(pb::DeleteScheduleRequest {
            name: "ops-report".into(),
        })
        .await
        .map(drop),
        team.update_schedule(schedule("ops-report", "emails"))
            .await
            .map(drop),
    ] {
        assert_refused(refused, Code::PermissionDenied, &["\"emails\""]);
    }
    let names = |r: pb::ListSchedulesResponse| -> Vec<String> {
        r.schedules
            .into_iter()
            .map(|s| s.schedule.unwrap().name)
            .collect()
    };
    let listed = team
        .list_schedules(pb::ListSchedulesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(listed), ["team-sweep"]);
    let listed = ops
        .list_schedules(pb::ListSchedulesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(listed), ["ops-report", "team-sweep"]);
    let paused = ops
        .pause_schedule(pb::PauseScheduleRequest {
            name: "ops-report".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.next_fire_unix_ms, 0, "paused: no next fire");
}

#[tokio::test]
async fn schemas_need_admin_on_their_target() {
    let b = broker_with_tokens().await;
    let mut producer = rpc_with(&b, PRODUCER).await;
    let mut team = rpc_with(&b, TEAM).await;
    assert_refused(
        producer.set_schema(set_schema("emails")).await,
        Code::PermissionDenied,
        &["target.queue: token \"producer\" may not admin \"emails\""],
    );
    assert_refused(
        team.set_schema(set_schema("emails")).await,
        Code::PermissionDenied,
        &["may not admin \"emails\""],
    );
    team.set_schema(set_schema("team.signups")).await.unwrap();
    let got = team
        .get_schema(pb::GetSchemaRequest {
            target: queue_target("team.signups"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.current_revision, 1);
    assert_refused(
        producer
            .get_schema(pb::GetSchemaRequest {
                target: queue_target("team.signups"),
            })
            .await,
        Code::PermissionDenied,
        &["may not admin"],
    );
}

#[tokio::test]
async fn every_broker_rpc_needs_a_known_token_and_health_does_not() {
    let b = broker_with_tokens().await;
    let mut anonymous = b.rpc().await;
    let outcomes = within(call_every_rpc(&mut anonymous)).await;
    // One entry per RPC of the service: a new RPC must be added here.
    assert_eq!(outcomes.len(), 37);
    for (rpc, outcome) in outcomes {
        let status = outcome.expect_err(rpc);
        assert_eq!(status.code(), Code::Unauthenticated, "{rpc}: {status:?}");
        assert!(status.message().contains("Bearer"), "{rpc}: {status:?}");
    }
    let mut stranger = rpc_with(&b, "not-a-token").await;
    for (rpc, outcome) in within(call_every_rpc(&mut stranger)).await {
        let status = outcome.expect_err(rpc);
        assert_eq!(status.code(), Code::Unauthenticated, "{rpc}: {status:?}");
        assert!(status.message().contains("not known"), "{rpc}: {status:?}");
    }
    // Nothing was created or enqueued by the refused calls.
    assert!(b.broker().list_queues().is_empty());

    // Health stays open, for load balancers and orchestrators.
    assert_eq!(
        health(&b.url(), "sluice.v1.Broker").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test]
async fn a_token_may_do_what_its_patterns_cover_and_nothing_else() {
    let b = broker_with_tokens().await;
    let mut producer = rpc_with(&b, PRODUCER).await;
    let mut worker = rpc_with(&b, WORKER).await;
    let mut ops = rpc_with(&b, OPS).await;

    // Publish: user.* only.
    producer.publish(publish("user.registered")).await.unwrap();
    assert_refused(
        producer.publish(publish("billing.paid")).await,
        Code::PermissionDenied,
        &[
            "topic: token \"producer\" may not publish \"billing.paid\" (its publish patterns: user.*)",
        ],
    );
    assert_refused(
        worker.publish(publish("user.registered")).await,
        Code::PermissionDenied,
        &["(its publish patterns: none)"],
    );
    // A stream is refused request by request, in its answers.
    let mut answers = producer
        .publish_stream(futures::stream::iter([
            publish("user.a"),
            publish("billing.b"),
        ]))
        .await
        .unwrap()
        .into_inner();
    let first = answers.next().await.unwrap().unwrap();
    assert!(first.refused.is_none() && first.results.len() == 1);
    let second = answers.next().await.unwrap().unwrap();
    let refusal = second.refused.expect("refused");
    assert_eq!(refusal.code, Code::PermissionDenied as i32);
    assert!(refusal.message.contains("billing.b"), "{refusal:?}");

    // Subscribe: the grant must cover the whole pattern.
    worker
        .subscribe(pb::SubscribeRequest {
            pattern: "user.*".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_refused(
        worker
            .subscribe(pb::SubscribeRequest {
                pattern: ">".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        &["may not subscribe \">\""],
    );

    // Enqueue, then lease and ack: producer enqueues, only the worker consumes.
    let id = producer
        .enqueue(enqueue("emails"))
        .await
        .unwrap()
        .into_inner()
        .results[0]
        .job_id
        .clone();
    assert_refused(
        producer.enqueue(enqueue("emails.dlq")).await,
        Code::PermissionDenied,
        &["may not enqueue \"emails.dlq\""],
    );
    assert_refused(
        producer.lease(lease("emails")).await,
        Code::PermissionDenied,
        &["may not consume \"emails\""],
    );
    let leased = worker
        .lease(lease("emails"))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(leased.len(), 1);
    let lease_id = leased[0].lease_id.clone();
    // Another token cannot settle the worker's lease, and trying changes nothing.
    let ack = |lease_id: &str| pb::AckRequest {
        acks: vec![pb::LeaseAck {
            lease_id: lease_id.into(),
            result: Bytes::new(),
        }],
    };
    assert_refused(
        producer.ack(ack(&lease_id)).await,
        Code::PermissionDenied,
        &["acks.lease_id: token \"producer\" may not consume \"emails\""],
    );
    assert_refused(
        producer
            .nack(pb::NackRequest {
                lease_id: lease_id.clone(),
                error: "no".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        &["lease_id"],
    );
    assert_refused(
        producer
            .extend_lease(pb::ExtendLeaseRequest {
                lease_id: lease_id.clone(),
                visibility_timeout_ms: 1_000,
            })
            .await,
        Code::PermissionDenied,
        &["lease_id"],
    );
    worker.ack(ack(&lease_id)).await.unwrap();

    // Job status: its producer may read it, without naming the queue too; only a
    // producer or admin may cancel.
    let get = |queue: &str| pb::GetJobRequest {
        id: id.clone(),
        queue: queue.into(),
    };
    let job = producer.get_job(get("")).await.unwrap().into_inner();
    assert_eq!(job.state, pb::JobState::Completed as i32);
    worker.get_job(get("emails")).await.unwrap();
    let pending = producer
        .enqueue(enqueue("emails"))
        .await
        .unwrap()
        .into_inner()
        .results[0]
        .job_id
        .clone();
    assert_refused(
        worker
            .cancel_job(pb::CancelJobRequest {
                id: pending.clone(),
                queue: String::new(),
            })
            .await,
        Code::PermissionDenied,
        &["needs one of: enqueue, admin"],
    );
    producer
        .cancel_job(pb::CancelJobRequest {
            id: pending.clone(),
            queue: String::new(),
        })
        .await
        .unwrap();
    // Deleting a job takes admin on its queue: its producer may cancel it but not delete
    // it, and the refused delete changes nothing.
    let delete = || pb::DeleteJobRequest {
        queue: "emails".into(),
        job_id: pending.clone(),
    };
    assert_refused(
        producer.delete_job(delete()).await,
        Code::PermissionDenied,
        &["queue: token \"producer\" may not admin \"emails\""],
    );
    let kept = ops
        .get_job(pb::GetJobRequest {
            id: pending.clone(),
            queue: "emails".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.state, pb::JobState::Cancelled as i32);
    let gone = ops.delete_job(delete()).await.unwrap().into_inner();
    assert_eq!(gone.job.unwrap().state, pb::JobState::Cancelled as i32);

    // Administration: admin patterns only; listings show what the token administers.
    let create = |name: &str| pb::CreateQueueRequest {
        name: name.into(),
        ..Default::default()
    };
    assert_refused(
        producer.create_queue(create("reports")).await,
        Code::PermissionDenied,
        &["name: token \"producer\" may not admin \"reports\""],
    );
    ops.create_queue(create("reports")).await.unwrap();
    let names = |r: pb::ListQueuesResponse| -> Vec<String> {
        let mut n: Vec<String> = r.queues.into_iter().map(|q| q.name).collect();
        n.sort();
        n
    };
    let all = names(
        ops.list_queues(pb::ListQueuesRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(all.contains(&"emails".to_owned()) && all.contains(&"reports".to_owned()));
    let seen = producer
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap();
    assert!(names(seen.into_inner()).is_empty());
    let stats = producer.stats(pb::StatsRequest::default()).await.unwrap();
    assert!(stats.into_inner().queues.is_empty());
    assert_refused(
        producer
            .stats(pb::StatsRequest {
                queues: vec!["emails".into()],
                topics: vec![],
            })
            .await,
        Code::PermissionDenied,
        &["queues: token \"producer\" may not admin \"emails\""],
    );
    let stats = ops
        .stats(pb::StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(stats.queues.iter().any(|q| q.name == "emails"));
}

#[tokio::test]
async fn a_queue_policy_may_reach_only_topics_and_queues_the_token_may() {
    let b = broker_with_tokens().await;
    let mut team = rpc_with(&b, TEAM).await;
    let create = |bindings: &[&str], dlq: &str| pb::CreateQueueRequest {
        name: "team.jobs".into(),
        policy: Some(pb::QueuePolicy {
            topic_bindings: bindings.iter().map(|b| b.to_string()).collect(),
            dead_letter_queue: dlq.into(),
            ..Default::default()
        }),
    };
    // A binding reads a topic: without subscribe on it, admin of the queue is not enough.
    assert_refused(
        team.create_queue(create(&["billing.>"], "")).await,
        Code::PermissionDenied,
        &["policy.topic_bindings[0]: token \"team\" may not subscribe \"billing.>\""],
    );
    // A dead-letter queue receives jobs: it needs enqueue or admin there.
    assert_refused(
        team.create_queue(create(&[], "emails")).await,
        Code::PermissionDenied,
        &["policy.dead_letter_queue: token \"team\" may not act on \"emails\""],
    );
    assert!(
        b.broker().list_queues().is_empty(),
        "refusals changed nothing"
    );
    team.create_queue(create(&["team.events.*"], "team.jobs.dead"))
        .await
        .unwrap();
    assert_refused(
        team.update_queue(pb::UpdateQueueRequest {
            name: "team.jobs".into(),
            policy: Some(pb::QueuePolicy {
                topic_bindings: vec![">".into()],
                ..Default::default()
            }),
        })
        .await,
        Code::PermissionDenied,
        &["may not subscribe \">\""],
    );
}

const EVIL: &str = "evil-token";
const DLQ_ADMIN: &str = "dlq-admin-token";

/// A broker for the redrive cases: `evil` may enqueue to and administer only `evil`;
/// `dlq-admin` administers only `payments.dlq`; `ops` may do anything.
async fn redrive_broker() -> TestBroker {
    let tokens = tokens_of(&[
        token_table(
            "evil",
            EVIL,
            &[r#"enqueue = ["evil"]"#, r#"admin = ["evil"]"#],
        ),
        token_table("dlq-admin", DLQ_ADMIN, &[r#"admin = ["payments.dlq"]"#]),
        token_table(
            "ops",
            OPS,
            &[
                r#"admin = [">"]"#,
                r#"enqueue = [">"]"#,
                r#"consume = [">"]"#,
            ],
        ),
    ]);
    broker_with_auth(Authenticator::from_tokens(tokens)).await
}

fn queue_names(b: &TestBroker) -> Vec<String> {
    let mut names: Vec<String> = b
        .broker()
        .list_queues()
        .into_iter()
        .map(|q| q.name)
        .collect();
    names.sort();
    names
}

/// Issue 17, item 1: the attack. A token with enqueue + admin on `evil` only enqueued a
/// job whose `x-sluice-original-queue` header named `payments` and redrove `evil`: the job
/// landed in `payments` (and invalid names in the header made queues that could never be
/// deleted). Now producers may not write `x-sluice-*` headers at all (in any case), and a
/// redrive follows only the origin the broker recorded: a job never dead-lettered by the
/// broker is skipped. On the old code the redrive moved 1 job into `payments`.
#[tokio::test]
async fn a_header_written_by_a_client_never_steers_a_redrive() {
    let b = redrive_broker().await;
    let mut evil = rpc_with(&b, EVIL).await;
    let with_header = |key: &str, value: &str| pb::EnqueueRequest {
        queue: "evil".into(),
        jobs: vec![pb::JobSpec {
            payload: Bytes::from_static(b"steal"),
            headers: [(key.to_owned(), value.to_owned())].into(),
            ..Default::default()
        }],
    };
    for (key, value) in [
        ("x-sluice-original-queue", "payments"),
        ("X-Sluice-Original-Queue", "payments"),
        ("x-sluice-original-queue", ""),
        ("x-sluice-original-queue", "bad name!/.."),
    ] {
        assert_refused(
            evil.enqueue(with_header(key, value)).await,
            Code::InvalidArgument,
            &[&format!(
                "jobs[0].headers[{key:?}]: header keys starting with \"x-sluice-\""
            )],
        );
    }
    assert!(queue_names(&b).is_empty(), "refusals created nothing");

    // A job that was never dead-lettered has no origin: a redrive of all, or by id,
    // moves nothing and creates nothing.
    let id = evil
        .enqueue(with_header("note", "x-sluice-original-queue: payments"))
        .await
        .unwrap()
        .into_inner()
        .results[0]
        .job_id
        .clone();
    let redrive = |job_ids: Vec<String>| pb::RedriveRequest {
        dead_letter_queue: "evil".into(),
        job_ids,
        rate_per_second: 1_000,
        max_jobs: 0,
    };
    let all = evil.redrive(redrive(vec![])).await.unwrap().into_inner();
    assert_eq!(all.redriven, 0);
    let by_id = evil
        .redrive(redrive(vec![id.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((by_id.redriven, by_id.skipped_ids), (0, vec![id]));
    assert_eq!(
        queue_names(&b),
        ["evil"],
        "no payments, no queue with a bad name"
    );
}

/// Issue 17, item 1: a redrive needs `admin` on the dead-letter queue and `enqueue` (or
/// `admin`) on every queue it moves jobs into. A token that administers only
/// `payments.dlq` is refused before anything moves, by id or for all, with the token, the
/// action and the queue named. On the old code `admin` on the DLQ was enough: the job
/// moved into `payments`.
#[tokio::test]
async fn a_redrive_into_a_queue_the_token_may_not_write_is_denied_and_moves_nothing() {
    let b = redrive_broker().await;
    let mut ops = rpc_with(&b, OPS).await;
    let id = ops
        .enqueue(pb::EnqueueRequest {
            queue: "payments".into(),
            jobs: vec![job("charge")],
        })
        .await
        .unwrap()
        .into_inner()
        .results[0]
        .job_id
        .clone();
    let leased = ops
        .lease(lease("payments"))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    ops.nack(pb::NackRequest {
        lease_id: leased[0].lease_id.clone(),
        error: "poison".into(),
        dead_letter: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let dead = ops
        .get_job(pb::GetJobRequest {
            id: id.clone(),
            queue: "payments.dlq".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dead.state, pb::JobState::Pending as i32);

    let mut dlq_admin = rpc_with(&b, DLQ_ADMIN).await;
    let redrive = |job_ids: Vec<String>| pb::RedriveRequest {
        dead_letter_queue: "payments.dlq".into(),
        job_ids,
        rate_per_second: 1_000,
        max_jobs: 0,
    };
    for ids in [vec![], vec![id.clone()]] {
        let field = if ids.is_empty() {
            "dead_letter_queue"
        } else {
            "job_ids"
        };
        assert_refused(
            dlq_admin.redrive(redrive(ids)).await,
            Code::PermissionDenied,
            &[&format!(
                "{field}: token \"dlq-admin\" may not act on \"payments\" (needs one of: enqueue, admin)"
            )],
        );
    }
    let still = ops
        .list_jobs(pb::ListJobsRequest {
            queue: "payments.dlq".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(still.len(), 1, "nothing moved");
    // A token that may write into the origin moves it back.
    let done = ops
        .redrive(redrive(vec![id.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.redriven, 1);
    let back = ops
        .get_job(pb::GetJobRequest {
            id,
            queue: "payments".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (back.state, back.attempts),
        (pb::JobState::Pending as i32, 0)
    );

    // The broker-wide memory figures are for whom administers everything.
    let all = ops
        .stats(pb::StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.memory_used_bytes, 6, "\"charge\" is held by payments");
    let some = dlq_admin
        .stats(pb::StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((some.memory_budget_bytes, some.memory_used_bytes), (0, 0));
}

#[tokio::test]
async fn a_consume_stream_needs_consume_and_refuses_acks_of_other_queues() {
    let b = broker_with_tokens().await;
    let mut producer = rpc_with(&b, PRODUCER).await;
    let mut worker = rpc_with(&b, WORKER).await;
    let mut ops = rpc_with(&b, OPS).await;
    producer.enqueue(enqueue("emails")).await.unwrap();
    ops.enqueue(enqueue("audit")).await.unwrap();
    let audit_lease = ops.lease(lease("audit")).await.unwrap().into_inner().jobs[0]
        .lease_id
        .clone();

    let open = |credits| pb::ConsumeRequest {
        queue: "emails".into(),
        credits,
        ..Default::default()
    };
    assert_refused(
        producer.consume(futures::stream::iter([open(1)])).await,
        Code::PermissionDenied,
        &["queue: token \"producer\" may not consume \"emails\""],
    );

    let (tx, mut events) = open_consume(&mut worker, open(1)).await.unwrap();
    let jobs = within(events.next()).await.unwrap().unwrap().jobs;
    assert_eq!(jobs.len(), 1);
    // The worker acks its own job and, on the same stream, one of a queue it may not
    // consume: that one is refused, and stays leased to ops.
    tx.send(pb::ConsumeRequest {
        acks: vec![
            pb::LeaseAck {
                lease_id: jobs[0].lease_id.clone(),
                result: Bytes::new(),
            },
            pb::LeaseAck {
                lease_id: audit_lease.clone(),
                result: Bytes::new(),
            },
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let refused = within(events.next()).await.unwrap().unwrap().errors;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].lease_id, audit_lease);
    assert_eq!(refused[0].code, Code::PermissionDenied as i32);
    assert!(refused[0].message.contains("may not consume \"audit\""));
    ops.ack(pb::AckRequest {
        acks: vec![pb::LeaseAck {
            lease_id: audit_lease,
            result: Bytes::new(),
        }],
    })
    .await
    .unwrap();
}

// ---- a tokens reload reaches open streams ------------------------------------------

/// `tokens()` with `worker` and `ops` changed: `None` drops the token, `Some(extra)`
/// keeps it with only the lines given.
fn tokens_with(worker: Option<&str>, ops: Option<&str>) -> Tokens {
    let mut tables = vec![
        token_table(
            "producer",
            PRODUCER,
            &[
                r#"publish = ["user.*", "team.*"]"#,
                r#"enqueue = ["emails"]"#,
            ],
        ),
        token_table(
            "team",
            TEAM,
            &[r#"admin = ["team.>"]"#, r#"subscribe = ["team.>"]"#],
        ),
    ];
    if let Some(lines) = worker {
        tables.push(token_table("worker", WORKER, &[lines]));
    }
    if let Some(lines) = ops {
        tables.push(token_table("ops", OPS, &[lines]));
    }
    tokens_of(&tables)
}

/// A broker serving `tokens()`, and its authenticator to reload in-process.
async fn broker_with_reloadable_tokens() -> (TestBroker, Authenticator) {
    let auth = Authenticator::from_tokens(tokens());
    (broker_with_auth(auth.clone()).await, auth)
}

/// The status a stream ends with: it must end (within 10 s) with an error, after
/// skipping whatever it still delivers.
async fn ends_with<T: std::fmt::Debug>(
    mut stream: tonic::Streaming<T>,
) -> (tonic::Status, Duration) {
    let started = std::time::Instant::now();
    within(async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return (status, started.elapsed()),
                None => panic!("the stream ended without a status"),
            }
        }
    })
    .await
}

fn subscribe_to(pattern: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        pattern: pattern.into(),
        ..Default::default()
    }
}

/// A consume stream of `queue` with one credit, and the sender of its next requests.
async fn consume_one(rpc: &mut Rpc, queue: &str) -> ConsumeStream {
    common::rpc::consume_with_credits(rpc, queue, 1).await
}

#[tokio::test]
async fn a_reload_ends_every_open_stream_of_a_revoked_token() {
    let (b, auth) = broker_with_reloadable_tokens().await;
    let mut worker = rpc_with(&b, WORKER).await;
    let mut ops = rpc_with(&b, OPS).await;
    let mut team = rpc_with(&b, TEAM).await;
    let mut producer = rpc_with(&b, PRODUCER).await;
    // Each stream's handler has registered it once its response has started.
    let subscription = worker
        .subscribe(subscribe_to("user.>"))
        .await
        .unwrap()
        .into_inner();
    let (_commands, consume) = consume_one(&mut worker, "emails").await;
    let mut watch = ops
        .watch_stats(pb::WatchStatsRequest {
            interval_ms: 100,
            filter: None,
        })
        .await
        .unwrap()
        .into_inner();
    within(watch.next()).await.unwrap().unwrap();
    let (publishes, inbound) = tokio::sync::mpsc::channel(4);
    let publish_stream = ops
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(inbound))
        .await
        .unwrap()
        .into_inner();
    let mut unchanged = team
        .subscribe(subscribe_to("team.>"))
        .await
        .unwrap()
        .into_inner();

    // Worker and ops are dropped from the file; producer and team stay as they were.
    let ended = auth.replace(tokens_with(None, None));
    assert_eq!(
        ended, 4,
        "subscribe, consume, watch and publish streams ended"
    );
    for (name, (status, took)) in [
        ("Subscribe", ends_with(subscription).await),
        ("Consume", ends_with(consume).await),
        ("WatchStats", ends_with(watch).await),
        ("PublishStream", ends_with(publish_stream).await),
    ] {
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
        assert!(
            status.message().contains("revoked"),
            "{name}: {:?}",
            status.message()
        );
        println!("{name} ended {took:?} after the reload");
    }
    drop(publishes);
    // A new call with the revoked token is refused too.
    assert_refused(
        worker.subscribe(subscribe_to("user.>")).await,
        Code::Unauthenticated,
        &["not known"],
    );
    // The team's stream, whose token did not change, still delivers.
    producer.publish(publish("team.a")).await.unwrap();
    let batch = within(unchanged.next()).await.unwrap().unwrap();
    assert_eq!(batch.messages.len(), 1);
}

#[tokio::test]
async fn a_reload_that_withdraws_a_grant_ends_only_the_streams_that_needed_it() {
    let (b, auth) = broker_with_reloadable_tokens().await;
    let mut worker = rpc_with(&b, WORKER).await;
    let mut ops = rpc_with(&b, OPS).await;
    let mut producer = rpc_with(&b, PRODUCER).await;
    let subscription = worker
        .subscribe(subscribe_to("user.>"))
        .await
        .unwrap()
        .into_inner();
    let (commands, mut consume) = consume_one(&mut worker, "emails").await;
    let filtered = ops
        .watch_stats(pb::WatchStatsRequest {
            interval_ms: 100,
            filter: Some(pb::StatsRequest {
                queues: vec!["emails".into()],
                topics: Vec::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut unfiltered = ops
        .watch_stats(pb::WatchStatsRequest {
            interval_ms: 100,
            filter: None,
        })
        .await
        .unwrap()
        .into_inner();
    producer.enqueue(enqueue("emails")).await.unwrap();
    let before = within(unfiltered.next()).await.unwrap().unwrap();
    assert!(
        before.queues.iter().any(|q| q.name == "emails"),
        "{before:?}"
    );

    // The worker keeps consume on "emails" but loses subscribe; ops keeps admin on
    // "audit" only.
    let ended = auth.replace(tokens_with(
        Some("consume = [\"emails\"]"),
        Some("admin = [\"audit\"]"),
    ));
    assert_eq!(ended, 2, "the subscription and the filtered watch");
    let (status, _) = ends_with(subscription).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("token \"worker\" may not subscribe \"user.>\""),
        "{:?}",
        status.message()
    );
    let (status, _) = ends_with(filtered).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("token \"ops\" may not admin \"emails\""),
        "{:?}",
        status.message()
    );
    // The consume stream still has its grant and goes on.
    let jobs = within(consume.next()).await.unwrap().unwrap().jobs;
    assert_eq!(jobs.len(), 1);
    commands
        .send(pb::ConsumeRequest {
            acks: vec![pb::LeaseAck {
                lease_id: jobs[0].lease_id.clone(),
                result: Bytes::new(),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    producer.enqueue(enqueue("emails")).await.unwrap();
    commands
        .send(pb::ConsumeRequest {
            credits: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let jobs = within(consume.next()).await.unwrap().unwrap().jobs;
    assert_eq!(jobs.len(), 1, "a job enqueued after the reload");
    // The unfiltered watch goes on, showing only what the new grant covers.
    within(async {
        loop {
            let snapshot = unfiltered.next().await.unwrap().unwrap();
            if snapshot.queues.iter().all(|q| q.name != "emails") {
                break;
            }
        }
    })
    .await;
}

/// A CA, a server certificate for `localhost` and 127.0.0.1, and a client certificate,
/// all PEM; plus a client certificate from a CA the server does not trust.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    stranger_cert: String,
    stranger_key: String,
}

fn pki() -> Pki {
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let leaf = |issuer: &CertifiedIssuer<'_, KeyPair>, names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let authority = ca("sluice test CA");
    let (server_cert, server_key) = leaf(&authority, vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_cert, client_key) = leaf(&authority, vec!["worker-1".into()]);
    let (stranger_cert, stranger_key) = leaf(&ca("another CA"), vec!["worker-2".into()]);
    Pki {
        ca: authority.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
        stranger_cert,
        stranger_key,
    }
}

/// The server side of `pki`; with `client_ca`, clients must show a certificate of its CA.
fn tls_settings(pki: &Pki, client_ca: bool) -> TlsSettings {
    TlsSettings {
        cert_pem: pki.server_cert.clone().into_bytes(),
        key_pem: pki.server_key.clone().into_bytes(),
        client_ca_pem: client_ca.then(|| pki.ca.clone().into_bytes()),
    }
}

async fn tls_broker(pki: &Pki, client_ca: bool) -> TestBroker {
    TestBroker::start_serving(ServeOptions {
        tls: Some(tls_settings(pki, client_ca)),
        ..serve_options()
    })
    .await
}

async fn works(url: &str, options: ConnectOptions) -> Result<(), String> {
    let client = tokio::time::timeout(Duration::from_secs(5), Client::connect_with(url, options))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    client
        .enqueue("tls", "over TLS")
        .send()
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca() {
    let pki = pki();
    let b = tls_broker(&pki, false).await;
    let url = format!("https://localhost:{}", b.addr.port());
    let trusting = ConnectOptions::new().ca_certificate_pem(pki.ca.clone());
    works(&url, trusting.clone()).await.unwrap();
    // By IP address too: the certificate names 127.0.0.1.
    works(&format!("https://127.0.0.1:{}", b.addr.port()), trusting)
        .await
        .unwrap();
    let err = works(&url, ConnectOptions::new()).await.unwrap_err();
    assert!(err.contains("needs the CA"), "{err}");
    let wrong = ConnectOptions::new().ca_certificate_pem(pki_other_ca());
    assert!(works(&url, wrong).await.is_err());
    // Plain HTTP/2 to a TLS port gets no service.
    assert!(
        works(
            &format!("http://127.0.0.1:{}", b.addr.port()),
            ConnectOptions::new()
        )
        .await
        .is_err()
    );
    assert_eq!(b.broker().stats(&[], &[]).queues.len(), 1);
}

fn pki_other_ca() -> String {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .pem()
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_its_ca() {
    let pki = pki();
    let b = tls_broker(&pki, true).await;
    let url = format!("https://localhost:{}", b.addr.port());
    let base = ConnectOptions::new().ca_certificate_pem(pki.ca.clone());
    works(
        &url,
        base.clone()
            .client_identity_pem(pki.client_cert.clone(), pki.client_key.clone()),
    )
    .await
    .unwrap();
    assert!(
        works(&url, base.clone()).await.is_err(),
        "no client certificate"
    );
    assert!(
        works(
            &url,
            base.client_identity_pem(pki.stranger_cert.clone(), pki.stranger_key.clone())
        )
        .await
        .is_err(),
        "a certificate from another CA"
    );
    let queues = b.broker().stats(&[], &[]).queues;
    assert_eq!(queues.len(), 1);
    assert_eq!(queues[0].1.pending, 1, "only the admitted client enqueued");
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_until_one_frees() {
    let b = TestBroker::start_serving(ServeOptions {
        max_connections: 2,
        ..serve_options()
    })
    .await;
    let first = b.client().await;
    let second = b.client().await;
    first.publish("cap", "1").await.unwrap();
    second.publish("cap", "2").await.unwrap();
    let third = works(&b.url(), ConnectOptions::new()).await;
    assert!(third.is_err(), "a third connection was served");
    drop(first);
    // The freed slot is taken by the next connection once the server sees the close.
    let url = b.url();
    eventually(|| works(&url, ConnectOptions::new())).await;
    second.publish("cap", "3").await.unwrap();
}

// ---- connection slots: handshake deadline, idle timeout, keepalive -------------------

/// A broker on plaintext (or TLS with `pki`) with these connection settings.
async fn broker_with_connections(
    max_connections: usize,
    handshake_ms: u64,
    idle_ms: Option<u64>,
    keepalive_ms: Option<u64>,
    pki: Option<&Pki>,
) -> TestBroker {
    TestBroker::start_serving(ServeOptions {
        max_connections,
        handshake_timeout: Duration::from_millis(handshake_ms),
        idle_timeout: idle_ms.map(Duration::from_millis),
        keepalive_interval: keepalive_ms.map(Duration::from_millis),
        keepalive_timeout: Duration::from_millis(keepalive_ms.unwrap_or(20_000)),
        tls: pki.map(|pki| tls_settings(pki, false)),
        ..serve_options()
    })
    .await
}

/// Reads until the server closes the connection (EOF or reset); returns how long it took.
async fn closed_by_server(socket: &mut tokio::net::TcpStream) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    within(async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    started.elapsed()
}

/// An HTTP/2 connection that sends the client preface and an empty SETTINGS frame, then
/// never answers anything (not even PINGs).
async fn mute_http2(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    socket
}

#[tokio::test]
async fn silent_sockets_lose_their_slots_at_the_handshake_deadline() {
    let b = broker_with_connections(10, 500, None, None, None).await;
    let opened = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(tokio::net::TcpStream::connect(b.addr).await.unwrap());
    }
    // The ten silent sockets hold every slot: a real client is refused...
    let first = works(&b.url(), ConnectOptions::new()).await;
    assert!(
        first.is_err(),
        "a client was served while 10 of 10 slots were held"
    );
    // ...until the deadline frees them.
    let url = b.url();
    eventually(|| works(&url, ConnectOptions::new())).await;
    let served_after = opened.elapsed();
    // Each silent socket was closed by the server, around the deadline.
    let mut longest = Duration::ZERO;
    for socket in &mut silent {
        longest = longest.max(closed_by_server(socket).await);
    }
    let closed_after = opened.elapsed();
    println!(
        "a client was served {served_after:?} after 10 silent sockets took every slot; all were closed {closed_after:?} after they opened"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "silent sockets closed only after {closed_after:?} (deadline 500 ms)"
    );
    assert!(
        served_after < Duration::from_secs(3),
        "served only after {served_after:?}"
    );
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_at_the_deadline() {
    use tokio::io::AsyncWriteExt;
    let pki = pki();
    let b = broker_with_connections(10_000, 500, None, None, Some(&pki)).await;
    let mut stalled = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    // The header of a ClientHello record, then nothing.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let took = closed_by_server(&mut stalled).await;
    println!("a stalled TLS ClientHello was closed after {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // TLS still serves real clients.
    let url = format!("https://localhost:{}", b.addr.port());
    works(
        &url,
        ConnectOptions::new().ca_certificate_pem(pki.ca.clone()),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn no_connection_waits_on_a_silent_one() {
    let pki = pki();
    for tls in [false, true] {
        // A deadline far longer than the test: a client that waited on a silent socket
        // would show it.
        let b = broker_with_connections(10_000, 30_000, None, None, tls.then_some(&pki)).await;
        let mut silent = Vec::new();
        for _ in 0..20 {
            silent.push(tokio::net::TcpStream::connect(b.addr).await.unwrap());
        }
        let (url, options) = if tls {
            (
                format!("https://localhost:{}", b.addr.port()),
                ConnectOptions::new().ca_certificate_pem(pki.ca.clone()),
            )
        } else {
            (b.url(), ConnectOptions::new())
        };
        let started = std::time::Instant::now();
        works(&url, options.clone()).await.unwrap();
        let first = started.elapsed();
        assert!(first < Duration::from_secs(5), "tls {tls}: {first:?}");
        // Sequential connects, each with its first RPC.
        let started = std::time::Instant::now();
        let mut slowest = Duration::ZERO;
        for _ in 0..if tls { 50 } else { 300 } {
            let one = std::time::Instant::now();
            works(&url, options.clone()).await.unwrap();
            slowest = slowest.max(one.elapsed());
        }
        let total = started.elapsed();
        println!(
            "tls {tls}: first client {first:?} beside 20 silent sockets; sequential connect + first RPC: total {total:?}, slowest {slowest:?}"
        );
        assert!(slowest < Duration::from_secs(5), "tls {tls}: {slowest:?}");
        drop(silent);
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_one_with_an_open_stream_is_not() {
    let b = broker_with_connections(10_000, 5_000, Some(300), None, None).await;
    let mut idle = mute_http2(b.addr).await;
    let client = b.client().await;
    let mut rpc = client.rpc();
    let mut subscription = rpc
        .subscribe(pb::SubscribeRequest {
            pattern: "idle.>".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let took = closed_by_server(&mut idle).await;
    println!("an idle connection was closed after {took:?} (idle timeout 300 ms)");
    assert!(took >= Duration::from_millis(250), "{took:?}");
    // Well past the idle timeout (the time passing is what is tested), the connection with
    // the open subscription still works.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let other = b.client().await;
    other.publish("idle.a", "still here").await.unwrap();
    let batch = within(subscription.next()).await.unwrap().unwrap();
    assert_eq!(batch.messages.len(), 1);
}

#[tokio::test]
async fn keepalive_pings_drop_a_peer_that_does_not_answer() {
    let b = broker_with_connections(10_000, 5_000, None, Some(200), None).await;
    let mut mute = mute_http2(b.addr).await;
    let took = closed_by_server(&mut mute).await;
    println!(
        "a peer that answers no PING was dropped after {took:?} (interval and timeout 200 ms)"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    // A live client answers the pings and stays.
    let client = b.client().await;
    client.publish("alive", "1").await.unwrap();
    // Five ping intervals pass (the time passing is what is tested).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    client.publish("alive", "2").await.unwrap();
}

// ---- the binary: flags, `sluice token`, SIGHUP reload ---------------------------------

fn sluice() -> tokio::process::Command {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
}

async fn run(cmd: &mut tokio::process::Command) -> Output {
    within(cmd.kill_on_drop(true).output()).await.unwrap()
}

/// `sluice serve` on 127.0.0.1:0 with an in-memory store and `flags`; returns the
/// process and the gRPC address its start-up log names (it listens before it logs it, so
/// one connection attempt is enough).
async fn serve_with(flags: &[&OsStr]) -> (tokio::process::Child, std::net::SocketAddr) {
    let mut server = sluice()
        .args(["serve", "--storage", "memory", "--listen", "127.0.0.1:0"])
        .args(flags)
        .env("SLUICE_LOG", SERVE_LOG)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap().into_owned_fd().unwrap();
    let addr = serve_addrs(std::fs::File::from(stdout), false).await.grpc;
    (server, addr)
}

/// Sends SIGHUP to `server`: it reloads its tokens file.
async fn sighup(server: &tokio::process::Child) {
    let pid = server.id().unwrap().to_string();
    let hup = run(tokio::process::Command::new("kill").args(["-HUP", &pid])).await;
    assert!(hup.status.success());
}

/// `sluice token` prints a token (in a comment) and its `[[token]]` table.
async fn new_token(name: &str) -> (String, String) {
    let out = run(sluice().args(["token", "--name", name])).await;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text
        .lines()
        .filter_map(|l| l.strip_prefix("# sk_"))
        .map(|t| format!("sk_{t}"))
        .next()
        .expect("a token line");
    let table: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    (token, table)
}

#[tokio::test]
async fn serve_with_tokens_and_tls_and_rotate_tokens_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let path = |name: &str| dir.path().join(name);
    for (name, pem) in [
        ("ca.pem", &pki.ca),
        ("server.pem", &pki.server_cert),
        ("server.key", &pki.server_key),
    ] {
        std::fs::write(path(name), pem).unwrap();
    }
    let (old, old_table) = new_token("ops").await;
    let (new, new_table) = new_token("ops").await;
    assert_ne!(old, new);
    // `--hash` gives the same hash as the printed table.
    let mut hasher = sluice()
        .args(["token", "--hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = hasher.stdin.take().unwrap();
    stdin.write_all(old.as_bytes()).await.unwrap();
    drop(stdin);
    let hashed = within(hasher.wait_with_output()).await.unwrap();
    let hash = String::from_utf8(hashed.stdout).unwrap();
    assert!(old_table.contains(hash.trim()), "{old_table} / {hash}");

    let tokens = path("tokens.toml");
    std::fs::write(&tokens, format!("{old_table}admin = [\">\"]\n")).unwrap();
    let (mut server, addr) = serve_with(&[
        "--tokens-file".as_ref(),
        tokens.as_ref(),
        "--tls-cert".as_ref(),
        path("server.pem").as_ref(),
        "--tls-key".as_ref(),
        path("server.key").as_ref(),
    ])
    .await;
    let url = format!("https://localhost:{}", addr.port());
    let queues = |token: &str| {
        let mut cmd = sluice();
        cmd.args(["queues", "--json", "--server", &url, "--ca-cert"])
            .arg(path("ca.pem"))
            .env_remove("SLUICE_TOKEN");
        if !token.is_empty() {
            cmd.args(["--token", token]);
        }
        cmd
    };
    // The broker listens before it logs its address, so the first call is served.
    let first = run(&mut queues(&old)).await;
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let anonymous = run(&mut queues("")).await;
    assert_eq!(anonymous.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&anonymous.stderr);
    assert!(stderr.contains("Bearer"), "{stderr}");

    // Rotation: the file now holds only the new token; SIGHUP makes it take effect.
    std::fs::write(&tokens, format!("{new_table}admin = [\">\"]\n")).unwrap();
    sighup(&server).await;
    eventually(|| async {
        let old_refused = !run(&mut queues(&old)).await.status.success();
        match old_refused && run(&mut queues(&new)).await.status.success() {
            true => Ok(()),
            false => Err("the reload has not taken effect"),
        }
    })
    .await;
    server.kill().await.unwrap();
}

#[tokio::test]
async fn sighup_ends_the_open_subscription_of_a_revoked_token() {
    let dir = tempfile::tempdir().unwrap();
    let (revoked, revoked_table) = new_token("leaving").await;
    let (kept, kept_table) = new_token("staying").await;
    let tokens = dir.path().join("tokens.toml");
    let both = format!(
        "{revoked_table}subscribe = [\">\"]\n\n{kept_table}subscribe = [\">\"]\npublish = [\">\"]\n"
    );
    std::fs::write(&tokens, both).unwrap();
    let (mut server, addr) = serve_with(&["--tokens-file".as_ref(), tokens.as_ref()]).await;
    let url = format!("http://{addr}");
    let connect = |token: String| {
        let url = url.clone();
        async move {
            Client::connect_with(url, ConnectOptions::new().token(token))
                .await
                .expect("connect to the broker")
                .rpc()
        }
    };
    let mut leaving = within(connect(revoked.clone())).await;
    let mut staying = within(connect(kept.clone())).await;
    let subscription = within(leaving.subscribe(subscribe_to("news.>")))
        .await
        .unwrap()
        .into_inner();
    let mut unchanged = within(staying.subscribe(subscribe_to("news.>")))
        .await
        .unwrap()
        .into_inner();

    std::fs::write(
        &tokens,
        format!("{kept_table}subscribe = [\">\"]\npublish = [\">\"]\n"),
    )
    .unwrap();
    sighup(&server).await;
    let (status, took) = ends_with(subscription).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("revoked"),
        "{:?}",
        status.message()
    );
    println!("the subscription ended {took:?} after SIGHUP");
    staying.publish(publish("news.a")).await.unwrap();
    let batch = within(unchanged.next()).await.unwrap().unwrap();
    assert_eq!(batch.messages.len(), 1);
    server.kill().await.unwrap();
}

#[tokio::test]
async fn serve_refuses_unsafe_or_incomplete_security_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--listen", "0.0.0.0:0"],
            "authentication is not configured: set --tokens-file",
        ),
        (&["--tls-cert", "c.pem"], "--tls-cert needs --tls-key"),
        (
            &["--tls-client-ca", "ca.pem"],
            "--tls-client-ca needs --tls-cert",
        ),
        (&["--max-connections", "0"], "--max-connections 0"),
        (
            &["--tokens-file", "/nonexistent/tokens.toml"],
            "cannot read tokens file",
        ),
    ];
    for (args, expected) in cases {
        let out = run(sluice()
            .args(["serve", "--storage", "memory"])
            .args(args)
            .current_dir(dir.path()))
        .await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let bad = dir.path().join("tokens.toml");
    std::fs::write(&bad, "[[token]]\nname = \"x\"\nsha256 = \"abc\"\n").unwrap();
    let out = run(sluice()
        .args(["serve", "--storage", "memory", "--tokens-file"])
        .arg(&bad))
    .await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("token[0] (\"x\").sha256"), "{stderr}");
}
