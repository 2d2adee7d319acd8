//! Durability in-process: state survives restarts (from the log and from snapshots), a
//! failed fsync or a full disk stops every acknowledgement (fail-stop), and corruption at
//! random offsets of random log files is detected without panics or garbage; a missing log
//! file is named and refused; a fail-stopped broker is NOT_SERVING and shows only what is
//! durable.

mod ops_common;

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ops_common::test_broker::storage::{FileHook, HookedStorage};
use ops_common::test_broker::{eventually, eventually_within, health, rpc};
use sluice::broker::testing::{JobState, NewJob};
use sluice::broker::testing::{LeaseParams, PolicyPatch};
use sluice::broker::testing::{NewMessage, Retention};
use sluice::broker::{Broker, BrokerConfig, BrokerError};
use sluice::broker::{DirStorage, RecoveryError, RecoveryReport, Storage, StoreConfig};

fn open_with(
    storage: Arc<dyn Storage>,
    config: StoreConfig,
) -> Result<(Broker, RecoveryReport), RecoveryError> {
    Broker::open(BrokerConfig::default(), storage, config)
}

fn open(dir: &Path) -> Broker {
    open_with(
        Arc::new(DirStorage::open(dir).unwrap()),
        StoreConfig::default(),
    )
    .unwrap()
    .0
}

fn stop(broker: &Broker) {
    broker.shutdown();
    broker.close_storage();
}

fn job(payload: &str) -> NewJob {
    NewJob {
        payload: Bytes::from(payload.to_owned()),
        kind: "test".into(),
        ..NewJob::default()
    }
}

fn lease_params(max: usize) -> LeaseParams {
    LeaseParams {
        max_jobs: max,
        visibility_timeout_ms: Some(60_000),
        wait_ms: 0,
        consumer: "w".into(),
        address: "test".into(),
    }
}

/// A payload that carries its own checksum, so garbage is recognisable.
fn checked_payload(i: u64) -> Bytes {
    let body = format!("job-{i:06}-{}", "x".repeat((i % 50) as usize));
    let crc = crc32c::crc32c(body.as_bytes());
    Bytes::from(format!("{body}#{crc:08x}"))
}

fn payload_is_valid(payload: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(payload) else {
        return false;
    };
    let Some((body, crc)) = text.rsplit_once('#') else {
        return false;
    };
    u32::from_str_radix(crc, 16).ok() == Some(crc32c::crc32c(body.as_bytes()))
}

#[tokio::test]
async fn queues_topics_bindings_and_jobs_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, d, leased_id, first_seq);
    {
        let broker = open(dir.path());
        broker
            .create_queue(
                "work",
                PolicyPatch {
                    max_attempts: Some(3),
                    topic_bindings: Some(vec!["events.*".into()]),
                    ..PolicyPatch::default()
                },
            )
            .await
            .unwrap();
        broker
            .create_topic(
                "events.x",
                Retention {
                    max_messages: 10,
                    ..Retention::default()
                },
            )
            .await
            .unwrap();
        let ids = broker
            .enqueue(
                "work",
                vec![
                    NewJob {
                        idempotency_key: Some("k1".into()),
                        ..job("a")
                    },
                    NewJob {
                        ordering_key: Some("o".into()),
                        ..job("b")
                    },
                    NewJob {
                        ordering_key: Some("o".into()),
                        ..job("c")
                    },
                    NewJob {
                        run_at: Some(sluice::broker::now_ms() + 3_600_000),
                        ..job("d")
                    },
                ],
            )
            .await
            .unwrap();
        (a, b, d) = (ids[0].id, ids[1].id, ids[3].id);
        let published = broker
            .publish(
                "events.x",
                vec![
                    NewMessage {
                        payload: Bytes::from_static(b"m1"),
                        idempotency_key: Some("p1".into()),
                        ..NewMessage::default()
                    },
                    NewMessage {
                        payload: Bytes::from_static(b"m2"),
                        ..NewMessage::default()
                    },
                ],
            )
            .await
            .unwrap();
        first_seq = published[0].sequence;

        // a: acked with a result; b: poison, to work.dlq; the first message's job: leased.
        let got = broker.lease("work", lease_params(2)).await.unwrap();
        assert_eq!(got[0].job_id, a);
        assert_eq!(got[1].job_id, b);
        broker
            .ack(vec![(
                got[0].lease_id.to_string(),
                Some(Bytes::from_static(b"done")),
            )])
            .await
            .unwrap();
        broker
            .nack(&got[1].lease_id.to_string(), "poison".into(), None, true)
            .await
            .unwrap();
        let held = broker.lease("work", lease_params(1)).await.unwrap();
        leased_id = held[0].job_id;
        broker.cancel_job(&d.to_string(), None).await.unwrap();
        stop(&broker);
    }
    // Twice: once replaying the log, once from the snapshot the first restart wrote.
    for round in 0..2 {
        let broker = open(dir.path());
        let (_, ja) = broker.get_job(&a.to_string(), Some("work")).unwrap();
        assert_eq!(ja.state, JobState::Completed, "round {round}");
        assert_eq!(ja.result.as_deref(), Some(&b"done"[..]));
        let (_, jb) = broker.get_job(&b.to_string(), Some("work")).unwrap();
        assert_eq!(jb.state, JobState::Dead);
        let (dlq, _) = broker.list_jobs("work.dlq", None, 10, "").unwrap();
        assert_eq!(dlq.len(), 1);
        assert_eq!(dlq[0].id, b);
        assert_eq!(dlq[0].headers["x-sluice-last-error"], "poison");
        // Where a redrive returns it is what the broker recorded, kept by log and snapshot.
        assert_eq!(dlq[0].origin.as_deref(), Some("work"), "round {round}");
        let (_, jd) = broker.get_job(&d.to_string(), None).unwrap();
        assert_eq!(jd.state, JobState::Cancelled);
        // The lease did not survive: the job is visible again.
        let (_, jl) = broker.get_job(&leased_id.to_string(), None).unwrap();
        assert_eq!(jl.state, JobState::Pending);
        let info = broker.list_queues();
        let work = info.iter().find(|q| q.name == "work").unwrap();
        assert_eq!(work.policy.max_attempts, 3);
        assert_eq!(work.policy.topic_bindings, vec!["events.*".to_owned()]);
        stop(&broker);
    }
    let broker = open(dir.path());
    // Dedup keys, topic sequences and bindings all carry on.
    let again = broker
        .enqueue(
            "work",
            vec![NewJob {
                idempotency_key: Some("k1".into()),
                ..job("a again")
            }],
        )
        .await
        .unwrap();
    assert!(again[0].duplicate);
    assert_eq!(again[0].id, a);
    let dup = broker
        .publish(
            "events.x",
            vec![NewMessage {
                payload: Bytes::from_static(b"m1"),
                idempotency_key: Some("p1".into()),
                ..NewMessage::default()
            }],
        )
        .await
        .unwrap();
    assert_eq!((dup[0].sequence, dup[0].duplicate), (first_seq, true));
    let next = broker
        .publish(
            "events.x",
            vec![NewMessage {
                payload: Bytes::from_static(b"m3"),
                ..NewMessage::default()
            }],
        )
        .await
        .unwrap();
    assert_eq!(next[0].sequence, first_seq + 2);
    let stats = broker.stats(&[], &["events.x".into()]);
    assert_eq!(stats.topics[0].retained_messages, 3);
    // c (behind b's ordering key, now free), the 2 bound copies and the new one.
    let (live, _) = broker.list_jobs("work", None, 100, "").unwrap();
    assert_eq!(live.len(), 4, "{live:?}");
    stop(&broker);
}

/// Disk faults for a [`HookedStorage`]: once `fail` is set, writes fail with ENOSPC
/// (when `enospc`) and fsyncs fail with EIO; with `all_writes`, so does every other change
/// to the directory (creating, cutting, renaming, deleting files, syncing it). While
/// `stall` is set, a failing write waits first, so a test can have many changes in flight
/// when it fails.
#[derive(Debug, Default)]
struct DiskFault {
    fail: AtomicBool,
    enospc: bool,
    all_writes: bool,
    stall: AtomicBool,
}

impl DiskFault {
    fn failing(&self) -> bool {
        self.fail.load(Ordering::SeqCst)
    }
}

impl FileHook for DiskFault {
    fn before_write(&self) -> io::Result<()> {
        // The WAL writer's own thread waits here (a poll of the flag), not the test.
        while self.failing() && self.stall.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.enospc && self.failing() {
            return Err(io::Error::from_raw_os_error(28));
        }
        Ok(())
    }

    fn before_sync(&self) -> io::Result<()> {
        if self.failing() {
            return Err(io::Error::from_raw_os_error(5));
        }
        Ok(())
    }

    fn before_change(&self) -> io::Result<()> {
        if self.all_writes && self.failing() {
            return Err(io::Error::from_raw_os_error(28));
        }
        Ok(())
    }
}

/// Deleted jobs stay deleted across restarts, from the log and from a snapshot: a pending
/// one, a leased one (whose lease does not bring it back), one that held its ordering key
/// (the key's next job is leasable after the restart) and a completed one in history.
#[tokio::test]
async fn deleted_jobs_stay_deleted_after_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (deleted, next, kept);
    {
        let broker = open(dir.path());
        let keyed = |payload: &str| NewJob {
            ordering_key: Some("o".into()),
            ..job(payload)
        };
        let ids: Vec<String> = broker
            .enqueue(
                "work",
                vec![
                    keyed("o1"),
                    keyed("o2"),
                    job("done"),
                    job("leased"),
                    job("pending"),
                    job("kept"),
                ],
            )
            .await
            .unwrap()
            .iter()
            .map(|e| e.id.to_string())
            .collect();
        // Leases o1 (the key's holder), done and leased; acks done.
        let held = broker.lease("work", lease_params(3)).await.unwrap();
        assert_eq!(held.len(), 3);
        let done = held
            .iter()
            .find(|l| l.job_id.to_string() == ids[2])
            .unwrap();
        broker
            .ack(vec![(done.lease_id.to_string(), None)])
            .await
            .unwrap();
        deleted = [
            ids[0].clone(),
            ids[2].clone(),
            ids[3].clone(),
            ids[4].clone(),
        ];
        for id in &deleted {
            broker.delete_job("work", id).await.unwrap();
        }
        (next, kept) = (ids[1].clone(), ids[5].clone());
        stop(&broker);
    }
    // Twice: once replaying the log, once from the snapshot the first restart wrote.
    for round in 0..2 {
        let broker = open(dir.path());
        for id in &deleted {
            let err = broker.get_job(id, Some("work")).unwrap_err();
            assert!(
                matches!(err, BrokerError::NotFound(_)),
                "round {round}: {err}"
            );
        }
        assert!(broker.job_history("work", 10).unwrap().is_empty());
        let (live, _) = broker.list_jobs("work", None, 10, "").unwrap();
        let mut live: Vec<String> = live.iter().map(|j| j.id.to_string()).collect();
        live.sort();
        let mut expected = vec![next.clone(), kept.clone()];
        expected.sort();
        assert_eq!(live, expected, "round {round}");
        stop(&broker);
    }
    // The ordering key is free: its next job is leased with the other one.
    let broker = open(dir.path());
    let got = broker.lease("work", lease_params(10)).await.unwrap();
    let mut got: Vec<String> = got.iter().map(|l| l.job_id.to_string()).collect();
    got.sort();
    let mut expected = vec![next, kept];
    expected.sort();
    assert_eq!(got, expected);
    stop(&broker);
}

fn assert_unavailable(result: Result<impl std::fmt::Debug, BrokerError>, what: &str) {
    let err = result.expect_err(what);
    assert!(
        matches!(err, BrokerError::StorageFailed(_)),
        "{what}: expected a storage failure, got {err:?}"
    );
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{what}");
    assert!(
        status.message().contains("fail-stop"),
        "{}",
        status.message()
    );
}

/// With `sync_threads` fsyncs of the log at once.
async fn fail_stop_case(enospc: bool, sync_threads: usize) {
    let dir = tempfile::tempdir().unwrap();
    let fault = Arc::new(DiskFault {
        enospc,
        ..DiskFault::default()
    });
    let storage = HookedStorage::open(dir.path(), fault.clone());
    let config = StoreConfig {
        sync_threads,
        ..StoreConfig::default()
    };
    let (broker, _) = open_with(storage, config).unwrap();
    let kept = broker.enqueue("q", vec![job("before")]).await.unwrap()[0].id;
    let leased = broker.lease("q", lease_params(1)).await.unwrap();
    fault.fail.store(true, Ordering::SeqCst);

    // Concurrent requests in flight when the disk fails: none is acknowledged.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            broker.enqueue("q", vec![job(&format!("during {i}"))]).await
        }));
    }
    for task in tasks {
        assert_unavailable(task.await.unwrap(), "an enqueue racing the failure");
    }
    // And every later change is refused before it is applied.
    assert_unavailable(broker.enqueue("q", vec![job("after")]).await, "enqueue");
    assert_unavailable(
        broker
            .publish(
                "t",
                vec![NewMessage {
                    payload: Bytes::from_static(b"x"),
                    ..NewMessage::default()
                }],
            )
            .await,
        "publish",
    );
    assert_unavailable(
        broker
            .ack(vec![(leased[0].lease_id.to_string(), None)])
            .await,
        "ack",
    );
    assert_unavailable(broker.lease("q", lease_params(1)).await, "lease");
    assert_unavailable(broker.purge_queue("q").await, "purge");
    assert_unavailable(
        broker.delete_job("q", &kept.to_string()).await,
        "delete_job",
    );
    assert_unavailable(
        broker.create_queue("other", PolicyPatch::default()).await,
        "create_queue",
    );
    // Reads still work, for diagnosis.
    assert!(broker.get_job(&kept.to_string(), Some("q")).is_ok());
    stop(&broker);

    // What was acknowledged before the failure is still there after a restart, and
    // nothing that was refused (written, but not fsynced) comes back.
    let broker = open(dir.path());
    let (_, job) = broker.get_job(&kept.to_string(), Some("q")).unwrap();
    assert_eq!(job.payload.as_ref(), b"before");
    let (jobs, _) = broker.list_jobs("q", None, 100, "").unwrap();
    assert_eq!(jobs.len(), 1, "enospc {enospc}: {jobs:?}");
    stop(&broker);
}

#[tokio::test]
async fn a_failed_fsync_stops_every_acknowledgement() {
    fail_stop_case(false, 1).await;
}

#[tokio::test]
async fn a_full_disk_never_gives_a_false_ok() {
    fail_stop_case(true, 1).await;
}

/// The same with 3 fsyncs at once (`--wal-sync-threads 3`): the failing fsync runs on a
/// sync thread, and no group after the last one released is acknowledged.
#[tokio::test]
async fn a_failed_fsync_stops_every_acknowledgement_with_overlapped_fsyncs() {
    fail_stop_case(false, 3).await;
}

#[tokio::test]
async fn a_full_disk_never_gives_a_false_ok_with_overlapped_fsyncs() {
    fail_stop_case(true, 3).await;
}

/// Every job of every queue (live and finished) has an intact payload.
fn all_payloads_valid(broker: &Broker) -> usize {
    let mut seen = 0;
    for q in broker.list_queues() {
        let mut token = String::new();
        loop {
            let (jobs, next) = broker.list_jobs(&q.name, None, 1000, &token).unwrap();
            for j in &jobs {
                assert!(
                    payload_is_valid(&j.payload),
                    "garbage payload {:?}",
                    j.payload
                );
                seen += 1;
            }
            match next {
                Some(n) => token = n.to_string(),
                None => break,
            }
        }
        for j in broker.job_history(&q.name, 1000).unwrap() {
            assert!(
                payload_is_valid(&j.payload),
                "garbage payload {:?}",
                j.payload
            );
        }
    }
    seen
}

#[tokio::test]
async fn corruption_at_random_offsets_is_detected_never_delivered() {
    let pristine = tempfile::tempdir().unwrap();
    // Small segments and no compaction while it runs, so the corpus always holds a
    // snapshot (written by the second start, with the first run's state) and several
    // segments.
    let small = StoreConfig {
        segment_bytes: 4096,
        compact_after_bytes: Some(u64::MAX / 4),
        ..StoreConfig::default()
    };
    for run in 0..2u64 {
        let (broker, _) = open_with(
            Arc::new(DirStorage::open(pristine.path()).unwrap()),
            small.clone(),
        )
        .unwrap();
        for batch in run * 20..run * 20 + 20 {
            let jobs = (0..10)
                .map(|i| NewJob {
                    payload: checked_payload(batch * 10 + i),
                    ..NewJob::default()
                })
                .collect();
            broker.enqueue("q", jobs).await.unwrap();
            if batch % 4 == 0 {
                let got = broker.lease("q", lease_params(5)).await.unwrap();
                let acks = got.iter().map(|d| (d.lease_id.to_string(), None)).collect();
                broker.ack(acks).await.unwrap();
            }
        }
        stop(&broker);
    }
    let files: Vec<String> = std::fs::read_dir(pristine.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wal"))
        .collect();
    assert!(
        files.len() >= 3,
        "expected a snapshot and segments, got {files:?}"
    );

    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let (mut refused, mut truncated, mut clean) = (0, 0, 0);
    for case in 0..40 {
        let dir = tempfile::tempdir().unwrap();
        for name in &files {
            std::fs::copy(pristine.path().join(name), dir.path().join(name)).unwrap();
        }
        let victim = &files[rng.usize(..files.len())];
        let path = dir.path().join(victim);
        let mut data = std::fs::read(&path).unwrap();
        let offset = rng.usize(..data.len());
        data[offset] ^= rng.u8(1..);
        std::fs::write(&path, &data).unwrap();

        let storage = || Arc::new(DirStorage::open(dir.path()).unwrap());
        match open_with(storage(), small.clone()) {
            Err(RecoveryError::Damaged {
                file, offset: at, ..
            }) => {
                refused += 1;
                assert!(
                    file.ends_with(victim.as_str()),
                    "case {case}: {file} vs {victim}"
                );
                assert!(
                    at as usize <= offset,
                    "case {case}: damage reported at {at}, after the flipped byte {offset}"
                );
                let message = open_with(storage(), small.clone())
                    .err()
                    .unwrap()
                    .to_string();
                assert!(
                    message.contains("byte offset") && message.contains("--repair"),
                    "{message}"
                );
                // --repair starts, cutting at the bad record, and delivers no garbage.
                let (broker, report) = open_with(
                    storage(),
                    StoreConfig {
                        repair: true,
                        ..small.clone()
                    },
                )
                .unwrap();
                assert!(!report.truncated.is_empty());
                all_payloads_valid(&broker);
                stop(&broker);
            }
            Err(other) => panic!("case {case}: unexpected error {other}"),
            Ok((broker, report)) => {
                if report.truncated.is_empty() {
                    clean += 1;
                } else {
                    truncated += 1;
                }
                all_payloads_valid(&broker);
                // Leasing everything hands out intact payloads only.
                loop {
                    let got = broker.lease("q", lease_params(100)).await.unwrap();
                    if got.is_empty() {
                        break;
                    }
                    assert!(got.iter().all(|d| payload_is_valid(&d.payload)));
                }
                stop(&broker);
            }
        }
    }
    eprintln!(
        "corruption cases: 40; refused {refused}, torn tail truncated {truncated}, unaffected {clean}"
    );
    assert!(refused > 0, "no case hit acknowledged data");
    assert_eq!(clean, 0, "a flipped byte went unnoticed");
}

/// The newest segment file in `dir`.
fn newest_segment(dir: &Path) -> std::path::PathBuf {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wal") && !n.starts_with("snap-"))
        .collect();
    names.sort();
    dir.join(names.last().expect("a segment"))
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_a_headerless_new_segment_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    let mut sizes = Vec::new();
    for i in 0..3 {
        broker
            .enqueue("q", vec![job(&format!("job {i}"))])
            .await
            .unwrap();
        sizes.push(std::fs::metadata(newest_segment(dir.path())).unwrap().len());
    }
    stop(&broker);
    // The broker died while writing the last record: its last bytes never made it.
    let segment = newest_segment(dir.path());
    let len = std::fs::metadata(&segment).unwrap().len();
    let cut = sizes[2] - sizes[1] - 3;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "data directory mode");
        let mode = std::fs::metadata(&segment).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "segment mode");
    }

    let (broker, report) = open_with(
        Arc::new(DirStorage::open(dir.path()).unwrap()),
        StoreConfig::default(),
    )
    .unwrap();
    assert_eq!(report.truncated.len(), 1, "{:?}", report.truncated);
    assert!(
        report.truncated[0].contains("torn tail"),
        "{:?}",
        report.truncated
    );
    let (jobs, _) = broker.list_jobs("q", None, 10, "").unwrap();
    let payloads: Vec<&[u8]> = jobs.iter().map(|j| j.payload.as_ref()).collect();
    assert_eq!(payloads, [&b"job 0"[..], b"job 1"]);
    // What was cut shows in Stats, over gRPC too.
    let recovery = broker.stats(&[], &[]).storage.recovery;
    assert_eq!(
        (recovery.torn_tail_bytes, recovery.torn_tail_records),
        (cut, 1)
    );
    let served = ops_common::Harness::serve(broker.clone(), 1000).await;
    let stats = rpc::stats(&mut served.rpc().await).await;
    let storage = stats.storage.expect("storage stats");
    assert_eq!(
        (storage.engine.as_str(), storage.fsync.as_str()),
        ("wal", "always")
    );
    let recovery = storage.recovery.expect("recovery stats");
    assert_eq!(
        (recovery.torn_tail_bytes, recovery.torn_tail_records),
        (cut, 1)
    );
    stop(&broker);
    // The restart wrote a snapshot and removed the old files; it opens cleanly again.
    let (broker, report) = open_with(
        Arc::new(DirStorage::open(dir.path()).unwrap()),
        StoreConfig::default(),
    )
    .unwrap();
    assert!(report.truncated.is_empty());
    assert!(report.snapshot.is_some());
    assert_eq!(broker.list_jobs("q", None, 10, "").unwrap().0.len(), 2);
    stop(&broker);

    // The next segment was created but the broker died before its header was written.
    let empty = dir
        .path()
        .join(format!("{:020}.wal", snapshot_base(dir.path())));
    std::fs::write(&empty, b"SLU").unwrap();
    let (broker, report) = open_with(
        Arc::new(DirStorage::open(dir.path()).unwrap()),
        StoreConfig::default(),
    )
    .unwrap();
    assert_eq!(report.truncated.len(), 1, "{:?}", report.truncated);
    assert!(!empty.exists());
    assert_eq!(broker.list_jobs("q", None, 10, "").unwrap().0.len(), 2);
    // The log goes on in the dropped segment's number: a gap in the numbering would make
    // the next start refuse the log as missing a segment (the crash test found this).
    broker.enqueue("q", vec![job("job 3")]).await.unwrap();
    stop(&broker);
    let (broker, report) = open_with(
        Arc::new(DirStorage::open(dir.path()).unwrap()),
        StoreConfig::default(),
    )
    .expect("the log after a dropped headerless segment opens");
    assert!(report.truncated.is_empty(), "{:?}", report.truncated);
    assert_eq!(broker.list_jobs("q", None, 10, "").unwrap().0.len(), 3);
    stop(&broker);
}

/// The base of the newest snapshot in `dir`: the segment the broker appends to next.
fn snapshot_base(dir: &Path) -> u64 {
    log_files(dir)
        .iter()
        .filter_map(|(name, _)| {
            name.strip_prefix("snap-")?
                .strip_suffix(".wal")?
                .parse()
                .ok()
        })
        .max()
        .expect("a snapshot")
}

/// The log's files in `dir` (segments and complete snapshots) with their sizes. A file the
/// compactor deletes meanwhile counts as empty.
fn log_files(dir: &Path) -> Vec<(String, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, e.metadata().map_or(0, |m| m.len()))
        })
        .filter(|(name, _)| name.ends_with(".wal"))
        .collect()
}

/// The bytes of the log's files in `dir`, snapshots included.
fn wal_bytes(dir: &Path) -> u64 {
    log_files(dir).iter().map(|(_, len)| len).sum()
}

/// The size of the biggest complete snapshot file in `dir` (0 if none).
fn largest_snapshot(dir: &Path) -> u64 {
    log_files(dir)
        .into_iter()
        .filter(|(name, _)| name.starts_with("snap-"))
        .map(|(_, len)| len)
        .max()
        .unwrap_or(0)
}

/// 8 KiB segments, so a few hundred kilobytes of records make compaction run.
fn small_segments() -> StoreConfig {
    StoreConfig {
        segment_bytes: 8192,
        ..StoreConfig::default()
    }
}

/// Waits until `done` succeeds (compaction, the WAL writer run in the background), bounded
/// (20 s); a timeout fails with `done`'s last message.
async fn wait_until(done: impl Fn() -> Result<(), String>) {
    eventually_within(Duration::from_secs(20), || std::future::ready(done())).await
}

#[tokio::test]
async fn compaction_keeps_the_log_proportional_to_the_live_data() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_segments();
    let storage = || Arc::new(DirStorage::open(dir.path()).unwrap());
    let (broker, _) = open_with(storage(), config.clone()).unwrap();
    broker
        .create_queue(
            "churn",
            PolicyPatch {
                history_limit: Some(10),
                ..PolicyPatch::default()
            },
        )
        .await
        .unwrap();
    // A queue only a worker named (a typo): it holds nothing and its creation is not
    // logged, so the snapshot leaves it out as the log does.
    assert!(
        broker
            .lease("churm", lease_params(1))
            .await
            .unwrap()
            .is_empty()
    );
    let body = "b".repeat(200);
    for _ in 0..300 {
        let jobs = (0..10).map(|_| job(&body)).collect();
        broker.enqueue("churn", jobs).await.unwrap();
        let got = broker.lease("churn", lease_params(10)).await.unwrap();
        let acks = got.iter().map(|d| (d.lease_id.to_string(), None)).collect();
        broker.ack(acks).await.unwrap();
    }
    let kept: Vec<_> = broker
        .enqueue("churn", (0..5).map(|i| job(&format!("keep {i}"))).collect())
        .await
        .unwrap();
    // About 1 MB went through the log; the live data is 5 jobs and 10 in history.
    // Compaction runs in the background: wait for it, bounded.
    wait_until(|| {
        let held = wal_bytes(dir.path());
        (held <= 64 * 1024)
            .then_some(())
            .ok_or(format!("the log still holds {held} bytes"))
    })
    .await;
    stop(&broker);

    let (broker, report) = open_with(storage(), config).unwrap();
    assert!(report.snapshot.is_some());
    let names: Vec<String> = broker.list_queues().into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["churn"]);
    let (live, _) = broker.list_jobs("churn", None, 100, "").unwrap();
    let ids: Vec<_> = live.iter().map(|j| j.id).collect();
    assert_eq!(ids, kept.iter().map(|k| k.id).collect::<Vec<_>>());
    let history = broker.job_history("churn", 100).unwrap();
    assert_eq!(history.len(), 10);
    assert!(history.iter().all(|j| j.state == JobState::Completed));
    stop(&broker);
}

#[tokio::test]
async fn retained_topic_messages_survive_a_snapshot() {
    use futures::StreamExt;
    use sluice::broker::testing::{Pattern, Start, SubscribeSpec};

    let dir = tempfile::tempdir().unwrap();
    let config = small_segments();
    let storage = || Arc::new(DirStorage::open(dir.path()).unwrap());
    let (broker, _) = open_with(storage(), config.clone()).unwrap();
    let retention = Retention {
        max_messages: 300,
        ..Retention::default()
    };
    broker.create_topic("events", retention).await.unwrap();
    // 2,000 messages of 200 B in blocks of 40: the last 300 are retained, starting inside
    // a block, and more than one snapshot entry (256 messages) holds them.
    let body = "m".repeat(200);
    for batch in 0..50 {
        let messages = (0..40)
            .map(|i| NewMessage {
                payload: Bytes::from(body.clone()),
                key: if i % 2 == 0 {
                    format!("k{batch}-{i}")
                } else {
                    String::new()
                },
                headers: if i % 3 == 0 {
                    [("n".to_string(), i.to_string())].into()
                } else {
                    Default::default()
                },
                ..NewMessage::default()
            })
            .collect();
        broker.publish("events", messages).await.unwrap();
    }
    // Compaction runs in the background, as often as the log outgrows twice the last
    // snapshot; wait (bounded) for a snapshot that holds all 300 retained payloads, so
    // it was captured with the oldest block partly evicted.
    wait_until(|| {
        let largest = largest_snapshot(dir.path());
        (largest >= 300 * 200).then_some(()).ok_or(format!(
            "no snapshot holds the retained messages; the largest has {largest} bytes"
        ))
    })
    .await;
    stop(&broker);

    let (broker, report) = open_with(storage(), config).unwrap();
    assert!(report.snapshot.is_some());
    let mut subscription = broker
        .subscribe(SubscribeSpec {
            pattern: Pattern::parse("pattern", "events").unwrap(),
            start: Start::Earliest,
            resume_from: Default::default(),
            on_gap: Default::default(),
            max_batch: 1000,
        })
        .unwrap();
    let batch = subscription.next().await.unwrap().unwrap();
    let got: Vec<(u64, String, Option<String>)> = batch
        .messages
        .iter()
        .flat_map(|s| s.messages())
        .map(|m| {
            let header = m.entry.headers().and_then(|h| h.get("n").cloned());
            (m.sequence, m.entry.key().to_owned(), header)
        })
        .collect();
    let expected: Vec<(u64, String, Option<String>)> = (1701..=2000u64)
        .map(|seq| {
            let (batch, i) = ((seq - 1) / 40, (seq - 1) % 40);
            let key = if i % 2 == 0 {
                format!("k{batch}-{i}")
            } else {
                String::new()
            };
            (seq, key, (i % 3 == 0).then(|| i.to_string()))
        })
        .collect();
    assert_eq!(got, expected);
    stop(&broker);
}

/// A log of 1,800 jobs (150 of them acked) in a snapshot and several segments: 600 jobs
/// before a restart (so its snapshot holds them), 1,200 after it in 8 KiB segments that
/// are never compacted. Returns the directory with the broker stopped.
async fn snapshot_and_segments() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        segment_bytes: 8192,
        compact_after_bytes: Some(u64::MAX),
        ..StoreConfig::default()
    };
    for (round, batches) in [(0, 6), (1, 12)] {
        let (broker, _) = open_with(
            Arc::new(DirStorage::open(dir.path()).unwrap()),
            config.clone(),
        )
        .unwrap();
        for b in 0..batches {
            let jobs = (0..100)
                .map(|i| job(&format!("round {round} batch {b} job {i}")))
                .collect();
            broker.enqueue("q", jobs).await.unwrap();
        }
        if round == 1 {
            let got = broker.lease("q", lease_params(150)).await.unwrap();
            let acks = got.iter().map(|d| (d.lease_id.to_string(), None)).collect();
            broker.ack(acks).await.unwrap();
        }
        stop(&broker);
    }
    dir
}

/// A copy of the log files of `from` (not its lock) in a new directory.
fn copy_log(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "LOCK" {
            std::fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
        }
    }
    to
}

/// Jobs the broker holds in queue `q`: live ones plus finished ones (its history).
fn jobs_held(broker: &Broker) -> usize {
    let c = &broker.stats(&["q".into()], &[]).queues[0].1;
    let live = c.pending + c.scheduled + c.leased + c.retrying;
    live as usize + broker.job_history("q", 1000).unwrap().len()
}

/// How many of queue `q`'s jobs are acked (in its history).
fn acked(broker: &Broker) -> usize {
    broker.job_history("q", 1000).unwrap().len()
}

#[tokio::test]
async fn a_missing_snapshot_or_segment_is_named_and_refused_unless_repair() {
    let pristine = snapshot_and_segments().await;
    let segments: Vec<String> = {
        let mut names: Vec<String> = log_files(pristine.path())
            .into_iter()
            .map(|(name, _)| name)
            .filter(|n| !n.starts_with("snap-"))
            .collect();
        names.sort();
        names
    };
    assert!(
        segments.len() >= 4,
        "a log of several segments: {segments:?}"
    );
    let snapshot = format!("snap-{:020}.wal", snapshot_base(pristine.path()));
    {
        let whole = copy_log(pristine.path());
        let broker = open(whole.path());
        assert_eq!(jobs_held(&broker), 1800, "the complete log");
        assert_eq!(acked(&broker), 150);
        stop(&broker);
    }
    let cases = [
        ("the snapshot", snapshot.clone()),
        ("a middle segment", segments[segments.len() / 2].clone()),
        ("the newest segment", segments.last().unwrap().clone()),
    ];
    for (what, file) in cases {
        let dir = copy_log(pristine.path());
        std::fs::remove_file(dir.path().join(&file)).unwrap();
        let storage = || Arc::new(DirStorage::open(dir.path()).unwrap());
        let refused = open_with(storage(), StoreConfig::default())
            .err()
            .unwrap_or_else(|| panic!("deleting {what} ({file}): the broker started"));
        let message = refused.to_string();
        assert!(
            matches!(refused, RecoveryError::Missing { .. })
                && message.contains(&file)
                && message.contains("MANIFEST")
                && message.contains("--repair"),
            "deleting {what}: {message}"
        );
        // The refusal changed nothing: it refuses again, the same way.
        let again = open_with(storage(), StoreConfig::default()).err().unwrap();
        assert_eq!(again.to_string(), message);

        let (broker, report) = open_with(
            storage(),
            StoreConfig {
                repair: true,
                ..StoreConfig::default()
            },
        )
        .unwrap();
        assert_eq!(report.missing, vec![file.clone()], "deleting {what}");
        let storage_stats = broker.stats(&[], &[]).storage;
        assert!(storage_stats.recovery.files_repaired >= 1);
        let (held, acked) = (jobs_held(&broker), acked(&broker));
        assert!(
            held < 1800 || acked < 150,
            "deleting {what} lost nothing: {held} jobs, {acked} acked"
        );
        println!("{message}");
        println!(
            "deleting {what} ({file}): refused; with --repair started with {held} of 1800 jobs, {acked} of 150 acked"
        );
        stop(&broker);
        // The repaired log is whole again: it starts without --repair, with the same jobs.
        let broker = open(dir.path());
        assert_eq!(jobs_held(&broker), held, "after repairing {what}");
        stop(&broker);
    }
}

#[tokio::test]
async fn a_data_directory_without_a_manifest_starts_and_gets_one() {
    let pristine = snapshot_and_segments().await;
    let legacy = copy_log(pristine.path());
    std::fs::remove_file(legacy.path().join("MANIFEST")).unwrap();
    let broker = open(legacy.path());
    assert_eq!(jobs_held(&broker), 1800);
    stop(&broker);
    assert!(
        legacy.path().join("MANIFEST").exists(),
        "a manifest is written"
    );
    let broker = open(legacy.path());
    assert_eq!(jobs_held(&broker), 1800);
    stop(&broker);

    // Without a manifest, the numbering still shows a segment missing in the middle.
    let gap = copy_log(pristine.path());
    std::fs::remove_file(gap.path().join("MANIFEST")).unwrap();
    let mut segments: Vec<String> = log_files(gap.path())
        .into_iter()
        .map(|(name, _)| name)
        .filter(|n| !n.starts_with("snap-"))
        .collect();
    segments.sort();
    let middle = segments[segments.len() / 2].clone();
    std::fs::remove_file(gap.path().join(&middle)).unwrap();
    let refused = open_with(
        Arc::new(DirStorage::open(gap.path()).unwrap()),
        StoreConfig::default(),
    )
    .err()
    .expect("a gap in the numbering is refused");
    assert!(refused.to_string().contains(&middle), "{refused}");
}

/// Waits (bounded, 10 s) until gRPC health says NOT_SERVING for the broker service and
/// the whole server, and `/healthz` answers 503; returns the `/healthz` body.
async fn wait_not_serving(served: &ops_common::Harness) -> String {
    use tonic_health::pb::health_check_response::ServingStatus;
    eventually(|| async {
        let grpc = [
            health(&served.url(), "").await,
            health(&served.url(), "sluice.v1.Broker").await,
        ];
        let http = ops_common::http_get(served.http, "/healthz").await;
        if grpc == [ServingStatus::NotServing; 2] && http.status == 503 {
            Ok(http.body)
        } else {
            Err(format!(
                "still serving: gRPC {grpc:?}, /healthz {} {:?}",
                http.status, http.body
            ))
        }
    })
    .await
}

fn spec(payload: &str) -> sluice::pb::JobSpec {
    sluice::pb::JobSpec {
        payload: Bytes::from(payload.to_owned()),
        ..sluice::pb::JobSpec::default()
    }
}

#[tokio::test]
async fn a_fail_stopped_broker_is_not_serving_and_never_shows_what_it_refused() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let fault = Arc::new(DiskFault {
        enospc: true,
        stall: AtomicBool::new(true),
        ..DiskFault::default()
    });
    let storage = HookedStorage::open(dir.path(), fault.clone());
    let (broker, _) = open_with(storage, StoreConfig::default()).unwrap();
    let served = ops_common::Harness::serve(broker.clone(), 1000).await;
    let kept = broker.enqueue("q", vec![job("kept")]).await.unwrap()[0].id;
    let message = |p: &str| NewMessage {
        payload: Bytes::from(p.to_owned()),
        ..NewMessage::default()
    };
    broker.publish("t", vec![message("kept")]).await.unwrap();
    assert_eq!(health(&served.url(), "").await, ServingStatus::Serving);
    assert_eq!(
        ops_common::http_get(served.http, "/healthz").await.status,
        200
    );

    // The disk fills while changes are in flight: they are applied in memory and
    // appended, and the write that fails holds until all of them are.
    fault.fail.store(true, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let jobs = (0..10).map(|j| job(&format!("refused {i}.{j}"))).collect();
                let queue = if i % 4 == 0 { "new-queue" } else { "q" };
                broker.enqueue(queue, jobs).await.map(|_| ())
            } else {
                let refused = message(&format!("refused {i}"));
                broker.publish("t", vec![refused]).await.map(|_| ())
            }
        }));
    }
    let in_flight = || {
        let stats = broker.stats(&[], &[]);
        let pending: Vec<(&str, u64)> = stats
            .queues
            .iter()
            .map(|(name, c)| (name.as_str(), c.pending))
            .collect();
        let last = stats.topics[0].last_sequence;
        (pending == [("new-queue", 40), ("q", 41)] && last == 9)
            .then_some(())
            .ok_or(format!("in flight: {pending:?}, topic at {last}"))
    };
    wait_until(in_flight).await;
    fault.stall.store(false, Ordering::SeqCst);
    for task in tasks {
        assert_unavailable(task.await.unwrap(), "a change racing the failure");
    }

    // Once refused, nothing of it shows: not in ListJobs, Stats, ListQueues.
    let mut client = served.rpc().await;
    let listed = rpc::list_jobs(&mut client, "q").await;
    let listed: Vec<&[u8]> = listed.iter().map(|j| j.payload.as_ref()).collect();
    assert_eq!(
        listed,
        [&b"kept"[..]],
        "ListJobs shows only the acknowledged job"
    );
    let stats = rpc::stats(&mut client).await;
    let queues: Vec<(&str, u64)> = stats
        .queues
        .iter()
        .map(|q| (q.name.as_str(), q.pending))
        .collect();
    assert_eq!(queues, [("q", 1)], "Stats shows no refused job or queue");
    assert_eq!(stats.topics.len(), 1);
    assert_eq!(
        (
            stats.topics[0].last_sequence,
            stats.topics[0].retained_messages
        ),
        (1, 1),
        "Stats shows no refused message"
    );
    let storage = stats.storage.expect("storage stats");
    assert!(storage.failed);
    assert!(
        storage.failure_reason.contains("fail-stop")
            && storage.failure_reason.contains("os error 28"),
        "{}",
        storage.failure_reason
    );
    let got = rpc::get_job(&mut client, &kept.to_string(), "").await;
    assert_eq!(got.payload.as_ref(), b"kept");
    let names: Vec<String> = broker.list_queues().into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["q"]);
    let read = broker.stats(&[], &["t".into()]);
    assert_eq!(read.topics[0].last_sequence, 1);

    // Health tells load balancers to go elsewhere, with the reason.
    let body = wait_not_serving(&served).await;
    assert!(
        body.contains("fail-stop") && body.contains("os error 28"),
        "/healthz: {body}"
    );
    stop(&broker);

    // A restart shows the same: what was acknowledged, nothing refused.
    let broker = open(dir.path());
    let names: Vec<String> = broker.list_queues().into_iter().map(|q| q.name).collect();
    assert_eq!(names, ["q"]);
    assert_eq!(broker.list_jobs("q", None, 100, "").unwrap().0.len(), 1);
    assert_eq!(broker.stats(&[], &["t".into()]).topics[0].last_sequence, 1);
    stop(&broker);
}

#[tokio::test]
async fn a_restart_on_a_disk_that_refuses_writes_serves_reads_and_refuses_changes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    let ids: Vec<_> = broker
        .enqueue("q", vec![job("a"), job("b"), job("c")])
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    stop(&broker);

    // The disk is full (or read-only): no file can be created, written, cut or renamed.
    let fault = DiskFault {
        fail: AtomicBool::new(true),
        enospc: true,
        all_writes: true,
        ..DiskFault::default()
    };
    let storage = HookedStorage::open(dir.path(), Arc::new(fault));
    let (broker, _) = open_with(storage, StoreConfig::default())
        .expect("a broker on a full disk starts, read-only");
    let served = ops_common::Harness::serve(broker.clone(), 1000).await;
    let mut client = served.rpc().await;
    let got = rpc::get_job(&mut client, &ids[1].to_string(), "q").await;
    assert_eq!(got.payload.as_ref(), b"b");
    let listed = rpc::list_jobs(&mut client, "q").await;
    assert_eq!(listed.len(), 3);
    let stats = rpc::stats(&mut client).await;
    assert_eq!(stats.queues[0].pending, 3);
    let storage = stats.storage.expect("storage stats");
    assert!(storage.failed, "{storage:?}");
    assert!(
        storage.failure_reason.contains("startup"),
        "{}",
        storage.failure_reason
    );
    let refused = client
        .enqueue(sluice::pb::EnqueueRequest {
            queue: "q".into(),
            jobs: vec![spec("d")],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("fail-stop"), "{refused:?}");
    let body = wait_not_serving(&served).await;
    assert!(body.contains("startup"), "/healthz: {body}");
    stop(&broker);

    // Nothing on disk changed: a restart on a good disk has the same jobs.
    let broker = open(dir.path());
    assert_eq!(broker.list_jobs("q", None, 10, "").unwrap().0.len(), 3);
    stop(&broker);
}

#[tokio::test]
async fn queue_limits_survive_a_restart_and_still_hold() {
    use sluice::broker::testing::RateLimit;

    let dir = tempfile::tempdir().unwrap();
    {
        let broker = open(dir.path());
        broker
            .create_queue(
                "emails",
                PolicyPatch {
                    rate_limit: Some(RateLimit {
                        per_second: 1,
                        burst: 0,
                    }),
                    ..PolicyPatch::default()
                },
            )
            .await
            .unwrap();
        broker
            .update_queue(
                "emails",
                PolicyPatch {
                    max_in_flight: Some(2),
                    ..PolicyPatch::default()
                },
            )
            .await
            .unwrap();
        broker
            .enqueue("emails", (0..5).map(|i| job(&format!("{i}"))).collect())
            .await
            .unwrap();
        stop(&broker);
    }
    let broker = open(dir.path());
    let emails = broker
        .list_queues()
        .into_iter()
        .find(|q| q.name == "emails")
        .unwrap();
    assert_eq!(
        emails.policy.rate_limit,
        Some(RateLimit {
            per_second: 1,
            burst: 1,
        })
    );
    assert_eq!(emails.policy.max_in_flight, Some(2));
    // A restarted bucket is full (one token): one job, not the two slots' worth.
    let leased = broker.lease("emails", lease_params(10)).await.unwrap();
    assert_eq!(leased.len(), 1);
    stop(&broker);
}
