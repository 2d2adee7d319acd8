//! Regression tests of queue bugs found by a randomized model-based test.

use super::*;

const T0: Millis = 1_700_000_000_000;

fn plain_job(payload: &'static str) -> NewJob {
    NewJob {
        payload: Bytes::from_static(payload.as_bytes()),
        kind: "test".into(),
        ..NewJob::default()
    }
}

#[test]
fn with_no_history_kept_jobs_still_die_and_cancel() {
    let mut p = QueuePolicy::default_for("jobs");
    p.history_limit = 0;
    p.max_attempts = 1;
    let mut q = Queue::new("jobs", p);
    let c: Arc<str> = Arc::from("w");
    let ids: Vec<Uuid> = q
        .enqueue(T0, vec![plain_job("a"), plain_job("b"), plain_job("c")])
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let ds = q.lease(T0, 2, 1_000, &c, "a");
    // Its last attempt fails: it is dead-lettered (this used to panic).
    assert_eq!(
        q.nack(T0, &ds[0].lease_id, "boom".into(), None, false),
        Ok(FailOutcome::Dead)
    );
    let letters = q.take_dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].job_id, ids[0]);
    assert_eq!(letters[0].payload.as_ref(), b"a");
    // A lease expiring on its last attempt too.
    q.tick(T0 + 1_000);
    assert_eq!(q.take_dead_letters()[0].job_id, ids[1]);
    // Cancel answers with the record it does not keep (this used to panic too).
    let cancelled = q.cancel(T0 + 1_000, &ids[2]).unwrap();
    assert_eq!(
        (cancelled.id, cancelled.state),
        (ids[2], JobState::Cancelled)
    );
    assert!(q.history(10).is_empty() && q.finished.is_empty());
    assert!(q.get(&ids[2]).is_none());
    let counts = q.counts(T0 + 1_000);
    assert_eq!((counts.dead, counts.cancelled, counts.pending), (2, 1, 0));
}

#[test]
fn idempotency_keys_are_forgotten_after_a_shrunk_dedup_window() {
    let mut q = Queue::new("jobs", QueuePolicy::default_for("jobs"));
    let keyed = |k: &str| NewJob {
        idempotency_key: Some(k.into()),
        ..plain_job("x")
    };
    // Remembered for the default five minutes.
    q.enqueue(T0, vec![keyed("old")]).unwrap();
    let mut p = q.policy().clone();
    p.dedup_window_ms = 1_000;
    q.set_policy(p);
    let first = q.enqueue(T0 + 1, vec![keyed("new")]).unwrap()[0];
    assert!(q.enqueue(T0 + 1_000, vec![keyed("new")]).unwrap()[0].duplicate);
    // Its one-second window is over even though "old" is still remembered.
    let again = q.enqueue(T0 + 1_001, vec![keyed("new")]).unwrap()[0];
    assert!(!again.duplicate, "{again:?}");
    assert_ne!(again.id, first.id);
    assert!(q.enqueue(T0 + 2_000, vec![keyed("old")]).unwrap()[0].duplicate);
    assert!(!q.enqueue(T0 + 300_000, vec![keyed("old")]).unwrap()[0].duplicate);
}

#[test]
fn a_redrive_naming_a_job_twice_moves_it_once() {
    let mut p = QueuePolicy::default_for("jobs");
    p.max_attempts = 1;
    let mut q = Queue::new("jobs", p);
    let mut dlq = Queue::new("jobs.dlq", QueuePolicy::default_for("jobs.dlq"));
    let c: Arc<str> = Arc::from("w");
    q.enqueue(T0, vec![plain_job("a"), plain_job("b")]).unwrap();
    for d in q.lease(T0, 2, 1_000, &c, "a") {
        q.nack(T0, &d.lease_id, "boom".into(), None, false).unwrap();
    }
    let letters = q.take_dead_letters();
    let (a, b) = (letters[0].job_id, letters[1].job_id);
    for letter in letters {
        dlq.insert_dead_letter(T0, letter);
    }
    // Redrive takes ids from the request as given (this used to panic).
    let (moved, skipped) = dlq.take_for_redrive(&[a, b, a], 10);
    assert_eq!(moved.iter().map(|r| r.job_id).collect::<Vec<_>>(), [a, b]);
    assert_eq!(skipped, [a]);
    assert_eq!(dlq.live_jobs(), 0);
    for r in moved {
        q.restore(T0 + 1, r);
    }
    assert_eq!(q.live_jobs(), 2);
}

#[test]
fn extending_a_lease_to_its_own_deadline_keeps_the_deadline_index_exact() {
    let mut q = Queue::new("jobs", QueuePolicy::default_for("jobs"));
    let c: Arc<str> = Arc::from("w");
    q.enqueue(T0, (0..100).map(|_| plain_job("x")).collect())
        .unwrap();
    let ds = q.lease(T0, 100, 1_000, &c, "a");
    assert_eq!(ds.len(), 100);
    for d in &ds[..82] {
        q.ack(T0 + 1, &d.lease_id, None).unwrap();
    }
    // To the deadline it has already: the group of T0 + 1_000 is compacted on the way.
    assert_eq!(q.extend(T0 + 1, &ds[82].lease_id, 999), Ok(T0 + 1_000));
    for d in &ds[82..] {
        q.ack(T0 + 2, &d.lease_id, None).unwrap();
    }
    assert!(q.leases.is_empty());
    assert_eq!(q.next_due(), None);
    assert!(q.deadlines.is_empty());
}
