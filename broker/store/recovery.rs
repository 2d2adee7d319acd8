//! Recovery: rebuilds queues and topics from the newest snapshot and the segments after
//! it.
//!
//! Damage handling: the newest segment may end in a torn write (the broker died while
//! appending): a bad frame there with no valid frame after it is cut off, since no request
//! was acknowledged for it (its fsync never returned). Any other bad frame (in an older
//! segment, in a snapshot, or followed by valid frames) is damage to acknowledged data,
//! and the broker refuses to start, naming the file and offset, unless `--repair` asks it
//! to cut the log at the first bad record (files after it are renamed `*.damaged`).

use std::collections::{BTreeMap, HashMap, VecDeque};

use prost::Message as _;
use uuid::Uuid;

use super::Storage;
use super::record::{
    FILE_MAGIC, FrameError, Kind, job_from_image, pb, policy_from_pb, read_frame, state_from_pb,
    valid_frame_after,
};
use super::wal::{parse_segment, parse_snapshot};
use crate::broker::queue::{Job, Queue, QueuePolicy};
use crate::broker::time::Millis;
use crate::broker::topic::{BlockEntry, Retention, Topic};

/// Why the broker refuses to start on its data directory.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecoveryError {
    /// A file could not be listed, read, truncated or renamed.
    #[error("cannot recover the write-ahead log: {0}")]
    Io(String),
    /// A record is damaged outside the tail of the newest segment.
    #[error(
        "write-ahead log file {file} is damaged at byte offset {offset}: {reason}. Refusing to start, because acknowledged data would be lost; restore the data directory from a backup, or start once with --repair (SLUICE_REPAIR=true) to cut the log at this record, dropping it and every record after it"
    )]
    Damaged {
        /// The file's path.
        file: String,
        /// Byte offset of the first bad record.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// What recovery found and did, for the startup log line.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// The snapshot it started from (its base segment).
    pub snapshot: Option<u64>,
    /// Segments replayed after it.
    pub segments: usize,
    /// Records applied.
    pub entries: u64,
    /// Torn tails cut off, and repairs made: one line each, with file and bytes dropped.
    pub truncated: Vec<String>,
    /// Records that referred to a job or queue that no longer existed (ignored).
    pub anomalies: u64,
}

/// The recovered state.
pub(crate) struct Recovered {
    pub queues: Vec<Queue>,
    pub topics: Vec<Topic>,
    /// The segment the new log starts with.
    pub next_segment: u64,
    pub report: RecoveryReport,
}

enum Scan {
    Clean,
    Torn(usize),
    Damaged(usize, String),
}

/// Applies every record of `data` in order; stops at the first bad one.
fn scan(data: &[u8], newest: bool, mut apply: impl FnMut(pb::Entry)) -> Scan {
    if data.len() < FILE_MAGIC.len() || &data[..FILE_MAGIC.len()] != FILE_MAGIC {
        let torn = newest && data.len() < FILE_MAGIC.len() && FILE_MAGIC.starts_with(data);
        return if torn {
            Scan::Torn(0)
        } else {
            Scan::Damaged(
                0,
                "bad file header (not a Sluice WAL file, or overwritten)".into(),
            )
        };
    }
    let mut at = FILE_MAGIC.len();
    while at < data.len() {
        match read_frame(data, at) {
            Ok((payload, next)) => match pb::Entry::decode(payload) {
                Ok(entry) => {
                    apply(entry);
                    at = next;
                }
                Err(e) => {
                    return Scan::Damaged(
                        at,
                        format!("record passes its checksum but does not decode: {e}"),
                    );
                }
            },
            Err(err) => {
                if newest && !valid_frame_after(data, at + 1) {
                    return Scan::Torn(at);
                }
                let reason = match err {
                    FrameError::Truncated => "record extends past the end of the file".to_owned(),
                    FrameError::Corrupt(why) => why,
                };
                return Scan::Damaged(at, format!("{reason} (valid records follow it)"));
            }
        }
    }
    Scan::Clean
}

/// Rebuilds state from `storage`. `now` decides what is due, expired or out of retention.
pub(crate) fn recover(
    storage: &dyn Storage,
    repair: bool,
    now: Millis,
) -> Result<Recovered, RecoveryError> {
    let io = |what: String, e: std::io::Error| RecoveryError::Io(format!("{what}: {e}"));
    let names = storage
        .list()
        .map_err(|e| io(format!("cannot list {}", storage.describe("")), e))?;
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    for name in names {
        if name.ends_with(".tmp") {
            // An interrupted snapshot: the segments it would replace are all still there.
            storage
                .remove(&name)
                .map_err(|e| io(format!("cannot delete {}", storage.describe(&name)), e))?;
        } else if let Some(id) = parse_snapshot(&name) {
            snapshots.push(id);
        } else if let Some(id) = parse_segment(&name) {
            segments.push(id);
        }
    }
    segments.sort_unstable();
    snapshots.sort_unstable();

    let mut replay = Replay::default();
    let mut report = RecoveryReport::default();
    let base = snapshots.last().copied();
    if let Some(base) = base {
        let name = super::wal::snapshot_name(base);
        let data = storage
            .read(&name)
            .map_err(|e| io(format!("cannot read {}", storage.describe(&name)), e))?;
        let mut complete = false;
        let outcome = scan(&data, false, |entry| {
            complete |= entry
                .ops
                .iter()
                .any(|o| matches!(o.op, Some(Kind::SnapshotEnd(_))));
            replay.apply(entry);
        });
        let damage = match outcome {
            Scan::Clean if complete => None,
            Scan::Clean => Some((data.len(), "snapshot has no end record".to_owned())),
            Scan::Torn(at) => Some((at, "snapshot is cut short".to_owned())),
            Scan::Damaged(at, why) => Some((at, why)),
        };
        if let Some((offset, reason)) = damage {
            if !repair {
                return Err(RecoveryError::Damaged {
                    file: storage.describe(&name),
                    offset: offset as u64,
                    reason,
                });
            }
            let line = format!(
                "--repair: snapshot {} is damaged at byte offset {offset} ({reason}); kept the {offset} bytes before it, dropped {} bytes",
                storage.describe(&name),
                data.len() - offset
            );
            tracing::warn!("{line}");
            report.truncated.push(line);
        }
        report.snapshot = Some(base);
        for old in snapshots.iter().filter(|s| **s < base) {
            let _ = storage.remove(&super::wal::snapshot_name(*old));
        }
    }
    let base_id = base.unwrap_or(0);
    for old in segments.iter().filter(|s| **s < base_id) {
        // Left over from a compaction that stopped before deleting them; the snapshot
        // already holds everything they held.
        let _ = storage.remove(&super::wal::segment_name(*old));
    }
    let live: Vec<u64> = segments.iter().copied().filter(|s| *s >= base_id).collect();
    for (i, id) in live.iter().enumerate() {
        let name = super::wal::segment_name(*id);
        let newest = i + 1 == live.len();
        let data = storage
            .read(&name)
            .map_err(|e| io(format!("cannot read {}", storage.describe(&name)), e))?;
        report.segments += 1;
        let cut = match scan(&data, newest, |entry| {
            report.entries += 1;
            replay.apply(entry);
        }) {
            Scan::Clean => None,
            Scan::Torn(at) => {
                let line = format!(
                    "torn tail: cut {} bytes (an unacknowledged, partly written record) from {} at byte offset {at}",
                    data.len() - at,
                    storage.describe(&name)
                );
                tracing::warn!("{line}");
                report.truncated.push(line);
                Some(at)
            }
            Scan::Damaged(at, reason) => {
                if !repair {
                    return Err(RecoveryError::Damaged {
                        file: storage.describe(&name),
                        offset: at as u64,
                        reason,
                    });
                }
                let mut line = format!(
                    "--repair: {} is damaged at byte offset {at} ({reason}); dropped its last {} bytes",
                    storage.describe(&name),
                    data.len() - at
                );
                for later in &live[i + 1..] {
                    let later_name = super::wal::segment_name(*later);
                    let damaged = format!("{later_name}.damaged");
                    storage.rename(&later_name, &damaged).map_err(|e| {
                        io(
                            format!("cannot rename {}", storage.describe(&later_name)),
                            e,
                        )
                    })?;
                    line.push_str(&format!(
                        "; set aside the later segment {} as {damaged}",
                        storage.describe(&later_name)
                    ));
                }
                tracing::warn!("{line}");
                report.truncated.push(line);
                Some(at)
            }
        };
        if let Some(at) = cut {
            if at <= FILE_MAGIC.len() {
                storage
                    .remove(&name)
                    .map_err(|e| io(format!("cannot delete {}", storage.describe(&name)), e))?;
            } else {
                storage
                    .truncate(&name, at as u64)
                    .map_err(|e| io(format!("cannot truncate {}", storage.describe(&name)), e))?;
            }
            if !newest {
                break;
            }
        }
    }
    storage
        .sync_dir()
        .map_err(|e| io(format!("cannot fsync {}", storage.describe("")), e))?;
    report.anomalies = replay.anomalies;
    let next_segment = segments.last().map_or(1, |s| s + 1).max(base_id).max(1);
    let (queues, topics) = replay.finish(now);
    Ok(Recovered {
        queues,
        topics,
        next_segment,
        report,
    })
}

struct RQueue {
    policy: QueuePolicy,
    paused: bool,
    /// By recovery seq: enqueue order as the log tells it.
    jobs: BTreeMap<u64, Job>,
    ids: HashMap<Uuid, u64>,
    next: u64,
    /// Finished jobs' seqs, in finish order.
    history: VecDeque<u64>,
    dedup: HashMap<String, (Uuid, Millis)>,
}

impl RQueue {
    fn new(name: &str) -> Self {
        Self {
            policy: QueuePolicy::default_for(name),
            paused: false,
            jobs: BTreeMap::new(),
            ids: HashMap::new(),
            next: 1,
            history: VecDeque::new(),
            dedup: HashMap::new(),
        }
    }

    fn remove(&mut self, id: &Uuid) -> Option<Job> {
        let seq = self.ids.remove(id)?;
        let job = self.jobs.remove(&seq)?;
        if job.state.is_finished() {
            self.history.retain(|s| *s != seq);
        }
        Some(job)
    }

    fn insert(&mut self, job: Job) {
        let seq = self.next;
        self.next += 1;
        self.ids.insert(job.id, seq);
        let finished = job.state.is_finished();
        self.jobs.insert(seq, job);
        if finished {
            self.finished(seq);
        }
    }

    fn finished(&mut self, seq: u64) {
        self.history.push_back(seq);
        while self.history.len() > self.policy.history_limit as usize {
            let old = self.history.pop_front().expect("non-empty history");
            if let Some(job) = self.jobs.remove(&old) {
                self.ids.remove(&job.id);
            }
        }
    }
}

#[derive(Default)]
struct Replay {
    queues: HashMap<String, RQueue>,
    topics: HashMap<String, Topic>,
    anomalies: u64,
}

fn uuid(bytes: &[u8]) -> Option<Uuid> {
    Uuid::from_slice(bytes).ok()
}

impl Replay {
    fn queue(&mut self, name: &str) -> &mut RQueue {
        self.queues
            .entry(name.to_owned())
            .or_insert_with(|| RQueue::new(name))
    }

    fn topic(&mut self, name: &str) -> &mut Topic {
        self.topics
            .entry(name.to_owned())
            .or_insert_with(|| Topic::new(name, Retention::default()))
    }

    fn apply(&mut self, entry: pb::Entry) {
        let at = entry.at;
        for op in entry.ops {
            let Some(op) = op.op else { continue };
            if !self.apply_op(at, op) {
                self.anomalies += 1;
            }
        }
    }

    /// Applies one op; false if it referred to something that does not exist.
    fn apply_op(&mut self, at: Millis, op: Kind) -> bool {
        match op {
            Kind::QueueDef(def) => {
                let q = self.queue(&def.name);
                if let Some(p) = def.policy {
                    q.policy = policy_from_pb(p);
                }
                q.paused = def.paused;
            }
            Kind::QueueDelete(d) => return self.queues.remove(&d.name).is_some(),
            Kind::QueuePaused(p) => self.queue(&p.name).paused = p.paused,
            Kind::Job(image) => {
                let name = image.queue.clone();
                let Some(job) = job_from_image(image) else {
                    return false;
                };
                let q = self.queue(&name);
                q.remove(&job.id);
                if let Some(key) = &job.idempotency_key {
                    let expires = job.enqueued_at.saturating_add(q.policy.dedup_window_ms);
                    q.dedup.insert(key.clone(), (job.id, expires));
                }
                q.insert(job);
            }
            Kind::JobUpdate(u) => {
                let (Some(id), Some(state)) = (uuid(&u.id), state_from_pb(u.state)) else {
                    return false;
                };
                let Some(q) = self.queues.get_mut(&u.queue) else {
                    return false;
                };
                let Some(&seq) = q.ids.get(&id) else {
                    return false;
                };
                let job = q.jobs.get_mut(&seq).expect("indexed job exists");
                let was_finished = job.state.is_finished();
                job.state = state;
                job.attempts = u.attempts;
                job.run_at = u.run_at;
                job.updated_at = at;
                job.last_error = u.last_error;
                job.result = u.result;
                job.dead_letter_queue = u.dead_letter_queue;
                if state.is_finished() && !was_finished {
                    job.finished_at = Some(at);
                    q.finished(seq);
                }
            }
            Kind::Transfer(t) => {
                let Some(id) = uuid(&t.id) else {
                    return false;
                };
                let q = self.queue(&t.target);
                q.remove(&id);
                let mut job = Job::restored(id, t.kind, t.payload, t.headers);
                job.priority = t.priority.min(9) as u8;
                job.origin = t.origin;
                job.max_attempts = q.policy.max_attempts;
                job.enqueued_at = at;
                job.run_at = at;
                job.updated_at = at;
                q.insert(job);
            }
            Kind::JobRemove(r) => {
                let Some(id) = uuid(&r.id) else {
                    return false;
                };
                let Some(q) = self.queues.get_mut(&r.queue) else {
                    return false;
                };
                return q.remove(&id).is_some();
            }
            Kind::DedupKey(d) => {
                let Some(id) = uuid(&d.id) else {
                    return false;
                };
                self.queue(&d.queue).dedup.insert(d.key, (id, d.expires));
            }
            Kind::TopicDef(def) => {
                let retention = Retention {
                    max_messages: def.max_messages,
                    max_bytes: def.max_bytes,
                    max_age_ms: def.max_age_ms,
                };
                let topic = self
                    .topics
                    .entry(def.name.clone())
                    .or_insert_with(|| Topic::new(&def.name, retention));
                topic.set_retention(retention, at);
                if def.next_seq > 0 {
                    topic.restore_next_seq(def.next_seq);
                }
            }
            Kind::TopicDelete(d) => return self.topics.remove(&d.name).is_some(),
            Kind::Publish(p) => {
                let topic = self.topic(&p.topic);
                for m in p.messages {
                    let entry = BlockEntry::new(m.key, m.headers, m.payload);
                    topic.restore_message(m.sequence, m.publish_time, entry, m.idempotency_key);
                }
            }
            Kind::TopicDedupKey(d) => {
                self.topic(&d.topic)
                    .restore_dedup(d.key, d.sequence, d.expires);
            }
            Kind::SnapshotBegin(_) | Kind::SnapshotEnd(_) => {}
        }
        true
    }

    fn finish(self, now: Millis) -> (Vec<Queue>, Vec<Topic>) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (name, mut rq) in self.queues {
            let mut queue = Queue::new(&name, rq.policy.clone());
            queue.set_paused(rq.paused);
            let finished: Vec<u64> = rq.history.iter().copied().collect();
            let live: Vec<u64> = rq
                .jobs
                .iter()
                .filter(|(_, j)| !j.state.is_finished())
                .map(|(s, _)| *s)
                .collect();
            for seq in live.into_iter().chain(finished) {
                if let Some(job) = rq.jobs.remove(&seq) {
                    queue.restore_job(now, job);
                }
            }
            let mut dedup: Vec<(String, Uuid, Millis)> = rq
                .dedup
                .into_iter()
                .filter(|(_, (_, expires))| *expires > now)
                .map(|(k, (id, e))| (k, id, e))
                .collect();
            dedup.sort_by_key(|d| d.2);
            for (key, id, expires) in dedup {
                queue.restore_dedup(key, id, expires);
            }
            queues.push(queue);
        }
        let topics = self
            .topics
            .into_values()
            .map(|mut t| {
                t.enforce_retention(now);
                t
            })
            .collect();
        (queues, topics)
    }
}
