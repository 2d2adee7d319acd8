//! The Redis queue store against a real `redis-server` (each test starts its own).

use std::time::{Duration, Instant};

use super::*;
use crate::broker::engine::redis::conn::connect;
use crate::broker::testing::redis::RedisServer;

async fn store() -> (RedisServer, QueueStore) {
    let server = RedisServer::start();
    let conn = connect(&[server.url()]).await.expect("connect");
    (server, QueueStore::new(conn))
}

/// A store on its own server whose scripts take the time from the returned clock (ms),
/// which starts at `t0` and moves only when the test sets it.
async fn clocked_store(t0: Millis) -> (RedisServer, QueueStore, Arc<std::sync::atomic::AtomicU64>) {
    let server = RedisServer::start();
    let conn = connect(&[server.url()]).await.expect("connect");
    let clock = Arc::new(std::sync::atomic::AtomicU64::new(t0));
    (server, QueueStore::with_clock(conn, clock.clone()), clock)
}

/// A policy with short leases and fixed, small retry delays (no jitter).
fn policy(name: &str) -> QueuePolicy {
    QueuePolicy {
        visibility_timeout_ms: 100,
        backoff: Backoff::Schedule(vec![50]),
        ..QueuePolicy::default_for(name)
    }
}

/// `policy(name)` with a rate limit of `per_second` and a bucket of `burst`.
fn rate_limited(name: &str, per_second: u32, burst: u32) -> QueuePolicy {
    QueuePolicy {
        rate_limit: Some(crate::broker::domain::queue::RateLimit { per_second, burst }),
        ..policy(name)
    }
}

fn job(payload: &str) -> NewJob {
    NewJob {
        payload: Bytes::from(payload.to_owned()),
        kind: "k".into(),
        ..NewJob::default()
    }
}

async fn lease(s: &QueueStore, q: &str, max: usize) -> Vec<Delivery> {
    s.lease(q, max, None, "w", "127.0.0.1:1").await.unwrap()
}

/// Leases until something comes back (sweeping between tries), or panics after 5 s.
async fn lease_eventually(s: &QueueStore, q: &str, max: usize) -> Vec<Delivery> {
    let start = Instant::now();
    loop {
        let got = lease(s, q, max).await;
        if !got.is_empty() {
            return got;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "nothing became visible"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn payloads(d: &[Delivery]) -> Vec<&[u8]> {
    d.iter().map(|d| d.payload.as_ref()).collect()
}

#[tokio::test]
async fn redis_queue_enqueue_lease_ack() {
    let (_srv, s) = store().await;
    assert!(s.create("q", &policy("q")).await.is_ok());
    let err = s.create("q", &policy("q")).await.unwrap_err();
    assert!(matches!(err, BrokerError::AlreadyExists(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "queue \"q\" already exists (use UpdateQueue)"
    );
    assert!(!s.ensure("q", &policy("q"), false).await.unwrap());
    assert_eq!(s.names().await.unwrap(), vec!["q".to_owned()]);
    let (p, paused) = s.info("q").await.unwrap().unwrap();
    assert_eq!((p, paused), (policy("q"), false));

    let mut j = job("a");
    j.headers.insert("h".into(), "v".into());
    let out = s.enqueue("q", vec![j]).await.unwrap();
    assert!(!out[0].duplicate);
    let got = lease(&s, "q", 10).await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!((d.job_id, d.attempt, &*d.kind), (out[0].id, 1, "k"));
    assert_eq!(d.headers.get("h").map(String::as_str), Some("v"));
    let results = s
        .ack(
            "q",
            vec![(d.lease_id.clone(), Some(Bytes::from_static(b"ok")))],
        )
        .await
        .unwrap();
    assert!(results[0].is_ok());
    // A repeat ack of the same lease is OK.
    let again = s.ack("q", vec![(d.lease_id.clone(), None)]).await.unwrap();
    assert!(again[0].is_ok());
    let done = s.get("q", &d.job_id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.result.as_deref(), Some(&b"ok"[..]));
    assert_eq!(done.consumer.as_deref(), Some("w"));
    let counts = s.counts("q").await.unwrap();
    assert_eq!(
        (
            counts.enqueued,
            counts.completed,
            counts.pending,
            counts.leased
        ),
        (1, 1, 0, 0)
    );
    let consumers = s.consumers("q").await.unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!((consumers[0].1.done, consumers[0].1.leases_held), (1, 0));
    assert_eq!(consumers[0].1.address, "127.0.0.1:1");

    let err = s.enqueue("nope", vec![job("x")]).await.unwrap_err();
    assert!(matches!(err, BrokerError::NotFound(_)), "{err}");
    // Every kind of key exists before the delete, none after.
    let keyed = NewJob {
        idempotency_key: Some("i".into()),
        ordering_key: Some("o".into()),
        ..job("b")
    };
    s.enqueue("q", vec![keyed, job("c")]).await.unwrap();
    let mut c = s.conn.clone();
    let pattern = format!("{}*", QueueKeys::new("q").base());
    let before: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(before.len() > 5, "{before:?}");
    s.delete("q").await.unwrap();
    let after: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(after.is_empty(), "{after:?}");
    assert!(s.info("q").await.unwrap().is_none());
    assert!(s.names().await.unwrap().is_empty());
    let err = s.delete("q").await.unwrap_err();
    assert_eq!(err.to_string(), "queue \"q\" does not exist");
}

#[tokio::test]
async fn redis_queue_priorities_then_fifo() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    let jobs = [("a", 1), ("b", 5), ("c", 1), ("d", 9)].map(|(p, prio)| NewJob {
        priority: prio,
        ..job(p)
    });
    s.enqueue("q", jobs.to_vec()).await.unwrap();
    let got = lease(&s, "q", 10).await;
    assert_eq!(payloads(&got), vec![&b"d"[..], b"b", b"a", b"c"]);
}

#[tokio::test]
async fn redis_queue_delayed_job_becomes_visible() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    let now = crate::broker::domain::time::now_ms();
    let out = s
        .enqueue(
            "q",
            vec![NewJob {
                run_at: Some(now + 150),
                ..job("later")
            }],
        )
        .await
        .unwrap();
    let j = s.get("q", &out[0].id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Scheduled);
    assert_eq!(s.counts("q").await.unwrap().scheduled, 1);
    assert!(s.next_due("q").await.unwrap().is_some());
    assert!(lease(&s, "q", 1).await.is_empty());
    let got = lease_eventually(&s, "q", 1).await;
    assert_eq!(got[0].job_id, out[0].id);
}

#[tokio::test]
async fn redis_queue_expired_lease_is_redelivered_and_old_lease_is_stale() {
    let (_srv, s) = store().await;
    let p = QueuePolicy {
        backoff: Backoff::Schedule(vec![0]),
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    s.enqueue("q", vec![job("a")]).await.unwrap();
    let first = s.lease("q", 1, Some(50), "w", "a").await.unwrap();
    let second = lease_eventually(&s, "q", 1).await;
    assert_eq!(second[0].job_id, first[0].job_id);
    assert_eq!(second[0].attempt, 2);
    assert_ne!(second[0].lease_id, first[0].lease_id);
    let results = s
        .ack("q", vec![(first[0].lease_id.clone(), None)])
        .await
        .unwrap();
    let err = results[0].as_ref().unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "lease {} is stale: job {} was delivered again since (attempt 2)",
            first[0].lease_id, first[0].job_id
        )),
        "{err}"
    );
    // The stale ack in the batch stops the live one too: all or none.
    let mixed = s
        .ack(
            "q",
            vec![
                (second[0].lease_id.clone(), None),
                (first[0].lease_id.clone(), None),
            ],
        )
        .await
        .unwrap();
    assert!(mixed[0].is_ok() && mixed[1].is_err());
    assert_eq!(
        s.get("q", &first[0].job_id).await.unwrap().unwrap().state,
        JobState::Leased
    );
    let job = s.get("q", &first[0].job_id).await.unwrap().unwrap();
    assert!(
        job.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("lease expired at ")),
        "{job:?}"
    );
    let consumers = s.consumers("q").await.unwrap();
    assert_eq!(consumers[0].1.failed, 1);
}

#[tokio::test]
async fn redis_queue_nack_retries_after_backoff_then_dies_into_the_dlq_once() {
    let (_srv, s) = store().await;
    let p = QueuePolicy {
        max_attempts: 2,
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    let mut j = job("a");
    j.headers.insert("mine".into(), "1".into());
    let id = s.enqueue("q", vec![j]).await.unwrap()[0].id;
    let d = lease(&s, "q", 1).await.remove(0);
    let (state, at) = s
        .nack(&d.lease_id, "boom".into(), None, false)
        .await
        .unwrap();
    assert_eq!(state, JobState::Retrying);
    assert!(at.is_some());
    assert_eq!(s.counts("q").await.unwrap().retrying, 1);
    // Nacking the same lease again is stale.
    let err = s
        .nack(&d.lease_id, "x".into(), None, false)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("is stale: job")
            && err
                .to_string()
                .contains("is retrying since this lease ended"),
        "{err}"
    );
    let d2 = lease_eventually(&s, "q", 1).await.remove(0);
    assert_eq!(d2.attempt, 2);
    let (state, at) = s
        .nack(&d2.lease_id, "boom2".into(), None, false)
        .await
        .unwrap();
    assert_eq!((state, at), (JobState::Dead, None));
    let dead = s.get("q", &id).await.unwrap().unwrap();
    assert_eq!(dead.state, JobState::Dead);
    assert_eq!(dead.dead_letter_queue.as_deref(), Some("q.dlq"));

    assert_eq!(s.move_dead_letters("q").await.unwrap(), 1);
    assert_eq!(s.move_dead_letters("q").await.unwrap(), 0);
    let moved = s.get("q.dlq", &id).await.unwrap().unwrap();
    assert_eq!(moved.origin.as_deref(), Some("q"));
    assert_eq!(moved.state, JobState::Pending);
    assert_eq!(moved.headers.get("mine").map(String::as_str), Some("1"));
    assert_eq!(
        moved.headers.get(HEADER_ORIGINAL_QUEUE).map(String::as_str),
        Some("q")
    );
    assert_eq!(
        moved.headers.get(HEADER_ATTEMPTS).map(String::as_str),
        Some("2")
    );
    assert_eq!(
        moved.headers.get(HEADER_LAST_ERROR).map(String::as_str),
        Some("boom2")
    );
    assert!(moved.headers.contains_key(HEADER_DEAD_LETTERED_AT));
    assert_eq!(s.counts("q.dlq").await.unwrap().pending, 1);
    assert!(s.names().await.unwrap().contains(&"q.dlq".to_owned()));

    // A crash after the insert and before the outbox was cleared: the retry does not
    // store the letter twice.
    let keys = QueueKeys::new("q");
    let mut c = s.conn.clone();
    let seq = dead.seq;
    redis::cmd("RPUSH")
        .arg(keys.key("outbox"))
        .arg(seq)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    redis::cmd("COPY")
        .arg(keys.key(&format!("job:{seq}")))
        .arg(keys.key(&format!("dl:{seq}")))
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    assert_eq!(s.move_dead_letters("q").await.unwrap(), 1);
    let counts = s.counts("q.dlq").await.unwrap();
    assert_eq!((counts.pending, counts.enqueued), (1, 1));
}

#[tokio::test]
async fn redis_queue_nack_with_dead_letter_and_explicit_delay() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    s.enqueue("q", vec![job("a"), job("b")]).await.unwrap();
    let got = lease(&s, "q", 2).await;
    let (state, at) = s
        .nack(&got[0].lease_id, "poison".into(), None, true)
        .await
        .unwrap();
    assert_eq!((state, at), (JobState::Dead, None));
    let (state, at) = s
        .nack(&got[1].lease_id, "later".into(), Some(0), false)
        .await
        .unwrap();
    assert_eq!(state, JobState::Pending);
    assert!(at.is_some());
    let again = lease(&s, "q", 2).await;
    assert_eq!(payloads(&again), vec![&b"b"[..]]);
}

#[tokio::test]
async fn redis_queue_idempotency_key_returns_the_first_id() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    let keyed = |p: &str| NewJob {
        idempotency_key: Some("k1".into()),
        ..job(p)
    };
    let out = s.enqueue("q", vec![keyed("a"), keyed("b")]).await.unwrap();
    assert_eq!((out[0].duplicate, out[1].duplicate), (false, true));
    assert_eq!(out[0].id, out[1].id);
    let later = s.enqueue("q", vec![keyed("c")]).await.unwrap();
    assert_eq!(
        later[0],
        Enqueued {
            id: out[0].id,
            duplicate: true
        }
    );
    let counts = s.counts("q").await.unwrap();
    assert_eq!((counts.enqueued, counts.pending), (1, 1));
}

#[tokio::test]
async fn redis_queue_max_depth_refuses_the_whole_batch() {
    let (_srv, s) = store().await;
    let p = QueuePolicy {
        max_depth: 2,
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    s.enqueue("q", vec![job("a")]).await.unwrap();
    let err = s.enqueue("q", vec![job("b"), job("c")]).await.unwrap_err();
    assert!(matches!(err, BrokerError::ResourceExhausted(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "queue \"q\" is full: 1 live jobs + 2 new exceeds max_depth 2"
    );
    assert_eq!(s.counts("q").await.unwrap().pending, 1);
}

#[tokio::test]
async fn redis_queue_ordering_key_is_never_leased_twice_at_once() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    let keyed = |p: &str| NewJob {
        ordering_key: Some("o".into()),
        ..job(p)
    };
    let ids = s
        .enqueue("q", vec![keyed("1"), keyed("2"), keyed("3"), job("free")])
        .await
        .unwrap();
    // Cancelling a waiting job keeps the rest in order.
    s.cancel("q", &ids[2].id).await.unwrap();
    assert_eq!(s.counts("q").await.unwrap().pending, 3);
    let got = lease(&s, "q", 10).await;
    assert_eq!(payloads(&got), vec![&b"1"[..], b"free"]);
    assert!(lease(&s, "q", 10).await.is_empty());
    let first = got.iter().find(|d| d.payload == "1").unwrap();
    assert_eq!(first.ordering_key.as_deref(), Some("o"));
    s.ack("q", vec![(first.lease_id.clone(), None)])
        .await
        .unwrap();
    let next = lease(&s, "q", 10).await;
    assert_eq!(payloads(&next), vec![&b"2"[..]]);
}

#[tokio::test]
async fn redis_queue_cancel_and_purge() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    let ids: Vec<Uuid> = s
        .enqueue("q", vec![job("a"), job("b"), job("c")])
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let cancelled = s.cancel("q", &ids[0]).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.payload, "a");
    let err = s.cancel("q", &ids[0]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("job {} is already cancelled", ids[0])
    );
    let missing = Uuid::now_v7();
    let err = s.cancel("q", &missing).await.unwrap_err();
    assert!(matches!(err, BrokerError::NotFound(_)), "{err}");
    let leased = lease(&s, "q", 1).await.remove(0);
    let err = s.cancel("q", &leased.job_id).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("job {} is leased by \"w\" until ", leased.job_id)),
        "{err}"
    );
    assert_eq!(s.purge("q").await.unwrap(), 1);
    let counts = s.counts("q").await.unwrap();
    assert_eq!((counts.pending, counts.leased, counts.cancelled), (0, 1, 2));
}

#[tokio::test]
async fn redis_queue_delete_job_in_any_state() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    let keyed = |p: &str| NewJob {
        ordering_key: Some("o".into()),
        ..job(p)
    };
    let later = NewJob {
        run_at: Some(u64::MAX / 2),
        ..job("later")
    };
    let ids: Vec<Uuid> = s
        .enqueue(
            "q",
            vec![keyed("o1"), keyed("o2"), keyed("o3"), later, job("done")],
        )
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let got = lease(&s, "q", 10).await;
    assert_eq!(payloads(&got), vec![&b"o1"[..], b"done"]);
    s.ack("q", vec![(got[1].lease_id.clone(), None)])
        .await
        .unwrap();

    // The blocked o2 leaves the line; the leased o1 goes and frees the key for o3.
    assert_eq!(
        s.delete_job("q", &ids[1]).await.unwrap().state,
        JobState::Pending
    );
    let gone = s.delete_job("q", &ids[0]).await.unwrap();
    assert_eq!(
        (gone.state, gone.payload.as_ref()),
        (JobState::Leased, &b"o1"[..])
    );
    let stale = s
        .ack("q", vec![(got[0].lease_id.clone(), None)])
        .await
        .unwrap();
    let err = stale[0].as_ref().unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("no longer exists"), "{err}");
    let next = lease(&s, "q", 10).await;
    assert_eq!(payloads(&next), vec![&b"o3"[..]]);

    assert_eq!(
        s.delete_job("q", &ids[3]).await.unwrap().state,
        JobState::Scheduled
    );
    assert_eq!(
        s.delete_job("q", &ids[4]).await.unwrap().state,
        JobState::Completed
    );
    assert!(s.history("q", 10).await.unwrap().is_empty());
    for id in &ids[..2] {
        assert!(s.get("q", id).await.unwrap().is_none());
    }
    let counts = s.counts("q").await.unwrap();
    assert_eq!(
        (
            counts.pending,
            counts.scheduled,
            counts.leased,
            counts.cancelled
        ),
        (0, 0, 1, 0)
    );
    let err = s.delete_job("q", &ids[0]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("job_id {} not found in queue \"q\"", ids[0])
    );
    let err = s.delete_job("nosuch", &ids[0]).await.unwrap_err();
    assert!(matches!(err, BrokerError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn redis_queue_list_and_history_pages() {
    let (_srv, s) = store().await;
    let p = QueuePolicy {
        history_limit: 2,
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    let jobs: Vec<NewJob> = (0..5).map(|i| job(&i.to_string())).collect();
    s.enqueue("q", jobs).await.unwrap();
    let (page, next) = s.list("q", None, 2, None).await.unwrap();
    assert_eq!(page.iter().map(|j| j.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(next, Some(2));
    let (page, next) = s.list("q", Some(JobState::Pending), 2, next).await.unwrap();
    assert_eq!(page.iter().map(|j| j.seq).collect::<Vec<_>>(), vec![3, 4]);
    let (page, next) = s.list("q", None, 2, next).await.unwrap();
    assert_eq!((page.len(), next), (1, None));
    // Three finish; history keeps the newest two.
    let got = lease(&s, "q", 3).await;
    let acks = got.iter().map(|d| (d.lease_id.clone(), None)).collect();
    s.ack("q", acks).await.unwrap();
    let history = s.history("q", 10).await.unwrap();
    assert_eq!(
        history.iter().map(|j| j.seq).collect::<Vec<_>>(),
        vec![3, 2]
    );
    assert!(s.get("q", &got[0].job_id).await.unwrap().is_none());
    let (done, _) = s
        .list("q", Some(JobState::Completed), 10, None)
        .await
        .unwrap();
    assert_eq!(done.len(), 2);
    let (leased, _) = s.list("q", Some(JobState::Leased), 10, None).await.unwrap();
    assert!(leased.is_empty());
    // The ack of an evicted job's lease is a stale lease, not an error of the call.
    let stale = s
        .ack("q", vec![(got[0].lease_id.clone(), None)])
        .await
        .unwrap();
    assert!(
        stale[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("its job no longer exists")
    );
}

#[tokio::test]
async fn redis_queue_extend_moves_the_deadline() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    s.enqueue("q", vec![job("a")]).await.unwrap();
    let d = lease(&s, "q", 1).await.remove(0);
    let deadline = s.extend(&d.lease_id, 60_000).await.unwrap();
    assert!(deadline >= d.deadline + 50_000);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(s.sweep("q").await.unwrap().changed, 0);
    assert!(lease(&s, "q", 1).await.is_empty());
    s.ack("q", vec![(d.lease_id.clone(), None)])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let err = s.extend(&d.lease_id, 1_000).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("lease {} is stale: its job was already acked", d.lease_id)
    );
}

#[tokio::test]
async fn redis_queue_paused_queue_leases_nothing() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    s.enqueue("q", vec![job("a")]).await.unwrap();
    s.set_paused("q", true).await.unwrap();
    assert!(s.info("q").await.unwrap().unwrap().1);
    assert!(lease(&s, "q", 1).await.is_empty());
    assert!(s.counts("q").await.unwrap().paused);
    s.set_paused("q", false).await.unwrap();
    assert_eq!(lease(&s, "q", 1).await.len(), 1);
}

#[tokio::test]
async fn redis_queue_max_in_flight_and_policy_change() {
    let (_srv, s) = store().await;
    let p = QueuePolicy {
        max_in_flight: Some(2),
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    let jobs: Vec<NewJob> = (0..4).map(|i| job(&i.to_string())).collect();
    s.enqueue("q", jobs).await.unwrap();
    let got = lease(&s, "q", 10).await;
    assert_eq!(got.len(), 2);
    assert!(lease(&s, "q", 10).await.is_empty());
    s.ack("q", vec![(got[0].lease_id.clone(), None)])
        .await
        .unwrap();
    assert_eq!(lease(&s, "q", 10).await.len(), 1);
    let open = QueuePolicy {
        max_in_flight: None,
        ..p
    };
    s.set_policy("q", &open).await.unwrap();
    assert_eq!(s.info("q").await.unwrap().unwrap().0, open);
    assert_eq!(lease(&s, "q", 10).await.len(), 1);
    let err = s.set_policy("nope", &open).await.unwrap_err();
    assert!(matches!(err, BrokerError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn redis_queue_rate_limit_lets_out_the_burst() {
    let (_srv, s) = store().await;
    let p = rate_limited("q", 1, 2);
    s.create("q", &p).await.unwrap();
    let jobs: Vec<NewJob> = (0..4).map(|i| job(&i.to_string())).collect();
    s.enqueue("q", jobs).await.unwrap();
    assert_eq!(lease(&s, "q", 10).await.len(), 2);
    assert!(lease(&s, "q", 10).await.is_empty());
    assert!(s.next_due("q").await.unwrap().is_some());
}

#[tokio::test]
async fn redis_queue_visible_jobs_publish_a_wake_up_only_while_a_waiter_is_noted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (srv, s) = store().await;
    assert!(s.ensure("q", &policy("q"), false).await.unwrap());
    assert_eq!(s.names().await.unwrap(), vec!["q".to_owned()]);
    let channel = QueueKeys::new("q").key("wake");
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", srv.port))
        .await
        .unwrap();
    let cmd = format!(
        "*2\r\n$10\r\nSSUBSCRIBE\r\n${}\r\n{channel}\r\n",
        channel.len()
    );
    sock.write_all(cmd.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let read_until = async |sock: &mut tokio::net::TcpStream, seen: &mut Vec<u8>, what: &str| {
        let mut buf = [0u8; 512];
        while !String::from_utf8_lossy(seen).contains(what) {
            let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
                .await
                .expect("a reply in time")
                .unwrap();
            assert!(n > 0, "connection closed");
            seen.extend_from_slice(&buf[..n]);
        }
    };
    read_until(&mut sock, &mut seen, "ssubscribe").await;
    // Nobody noted as waiting: two jobs made visible, no wake-up.
    s.enqueue("q", vec![job("a"), job("b")]).await.unwrap();
    // A waiter's note: the next job made visible is published, with its count (1).
    s.note_waiting("q", "w1", 1_000).await.unwrap();
    s.enqueue("q", vec![job("c")]).await.unwrap();
    read_until(&mut sock, &mut seen, "smessage").await;
    read_until(&mut sock, &mut seen, "\r\n$1\r\n1\r\n").await;
    let seen = String::from_utf8_lossy(&seen);
    assert!(
        !seen.contains("$1\r\n2\r\n"),
        "published without a waiter: {seen:?}"
    );
}

/// On a (one-node) Redis Cluster every script keeps to its queue's slot, and dead letters
/// cross slots through the node.
#[tokio::test]
async fn redis_queue_works_on_a_cluster() {
    let srv = RedisServer::start_with(&["--cluster-enabled", "yes"]);
    let port = srv.port.to_string();
    let cli = |args: &[&str]| {
        std::process::Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output()
            .expect("redis-cli runs")
    };
    assert!(
        cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"])
            .status
            .success()
    );
    let start = Instant::now();
    while !String::from_utf8_lossy(&cli(&["CLUSTER", "INFO"]).stdout).contains("cluster_state:ok") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "cluster never ok"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let conn = connect(&[srv.url()]).await.expect("connect");
    assert!(conn.is_cluster());
    let s = QueueStore::new(conn);
    let p = QueuePolicy {
        max_attempts: 1,
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    let keyed = NewJob {
        idempotency_key: Some("i".into()),
        ordering_key: Some("o".into()),
        ..job("a")
    };
    let id = s.enqueue("q", vec![keyed]).await.unwrap()[0].id;
    let d = lease(&s, "q", 1).await.remove(0);
    assert_eq!(
        s.nack(&d.lease_id, "bad".into(), None, false)
            .await
            .unwrap(),
        (JobState::Dead, None)
    );
    assert_eq!(s.move_dead_letters("q").await.unwrap(), 1);
    let moved = s.get("q.dlq", &id).await.unwrap().unwrap();
    assert_eq!(moved.origin.as_deref(), Some("q"));
    assert_eq!(s.counts("q").await.unwrap().dead, 1);
    s.delete("q").await.unwrap();
    assert_eq!(s.names().await.unwrap(), vec!["q.dlq".to_owned()]);
}

#[tokio::test]
async fn redis_queue_times_saturate_at_the_end_of_time() {
    let (_srv, s) = store().await;
    let p = QueuePolicy {
        backoff: Backoff::Exponential {
            initial_ms: u64::MAX,
            max_ms: u64::MAX,
            jitter: true,
        },
        dedup_window_ms: u64::MAX,
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    let keyed = NewJob {
        idempotency_key: Some("k".into()),
        run_at: Some(u64::MAX),
        ..job("a")
    };
    let id = s.enqueue("q", vec![keyed.clone(), job("b")]).await.unwrap()[0].id;
    assert_eq!(s.get("q", &id).await.unwrap().unwrap().run_at, END_OF_TIME);
    let d = s
        .lease("q", 1, Some(u64::MAX), "w", "a")
        .await
        .unwrap()
        .remove(0);
    assert_eq!(d.deadline, END_OF_TIME);
    assert_eq!(s.extend(&d.lease_id, u64::MAX).await.unwrap(), END_OF_TIME);
    assert_eq!(
        s.nack(&d.lease_id, "x".into(), None, false).await.unwrap(),
        (JobState::Retrying, Some(END_OF_TIME))
    );
    assert!(lease(&s, "q", 1).await.is_empty());
    assert_eq!(s.next_due("q").await.unwrap(), Some(END_OF_TIME));
    assert!(s.enqueue("q", vec![keyed]).await.unwrap()[0].duplicate);
}

/// Where the scripts' times saturate.
const END_OF_TIME: Millis = (1 << 53) - 1;

/// A second death of the same job (after a redrive it has a new seq in its queue) replaces
/// its record in the dead-letter queue, even a leased one.
#[tokio::test]
async fn redis_queue_a_new_death_replaces_the_dead_letter_record() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    let id = s.enqueue("q", vec![job("a")]).await.unwrap()[0].id;
    let d = lease(&s, "q", 1).await.remove(0);
    s.nack(&d.lease_id, "first".into(), None, true)
        .await
        .unwrap();
    assert_eq!(s.move_dead_letters("q").await.unwrap(), 1);
    let held = lease(&s, "q.dlq", 1).await.remove(0);
    assert_eq!(held.job_id, id);
    let mut dead = s.get("q", &id).await.unwrap().unwrap();
    dead.last_error = Some("second".into());
    s.insert_dead_letter("q", dead.seq + 100, dead)
        .await
        .unwrap();
    let counts = s.counts("q.dlq").await.unwrap();
    assert_eq!((counts.pending, counts.leased, counts.enqueued), (1, 0, 2));
    let record = s.get("q.dlq", &id).await.unwrap().unwrap();
    assert_eq!(
        record.headers.get(HEADER_LAST_ERROR).map(String::as_str),
        Some("second")
    );
    let results = s.ack("q.dlq", vec![(held.lease_id, None)]).await.unwrap();
    assert!(results[0].is_err());
    assert_eq!(s.consumers("q.dlq").await.unwrap()[0].1.leases_held, 0);
}

/// A store with a test clock: the scripts' time is the clock's, not Redis's, and the
/// clock's argument does not shift the scripts' own (`define` and `dead_letters_done`
/// read every argument there is).
#[tokio::test]
async fn redis_queue_test_clock_drives_the_scripts_time() {
    const T0: Millis = 1_700_000_000_000;
    let (_srv, s, clock) = clocked_store(T0).await;
    let set = |t: Millis| clock.store(t, std::sync::atomic::Ordering::SeqCst);
    s.create("q", &policy("q")).await.unwrap();
    assert_eq!(s.info("q").await.unwrap().unwrap().0, policy("q"));
    let delayed = NewJob {
        run_at: Some(T0 + 1_000),
        ..job("a")
    };
    let id = s.enqueue("q", vec![delayed]).await.unwrap()[0].id;
    let j = s.get("q", &id).await.unwrap().unwrap();
    assert_eq!(
        (j.enqueued_at, j.run_at, j.state),
        (T0, T0 + 1_000, JobState::Scheduled)
    );
    set(T0 + 999);
    assert!(lease(&s, "q", 1).await.is_empty());
    set(T0 + 1_000);
    let d = lease(&s, "q", 1).await.remove(0);
    assert_eq!(d.deadline, T0 + 1_100);
    // Its lease expires at its deadline only, whatever Redis's own time says.
    set(T0 + 1_099);
    assert_eq!(s.sweep("q").await.unwrap().changed, 0);
    set(T0 + 1_100);
    assert_eq!(s.sweep("q").await.unwrap().changed, 1);
    let j = s.get("q", &id).await.unwrap().unwrap();
    assert_eq!((j.state, j.run_at), (JobState::Retrying, T0 + 1_150));
    let d = lease_at(&s, &set, T0 + 1_150).await;
    s.nack(&d.lease_id, "x".into(), None, true).await.unwrap();
    assert_eq!(s.move_dead_letters("q").await.unwrap(), 1);
    let dead = s.get("q.dlq", &id).await.unwrap().unwrap();
    assert_eq!(
        dead.headers
            .get(HEADER_DEAD_LETTERED_AT)
            .map(String::as_str),
        Some((T0 + 1_150).to_string().as_str())
    );
}

/// Leases one job at `t`.
async fn lease_at(s: &QueueStore, set: &impl Fn(Millis), t: Millis) -> Delivery {
    set(t);
    lease(s, "q", 1).await.remove(0)
}

/// Regression (found by the model run): a job cancelled (or purged) after a failed
/// delivery kept that delivery's nonce and consumer, so its finished record named a lease
/// that had not ended it. No lease finishes a cancelled job, as in the in-process queue.
#[tokio::test]
async fn redis_queue_a_cancelled_retry_names_no_lease() {
    let (_srv, s) = store().await;
    let p = QueuePolicy {
        backoff: Backoff::Schedule(vec![60_000]),
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    let ids: Vec<Uuid> = s
        .enqueue("q", vec![job("a"), job("b")])
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let ds = lease(&s, "q", 2).await;
    for d in &ds {
        s.nack(&d.lease_id, "x".into(), None, false).await.unwrap();
    }
    let cancelled = s.cancel("q", &ids[0]).await.unwrap();
    assert_eq!((cancelled.lease_nonce, cancelled.consumer), (0, None));
    assert_eq!(s.purge("q").await.unwrap(), 1);
    for id in &ids {
        let j = s.get("q", id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Cancelled);
        assert_eq!((j.lease_nonce, j.consumer), (0, None), "{id}");
    }
    let late = s
        .ack("q", vec![(ds[0].lease_id.clone(), None)])
        .await
        .unwrap();
    assert!(matches!(late[0], Err(BrokerError::FailedPrecondition(_))));
}

/// Regression (found by the model run): with a dedup window of 0 ms, a key repeated in
/// one batch stored the repeat as a new job while counting it as a duplicate (for the
/// enqueued counter and max depth). A repeat in the batch is a duplicate of the first.
#[tokio::test]
async fn redis_queue_a_key_repeated_in_a_batch_is_a_duplicate_with_no_window() {
    let (_srv, s) = store().await;
    let p = QueuePolicy {
        dedup_window_ms: 0,
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    let keyed = NewJob {
        idempotency_key: Some("k".into()),
        ..job("a")
    };
    let out = s
        .enqueue("q", vec![keyed.clone(), keyed.clone()])
        .await
        .unwrap();
    assert_eq!(
        out[1],
        Enqueued {
            id: out[0].id,
            duplicate: true
        }
    );
    let counts = s.counts("q").await.unwrap();
    assert_eq!((counts.pending, counts.enqueued), (1, 1));
    // The window is over after the batch: the key is new again.
    let again = s.enqueue("q", vec![keyed]).await.unwrap();
    assert!(!again[0].duplicate);
}

/// The rates and the limits' held-back times against the in-process queue: the same
/// enqueues, leases (some cut short by `max_in_flight` or the rate limit) and acks at the
/// same times, through the test clock, give the same `enqueue_rate`, `ack_rate`,
/// `rate_limited_ms` and `in_flight_limited_ms` at every step, including a window that
/// slides past old seconds and a wait counted ahead of the clock.
#[tokio::test]
async fn redis_queue_rates_and_held_back_times_match_the_in_process_queue() {
    use crate::broker::domain::queue::{Queue, RateLimit};
    const T0: Millis = 1_700_000_000_000;
    let (_srv, s, clock) = clocked_store(T0).await;
    let set = |t: Millis| clock.store(t, std::sync::atomic::Ordering::SeqCst);
    let consumer: Arc<str> = Arc::from("w");
    for (name, rate_limit, max_in_flight) in [
        ("inflight", None, Some(2)),
        (
            "rate",
            Some(RateLimit {
                per_second: 4,
                burst: 2,
            }),
            None,
        ),
        (
            "both",
            Some(RateLimit {
                per_second: 3,
                burst: 3,
            }),
            Some(2),
        ),
    ] {
        let p = QueuePolicy {
            rate_limit,
            max_in_flight,
            visibility_timeout_ms: 60_000,
            ..policy(name)
        };
        s.create(name, &p).await.unwrap();
        let mut local = Queue::new(name, p);
        let mut held: Vec<(LeaseId, LeaseId)> = Vec::new();
        let compare = |local: &Queue, c: QueueCounts, t: Millis, step: &str| {
            let l = local.counts(t);
            assert_eq!(
                (
                    c.enqueue_rate,
                    c.ack_rate,
                    c.rate_limited_ms,
                    c.in_flight_limited_ms
                ),
                (
                    l.enqueue_rate,
                    l.ack_rate,
                    l.rate_limited_ms,
                    l.in_flight_limited_ms
                ),
                "{name} at {step} (t0 + {})",
                t - T0
            );
        };
        // (time after T0, enqueue n, lease max, ack the oldest n held)
        let steps: [(Millis, usize, usize, usize); 12] = [
            (0, 6, 4, 0),
            (40, 0, 3, 0),
            (100, 2, 0, 1),
            (150, 0, 5, 0),
            (260, 0, 5, 1),
            (900, 1, 1, 2),
            (1_500, 3, 6, 0),
            (2_300, 0, 6, 3),
            (4_000, 5, 6, 1),
            (9_800, 0, 2, 2),
            (12_100, 0, 6, 6),
            (25_000, 1, 0, 0),
        ];
        for (i, (dt, enqueue, lease_max, ack)) in steps.into_iter().enumerate() {
            let t = T0 + dt;
            set(t);
            if enqueue > 0 {
                let jobs: Vec<NewJob> = (0..enqueue).map(|k| job(&format!("{i}.{k}"))).collect();
                s.enqueue(name, jobs.clone()).await.unwrap();
                local.enqueue(t, jobs).unwrap();
            }
            for _ in 0..ack.min(held.len()) {
                let (remote, mine) = held.remove(0);
                assert!(s.ack(name, vec![(remote, None)]).await.unwrap()[0].is_ok());
                local.ack(t, &mine, None).unwrap();
            }
            if lease_max > 0 {
                let remote = s
                    .lease(name, lease_max, None, "w", "127.0.0.1:1")
                    .await
                    .unwrap();
                let mine = local.lease(t, lease_max, 60_000, &consumer, "127.0.0.1:1");
                assert_eq!(remote.len(), mine.len(), "{name} step {i}: leased");
                held.extend(
                    remote
                        .into_iter()
                        .map(|d| d.lease_id)
                        .zip(mine.into_iter().map(|d| d.lease_id)),
                );
            }
            compare(
                &local,
                s.counts(name).await.unwrap(),
                t,
                &format!("step {i}"),
            );
            // Read again a little later: open intervals grow, waits counted ahead show.
            set(t + 30);
            compare(
                &local,
                s.counts(name).await.unwrap(),
                t + 30,
                &format!("step {i} + 30 ms"),
            );
        }
        let c = s.counts(name).await.unwrap();
        assert!(
            c.rate_limited_ms > 0 || c.in_flight_limited_ms > 0,
            "{name}: {c:?}"
        );
    }
}

/// A Consume stream's settle-and-refill: acks and the next lease in one script. A stale
/// ack applies none of the batch's acks, and the lease still happens.
#[tokio::test]
async fn redis_queue_ack_then_lease_in_one_script() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    s.enqueue("q", vec![job("a"), job("b"), job("c"), job("d")])
        .await
        .unwrap();
    let first = lease(&s, "q", 1).await.remove(0);
    let lease_args = (2, Some(60_000), "w", "127.0.0.1:1");
    let (acked, next) = s
        .ack_lease(
            "q",
            &[(first.lease_id.clone(), Some(Bytes::from_static(b"r")))],
            lease_args,
        )
        .await
        .unwrap();
    assert!(acked.iter().all(Result::is_ok), "{acked:?}");
    assert_eq!(
        next.iter().map(|d| &d.payload[..]).collect::<Vec<_>>(),
        [&b"b"[..], b"c"]
    );
    let done = s.get("q", &first.job_id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.result.as_deref(), Some(&b"r"[..]));

    // One stale lease (`first`, acked already under another nonce) among live ones.
    let stale = LeaseId {
        nonce: first.lease_id.nonce ^ 1,
        ..first.lease_id.clone()
    };
    let acks = [(next[0].lease_id.clone(), None), (stale, None)];
    let (acked, more) = s.ack_lease("q", &acks, lease_args).await.unwrap();
    assert!(acked[0].is_ok() && acked[1].is_err(), "{acked:?}");
    assert_eq!(more.len(), 1, "the lease happens whatever the acks did");
    let held = s.get("q", &next[0].job_id).await.unwrap().unwrap();
    assert_eq!(held.state, JobState::Leased, "all or nothing: not acked");
    let counts = s.counts("q").await.unwrap();
    assert_eq!((counts.completed, counts.leased), (1, 3));
    // The worker's record, changed by both parts and written once, adds both up.
    let consumers = s.consumers("q").await.unwrap();
    assert_eq!(consumers.len(), 1);
    let w = &consumers[0].1;
    assert_eq!(
        (w.done, w.leases_held, w.address.as_str()),
        (1, 3, "127.0.0.1:1")
    );

    // Acks of another worker's leases with this worker's next lease: each record counts
    // its own side.
    let (acked, leased) = s
        .ack_lease(
            "q",
            &[
                (next[0].lease_id.clone(), None),
                (next[1].lease_id.clone(), None),
            ],
            (1, Some(60_000), "v", "127.0.0.1:2"),
        )
        .await
        .unwrap();
    assert!(acked.iter().all(Result::is_ok), "{acked:?}");
    assert!(leased.is_empty(), "nothing left to lease");
    let consumers: HashMap<String, ConsumerState> = s
        .consumers("q")
        .await
        .unwrap()
        .into_iter()
        .map(|(name, state)| (name.to_string(), state))
        .collect();
    assert_eq!((consumers["w"].done, consumers["w"].leases_held), (3, 1));
    assert_eq!((consumers["v"].done, consumers["v"].leases_held), (0, 0));
    assert_eq!(consumers["v"].address, "127.0.0.1:2");

    // A queue that does not exist is an error, as for a lease.
    let err = s.ack_lease("nope", &[], lease_args).await.unwrap_err();
    assert!(matches!(err, BrokerError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn redis_queue_created_by_consumer_until_something_names_it() {
    let (_srv, s) = store().await;
    let marked = |name: &'static str| {
        let s = s.clone();
        async move {
            assert!(s.ensure(name, &policy(name), true).await.unwrap());
            assert!(s.counts(name).await.unwrap().created_by_consumer);
        }
    };
    // Leases leave the mark: only consumers named the queue.
    marked("typo").await;
    assert!(lease(&s, "typo", 10).await.is_empty());
    assert!(s.counts("typo").await.unwrap().created_by_consumer);
    // An ensure of an existing queue (a second node's Lease) does not mark it again.
    marked("early").await;
    s.enqueue("early", vec![job("a")]).await.unwrap();
    assert!(!s.counts("early").await.unwrap().created_by_consumer);
    assert!(!s.ensure("early", &policy("early"), true).await.unwrap());
    assert!(!s.counts("early").await.unwrap().created_by_consumer);

    // A dead letter clears it in its dead-letter queue.
    marked("src.dlq").await;
    s.create("src", &policy("src")).await.unwrap();
    s.enqueue(
        "src",
        vec![NewJob {
            max_attempts: Some(1),
            ..job("b")
        }],
    )
    .await
    .unwrap();
    let d = lease(&s, "src", 1).await.remove(0);
    s.nack(&d.lease_id, "boom".into(), None, false)
        .await
        .unwrap();
    assert_eq!(s.move_dead_letters("src").await.unwrap(), 1);
    assert!(!s.counts("src.dlq").await.unwrap().created_by_consumer);

    // So do a policy and a pause.
    s.set_policy("typo", &policy("typo")).await.unwrap();
    assert!(!s.counts("typo").await.unwrap().created_by_consumer);
    marked("paused").await;
    s.set_paused("paused", true).await.unwrap();
    assert!(!s.counts("paused").await.unwrap().created_by_consumer);
}

/// Queue function calls Redis has run so far (INFO commandstats: FCALL).
async fn script_calls(s: &QueueStore) -> u64 {
    command_calls(s, "fcall").await
}

/// How many times Redis ran `command` (lower case), scripts' calls included.
async fn command_calls(s: &QueueStore, command: &str) -> u64 {
    let mut c = s.conn.clone();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Enqueues each batch of `requests` (checked against `revisions[i]`, 0 if missing) to
/// `q` at once: on the test's single-threaded runtime the first one's call is in flight
/// while all the others arrive, in order. Returns each request's result and the script
/// calls they took.
async fn enqueue_together(
    s: &QueueStore,
    q: &str,
    requests: &[Vec<NewJob>],
    revisions: &[u32],
) -> (Vec<Result<Vec<Enqueued>, BrokerError>>, u64) {
    assert!(
        requests.len() <= 30,
        "join_all polls more futures unordered"
    );
    let before = script_calls(s).await;
    let results = futures::future::join_all(
        requests
            .iter()
            .enumerate()
            .map(|(i, jobs)| s.enqueue_checked(q, jobs, revisions.get(i).copied().unwrap_or(0))),
    )
    .await;
    (results, script_calls(s).await - before)
}

/// Loads the enqueue script (into queue `warm`), so the calls counted after it are one
/// FCALL each (a first FCALL refused for want of the library counts too).
async fn load_enqueue_script(s: &QueueStore) {
    s.create("warm", &policy("warm")).await.unwrap();
    s.enqueue("warm", vec![job("warm")]).await.unwrap();
}

fn keyed(payload: &str, key: &str) -> NewJob {
    NewJob {
        idempotency_key: Some(key.into()),
        ..job(payload)
    }
}

#[tokio::test]
async fn redis_queue_concurrent_enqueues_share_one_script_call() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    load_enqueue_script(&s).await;
    let requests: Vec<Vec<NewJob>> = (0..20)
        .map(|i| vec![job(&format!("{i}a")), job(&format!("{i}b"))])
        .collect();
    let (results, calls) = enqueue_together(&s, "q", &requests, &[]).await;
    // The first request alone, then the 19 that arrived while it ran, merged.
    assert_eq!(calls, 2);
    let mut ids = Vec::new();
    for r in results {
        let out = r.unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|e| !e.duplicate));
        ids.extend(out.iter().map(|e| e.id));
    }
    // Each request got its own jobs' ids, stored in arrival order.
    let got = lease(&s, "q", 100).await;
    let expected: Vec<&[u8]> = requests.iter().flatten().map(|j| &j.payload[..]).collect();
    assert_eq!(payloads(&got), expected);
    assert_eq!(got.iter().map(|d| d.job_id).collect::<Vec<_>>(), ids);
}

#[tokio::test]
async fn redis_queue_a_merged_enqueue_over_max_depth_refuses_only_the_request_that_overflows() {
    let (_srv, s) = store().await;
    let p = QueuePolicy {
        max_depth: 5,
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    load_enqueue_script(&s).await;
    s.enqueue("q", vec![job("old")]).await.unwrap();
    let requests = vec![
        vec![job("first")],
        vec![job("a1"), job("a2")],
        vec![job("b1"), job("b2"), job("b3")],
        vec![job("c1")],
    ];
    let (results, calls) = enqueue_together(&s, "q", &requests, &[]).await;
    // The first alone, the merged call refused as full, then a, b and c alone.
    assert_eq!(calls, 5);
    assert_eq!(results[0].as_ref().unwrap().len(), 1);
    assert_eq!(results[1].as_ref().unwrap().len(), 2);
    let err = results[2].as_ref().unwrap_err();
    assert!(matches!(err, BrokerError::ResourceExhausted(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "queue \"q\" is full: 4 live jobs + 3 new exceeds max_depth 5"
    );
    assert_eq!(results[3].as_ref().unwrap().len(), 1);
    let got = lease(&s, "q", 10).await;
    assert_eq!(
        payloads(&got),
        vec![&b"old"[..], b"first", b"a1", b"a2", b"c1"]
    );
}

#[tokio::test]
async fn redis_queue_idempotency_keys_across_merged_requests_act_in_arrival_order() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    load_enqueue_script(&s).await;
    let requests = vec![
        vec![job("first")],
        vec![keyed("a", "k1"), keyed("a-again", "k1")],
        vec![keyed("b", "k1"), keyed("b2", "k2")],
        vec![keyed("c", "k2")],
    ];
    let (results, calls) = enqueue_together(&s, "q", &requests, &[]).await;
    assert_eq!(calls, 2);
    let out: Vec<Vec<Enqueued>> = results.into_iter().map(Result::unwrap).collect();
    let (x, y) = (out[1][0].id, out[2][1].id);
    let flags = |o: &[Enqueued]| o.iter().map(|e| (e.id, e.duplicate)).collect::<Vec<_>>();
    assert_eq!(flags(&out[1]), vec![(x, false), (x, true)]);
    assert_eq!(flags(&out[2]), vec![(x, true), (y, false)]);
    assert_eq!(flags(&out[3]), vec![(y, true)]);
    assert_ne!(x, y);
    let counts = s.counts("q").await.unwrap();
    assert_eq!((counts.enqueued, counts.pending), (3, 3));

    // With no window a key is new again in each later request, as if they ran one after
    // another, and a repeat within a request is still a duplicate of its first.
    let p = QueuePolicy {
        dedup_window_ms: 0,
        ..policy("z")
    };
    s.create("z", &p).await.unwrap();
    let requests = vec![
        vec![job("first")],
        vec![keyed("a", "k"), keyed("a-again", "k")],
        vec![keyed("b", "k")],
    ];
    let (results, calls) = enqueue_together(&s, "z", &requests, &[]).await;
    assert_eq!(calls, 2);
    let out: Vec<Vec<Enqueued>> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        flags(&out[1]),
        vec![(out[1][0].id, false), (out[1][0].id, true)]
    );
    assert!(!out[2][0].duplicate);
    assert_ne!(out[2][0].id, out[1][0].id);
    let got = lease(&s, "z", 10).await;
    assert_eq!(payloads(&got), vec![&b"first"[..], b"a", b"b"]);
}

#[tokio::test]
async fn redis_queue_merged_enqueues_share_a_call_only_with_their_schema_revision() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    load_enqueue_script(&s).await;
    let mut c = s.conn.clone();
    redis::cmd("HSET")
        .arg(QueueKeys::new("q").key("schema"))
        .arg("cur")
        .arg(3)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let requests: Vec<Vec<NewJob>> = (0..5).map(|i| vec![job(&i.to_string())]).collect();
    let (results, calls) = enqueue_together(&s, "q", &requests, &[3, 3, 0, 0, 3]).await;
    // The first alone; then 1, then 2 and 3 (refused together as stale), then 4.
    assert_eq!(calls, 4);
    for i in [0, 1, 4] {
        assert_eq!(results[i].as_ref().unwrap().len(), 1, "request {i}");
    }
    for i in [2, 3] {
        assert_eq!(
            results[i].as_ref().unwrap_err(),
            &BrokerError::SchemaStale { revision: 3 },
            "request {i}"
        );
    }
    let got = lease(&s, "q", 10).await;
    assert_eq!(payloads(&got), vec![&b"0"[..], b"1", b"4"]);
}

/// The scripts skip their due-time scans (expired leases, due timers, ended idempotency
/// windows) until the meta hash's `due`, kept at or before the earliest of them: a lease
/// on a queue with nothing due scans nothing, and every deadline still takes effect on
/// time, one an extend moved earlier and one on a queue with no `due` yet included.
#[tokio::test]
async fn redis_queue_skips_its_due_time_scans_until_something_is_due() {
    const T0: Millis = 1_700_000_000_000;
    let (_srv, s, clock) = clocked_store(T0).await;
    let set = |t: Millis| clock.store(t, std::sync::atomic::Ordering::SeqCst);
    let scans = || command_calls(&s, "zrangebyscore");
    let p = QueuePolicy {
        dedup_window_ms: 10_000,
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    let first = s
        .enqueue("q", vec![keyed("a", "k"), job("b"), job("c")])
        .await
        .unwrap();
    let a = s
        .lease("q", 1, Some(60_000), "w", "x")
        .await
        .unwrap()
        .remove(0);
    assert_eq!(a.job_id, first[0].id);

    // Nothing due before the idempotency window ends (T0 + 10 s): no scans.
    set(T0 + 1);
    let before = scans().await;
    let b = s
        .lease("q", 1, Some(60_000), "w", "x")
        .await
        .unwrap()
        .remove(0);
    let again = s.enqueue("q", vec![keyed("a-again", "k")]).await.unwrap();
    assert!(again[0].duplicate);
    assert_eq!(scans().await, before, "nothing was due");

    // An extend that moves a deadline earlier makes it due then.
    set(T0 + 2);
    assert_eq!(s.extend(&a.lease_id, 50).await.unwrap(), T0 + 52);
    set(T0 + 51);
    let c = lease(&s, "q", 1).await.remove(0);
    assert_eq!(c.job_id, first[2].id);
    assert_eq!(
        s.get("q", &a.job_id).await.unwrap().unwrap().state,
        JobState::Leased
    );
    set(T0 + 52);
    assert!(
        lease(&s, "q", 1).await.is_empty(),
        "a retries after its backoff"
    );
    let j = s.get("q", &a.job_id).await.unwrap().unwrap();
    assert_eq!((j.state, j.run_at), (JobState::Retrying, T0 + 102));
    assert!(scans().await > before);
    // Its retry timer is due at T0 + 102; c's lease (100 ms) ends at T0 + 151.
    set(T0 + 101);
    assert!(lease(&s, "q", 1).await.is_empty());
    let a2 = lease_at(&s, &set, T0 + 102).await;
    assert_eq!((a2.job_id, a2.attempt), (a.job_id, 2));
    set(T0 + 150);
    assert!(lease(&s, "q", 1).await.is_empty());
    assert_eq!(
        s.get("q", &c.job_id).await.unwrap().unwrap().state,
        JobState::Leased
    );
    set(T0 + 151);
    assert!(lease(&s, "q", 1).await.is_empty());
    let j = s.get("q", &c.job_id).await.unwrap().unwrap();
    assert_eq!((j.state, j.run_at), (JobState::Retrying, T0 + 201));
    let c2 = lease_at(&s, &set, T0 + 201).await;
    assert_eq!((c2.job_id, c2.attempt), (c.job_id, 2));

    // The window ends on time: the key is new again.
    set(T0 + 9_999);
    assert!(s.enqueue("q", vec![keyed("d", "k")]).await.unwrap()[0].duplicate);
    set(T0 + 10_000);
    assert!(!s.enqueue("q", vec![keyed("e", "k")]).await.unwrap()[0].duplicate);

    // A queue with no `due` yet (made before the field) scans on its first lease.
    let mut conn = s.conn.clone();
    redis::cmd("HDEL")
        .arg(QueueKeys::new("q").key("meta"))
        .arg("due")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    set(T0 + 60_000);
    let before = scans().await;
    let leased = lease(&s, "q", 10).await;
    assert!(scans().await > before);
    // The leases of a2 and c2 ended long ago, and so did their retries' backoff (timed
    // from each deadline): both are leased again, with e; b's lease (60 s) lasts until
    // T0 + 60_001.
    assert_eq!(payloads(&leased), vec![&b"a"[..], b"c", b"e"]);
    assert_eq!((leased[0].attempt, leased[1].attempt), (3, 3));
    assert_eq!(
        s.get("q", &b.job_id).await.unwrap().unwrap().state,
        JobState::Leased
    );
}

/// Libraries loaded on the store's server, by name.
async fn libraries(s: &QueueStore) -> Vec<String> {
    let mut c = s.conn.clone();
    let list: Vec<HashMap<String, Value>> = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .unwrap();
    list.iter()
        .map(|lib| match &lib["library_name"] {
            Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("library name {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn redis_queue_functions_are_loaded_again_after_a_function_flush() {
    let (_srv, s) = store().await;
    // The first call finds no library and loads it.
    s.create("q", &policy("q")).await.unwrap();
    s.enqueue("q", vec![job("a")]).await.unwrap();
    let loaded = libraries(&s).await;
    assert_eq!(loaded.len(), 1, "{loaded:?}");
    assert!(loaded[0].starts_with("sluice_q_"), "{loaded:?}");

    let mut c = s.conn.clone();
    let () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(libraries(&s).await.is_empty());
    // The queue's data is untouched, and the next call brings the library back.
    s.enqueue("q", vec![job("b")]).await.unwrap();
    assert_eq!(payloads(&lease(&s, "q", 10).await), [&b"a"[..], b"b"]);
    assert_eq!(libraries(&s).await, loaded);
}

#[tokio::test]
async fn redis_queue_out_of_memory_refuses_writes_whole_and_still_answers_reads() {
    let (srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    let first = s.enqueue("q", vec![job("a")]).await.unwrap()[0].id;
    srv.config_set("maxmemory", "1");

    let err = s.enqueue("q", vec![job("b")]).await.unwrap_err();
    assert!(matches!(err, BrokerError::ResourceExhausted(_)), "{err}");
    assert!(err.to_string().contains("maxmemory"), "{err}");
    assert!(
        err.to_string().contains("enqueueing to queue \"q\""),
        "{err}"
    );
    let err = s.lease("q", 1, None, "w", "127.0.0.1:1").await.unwrap_err();
    assert!(matches!(err, BrokerError::ResourceExhausted(_)), "{err}");

    // Reads still run, and show that nothing changed.
    let counts = s.counts("q").await.unwrap();
    assert_eq!((counts.enqueued, counts.pending, counts.leased), (1, 1, 0));
    assert_eq!(
        s.get("q", &first).await.unwrap().unwrap().state,
        JobState::Pending
    );
    assert_eq!(s.list("q", None, 10, None).await.unwrap().0.len(), 1);

    srv.config_set("maxmemory", "0");
    s.enqueue("q", vec![job("b")]).await.unwrap();
    assert_eq!(payloads(&lease(&s, "q", 10).await), [&b"a"[..], b"b"]);
}

/// A Redis that cannot persist (its disk full or gone) refuses every write before it
/// runs: UNAVAILABLE saying so and that nothing changed; reads still answer.
#[tokio::test]
async fn redis_queue_writes_on_a_redis_that_cannot_persist_are_refused_whole() {
    let (srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    s.enqueue("q", vec![job("a")]).await.unwrap();
    srv.fail_persistence();
    for err in [
        s.enqueue("q", vec![job("b")]).await.unwrap_err(),
        s.lease("q", 1, None, "w", "127.0.0.1:1").await.unwrap_err(),
    ] {
        assert!(matches!(err, BrokerError::Unavailable(_)), "{err}");
        let text = err.to_string();
        assert!(text.contains("redis cannot persist writes"), "{text}");
        assert!(text.contains("was refused and changed nothing"), "{text}");
        assert!(text.contains("free disk space"), "{text}");
    }
    let counts = s.counts("q").await.unwrap();
    assert_eq!((counts.enqueued, counts.pending, counts.leased), (1, 1, 0));
}

#[tokio::test]
async fn redis_queue_history_entries_carry_ids_and_older_ones_still_read_and_trim() {
    let (_srv, s) = store().await;
    let p = QueuePolicy {
        history_limit: 2,
        ..policy("q")
    };
    s.create("q", &p).await.unwrap();
    let jobs: Vec<NewJob> = (0..4).map(|i| job(&i.to_string())).collect();
    s.enqueue("q", jobs).await.unwrap();
    let ack_all = |got: &[Delivery]| got.iter().map(|d| (d.lease_id.clone(), None)).collect();
    let first = lease(&s, "q", 2).await;
    s.ack("q", ack_all(&first)).await.unwrap();
    let key = QueueKeys::new("q").key("history");
    let mut c = s.conn.clone();
    let entries: Vec<String> = redis::cmd("LRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    let expected: Vec<String> = first
        .iter()
        .map(|d| format!("{}:{}", d.lease_id.seq, d.job_id))
        .collect();
    assert_eq!(entries, expected);

    // Entries as an older build wrote them: the seq alone.
    let () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    let _: u64 = redis::cmd("RPUSH")
        .arg(&key)
        .arg(first[0].lease_id.seq)
        .arg(first[1].lease_id.seq)
        .query_async(&mut c)
        .await
        .unwrap();
    let history = s.history("q", 10).await.unwrap();
    assert_eq!(
        history.iter().map(|j| j.seq).collect::<Vec<_>>(),
        vec![first[1].lease_id.seq, first[0].lease_id.seq]
    );
    let (done, _) = s
        .list("q", Some(JobState::Completed), 10, None)
        .await
        .unwrap();
    assert_eq!(done.len(), 2);

    // Two more finish: the old entries are trimmed, their jobs and ids with them.
    let second = lease(&s, "q", 2).await;
    s.ack("q", ack_all(&second)).await.unwrap();
    for d in &first {
        assert!(s.get("q", &d.job_id).await.unwrap().is_none());
    }
    let ids: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(QueueKeys::new("q").key("ids"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let history = s.history("q", 10).await.unwrap();
    assert_eq!(
        history.iter().map(|j| j.seq).collect::<Vec<_>>(),
        vec![second[1].lease_id.seq, second[0].lease_id.seq]
    );
}

/// The library keeps a queue's key names between calls and reads only the meta fields the
/// hot bodies name: calls alternating between queues each reach their own queue, and a
/// field outside those lists (the rate limit's burst) is still read.
#[tokio::test]
async fn redis_queue_calls_alternating_between_queues_each_reach_their_own() {
    let (_srv, s) = store().await;
    let limited = rate_limited("b", 1, 2);
    s.create("a", &policy("a")).await.unwrap();
    s.create("b", &limited).await.unwrap();
    for i in 0..3 {
        s.enqueue("a", vec![job(&format!("a{i}"))]).await.unwrap();
        s.enqueue("b", vec![job(&format!("b{i}"))]).await.unwrap();
    }
    // The burst (2) lets two of b's three out, in order; a's lease takes a's own.
    let b = lease(&s, "b", 3).await;
    assert_eq!(payloads(&b), [&b"b0"[..], b"b1"]);
    let a = lease(&s, "a", 1).await;
    assert_eq!(payloads(&a), [&b"a0"[..]]);
    let (acked, next) = s
        .ack_lease(
            "b",
            &[(b[0].lease_id.clone(), None)],
            (1, None, "w", "127.0.0.1:1"),
        )
        .await
        .unwrap();
    assert!(acked[0].is_ok(), "{acked:?}");
    assert!(next.is_empty(), "the rate limit holds b2 back");
    let (acked, next) = s
        .ack_lease(
            "a",
            &[(a[0].lease_id.clone(), None)],
            (2, None, "w", "127.0.0.1:1"),
        )
        .await
        .unwrap();
    assert!(acked[0].is_ok(), "{acked:?}");
    assert_eq!(payloads(&next), [&b"a1"[..], b"a2"]);
    let (ca, cb) = (s.counts("a").await.unwrap(), s.counts("b").await.unwrap());
    assert_eq!(
        (ca.enqueued, ca.completed, ca.leased, ca.pending),
        (3, 1, 2, 0)
    );
    assert_eq!(
        (cb.enqueued, cb.completed, cb.leased, cb.pending),
        (3, 1, 1, 1)
    );
    // A queue that does not exist, between calls on queues that do.
    let err = s.enqueue("c", vec![job("c")]).await.unwrap_err();
    assert!(matches!(err, BrokerError::NotFound(_)), "{err}");
    assert_eq!(lease(&s, "a", 1).await.len(), 0);
}

/// Jobs a consume stream leased ahead and never delivered go back as if never leased: the
/// attempt is not counted, the consumer no longer holds them, the rate limit's tokens come
/// back, nothing counts as failed, and a lease that is not live any more is left alone.
#[tokio::test]
async fn redis_queue_unleased_jobs_go_back_as_if_never_leased() {
    let (_srv, s) = store().await;
    let p = rate_limited("q", 1, 3);
    s.create("q", &p).await.unwrap();
    let jobs: Vec<NewJob> = (0..3).map(|i| job(&i.to_string())).collect();
    s.enqueue("q", jobs).await.unwrap();
    let got = lease(&s, "q", 3).await;
    assert_eq!(payloads(&got), vec![b"0".as_ref(), b"1", b"2"]);
    assert!(lease(&s, "q", 3).await.is_empty(), "the burst is spent");
    // Job 0 was delivered and acked; 1 and 2 were held ahead. A stale nonce is ignored.
    s.ack("q", vec![(got[0].lease_id.clone(), None)])
        .await
        .unwrap();
    let held = [&got[1], &got[2]].map(|d| (d.lease_id.seq, d.lease_id.nonce));
    let stale = (got[0].lease_id.seq, got[0].lease_id.nonce);
    let stranger = (got[1].lease_id.seq, got[1].lease_id.nonce ^ 1);
    assert_eq!(s.unlease("q", [stale, stranger]).await.unwrap(), 0);
    assert_eq!(s.unlease("q", held).await.unwrap(), 2);
    assert_eq!(s.unlease("q", held).await.unwrap(), 0, "only once");

    let counts = s.counts("q").await.unwrap();
    assert_eq!(
        (
            counts.pending,
            counts.leased,
            counts.failed,
            counts.completed
        ),
        (2, 0, 0, 1)
    );
    assert_eq!(counts.rate_tokens, 2, "the two tokens came back");
    let consumers = s.consumers("q").await.unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0].1.leases_held, 0);
    assert_eq!(consumers[0].1.failed, 0);
    for d in &got[1..] {
        let job = s.get("q", &d.job_id).await.unwrap().unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Pending, 0));
    }
    // The old leases are stale; the jobs come again as first attempts, in order.
    let refused = s
        .ack("q", vec![(got[1].lease_id.clone(), None)])
        .await
        .unwrap();
    assert!(refused[0].is_err(), "{refused:?}");
    let again = lease(&s, "q", 3).await;
    assert_eq!(payloads(&again), vec![b"1".as_ref(), b"2"]);
    assert!(again.iter().all(|d| d.attempt == 1), "{again:?}");
}

/// The meta and rates hashes, touched several times by every call, are hash tables (one
/// lookup per field) rather than listpacks (a scan of every field); enqueue's one write of
/// the sequence and the count keeps both right.
#[tokio::test]
async fn redis_queue_hot_hashes_are_hash_tables_and_counts_stay_right() {
    let (_srv, s) = store().await;
    s.create("q", &policy("q")).await.unwrap();
    s.enqueue("q", vec![job("a"), job("b")]).await.unwrap();
    let keyed = NewJob {
        idempotency_key: Some("k".into()),
        ..job("c")
    };
    s.enqueue("q", vec![keyed.clone(), keyed]).await.unwrap();
    let keys = QueueKeys::new("q");
    let mut c = s.conn.clone();
    for key in [keys.key("meta"), keys.key("rates")] {
        let encoding: String = redis::cmd("OBJECT")
            .arg("ENCODING")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(encoding, "hashtable", "{key}");
    }
    let counts = s.counts("q").await.unwrap();
    assert_eq!(counts.enqueued, 3, "{counts:?}");
    let seqs: Vec<u64> = lease(&s, "q", 10)
        .await
        .iter()
        .map(|d| d.lease_id.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    s.enqueue("q", vec![job("d")]).await.unwrap();
    assert_eq!(lease(&s, "q", 1).await[0].lease_id.seq, 4);
    assert_eq!(s.counts("q").await.unwrap().enqueued, 4);
}
