//! Unit tests of the queue state machine with explicit time: nothing here sleeps.

use super::*;
use crate::broker::domain::limits::Headers;

const T0: Millis = 1_700_000_000_000;

fn consumer() -> Arc<str> {
    Arc::from("worker-1")
}

fn queue_with(policy: impl FnOnce(&mut QueuePolicy)) -> Queue {
    let mut p = QueuePolicy::default_for("jobs");
    p.backoff = Backoff::Schedule(vec![0]);
    policy(&mut p);
    Queue::new("jobs", p)
}

fn job(payload: &'static str) -> NewJob {
    NewJob {
        payload: Bytes::from_static(payload.as_bytes()),
        kind: "test".into(),
        ..NewJob::default()
    }
}

fn enqueue_one(q: &mut Queue, now: Millis, j: NewJob) -> Uuid {
    q.enqueue(now, vec![j]).unwrap()[0].id
}

fn lease_one(q: &mut Queue, now: Millis, visibility: u64) -> Option<Delivery> {
    q.lease(now, 1, visibility, &consumer(), "127.0.0.1:1")
        .into_iter()
        .next()
}

fn payloads(deliveries: &[Delivery]) -> Vec<&[u8]> {
    deliveries.iter().map(|d| d.payload.as_ref()).collect()
}

#[test]
fn lease_expires_exactly_at_the_deadline_and_not_before() {
    let mut q = queue_with(|_| {});
    let id = enqueue_one(&mut q, T0, job("a"));
    let d = lease_one(&mut q, T0, 1_000).unwrap();
    assert_eq!(d.deadline, T0 + 1_000);

    // One millisecond before the deadline the job is still leased and invisible.
    assert!(lease_one(&mut q, T0 + 999, 1_000).is_none());
    assert_eq!(q.get(&id).unwrap().state, JobState::Leased);
    assert_eq!(q.check_lease(T0 + 999, &d.lease_id), Ok(LeaseCheck::Live));

    // At the deadline the lease is over (backoff [0]: visible at once) and counts as a
    // failed attempt.
    let again = lease_one(&mut q, T0 + 1_000, 1_000).unwrap();
    assert_eq!(again.job_id, id);
    assert_eq!(again.attempt, 2);
    assert_ne!(again.lease_id, d.lease_id);
    let job = q.get(&id).unwrap();
    assert!(job.last_error.as_deref().unwrap().contains("lease expired"));
    assert_eq!(q.counts(T0 + 1_000).failed, 1);
}

/// A queue whose one job was enqueued and leased for 1 s at `T0` under a fixed backoff,
/// after a tick at `tick_at` (at or past the lease's deadline, `T0 + 1_000`) expired the
/// lease.
fn expired_by_tick(backoff_ms: u64, tick_at: Millis) -> (Queue, Uuid) {
    let mut q = queue_with(|p| p.backoff = Backoff::Schedule(vec![backoff_ms]));
    let id = enqueue_one(&mut q, T0, job("a"));
    lease_one(&mut q, T0, 1_000).unwrap();
    q.tick(tick_at);
    (q, id)
}

#[test]
fn expiry_follows_the_backoff_policy_from_the_deadline() {
    // A tick on time, and one that notices the expiry 7 ms late: either way the retry is
    // due one backoff after the deadline, not after the tick.
    for (backoff, tick_at) in [(5_000, T0 + 1_000), (1_000, T0 + 1_007)] {
        let (mut q, id) = expired_by_tick(backoff, tick_at);
        let due = T0 + 1_000 + backoff;
        let j = q.get(&id).unwrap();
        assert_eq!(j.state, JobState::Retrying);
        assert_eq!(j.run_at, due);
        assert!(lease_one(&mut q, due - 1, 1_000).is_none());
        assert_eq!(lease_one(&mut q, due, 1_000).unwrap().job_id, id);
    }

    // A tick later than the whole backoff makes the job visible at once.
    let (mut q, id) = expired_by_tick(1_000, T0 + 2_500);
    assert_eq!(q.get(&id).unwrap().run_at, T0 + 2_000);
    assert_eq!(lease_one(&mut q, T0 + 2_500, 1_000).unwrap().job_id, id);
}

#[test]
fn a_stale_lease_is_rejected_after_the_job_is_leased_again() {
    let mut q = queue_with(|_| {});
    enqueue_one(&mut q, T0, job("a"));
    let first = lease_one(&mut q, T0, 1_000).unwrap();
    let second = lease_one(&mut q, T0 + 1_000, 1_000).unwrap();

    let err = q.ack(T0 + 1_001, &first.lease_id, None).unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("delivered again"), "{err}");
    // The late ack changed nothing: the second delivery is still live.
    assert_eq!(
        q.check_lease(T0 + 1_001, &second.lease_id),
        Ok(LeaseCheck::Live)
    );
    assert!(
        q.nack(T0 + 1_001, &first.lease_id, "x".into(), None, false)
            .is_err()
    );
    assert!(q.extend(T0 + 1_001, &first.lease_id, 10).is_err());

    q.ack(
        T0 + 1_002,
        &second.lease_id,
        Some(Bytes::from_static(b"ok")),
    )
    .unwrap();
    // Acking the same lease again is idempotent.
    q.ack(T0 + 1_003, &second.lease_id, None).unwrap();
    assert_eq!(q.counts(T0 + 1_003).completed, 1);
    let job = q.get(&second.job_id).unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.result.as_deref(), Some(&b"ok"[..]));
}

#[test]
fn an_expired_but_unticked_lease_cannot_be_acked() {
    let mut q = queue_with(|_| {});
    enqueue_one(&mut q, T0, job("a"));
    let d = lease_one(&mut q, T0, 1_000).unwrap();
    let err = q.ack(T0 + 1_000, &d.lease_id, None).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}

#[test]
fn retries_then_dead_letters_with_the_recorded_headers() {
    let mut q = queue_with(|p| {
        p.max_attempts = 3;
        p.backoff = Backoff::Schedule(vec![100, 200]);
    });
    let mut j = job("poison");
    j.headers.insert("trace".into(), "t1".into());
    let id = enqueue_one(&mut q, T0, j);

    let d1 = lease_one(&mut q, T0, 1_000).unwrap();
    assert_eq!(
        q.nack(T0 + 10, &d1.lease_id, "boom 1".into(), None, false),
        Ok(FailOutcome::Retry { at: T0 + 110 })
    );
    assert_eq!(q.get(&id).unwrap().state, JobState::Retrying);
    assert!(lease_one(&mut q, T0 + 109, 1_000).is_none());
    let d2 = lease_one(&mut q, T0 + 110, 1_000).unwrap();
    assert_eq!(d2.attempt, 2);
    assert_eq!(
        q.nack(T0 + 120, &d2.lease_id, "boom 2".into(), None, false),
        Ok(FailOutcome::Retry { at: T0 + 320 })
    );
    let d3 = lease_one(&mut q, T0 + 320, 1_000).unwrap();
    assert_eq!(d3.attempt, 3);
    assert!(q.take_dead_letters().is_empty());
    assert_eq!(
        q.nack(T0 + 330, &d3.lease_id, "boom 3".into(), None, false),
        Ok(FailOutcome::Dead)
    );

    let dead = q.get(&id).unwrap();
    assert_eq!(dead.state, JobState::Dead);
    assert_eq!(dead.dead_letter_queue.as_deref(), Some("jobs.dlq"));
    let letters = q.take_dead_letters();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.target, "jobs.dlq");
    assert_eq!(letter.job_id, id);
    assert_eq!(letter.headers[HEADER_ORIGINAL_QUEUE], "jobs");
    assert_eq!(letter.headers[HEADER_ATTEMPTS], "3");
    assert_eq!(letter.headers[HEADER_LAST_ERROR], "boom 3");
    assert_eq!(
        letter.headers[HEADER_DEAD_LETTERED_AT],
        (T0 + 330).to_string()
    );
    assert_eq!(letter.headers["trace"], "t1");
    let counts = q.counts(T0 + 330);
    assert_eq!((counts.failed, counts.dead, counts.pending), (3, 1, 0));
}

#[test]
fn nack_with_dead_letter_or_explicit_delay() {
    let mut q = queue_with(|p| p.max_attempts = 10);
    let a = enqueue_one(&mut q, T0, job("a"));
    let d = lease_one(&mut q, T0, 1_000).unwrap();
    assert_eq!(
        q.nack(T0, &d.lease_id, "bad input".into(), Some(7_000), false),
        Ok(FailOutcome::Retry { at: T0 + 7_000 })
    );
    let d = lease_one(&mut q, T0 + 7_000, 1_000).unwrap();
    assert_eq!(
        q.nack(T0 + 7_000, &d.lease_id, "poison".into(), None, true),
        Ok(FailOutcome::Dead)
    );
    assert_eq!(q.get(&a).unwrap().state, JobState::Dead);
    assert_eq!(q.take_dead_letters()[0].headers[HEADER_ATTEMPTS], "2");
}

#[test]
fn higher_priority_first_and_fifo_within_a_priority() {
    let mut q = queue_with(|_| {});
    for (payload, priority) in [
        ("low1", 0),
        ("high1", 9),
        ("mid", 5),
        ("high2", 9),
        ("low2", 0),
    ] {
        let mut j = job(payload);
        j.priority = priority;
        enqueue_one(&mut q, T0, j);
    }
    let all = q.lease(T0, 10, 1_000, &consumer(), "");
    assert_eq!(
        payloads(&all),
        [&b"high1"[..], b"high2", b"mid", b"low1", b"low2"]
    );
}

#[test]
fn delayed_jobs_are_invisible_until_their_time() {
    let mut q = queue_with(|_| {});
    let mut later = job("later");
    later.run_at = Some(T0 + 5_000);
    let id = enqueue_one(&mut q, T0, later);
    enqueue_one(&mut q, T0, job("now"));
    assert_eq!(q.get(&id).unwrap().state, JobState::Scheduled);
    assert_eq!(q.counts(T0).scheduled, 1);
    assert_eq!(q.next_due(), Some(T0 + 5_000));

    let first = q.lease(T0 + 4_999, 10, 1_000, &consumer(), "");
    assert_eq!(payloads(&first), [&b"now"[..]]);
    let second = q.lease(T0 + 5_000, 10, 1_000, &consumer(), "");
    assert_eq!(payloads(&second), [&b"later"[..]]);
}

#[test]
fn ordering_keys_are_never_leased_concurrently_and_keep_enqueue_order() {
    let mut q = queue_with(|_| {});
    for (payload, key) in [
        ("a1", "A"),
        ("a2", "A"),
        ("b1", "B"),
        ("a3", "A"),
        ("free", ""),
    ] {
        let mut j = job(payload);
        j.ordering_key = (!key.is_empty()).then(|| key.to_string());
        enqueue_one(&mut q, T0, j);
    }
    assert_eq!(q.counts(T0).pending, 5);
    let batch = q.lease(T0, 10, 1_000, &consumer(), "");
    assert_eq!(payloads(&batch), [&b"a1"[..], b"b1", b"free"]);
    assert!(q.lease(T0, 10, 1_000, &consumer(), "").is_empty());

    // a1 fails and retries: a2 must still wait behind it.
    let a1 = &batch[0];
    q.nack(T0 + 1, &a1.lease_id, "retry".into(), Some(50), false)
        .unwrap();
    assert!(q.lease(T0 + 2, 10, 1_000, &consumer(), "").is_empty());
    let a1_again = lease_one(&mut q, T0 + 51, 1_000).unwrap();
    assert_eq!(a1_again.payload.as_ref(), b"a1");
    q.ack(T0 + 52, &a1_again.lease_id, None).unwrap();

    let a2 = q.lease(T0 + 53, 10, 1_000, &consumer(), "");
    assert_eq!(payloads(&a2), [&b"a2"[..]]);
    q.ack(T0 + 54, &a2[0].lease_id, None).unwrap();
    let a3 = q.lease(T0 + 55, 10, 1_000, &consumer(), "");
    assert_eq!(payloads(&a3), [&b"a3"[..]]);
}

#[test]
fn cancelling_a_waiting_ordered_job_keeps_the_rest_in_order() {
    let mut q = queue_with(|_| {});
    let mut ids = Vec::new();
    for payload in ["k1", "k2", "k3"] {
        let mut j = job(payload);
        j.ordering_key = Some("K".into());
        ids.push(enqueue_one(&mut q, T0, j));
    }
    q.cancel(T0, &ids[1]).unwrap();
    let k1 = lease_one(&mut q, T0, 1_000).unwrap();
    assert_eq!(k1.payload.as_ref(), b"k1");
    q.ack(T0, &k1.lease_id, None).unwrap();
    assert_eq!(
        lease_one(&mut q, T0, 1_000).unwrap().payload.as_ref(),
        b"k3"
    );
}

#[test]
fn idempotency_keys_dedupe_within_the_window_only() {
    let mut q = queue_with(|p| p.dedup_window_ms = 1_000);
    let keyed = |k: &str| NewJob {
        idempotency_key: Some(k.into()),
        ..job("x")
    };
    let first = q.enqueue(T0, vec![keyed("k1"), keyed("k1")]).unwrap();
    assert!(!first[0].duplicate);
    assert_eq!(
        first[1],
        Enqueued {
            id: first[0].id,
            duplicate: true
        }
    );

    let inside = q.enqueue(T0 + 999, vec![keyed("k1")]).unwrap();
    assert_eq!(
        inside[0],
        Enqueued {
            id: first[0].id,
            duplicate: true
        }
    );
    assert_eq!(q.live_jobs(), 1);

    let after = q.enqueue(T0 + 1_000, vec![keyed("k1")]).unwrap();
    assert!(!after[0].duplicate);
    assert_ne!(after[0].id, first[0].id);
    assert_eq!(q.live_jobs(), 2);
    assert_eq!(q.counts(T0 + 1_000).enqueued, 2);
}

#[test]
fn a_full_queue_rejects_the_whole_batch() {
    let mut q = queue_with(|p| p.max_depth = 3);
    q.enqueue(T0, vec![job("1"), job("2")]).unwrap();
    let err = q.enqueue(T0, vec![job("3"), job("4")]).unwrap_err();
    assert!(matches!(err, BrokerError::ResourceExhausted(_)));
    assert!(err.to_string().contains("max_depth 3"), "{err}");
    assert_eq!(q.live_jobs(), 2);
    // Duplicates do not count against depth.
    q.enqueue(T0, vec![job("3")]).unwrap();
    assert!(q.enqueue(T0, vec![job("4")]).is_err());
}

#[test]
fn extend_moves_the_deadline() {
    let mut q = queue_with(|_| {});
    enqueue_one(&mut q, T0, job("a"));
    let d = lease_one(&mut q, T0, 1_000).unwrap();
    assert_eq!(q.extend(T0 + 900, &d.lease_id, 5_000), Ok(T0 + 5_900));
    q.tick(T0 + 5_000);
    assert_eq!(q.check_lease(T0 + 5_000, &d.lease_id), Ok(LeaseCheck::Live));
    q.tick(T0 + 5_900);
    assert!(q.check_lease(T0 + 5_900, &d.lease_id).is_err());
}

#[test]
fn cancel_purge_and_history() {
    let mut q = queue_with(|p| p.history_limit = 2);
    let a = enqueue_one(&mut q, T0, job("a"));
    let b = enqueue_one(&mut q, T0, job("b"));
    enqueue_one(&mut q, T0, job("c"));
    let leased = lease_one(&mut q, T0, 1_000).unwrap();
    assert_eq!(leased.job_id, a);

    let err = q.cancel(T0, &a).unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err}");
    assert_eq!(q.cancel(T0, &b).unwrap().state, JobState::Cancelled);
    assert!(q.cancel(T0, &b).is_err());
    assert_eq!(q.purge(T0), 1);
    assert_eq!(q.live_jobs(), 1);
    q.ack(T0, &leased.lease_id, None).unwrap();

    // History is bounded: the oldest finished job (b) is evicted.
    let history = q.history(10);
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].id, a);
    assert!(q.get(&b).is_none());
}

#[test]
fn a_repeat_ack_is_ok_until_the_job_leaves_history() {
    let mut q = queue_with(|p| p.history_limit = 1);
    enqueue_one(&mut q, T0, job("a"));
    let first = lease_one(&mut q, T0, 1_000).unwrap();
    q.ack(T0, &first.lease_id, None).unwrap();
    assert_eq!(
        q.check_lease(T0, &first.lease_id),
        Ok(LeaseCheck::AlreadyAcked)
    );
    q.ack(T0 + 1, &first.lease_id, None).unwrap();
    assert_eq!(q.counts(T0 + 1).completed, 1, "a repeat ack counts once");

    // A second finished job pushes the first out of a one-entry history.
    enqueue_one(&mut q, T0, job("b"));
    let second = lease_one(&mut q, T0, 1_000).unwrap();
    q.ack(T0, &second.lease_id, None).unwrap();
    let err = q.ack(T0 + 2, &first.lease_id, None).unwrap_err();
    assert!(
        matches!(&err, BrokerError::FailedPrecondition(m) if m.contains("evicted from history")),
        "{err}"
    );
}

#[test]
fn list_pages_through_jobs_in_enqueue_order() {
    let mut q = queue_with(|_| {});
    for p in ["1", "2", "3", "4", "5"] {
        enqueue_one(&mut q, T0, job(p));
    }
    lease_one(&mut q, T0, 1_000).unwrap();
    let (page, next) = q.list(Some(JobState::Pending), 0, 2);
    assert_eq!(
        page.iter().map(|j| j.payload.as_ref()).collect::<Vec<_>>(),
        [&b"2"[..], b"3"]
    );
    let (page, next) = q.list(Some(JobState::Pending), next.unwrap(), 2);
    assert_eq!(
        page.iter().map(|j| j.payload.as_ref()).collect::<Vec<_>>(),
        [&b"4"[..], b"5"]
    );
    assert_eq!(next, None);
    assert_eq!(q.list(Some(JobState::Leased), 0, 10).0.len(), 1);
    assert_eq!(q.list(None, 0, 10).0.len(), 5);
}

#[test]
fn dead_letters_can_be_redriven_with_attempts_reset() {
    let mut q = queue_with(|p| p.max_attempts = 4);
    let mut dlq = Queue::new("jobs.dlq", QueuePolicy::default_for("jobs.dlq"));
    assert_eq!(dlq.policy().dead_letter_queue, "");
    let id = enqueue_one(
        &mut q,
        T0,
        NewJob {
            max_attempts: Some(1),
            ..job("a")
        },
    );
    let d = lease_one(&mut q, T0, 1_000).unwrap();
    q.nack(T0, &d.lease_id, "boom".into(), None, false).unwrap();
    for letter in q.take_dead_letters() {
        dlq.insert_dead_letter(T0, letter);
    }
    assert_eq!(dlq.get(&id).unwrap().state, JobState::Pending);

    assert_eq!(dlq.get(&id).unwrap().origin.as_deref(), Some("jobs"));
    let (moved, skipped) = dlq.take_for_redrive(T0, &[id, Uuid::nil()], 10, |_| true);
    assert_eq!(skipped, vec![Uuid::nil()]);
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].target, "jobs");
    assert!(dlq.get(&id).is_none());
    assert!(!moved[0].headers.contains_key(HEADER_ORIGINAL_QUEUE));
    q.restore(T0 + 1, moved.into_iter().next().unwrap());
    let job = q.get(&id).unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Pending, 0));
    // The per-job override does not travel through the DLQ: the queue's limit applies.
    assert_eq!(job.max_attempts, 4);
    assert_eq!(lease_one(&mut q, T0 + 1, 1_000).unwrap().job_id, id);
    assert_eq!(
        q.get(&id).unwrap().origin,
        None,
        "back home it is an ordinary job"
    );
}

/// Where a dead job returns is what the broker recorded when it dead-lettered it. A job
/// enqueued into a dead-letter queue with a header naming another queue has no origin:
/// a redrive leaves it (by id it is skipped), and the header never picks a target. On the
/// old code the header alone made the job movable, into the queue it named.
#[test]
fn a_redrive_follows_the_recorded_origin_never_a_header() {
    let mut q = queue_with(|p| p.max_attempts = 1);
    let mut dlq = Queue::new("jobs.dlq", QueuePolicy::default_for("jobs.dlq"));
    let dead = enqueue_one(&mut q, T0, job("dead"));
    let d = lease_one(&mut q, T0, 1_000).unwrap();
    q.nack(T0, &d.lease_id, "boom".into(), None, false).unwrap();
    let mut letters = q.take_dead_letters();
    assert_eq!(letters[0].origin, "jobs");
    // What the broker wrote as headers is informational: changing them changes nothing.
    letters[0]
        .headers
        .insert(HEADER_ORIGINAL_QUEUE.into(), "payments".into());
    for letter in letters {
        dlq.insert_dead_letter(T0, letter);
    }
    let forged = enqueue_one(
        &mut dlq,
        T0,
        NewJob {
            headers: Headers::from([(HEADER_ORIGINAL_QUEUE.into(), "payments".into())]),
            ..job("forged")
        },
    );
    assert_eq!(dlq.get(&forged).unwrap().origin, None);
    assert_eq!(
        dlq.redrive_targets(&[], usize::MAX),
        BTreeSet::from(["jobs".to_owned()])
    );
    assert!(dlq.redrive_targets(&[forged], 10).is_empty());

    let (moved, skipped) = dlq.take_for_redrive(T0 + 1, &[forged], 10, |_| true);
    assert!(moved.is_empty());
    assert_eq!(skipped, [forged]);
    let (moved, skipped) = dlq.take_for_redrive(T0 + 1, &[], 10, |_| true);
    assert!(skipped.is_empty());
    assert_eq!(moved.len(), 1);
    assert_eq!((moved[0].job_id, moved[0].target.as_str()), (dead, "jobs"));
    assert_eq!(
        dlq.get(&forged).unwrap().state,
        JobState::Pending,
        "left in place"
    );
}

/// A redrive moves nothing into a queue the caller refuses (`allowed`): those jobs stay,
/// and by id they are listed as skipped.
#[test]
fn a_redrive_leaves_jobs_whose_origin_is_not_allowed() {
    let mut dlq = Queue::new("jobs.dlq", QueuePolicy::default_for("jobs.dlq"));
    let letter = |origin: &str| DeadLetter {
        target: "jobs.dlq".into(),
        origin: origin.into(),
        job_id: Uuid::now_v7(),
        kind: String::new(),
        payload: Bytes::from_static(b"x"),
        headers: Headers::new(),
        priority: 0,
    };
    let (a, b) = (letter("a"), letter("b"));
    let (ida, idb) = (a.job_id, b.job_id);
    dlq.insert_dead_letter(T0, a);
    dlq.insert_dead_letter(T0, b);
    let (moved, skipped) = dlq.take_for_redrive(T0, &[ida, idb], 10, |o| o == "b");
    assert_eq!(skipped, [ida]);
    assert_eq!(moved.iter().map(|r| r.job_id).collect::<Vec<_>>(), [idb]);
    let (moved, _) = dlq.take_for_redrive(T0, &[], 10, |o| o == "b");
    assert!(moved.is_empty());
    assert_eq!(dlq.live_jobs(), 1);
}

/// Time arithmetic saturates: a retry, lease or dedup window at the end of time stays
/// there instead of wrapping into the past (where a u64::MAX backoff made the job retry
/// at once, and with jitter, never).
#[test]
fn time_arithmetic_saturates_at_the_end_of_time() {
    let mut q = queue_with(|p| {
        p.backoff = Backoff::Exponential {
            initial_ms: u64::MAX,
            max_ms: u64::MAX,
            jitter: false,
        };
        p.max_attempts = 3;
        p.dedup_window_ms = u64::MAX;
    });
    let id = enqueue_one(
        &mut q,
        T0,
        NewJob {
            idempotency_key: Some("k".into()),
            ..job("a")
        },
    );
    let d = lease_one(&mut q, T0, u64::MAX).unwrap();
    assert_eq!(d.deadline, u64::MAX);
    assert_eq!(q.extend(T0 + 1, &d.lease_id, u64::MAX), Ok(u64::MAX));
    assert_eq!(
        q.nack(T0 + 2, &d.lease_id, "boom".into(), None, false),
        Ok(FailOutcome::Retry { at: u64::MAX })
    );
    assert_eq!(q.get(&id).unwrap().state, JobState::Retrying);
    assert!(
        lease_one(&mut q, T0 + 3, 1_000).is_none(),
        "not retried at once"
    );
    assert_eq!(q.next_due(), Some(u64::MAX));
    // An explicit retry delay saturates too.
    let id2 = enqueue_one(&mut q, T0, job("b"));
    let d = lease_one(&mut q, u64::MAX - 5, 1_000).unwrap();
    assert_eq!(d.job_id, id2);
    assert_eq!(d.deadline, u64::MAX);
    assert_eq!(
        q.nack(u64::MAX - 4, &d.lease_id, "x".into(), Some(1_000), false),
        Ok(FailOutcome::Retry { at: u64::MAX })
    );
    // The key is remembered to the end of time.
    assert!(
        q.enqueue(
            T0 + 10,
            vec![NewJob {
                idempotency_key: Some("k".into()),
                ..job("c")
            }]
        )
        .unwrap()[0]
            .duplicate
    );
}

#[test]
fn consumers_are_tracked_per_name() {
    let mut q = queue_with(|_| {});
    q.enqueue(T0, vec![job("a"), job("b")]).unwrap();
    let ds = q.lease(T0, 2, 1_000, &consumer(), "10.0.0.1:5");
    q.ack(T0 + 1, &ds[0].lease_id, None).unwrap();
    q.nack(T0 + 1, &ds[1].lease_id, "x".into(), Some(10_000), false)
        .unwrap();
    let consumers = q.consumers();
    assert_eq!(consumers.len(), 1);
    let (name, state) = &consumers[0];
    assert_eq!(&**name, "worker-1");
    assert_eq!((state.leases_held, state.done, state.failed), (0, 1, 1));
    assert_eq!(state.address, "10.0.0.1:5");
    assert_eq!(q.counts(T0 + 1).consumers, 1);
}

#[test]
fn paused_queues_hand_out_nothing() {
    let mut q = queue_with(|_| {});
    enqueue_one(&mut q, T0, job("a"));
    q.set_paused(true);
    assert!(lease_one(&mut q, T0, 1_000).is_none());
    q.set_paused(false);
    assert!(lease_one(&mut q, T0, 1_000).is_some());
}

#[test]
fn lease_ids_round_trip() {
    let id = LeaseId {
        queue: "a.b-c".into(),
        seq: 42,
        nonce: 0xdead_beef,
    };
    assert_eq!(id.to_string(), "a.b-c/42/deadbeef");
    assert_eq!(id.to_string().parse::<LeaseId>(), Ok(id));
    for bad in ["", "x", "/1/2", "q/x/1", "q/1/zz"] {
        assert!(bad.parse::<LeaseId>().is_err(), "{bad}");
    }
}

#[test]
fn exponential_backoff_grows_and_caps() {
    let b = Backoff::Exponential {
        initial_ms: 100,
        max_ms: 1_000,
        jitter: false,
    };
    let delays: Vec<u64> = (1..=6).map(|n| b.delay_ms(n)).collect();
    assert_eq!(delays, [100, 200, 400, 800, 1_000, 1_000]);
    let jittered = Backoff::Exponential {
        initial_ms: 100,
        max_ms: 1_000,
        jitter: true,
    };
    for _ in 0..100 {
        let d = jittered.delay_ms(3);
        assert!((200..=400).contains(&d), "{d}");
    }
    assert_eq!(Backoff::Schedule(vec![1, 5, 30]).delay_ms(7), 30);
}

#[test]
fn restored_jobs_rebuild_indexes_ordering_keys_history_and_dedup() {
    let mut q = queue_with(|_| {});
    let restored = |payload: &'static str, state: JobState| {
        let mut j = Job::restored(
            Uuid::now_v7(),
            "test".into(),
            Bytes::from_static(payload.as_bytes()),
            Headers::new(),
        );
        j.state = state;
        j.max_attempts = 5;
        j.enqueued_at = T0;
        j.run_at = T0;
        j
    };
    // A leased job comes back visible (leases are not persisted), keeping its attempts.
    let mut leased = restored("leased", JobState::Leased);
    leased.attempts = 2;
    let leased_id = leased.id;
    // Two jobs on one ordering key: only the first is visible.
    let mut first = restored("first", JobState::Pending);
    first.ordering_key = Some(Arc::from("k"));
    let mut second = restored("second", JobState::Pending);
    second.ordering_key = Some(Arc::from("k"));
    let second_id = second.id;
    // A retrying job due later goes to the timers.
    let mut later = restored("later", JobState::Retrying);
    later.attempts = 1;
    later.run_at = T0 + 5_000;
    let mut done = restored("done", JobState::Completed);
    done.finished_at = Some(T0);
    let done_id = done.id;
    for j in [leased, first, second, later, done] {
        q.restore_job(T0, j);
    }
    q.restore_dedup("key".into(), done_id, T0 + 100_000);

    let c = q.counts(T0);
    assert_eq!((c.pending, c.retrying, c.leased), (3, 1, 0));
    assert_eq!(q.live_jobs(), 4);
    assert_eq!(q.get(&leased_id).unwrap().state, JobState::Pending);
    assert_eq!(q.history(10)[0].id, done_id);
    let got = q.lease(T0, 10, 60_000, &consumer(), "a");
    assert_eq!(payloads(&got), [&b"leased"[..], b"first"]);
    assert_eq!(got[0].attempt, 3);
    // The second job of the key runs once the first is done.
    q.ack(T0, &got[1].lease_id, None).unwrap();
    assert_eq!(lease_one(&mut q, T0, 60_000).unwrap().job_id, second_id);
    assert_eq!(
        payloads(&q.lease(T0 + 5_000, 10, 60_000, &consumer(), "a")),
        [&b"later"[..]]
    );
    // The restored idempotency key still deduplicates, until it expires.
    let dup = q
        .enqueue(
            T0 + 5_010,
            vec![NewJob {
                idempotency_key: Some("key".into()),
                ..job("x")
            }],
        )
        .unwrap();
    assert_eq!(
        dup[0],
        Enqueued {
            id: done_id,
            duplicate: true
        }
    );
    let fresh = q
        .enqueue(
            T0 + 100_000,
            vec![NewJob {
                idempotency_key: Some("key".into()),
                ..job("x")
            }],
        )
        .unwrap();
    assert!(!fresh[0].duplicate);
}

#[test]
fn purge_reports_the_ids_it_cancelled_and_expiry_is_journaled() {
    let mut q = queue_with(|_| {});
    let a = enqueue_one(&mut q, T0, job("a"));
    let b = enqueue_one(&mut q, T0, job("b"));
    let d = lease_one(&mut q, T0, 100).unwrap();
    assert_eq!(d.job_id, a);
    assert_eq!(q.purge_ids(T0), vec![b]);
    assert!(q.take_expired().is_empty());
    q.tick(T0 + 100);
    let expired = q.take_expired();
    assert_eq!(expired, vec![d.lease_id.seq]);
    assert_eq!(q.job_by_seq(expired[0]).unwrap().id, a);
    assert_eq!(q.job_by_seq(expired[0]).unwrap().attempts, 1);
    assert!(q.take_expired().is_empty());
}

#[test]
fn oldest_pending_age_counts_from_when_each_job_became_visible() {
    let mut q = queue_with(|_| {});
    // `a` is enqueued first but only visible from T0 + 500; `b` is visible at once.
    let mut delayed = job("a");
    delayed.run_at = Some(T0 + 500);
    enqueue_one(&mut q, T0, delayed);
    enqueue_one(&mut q, T0 + 100, job("b"));
    assert_eq!(q.counts(T0 + 300).oldest_pending_age_ms, 200);
    q.tick(T0 + 500);
    // Both visible: b has waited 600 ms, a only 100 ms.
    assert_eq!(q.counts(T0 + 700).oldest_pending_age_ms, 600);
    // Leasing takes a first (enqueue order within a priority); b still waits.
    let first = lease_one(&mut q, T0 + 700, 1_000).unwrap();
    assert_eq!(first.payload.as_ref(), b"a");
    assert_eq!(q.counts(T0 + 700).oldest_pending_age_ms, 600);
    lease_one(&mut q, T0 + 700, 1_000).unwrap();
    assert_eq!(q.counts(T0 + 800).oldest_pending_age_ms, 0);
}

#[test]
fn ack_reports_lease_to_ack_time_across_extensions() {
    let mut q = queue_with(|_| {});
    enqueue_one(&mut q, T0, job("a"));
    let d = lease_one(&mut q, T0 + 10, 1_000).unwrap();
    q.extend(T0 + 900, &d.lease_id, 5_000).unwrap();
    assert_eq!(q.ack(T0 + 2_010, &d.lease_id, None).unwrap(), Some(2_000));
    // A repeat ack changes nothing and reports nothing.
    assert_eq!(q.ack(T0 + 2_020, &d.lease_id, None).unwrap(), None);
}

#[test]
fn idle_consumers_are_forgotten_once_there_are_many() {
    let mut q = queue_with(|_| {});
    enqueue_one(&mut q, T0, job("held"));
    let holder: Arc<str> = Arc::from("holder");
    assert_eq!(q.lease(T0, 1, 600_000, &holder, "a").len(), 1);
    for i in 0..MAX_IDLE_CONSUMERS {
        let name: Arc<str> = Arc::from(format!("127.0.0.1:{i}"));
        q.lease(T0 + 1, 1, 1_000, &name, "b");
    }
    assert_eq!(q.consumers().len(), MAX_IDLE_CONSUMERS + 1);
    // Long after, a new consumer arrives: only the one holding a lease is kept with it.
    let late: Arc<str> = Arc::from("late");
    q.lease(T0 + CONSUMER_ACTIVE_MS + 10, 1, 1_000, &late, "c");
    let names: Vec<String> = q.consumers().iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(names, ["holder", "late"]);
}

#[test]
fn ids_find_live_and_finished_jobs_of_this_queue_only() {
    let mut q = queue_with(|_| {});
    let mut other = queue_with(|_| {});
    let a = enqueue_one(&mut q, T0, job("a"));
    let b = enqueue_one(&mut q, T0 + 5, job("b"));
    let elsewhere = enqueue_one(&mut other, T0, job("x"));
    assert_eq!(a.get_version_num(), 7);
    assert!(a < b, "ids of one queue sort in enqueue order");
    assert_eq!(q.get(&b).unwrap().payload.as_ref(), b"b");
    // Same seq and time, another queue: not this job.
    assert!(q.get(&elsewhere).is_none());
    assert!(q.cancel(T0, &elsewhere).is_err());
    // A forged id with this queue's tag and seq but another enqueue time is not found.
    let forged = Uuid::from_u128(a.as_u128() ^ (1 << 80));
    assert!(q.get(&forged).is_none());

    let d = lease_one(&mut q, T0 + 10, 1_000).unwrap();
    q.ack(T0 + 11, &d.lease_id, Some(Bytes::from_static(b"ok")))
        .unwrap();
    let done = q.get(&a).unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.result.as_deref(), Some(&b"ok"[..]));
    assert_eq!(done.payload.as_ref(), b"a");
    assert_eq!(done.finished_at, Some(T0 + 11));
}

#[test]
fn cancelled_jobs_in_the_middle_of_a_backlog_are_skipped_by_lease_and_stats() {
    let mut q = queue_with(|_| {});
    let ids: Vec<Uuid> = (0..10)
        .map(|i| enqueue_one(&mut q, T0 + i, job("p")))
        .collect();
    for id in [ids[0], ids[3], ids[4], ids[9]] {
        q.cancel(T0 + 20, &id).unwrap();
    }
    let counts = q.counts(T0 + 20);
    assert_eq!(counts.pending, 6);
    // The oldest visible job is now ids[1], enqueued at T0 + 1.
    assert_eq!(counts.oldest_pending_age_ms, 19);
    let leased: Vec<Uuid> = q
        .lease(T0 + 20, 10, 1_000, &consumer(), "a")
        .into_iter()
        .map(|d| d.job_id)
        .collect();
    assert_eq!(leased, vec![ids[1], ids[2], ids[5], ids[6], ids[7], ids[8]]);
    assert_eq!(q.counts(T0 + 20).pending, 0);
}

#[test]
fn a_retried_job_goes_back_before_newer_jobs_of_its_priority() {
    let mut q = queue_with(|_| {});
    let a = enqueue_one(&mut q, T0, job("a"));
    let d = lease_one(&mut q, T0, 1_000).unwrap();
    let b = enqueue_one(&mut q, T0 + 1, job("b"));
    q.nack(T0 + 2, &d.lease_id, "again".into(), Some(0), false)
        .unwrap();
    assert_eq!(lease_one(&mut q, T0 + 2, 1_000).unwrap().job_id, a);
    assert_eq!(lease_one(&mut q, T0 + 2, 1_000).unwrap().job_id, b);
}

#[test]
fn a_drained_backlog_frees_its_storage() {
    let mut q = queue_with(|_| {});
    let batch: Vec<NewJob> = (0..1_000).map(|_| job("0123456789")).collect();
    for i in 0..10 {
        q.enqueue(T0 + i, batch.clone()).unwrap();
    }
    assert_eq!(q.live_jobs(), 10_000);
    while q.live_jobs() > 0 {
        for d in q.lease(T0 + 100, 700, 1_000, &consumer(), "a") {
            q.ack(T0 + 101, &d.lease_id, None).unwrap();
        }
    }
    assert_eq!(q.slots.len(), 0);
    assert!(q.leases.is_empty() && q.deadlines.is_empty());
    assert!(q.ready.is_empty());
    assert_eq!(q.finished.len(), q.policy().history_limit as usize);
    assert!(q.foreign.is_empty());
}

#[test]
fn a_malformed_lease_id_says_what_is_wrong() {
    use LeaseIdError::*;
    for (bad, why) in [
        ("", MissingParts { found: 1 }),
        ("x", MissingParts { found: 1 }),
        ("q/1", MissingParts { found: 2 }),
        ("/1/2", EmptyQueue),
        ("q/x/1", SeqNotANumber),
        ("q/-1/1", SeqNotANumber),
        ("q/1/zz", NonceNotHex),
        ("q/1/", NonceNotHex),
    ] {
        assert_eq!(bad.parse::<LeaseId>(), Err(why), "{bad:?}");
        assert_eq!(LeaseId::try_parse_for(bad, &Arc::from("q")), Err(why));
    }
    assert_eq!(
        MissingParts { found: 2 }.to_string(),
        "it has 2 of the 3 parts separated by \"/\""
    );
}

/// What `enqueue_recorded` hands the log for each stored job is the record `get` shows
/// (and nothing for a duplicate), so a new job's log record needs no lookup by id.
#[test]
fn enqueue_records_each_stored_job_as_get_shows_it() {
    let mut q = queue_with(|_| {});
    enqueue_one(
        &mut q,
        T0,
        NewJob {
            idempotency_key: Some("seen".into()),
            ..job("earlier")
        },
    );
    let jobs = vec![
        NewJob {
            headers: Headers::from([("trace".into(), "1".into())]),
            idempotency_key: Some("fresh".into()),
            ordering_key: Some("account-7".into()),
            priority: 4,
            max_attempts: Some(2),
            ..job("keyed")
        },
        NewJob {
            idempotency_key: Some("seen".into()),
            ..job("duplicate")
        },
        // Waits behind the first job of its ordering key.
        NewJob {
            ordering_key: Some("account-7".into()),
            ..job("blocked")
        },
        NewJob {
            kind: "a kind of its own".into(),
            run_at: Some(T0 + 60_000),
            ..job("scheduled")
        },
    ];
    let mut recorded = Vec::new();
    let out = q
        .enqueue_recorded(T0 + 5, jobs, |record| {
            recorded.push((record.id, format!("{record:?}"), !record.headers.is_empty()))
        })
        .unwrap();
    assert!(out[1].duplicate);
    let stored: Vec<Uuid> = [0, 2, 3].iter().map(|&i| out[i].id).collect();
    assert_eq!(
        recorded.iter().map(|(id, _, _)| *id).collect::<Vec<_>>(),
        stored
    );
    for (id, record, _) in &recorded {
        assert_eq!(*record, format!("{:?}", q.get(id).unwrap().record()));
    }
    let states: Vec<JobState> = stored.iter().map(|id| q.get(id).unwrap().state).collect();
    assert_eq!(
        states,
        [JobState::Pending, JobState::Pending, JobState::Scheduled]
    );
    assert!(recorded[0].2 && !recorded[1].2);
}

/// `ack_checked` applies a lease `check_lease` accepted without checking it again; once
/// the lease is acked (its record may already be gone from history) it is a no-op.
#[test]
fn ack_checked_acks_a_checked_lease_once() {
    let mut q = queue_with(|p| p.history_limit = 0);
    enqueue_one(&mut q, T0, job("a"));
    let d = lease_one(&mut q, T0, 1_000).unwrap();
    assert_eq!(q.check_lease(T0 + 10, &d.lease_id), Ok(LeaseCheck::Live));
    assert_eq!(q.ack_checked(T0 + 10, &d.lease_id, None), Some(10));
    assert!(
        q.check_lease(T0 + 10, &d.lease_id).is_err(),
        "not in history"
    );
    assert_eq!(q.ack_checked(T0 + 10, &d.lease_id, None), None);
    let c = q.counts(T0 + 10);
    assert_eq!((c.completed, c.leased, q.live_jobs()), (1, 0, 0));
}

// ---- rate and in-flight limits ------------------------------------------------------

fn limited(rate: Option<(u32, u32)>, max_in_flight: Option<u32>) -> Queue {
    queue_with(|p| {
        p.rate_limit = rate.map(|(per_second, burst)| RateLimit { per_second, burst });
        p.max_in_flight = max_in_flight;
    })
}

fn enqueue_n(q: &mut Queue, now: Millis, n: usize) {
    q.enqueue(now, (0..n).map(|_| job("j")).collect()).unwrap();
}

#[test]
fn a_rate_limit_hands_out_its_burst_then_one_job_per_token() {
    let mut q = limited(Some((10, 10)), None);
    enqueue_n(&mut q, T0, 30);
    let mut now = T0;
    let mut leased = 0;
    while leased < 30 {
        let got = q.lease(now, 100, 60_000, &consumer(), "a").len();
        leased += got;
        // Never more than the burst plus what the clock refilled.
        let allowed = 10 + (now - T0) * 10 / 1_000;
        assert!(leased as u64 <= allowed, "{leased} leased by {now}");
        if leased < 30 {
            // A waiter sleeps until the next token, as `next_due` says, and no longer.
            assert!(!q.has_visible(now));
            let due = q.next_due().expect("the next token is due");
            assert!(due > now);
            now = due;
            assert!(q.has_visible(now));
        }
    }
    // 10 at once, then 20 more at 10 a second.
    assert_eq!(now, T0 + 2_000);
}

#[test]
fn a_rate_limit_counts_the_time_it_held_jobs_back_once() {
    let mut q = limited(Some((10, 1)), None);
    enqueue_n(&mut q, T0, 3);
    assert_eq!(q.lease(T0, 5, 60_000, &consumer(), "a").len(), 1);
    // Cut short at T0 with more visible: held back until the next token at T0 + 100.
    assert_eq!(q.counts(T0 + 40).rate_limited_ms, 40);
    // A second refusal within the same wait adds nothing.
    assert!(lease_one(&mut q, T0 + 50, 60_000).is_none());
    let counts = q.counts(T0 + 100);
    assert_eq!(counts.rate_limited_ms, 100);
    assert_eq!(
        (counts.rate_limit_per_second, counts.rate_limit_burst),
        (10, 1)
    );
    assert_eq!(counts.rate_tokens, 1);
    assert!(lease_one(&mut q, T0 + 100, 60_000).is_some());
    // Asking for exactly what the bucket gave is not being held back.
    assert_eq!(q.counts(T0 + 1_000).rate_limited_ms, 100);
}

#[test]
fn a_long_idle_bucket_is_full_but_not_fuller() {
    let mut q = limited(Some((10, 3)), None);
    enqueue_n(&mut q, T0, 10);
    assert_eq!(q.lease(T0, 10, 60_000, &consumer(), "a").len(), 3);
    assert_eq!(q.lease(T0 + 60_000, 10, 60_000, &consumer(), "a").len(), 3);
}

#[test]
fn max_in_flight_hands_out_free_slots_only_and_an_ack_frees_one() {
    let mut q = limited(None, Some(3));
    enqueue_n(&mut q, T0, 5);
    let first = q.lease(T0, 10, 1_000, &consumer(), "a");
    assert_eq!(first.len(), 3);
    assert!(lease_one(&mut q, T0 + 10, 1_000).is_none());
    assert!(!q.has_visible(T0 + 10));
    // Capacity returns with a lease, not with the clock: only the deadlines are due.
    assert_eq!(q.next_due(), Some(T0 + 1_000));
    let counts = q.counts(T0 + 10);
    assert_eq!((counts.leased, counts.max_in_flight), (3, 3));

    q.ack(T0 + 50, &first[0].lease_id, None).unwrap();
    assert!(q.has_visible(T0 + 50));
    assert_eq!(q.counts(T0 + 50).in_flight_limited_ms, 50);
    assert!(lease_one(&mut q, T0 + 50, 1_000).is_some());
    assert!(lease_one(&mut q, T0 + 50, 1_000).is_none());

    // A nack frees a slot too, and so does an expired lease.
    q.nack(
        T0 + 60,
        &first[1].lease_id,
        "boom".into(),
        Some(60_000),
        false,
    )
    .unwrap();
    assert!(lease_one(&mut q, T0 + 60, 1_000).is_some());
    assert!(lease_one(&mut q, T0 + 60, 1_000).is_none());
    assert!(lease_one(&mut q, T0 + 1_000, 1_000).is_some());
}

#[test]
fn competing_consumers_never_hold_more_than_max_in_flight() {
    let mut q = limited(Some((50, 5)), Some(4));
    enqueue_n(&mut q, T0, 200);
    let workers: Vec<Arc<str>> = (0..5).map(|i| Arc::from(format!("w{i}"))).collect();
    let mut held: Vec<Vec<LeaseId>> = vec![Vec::new(); workers.len()];
    let mut done = 0;
    let mut now = T0;
    while done < 200 {
        for (i, w) in workers.iter().enumerate() {
            let got = q.lease(now, 1 + i % 3, 60_000, w, "a");
            held[i].extend(got.into_iter().map(|d| d.lease_id));
            assert!(held.iter().map(Vec::len).sum::<usize>() <= 4);
            // Each acks one in two rounds, so slots free unevenly.
            if (now / 7 + i as u64).is_multiple_of(2)
                && let Some(lease) = held[i].pop()
            {
                q.ack(now, &lease, None).unwrap();
                done += 1;
            }
        }
        now += 7;
    }
    // 200 jobs at 50 a second after a burst of 5: at least 3.9 s.
    assert!(now - T0 >= 3_900, "{}", now - T0);
}

#[test]
fn a_changed_rate_limit_starts_full_and_an_unchanged_one_keeps_its_tokens() {
    let mut q = limited(Some((1, 2)), None);
    enqueue_n(&mut q, T0, 10);
    assert_eq!(q.lease(T0, 10, 60_000, &consumer(), "a").len(), 2);
    let same = q.policy().clone();
    q.set_policy(same.clone());
    assert!(lease_one(&mut q, T0, 60_000).is_none());
    q.set_policy(QueuePolicy {
        rate_limit: Some(RateLimit {
            per_second: 1,
            burst: 3,
        }),
        ..same.clone()
    });
    assert_eq!(q.lease(T0, 10, 60_000, &consumer(), "a").len(), 3);
    // Without a limit the rest goes at once, and nothing waits for a token.
    q.set_policy(QueuePolicy {
        rate_limit: None,
        ..same
    });
    assert_eq!(q.lease(T0, 10, 60_000, &consumer(), "a").len(), 5);
    assert_eq!(q.next_due(), Some(T0 + 60_000));
}

#[test]
fn only_what_names_a_queue_on_purpose_clears_its_created_by_consumer_mark() {
    let marked = || {
        let mut q = queue_with(|_| {});
        q.mark_created_by_consumer();
        assert!(q.counts(T0).created_by_consumer);
        q
    };
    // Leasing, expiring, purging and counting leave the mark: only consumers named it.
    let mut q = marked();
    assert!(lease_one(&mut q, T0, 1_000).is_none());
    q.tick(T0 + 5_000);
    q.purge(T0 + 5_000);
    assert!(q.is_created_by_consumer());

    // A job coming in by Enqueue, a dead letter, or a redrive clears it.
    enqueue_one(&mut q, T0, job("a"));
    assert!(!q.counts(T0).created_by_consumer);

    let mut source = queue_with(|p| p.max_attempts = 1);
    enqueue_one(&mut source, T0, job("b"));
    let d = lease_one(&mut source, T0, 1_000).unwrap();
    source
        .nack(T0, &d.lease_id, "boom".into(), None, false)
        .unwrap();
    let mut letters = source.take_dead_letters();
    let mut dlq = marked();
    dlq.insert_dead_letter(T0, letters.pop().unwrap());
    assert!(!dlq.is_created_by_consumer());

    let (moved, _) = dlq.take_for_redrive(T0, &[], 10, |_| true);
    assert_eq!(moved.len(), 1);
    let mut origin = marked();
    for job in moved {
        origin.restore(T0, job);
    }
    assert!(!origin.is_created_by_consumer());

    // So does setting its policy or pausing it.
    let mut q = marked();
    q.set_policy(QueuePolicy::default_for("jobs"));
    assert!(!q.is_created_by_consumer());
    let mut q = marked();
    q.set_paused(false);
    assert!(!q.is_created_by_consumer());
}

#[test]
fn deleting_live_jobs_removes_them_from_every_index_and_count() {
    let mut q = queue_with(|p| p.backoff = Backoff::Schedule(vec![5_000]));
    let pending = enqueue_one(&mut q, T0, job("pending"));
    let mut later = job("scheduled");
    later.run_at = Some(T0 + 10_000);
    let scheduled = enqueue_one(&mut q, T0, later);
    let retried = enqueue_one(&mut q, T0, job("retrying"));
    let leased = enqueue_one(&mut q, T0, job("leased"));
    let first = q.lease(T0, 2, 1_000, &consumer(), "");
    assert_eq!(payloads(&first), [&b"pending"[..], b"retrying"]);
    q.nack(T0, &first[1].lease_id, "again".into(), None, false)
        .unwrap();
    q.ack(T0, &first[0].lease_id, None).unwrap();
    let d = lease_one(&mut q, T0, 1_000).unwrap();
    assert_eq!(d.job_id, leased);
    let counts = q.counts(T0);
    assert_eq!(
        (counts.scheduled, counts.retrying, counts.leased),
        (1, 1, 1)
    );

    for (id, state) in [
        (scheduled, JobState::Scheduled),
        (retried, JobState::Retrying),
        (leased, JobState::Leased),
    ] {
        assert_eq!(q.delete(T0 + 1, &id).unwrap().state, state);
        assert!(q.get(&id).is_none());
    }
    let counts = q.counts(T0 + 1);
    assert_eq!(
        (
            counts.pending,
            counts.scheduled,
            counts.retrying,
            counts.leased
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(
        (counts.cancelled, counts.completed),
        (0, 1),
        "nothing counted"
    );
    assert_eq!(q.live_jobs(), 0);
    // The deleted lease is stale, and nothing is ever delivered again.
    let err = q.ack(T0 + 2, &d.lease_id, None).unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err}");
    assert!(q.lease(T0 + 60_000, 10, 1_000, &consumer(), "").is_empty());
    assert_eq!(q.next_due(), None);

    // The completed job leaves history; a second delete finds nothing.
    assert_eq!(
        q.delete(T0 + 3, &pending).unwrap().state,
        JobState::Completed
    );
    assert!(q.history(10).is_empty());
    let err = q.delete(T0 + 3, &pending).unwrap_err();
    assert!(matches!(err, BrokerError::NotFound(_)), "{err}");
    assert!(err.to_string().contains(&pending.to_string()), "{err}");
}

#[test]
fn deleting_an_ordered_job_frees_its_key_for_the_next_one() {
    let mut q = queue_with(|_| {});
    let mut ids = Vec::new();
    for payload in ["k1", "k2", "k3", "k4"] {
        let mut j = job(payload);
        j.ordering_key = Some("K".into());
        ids.push(enqueue_one(&mut q, T0, j));
    }
    let k1 = lease_one(&mut q, T0, 1_000).unwrap();
    // A blocked job leaves its place in the line and the blocked count.
    q.delete(T0, &ids[2]).unwrap();
    assert_eq!(q.counts(T0).pending, 2);
    assert!(
        lease_one(&mut q, T0, 1_000).is_none(),
        "k1 still holds the key"
    );

    // Deleting the leased front of the key makes the next one leasable at once.
    assert_eq!(q.delete(T0, &ids[0]).unwrap().state, JobState::Leased);
    assert!(q.check_lease(T0, &k1.lease_id).is_err());
    let k2 = lease_one(&mut q, T0, 1_000).unwrap();
    assert_eq!(k2.payload.as_ref(), b"k2");
    q.ack(T0, &k2.lease_id, None).unwrap();
    assert_eq!(
        lease_one(&mut q, T0, 1_000).unwrap().payload.as_ref(),
        b"k4"
    );
    assert_eq!(q.counts(T0).pending, 0);
}
