//! Work-queue RPCs over real gRPC.

mod common;

use std::time::{Duration, Instant};

use common::{TestBroker, long_poll, within};
use sluice::client::{Job, Policy};
use sluice::pb;
use tonic::Code;

fn policy(f: impl FnOnce(&mut pb::QueuePolicy)) -> pb::QueuePolicy {
    let mut p = pb::QueuePolicy::default();
    f(&mut p);
    p
}

fn no_backoff() -> Option<pb::BackoffPolicy> {
    Some(pb::BackoffPolicy {
        delays_ms: vec![0],
        ..Default::default()
    })
}

#[tokio::test]
async fn enqueue_lease_ack_round_trip_with_result_and_history() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let enqueued = client
        .enqueue("emails", "hello")
        .kind("welcome")
        .priority(3)
        .header("trace", "abc")
        .send()
        .await
        .unwrap();
    assert!(!enqueued.duplicate);
    assert_eq!(
        uuid::Uuid::parse_str(&enqueued.job_id)
            .unwrap()
            .get_version_num(),
        7
    );

    let leases = client.lease("emails").consumer("w1").send().await.unwrap();
    assert_eq!(leases.len(), 1);
    let lease = leases.into_iter().next().unwrap();
    assert_eq!(lease.job_id(), enqueued.job_id);
    assert_eq!(lease.kind(), "welcome");
    assert_eq!(lease.payload().as_ref(), b"hello");
    assert_eq!(lease.headers()["trace"], "abc");
    assert_eq!(lease.attempt(), 1);
    assert_eq!(lease.max_attempts(), 5);
    assert_eq!(lease.job().priority, 3);
    assert_eq!(lease.queue(), "emails");
    lease.ack_with_result("sent").await.unwrap();

    let job = client.get_job(&enqueued.job_id).await.unwrap();
    assert_eq!(job.state(), pb::JobState::Completed);
    assert_eq!(job.result.as_ref(), b"sent");
    assert_eq!(job.queue, "emails");
    assert_eq!(job.consumer, "w1");
    assert!(job.finished_at_unix_ms >= job.enqueued_at_unix_ms);

    let history = client
        .rpc()
        .job_history(pb::JobHistoryRequest {
            queue: "emails".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.jobs.len(), 1);
    assert_eq!(history.jobs[0].id, enqueued.job_id);
}

#[tokio::test]
async fn batches_lease_by_priority_then_fifo() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let jobs = [("l1", 0), ("h1", 9), ("m", 4), ("h2", 9), ("l2", 0)]
        .into_iter()
        .map(|(p, prio)| Job::new(p).priority(prio))
        .collect();
    let ids = client.enqueue_batch("q", jobs).await.unwrap();
    assert_eq!(ids.len(), 5);
    let leases = client.lease("q").max_jobs(10).send().await.unwrap();
    let order: Vec<&[u8]> = leases.iter().map(|l| l.payload().as_ref()).collect();
    assert_eq!(order, [&b"h1"[..], b"h2", b"m", b"l1", b"l2"]);
    client.ack_batch(leases).await.unwrap();
    let stats = client.stats().await.unwrap();
    let q = stats.queues.iter().find(|q| q.name == "q").unwrap();
    assert_eq!((q.completed, q.pending, q.leased, q.enqueued), (5, 0, 0, 5));
}

#[tokio::test]
async fn long_poll_wakes_on_enqueue_and_times_out_empty() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let started = Instant::now();
    let empty = client
        .lease("idle")
        .wait(Duration::from_millis(200))
        .send()
        .await
        .unwrap();
    assert!(empty.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(190));

    let started = Instant::now();
    let waiter = long_poll(&client, "wake", Duration::from_secs(10)).await;
    client.enqueue("wake", "now").send().await.unwrap();
    let leases = within(waiter).await.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert_eq!(leases.len(), 1);
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    for l in leases {
        l.ack().await.unwrap();
    }
}

#[tokio::test]
async fn one_batch_reaches_every_long_poll_waiter() {
    // Each enqueue wakes one waiter; the woken one passes the wake-up on while jobs remain,
    // so eight waiters on an empty queue get one job each from a single batch of eight,
    // long before their 30 s wait would end.
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut waiters = Vec::new();
    for _ in 0..8 {
        waiters.push(long_poll(&client, "herd", Duration::from_secs(30)).await);
    }
    let jobs = (0..8).map(|i| Job::new(format!("{i}"))).collect();
    client.enqueue_batch("herd", jobs).await.unwrap();
    let mut payloads = Vec::new();
    for waiter in waiters {
        let leases = within(waiter).await.unwrap().unwrap();
        assert_eq!(leases.len(), 1);
        payloads.push(String::from_utf8(leases[0].payload().to_vec()).unwrap());
    }
    payloads.sort();
    let expected: Vec<String> = (0..8).map(|i| i.to_string()).collect();
    assert_eq!(payloads, expected);
}

#[tokio::test]
async fn delayed_jobs_become_visible_at_their_time() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let enqueued_at = Instant::now();
    let id = client
        .enqueue("later", "x")
        .delay(Duration::from_millis(300))
        .send()
        .await
        .unwrap()
        .job_id;
    assert_eq!(
        client.get_job(&id).await.unwrap().state(),
        pb::JobState::Scheduled
    );
    assert!(client.lease("later").send().await.unwrap().is_empty());
    let leases = client
        .lease("later")
        .wait(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(leases.len(), 1);
    assert!(enqueued_at.elapsed() >= Duration::from_millis(290));
    leases.into_iter().next().unwrap().ack().await.unwrap();
}

#[tokio::test]
async fn an_expired_lease_is_stale_and_the_job_is_delivered_again() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    client
        .create_queue("vt", policy(|p| p.backoff = no_backoff()))
        .await
        .unwrap();
    client.enqueue("vt", "x").send().await.unwrap();
    let first = client
        .lease("vt")
        .visibility_timeout(Duration::from_millis(200))
        .send()
        .await
        .unwrap()
        .remove(0);
    let second = client
        .lease("vt")
        .visibility_timeout(Duration::from_secs(30))
        .wait(Duration::from_secs(5))
        .send()
        .await
        .unwrap()
        .remove(0);
    assert_eq!(second.job_id(), first.job_id());
    assert_eq!(second.attempt(), 2);
    let err = first.clone().ack().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("stale"), "{err}");
    // The late ack changed nothing: the live delivery still settles.
    second.ack().await.unwrap();
    let job = client.get_job(first.job_id()).await.unwrap();
    assert_eq!((job.state(), job.attempts), (pb::JobState::Completed, 2));
    assert!(
        job.last_error.contains("lease expired"),
        "{}",
        job.last_error
    );
}

#[tokio::test]
async fn extend_keeps_the_lease_alive() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    client.enqueue("ext", "x").send().await.unwrap();
    let mut lease = client
        .lease("ext")
        .visibility_timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap()
        .remove(0);
    let before = lease.deadline_unix_ms();
    lease.extend(Duration::from_secs(30)).await.unwrap();
    assert!(lease.deadline_unix_ms() > before + 20_000);
    // Past the original 300 ms timeout: the time passing is what is tested.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(client.lease("ext").send().await.unwrap().is_empty());
    lease.ack().await.unwrap();
}

#[tokio::test]
async fn retries_dead_letter_with_headers_and_redrive_brings_jobs_back() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    client
        .create_queue(
            "work",
            policy(|p| {
                p.max_attempts = 2;
                p.backoff = no_backoff();
            }),
        )
        .await
        .unwrap();
    let id = client
        .enqueue("work", "poison")
        .send()
        .await
        .unwrap()
        .job_id;

    let l1 = client.lease("work").send().await.unwrap().remove(0);
    let outcome = l1.nack("boom 1").await.unwrap();
    assert_eq!(outcome.state, pb::JobState::Pending);
    let l2 = client.lease("work").send().await.unwrap().remove(0);
    assert_eq!(l2.attempt(), 2);
    assert_eq!(l2.nack("boom 2").await.unwrap().state, pb::JobState::Dead);

    let job = client.get_job(&id).await.unwrap();
    assert_eq!(job.state(), pb::JobState::Dead);
    assert_eq!(job.dead_letter_queue, "work.dlq");
    assert_eq!(job.last_error, "boom 2");

    let dead = client.lease("work.dlq").send().await.unwrap().remove(0);
    assert_eq!(dead.job_id(), id);
    assert_eq!(dead.headers()["x-sluice-original-queue"], "work");
    assert_eq!(dead.headers()["x-sluice-attempts"], "2");
    assert_eq!(dead.headers()["x-sluice-last-error"], "boom 2");
    assert!(dead.headers().contains_key("x-sluice-dead-lettered-at"));
    // Put it back so it can be redriven.
    dead.nack_after("inspect later", Duration::from_millis(1))
        .await
        .unwrap();
    // Waits out the 1 ms retry delay (time, not something to register), so the dead
    // letter is visible again for the redrive.
    tokio::time::sleep(Duration::from_millis(20)).await;

    let redrive = client
        .rpc()
        .redrive(pb::RedriveRequest {
            dead_letter_queue: "work.dlq".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redrive.redriven, 1);
    let back = client.lease("work").send().await.unwrap().remove(0);
    assert_eq!(back.job_id(), id);
    assert_eq!(back.attempt(), 1);
    assert!(!back.headers().contains_key("x-sluice-original-queue"));
    back.ack().await.unwrap();
    assert_eq!(
        client.get_job(&id).await.unwrap().state(),
        pb::JobState::Completed
    );
}

#[tokio::test]
async fn nack_as_poison_dead_letters_at_once_and_redrive_by_id_is_rate_limited() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            client
                .enqueue("p", format!("{i}"))
                .send()
                .await
                .unwrap()
                .job_id,
        );
    }
    for lease in client.lease("p").max_jobs(3).send().await.unwrap() {
        assert_eq!(
            lease.dead_letter("bad input").await.unwrap().state,
            pb::JobState::Dead
        );
    }
    let started = Instant::now();
    let redrive = client
        .rpc()
        .redrive(pb::RedriveRequest {
            dead_letter_queue: "p.dlq".into(),
            job_ids: vec![
                ids[0].clone(),
                ids[2].clone(),
                uuid::Uuid::now_v7().to_string(),
            ],
            rate_per_second: 10,
            max_jobs: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redrive.redriven, 2);
    assert_eq!(redrive.skipped_ids.len(), 1);
    // 10 jobs a second, one per 100 ms step: the second job waits for the second step.
    assert!(started.elapsed() >= Duration::from_millis(100));
    let back = client.lease("p").max_jobs(10).send().await.unwrap();
    assert_eq!(back.len(), 2);
    client.ack_batch(back).await.unwrap();
}

#[tokio::test]
async fn idempotency_keys_return_the_original_job() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let a = client
        .enqueue("idem", "x")
        .idempotency_key("order-1")
        .send()
        .await
        .unwrap();
    let b = client
        .enqueue("idem", "x")
        .idempotency_key("order-1")
        .send()
        .await
        .unwrap();
    assert!(b.duplicate);
    assert_eq!(a.job_id, b.job_id);
    let leases = client.lease("idem").max_jobs(10).send().await.unwrap();
    assert_eq!(leases.len(), 1);
    client.ack_batch(leases).await.unwrap();
}

#[tokio::test]
async fn ordering_keys_serialise_jobs_per_key() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let jobs = ["a1", "a2", "b1"]
        .into_iter()
        .map(|p| Job::new(p).ordering_key(&p[..1]))
        .collect();
    client.enqueue_batch("ord", jobs).await.unwrap();
    let first = client.lease("ord").max_jobs(10).send().await.unwrap();
    let payloads: Vec<&[u8]> = first.iter().map(|l| l.payload().as_ref()).collect();
    assert_eq!(payloads, [&b"a1"[..], b"b1"]);
    assert_eq!(first[0].job().ordering_key, "a");
    client.ack_batch(first).await.unwrap();
    let next = client.lease("ord").max_jobs(10).send().await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].payload().as_ref(), b"a2");
    client.ack_batch(next).await.unwrap();
}

#[tokio::test]
async fn cancel_list_purge_pause_and_delete() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    let ids: Vec<String> = client
        .enqueue_batch("adm", (0..5).map(|i| Job::new(format!("{i}"))).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.job_id)
        .collect();
    let leased = client.lease("adm").send().await.unwrap().remove(0);
    assert_eq!(leased.job_id(), ids[0]);

    let err = client.cancel_job(&ids[0]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    let cancelled = client.cancel_job(&ids[1]).await.unwrap();
    assert_eq!(cancelled.state(), pb::JobState::Cancelled);
    let err = client.cancel_job(&ids[1]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");

    let page = rpc
        .list_jobs(pb::ListJobsRequest {
            queue: "adm".into(),
            state: pb::JobState::Pending as i32,
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.jobs.iter().map(|j| &j.id).collect::<Vec<_>>(),
        [&ids[2], &ids[3]]
    );
    let rest = rpc
        .list_jobs(pb::ListJobsRequest {
            queue: "adm".into(),
            state: pb::JobState::Pending as i32,
            page_size: 2,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.jobs.len(), 1);
    assert!(rest.next_page_token.is_empty());

    let purged = rpc
        .purge_queue(pb::PurgeQueueRequest { name: "adm".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.purged, 3);
    leased.ack().await.unwrap();

    // Paused: enqueue works, lease waits like an empty queue, resume wakes it.
    let info = rpc
        .pause_queue(pb::PauseQueueRequest { name: "adm".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(info.paused);
    client.enqueue("adm", "after pause").send().await.unwrap();
    assert!(client.lease("adm").send().await.unwrap().is_empty());
    let waiter = long_poll(&client, "adm", Duration::from_secs(10)).await;
    rpc.resume_queue(pb::ResumeQueueRequest { name: "adm".into() })
        .await
        .unwrap();
    let woke = within(waiter).await.unwrap().unwrap();
    assert_eq!(woke.len(), 1);
    client.ack_batch(woke).await.unwrap();

    rpc.delete_queue(pb::DeleteQueueRequest { name: "adm".into() })
        .await
        .unwrap();
    let err = rpc
        .purge_queue(pb::PurgeQueueRequest { name: "adm".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn queue_admin_and_consumer_listing() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    let created = client
        .create_queue(
            "orders",
            policy(|p| {
                p.max_attempts = 7;
                p.visibility_timeout_ms = 5_000;
                p.topic_bindings = vec!["order.*".into()];
            }),
        )
        .await
        .unwrap();
    let p = created.policy.unwrap();
    assert_eq!((p.max_attempts, p.visibility_timeout_ms), (7, 5_000));
    assert_eq!(p.dead_letter_queue, "orders.dlq");
    assert_eq!(p.topic_bindings, ["order.*"]);

    let err = client
        .create_queue("orders", pb::QueuePolicy::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::AlreadyExists));

    let updated = rpc
        .update_queue(pb::UpdateQueueRequest {
            name: "orders".into(),
            policy: Some(policy(|p| p.max_depth = 10)),
        })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!((updated.max_depth, updated.max_attempts), (10, 7));
    assert_eq!(updated.topic_bindings, ["order.*"], "bindings kept");

    let queues = rpc
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(queues.queues.iter().any(|q| q.name == "orders"));

    client.enqueue("orders", "a").send().await.unwrap();
    client.enqueue("orders", "b").send().await.unwrap();
    let l = client
        .lease("orders")
        .consumer("billing-1")
        .send()
        .await
        .unwrap()
        .remove(0);
    l.ack().await.unwrap();
    let _held = client
        .lease("orders")
        .consumer("billing-1")
        .send()
        .await
        .unwrap()
        .remove(0);
    let consumers = rpc
        .list_consumers(pb::ListConsumersRequest {
            queue: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .consumers;
    assert_eq!(consumers.len(), 1);
    let c = &consumers[0];
    assert_eq!(
        (c.name.as_str(), c.leases_held, c.done, c.failed),
        ("billing-1", 1, 1, 0)
    );
    assert!(c.address.starts_with("127.0.0.1:"), "{}", c.address);

    let stats = client.stats().await.unwrap();
    let q = stats.queues.iter().find(|q| q.name == "orders").unwrap();
    assert_eq!((q.leased, q.completed, q.consumers), (1, 1, 1));
    assert!(q.ack_rate > 0.0 && q.enqueue_rate > 0.0);
}

// ---- rate and in-flight limits ------------------------------------------------------

/// Creates `name` with the limits given, through the client's typed policy.
async fn create_limited(
    client: &sluice::client::Client,
    name: &str,
    rate: Option<(u32, u32)>,
    max_in_flight: Option<u32>,
) {
    let mut policy = Policy::new();
    if let Some((per_second, burst)) = rate {
        policy = policy.rate_limit(per_second, burst);
    }
    if let Some(n) = max_in_flight {
        policy = policy.max_in_flight(n);
    }
    client.create_queue(name, policy).await.unwrap();
}

#[tokio::test]
async fn competing_consumers_never_hold_more_than_max_in_flight() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_limited(&client, "emails", None, Some(3)).await;
    let jobs = (0..40).map(|i| Job::new(format!("{i}"))).collect();
    client.enqueue_batch("emails", jobs).await.unwrap();

    // Counted after a lease arrives and before its ack is sent, so never above what the
    // broker holds leased.
    let held = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (client, held, most) = (client.clone(), held.clone(), most.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let leases = client
                    .lease("emails")
                    .consumer(format!("w{w}"))
                    .max_jobs(2)
                    .wait(Duration::from_millis(500))
                    .send()
                    .await
                    .unwrap();
                if leases.is_empty() {
                    return seen;
                }
                let now = held.fetch_add(leases.len(), Ordering::SeqCst) + leases.len();
                most.fetch_max(now, Ordering::SeqCst);
                // Holds the jobs a moment, as a worker does, so the six workers' leases
                // overlap and press on the limit: the time held is the point.
                tokio::time::sleep(Duration::from_millis(5)).await;
                for lease in leases {
                    seen.push(lease.job_id().to_owned());
                    held.fetch_sub(1, Ordering::SeqCst);
                    lease.ack().await.unwrap();
                }
            }
        }));
    }
    let mut seen = Vec::new();
    for worker in workers {
        seen.extend(within(worker).await.unwrap());
    }
    assert!(most.load(Ordering::SeqCst) <= 3, "{most:?} held at once");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 40, "every job leased once");
    let stats = client.stats().await.unwrap();
    let emails = stats.queues.iter().find(|q| q.name == "emails").unwrap();
    assert_eq!((emails.completed, emails.max_in_flight), (40, 3));
    // Six workers on three slots: some of them were held back.
    assert!(emails.in_flight_limited_ms > 0);
}

#[tokio::test]
async fn a_rate_limit_paces_long_polls_and_consume_streams_alike() {
    use futures::StreamExt;

    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_limited(&client, "emails", Some((20, 5)), None).await;
    let started = Instant::now();
    let jobs = (0..30).map(|i| Job::new(format!("{i}"))).collect();
    client.enqueue_batch("emails", jobs).await.unwrap();

    let mut tasks = Vec::new();
    for w in 0..3 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let leases = client
                    .lease("emails")
                    .consumer(format!("poll{w}"))
                    .max_jobs(10)
                    .wait(Duration::from_millis(700))
                    .send()
                    .await
                    .unwrap();
                if leases.is_empty() {
                    return got;
                }
                for lease in leases {
                    got.push(lease.job_id().to_owned());
                    lease.ack().await.unwrap();
                }
            }
        }));
    }
    let stream = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut consumer = client
                .consume("emails")
                .prefetch(10)
                .consumer("stream")
                .open()
                .await
                .unwrap();
            let mut got = Vec::new();
            while let Ok(Some(lease)) =
                tokio::time::timeout(Duration::from_millis(700), consumer.next()).await
            {
                let lease = lease.unwrap();
                got.push(lease.job_id().to_owned());
                lease.ack().await.unwrap();
            }
            got
        })
    };
    tasks.push(stream);
    let mut seen = Vec::new();
    for task in tasks {
        seen.extend(within(task).await.unwrap());
    }
    let elapsed = started.elapsed();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 30, "every job handed out once");
    // A burst of 5, then 25 at 20 a second: 1.25 s at the least, however many consumers.
    // (The consumers' final 700 ms of waiting for nothing comes on top.)
    assert!(elapsed >= Duration::from_millis(1_250), "{elapsed:?}");
    let stats = client.stats().await.unwrap();
    let emails = stats.queues.iter().find(|q| q.name == "emails").unwrap();
    assert_eq!(
        (emails.rate_limit_per_second, emails.rate_limit_burst),
        (20, 5)
    );
    assert!(emails.rate_limited_ms > 0);
    assert!(emails.rate_tokens <= 5);
}

#[tokio::test]
async fn limits_are_checked_named_and_removable() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = client.rpc();
    let create =
        |name: &str, rate: Option<(u32, u32)>, max_in_flight: Option<u32>| pb::CreateQueueRequest {
            name: name.into(),
            policy: Some(policy(|p| {
                p.rate_limit = rate.map(|(per_second, burst)| pb::RateLimit { per_second, burst });
                p.max_in_flight = max_in_flight;
            })),
        };
    for (request, needles) in [
        (
            create("a", Some((0, 5)), None),
            &["policy.rate_limit.per_second", "burst 5"][..],
        ),
        (
            create("a", Some((2_000_000, 0)), None),
            &["policy.rate_limit.per_second", "2000000", "1000000"][..],
        ),
        (
            create("a", Some((10, 1_000_001)), None),
            &["policy.rate_limit.burst", "1000001"][..],
        ),
        (
            create("a", None, Some(1_000_001)),
            &["policy.max_in_flight", "1000001", "1000000"][..],
        ),
    ] {
        let err = rpc.create_queue(request).await.unwrap_err();
        common::rpc::assert_status(err, Code::InvalidArgument, needles);
    }

    // Burst defaults to the rate; an update without the fields keeps them.
    let info = rpc
        .create_queue(create("emails", Some((10, 0)), Some(4)))
        .await
        .unwrap()
        .into_inner();
    let p = info.policy.unwrap();
    assert_eq!(
        p.rate_limit,
        Some(pb::RateLimit {
            per_second: 10,
            burst: 10
        })
    );
    assert_eq!(p.max_in_flight, Some(4));
    let update = |p: pb::QueuePolicy| pb::UpdateQueueRequest {
        name: "emails".into(),
        policy: Some(p),
    };
    let kept = rpc
        .update_queue(update(policy(|p| p.max_attempts = 7)))
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(
        (kept.rate_limit, kept.max_in_flight),
        (p.rate_limit, Some(4))
    );
    // Zeros remove them.
    let removed = rpc
        .update_queue(update(policy(|p| {
            p.rate_limit = Some(pb::RateLimit::default());
            p.max_in_flight = Some(0);
        })))
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!((removed.rate_limit, removed.max_in_flight), (None, None));
    // The client's typed policy sets and removes them the same way.
    let set = client
        .update_queue("emails", Policy::new().rate_limit(5, 0).max_in_flight(2))
        .await
        .unwrap()
        .policy
        .unwrap();
    assert_eq!(
        set.rate_limit,
        Some(pb::RateLimit {
            per_second: 5,
            burst: 5
        })
    );
    assert_eq!(set.max_in_flight, Some(2));
    let removed = client
        .update_queue("emails", Policy::new().no_rate_limit().max_in_flight(0))
        .await
        .unwrap()
        .policy
        .unwrap();
    assert_eq!((removed.rate_limit, removed.max_in_flight), (None, None));
}

#[tokio::test]
async fn a_long_poll_wakes_when_a_limit_frees_capacity() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    create_limited(&client, "slots", None, Some(1)).await;
    create_limited(&client, "paced", Some((2, 1)), None).await;
    for queue in ["slots", "paced"] {
        let jobs = vec![Job::new("a"), Job::new("b")];
        client.enqueue_batch(queue, jobs).await.unwrap();
    }

    // An ack frees the one slot: the waiting poll gets the second job at once.
    let first = client.lease("slots").send().await.unwrap().remove(0);
    let poll = long_poll(&client, "slots", Duration::from_secs(20)).await;
    let acked = Instant::now();
    first.ack().await.unwrap();
    assert_eq!(within(poll).await.unwrap().unwrap().len(), 1);
    assert!(acked.elapsed() < Duration::from_secs(10));

    // The bucket's next token wakes the poll on its own: half a second at 2 a second.
    assert_eq!(client.lease("paced").send().await.unwrap().len(), 1);
    let started = Instant::now();
    let poll = long_poll(&client, "paced", Duration::from_secs(20)).await;
    assert_eq!(within(poll).await.unwrap().unwrap().len(), 1);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(10), "{waited:?}");
}

/// DeleteJob in each state: a pending or scheduled job is never delivered, a leased one's
/// ack is refused as stale, a finished one leaves history, an ordering key's next job
/// becomes leasable at once, and the counters drop with each live job.
#[tokio::test]
async fn delete_job_removes_a_job_in_any_state() {
    use common::rpc::{assert_refused, queue_stats, stats};
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut rpc = broker.rpc().await;
    let keyed = |payload: &'static str| client.enqueue("del", payload).ordering_key("k");
    let first = keyed("k1").send().await.unwrap().job_id;
    let blocked = keyed("k2").send().await.unwrap().job_id;
    let next = keyed("k3").send().await.unwrap().job_id;
    let scheduled = client
        .enqueue("del", "later")
        .delay(Duration::from_secs(3_600))
        .send()
        .await
        .unwrap()
        .job_id;
    let done = client.enqueue("done", "x").send().await.unwrap().job_id;
    let finished = client.lease("done").send().await.unwrap().remove(0);
    finished.ack().await.unwrap();

    let leased = client.lease("del").send().await.unwrap().remove(0);
    assert_eq!(leased.job_id(), first);
    let s = stats(&mut rpc).await;
    let q = queue_stats(&s, "del");
    assert_eq!((q.pending, q.scheduled, q.leased), (2, 1, 1));

    // A job waiting behind its key leaves the line; the key's holder is still leased.
    let gone = client.delete_job("del", &blocked).await.unwrap();
    assert_eq!(gone.state, pb::JobState::Pending as i32);
    assert!(client.lease("del").send().await.unwrap().is_empty());

    // The leased holder: its ack is stale, and the key's next job is leasable at once.
    let gone = client.delete_job("del", &first).await.unwrap();
    assert_eq!(gone.state, pb::JobState::Leased as i32);
    assert_eq!(gone.payload.as_ref(), b"k1");
    let err = leased.ack().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    let now = client.lease("del").send().await.unwrap().remove(0);
    assert_eq!(now.job_id(), next);
    now.ack().await.unwrap();

    let gone = client.delete_job("del", &scheduled).await.unwrap();
    assert_eq!(gone.state, pb::JobState::Scheduled as i32);
    let s = stats(&mut rpc).await;
    let q = queue_stats(&s, "del");
    assert_eq!(
        (q.pending, q.scheduled, q.leased, q.retrying, q.cancelled),
        (0, 0, 0, 0, 0)
    );

    // A finished job leaves history.
    let gone = client.delete_job("done", &done).await.unwrap();
    assert_eq!(gone.state, pb::JobState::Completed as i32);
    let history = rpc
        .job_history(pb::JobHistoryRequest {
            queue: "done".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(history.jobs.is_empty(), "{history:?}");

    // Unknown ids and queues are NOT_FOUND, a malformed id INVALID_ARGUMENT; each names
    // the field and the value.
    let delete = |queue: &str, job_id: &str| {
        let mut rpc = rpc.clone();
        let request = pb::DeleteJobRequest {
            queue: queue.into(),
            job_id: job_id.into(),
        };
        async move { rpc.delete_job(request).await }
    };
    assert_refused(
        delete("done", &done).await,
        Code::NotFound,
        &["job_id", &done],
    );
    assert_refused(
        delete("del", &done).await,
        Code::NotFound,
        &["job_id", &done, "\"del\""],
    );
    assert_refused(
        delete("nosuch", &done).await,
        Code::NotFound,
        &["queue", "\"nosuch\""],
    );
    assert_refused(
        delete("del", "not-a-uuid").await,
        Code::InvalidArgument,
        &["job_id", "not-a-uuid"],
    );
    assert!(client.get_job(&first).await.is_err());
}
