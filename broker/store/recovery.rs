//! Recovery: rebuilds queues and topics from the newest snapshot and the segments after
//! it.
//!
//! Missing files: the MANIFEST (see `manifest`) names the current snapshot and the newest
//! segment, and segments are numbered consecutively from the snapshot's base, so a
//! missing snapshot or segment is named, and the broker refuses to start unless
//! `--repair` asks it to start with the files that are there. A data directory from a
//! version without manifests is checked for consecutive numbering only, then given one.
//!
//! Damage handling: the newest segment may end in a torn write (the broker died while
//! appending): a bad frame there with no valid frame after it is cut off, since no request
//! was acknowledged for it (its fsync never returned). Any other bad frame (in an older
//! segment, in a snapshot, or followed by valid frames) is damage to acknowledged data,
//! and the broker refuses to start, naming the file and offset, unless `--repair` asks it
//! to cut the log at the first bad record (files after it are renamed `*.damaged`).
//!
//! After a storage failure the running broker reloads its state read-only (`reload`),
//! reading no further than where the writer knew the log was durable.

use std::collections::{BTreeMap, HashMap, VecDeque};

use prost::Message as _;
use uuid::Uuid;

use super::Storage;
use super::error::{FileOp, StoreError};
use super::manifest::{self, MANIFEST, Manifest};
use super::record::schemas;
use super::record::{
    FILE_MAGIC, FRAME_HEADER, FRAME_MAGIC, FrameError, Kind, MAX_FRAME, job_from_image, pb,
    policy_from_pb, read_frame, state_from_pb, valid_frame_after,
};
use super::schedule_record::{apply_run, schedule_from_pb};
use super::wal::{DurableEnd, parse_segment, parse_snapshot, segment_name, snapshot_name};
use crate::broker::domain::queue::{Job, Queue, QueuePolicy};
use crate::broker::domain::schedule::Schedule;
use crate::broker::domain::schema::{SchemaHistory, SchemaTarget};
use crate::broker::domain::time::Millis;
use crate::broker::domain::topic::{BlockEntry, Retention, Topic};

/// Why the broker refuses to start on its data directory.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecoveryError {
    /// A file could not be listed or read.
    #[error("cannot recover the write-ahead log: {0}")]
    Io(#[from] StoreError),
    /// The manifest cannot be read or is damaged; `--repair` rebuilds it.
    #[error(
        "cannot recover the write-ahead log: {0}. Refusing to start: it says which files make up the log; start once with --repair (SLUICE_REPAIR=true) to rebuild it from the files present"
    )]
    Manifest(StoreError),
    /// A reload was asked for while the log is still writable.
    #[error(
        "cannot recover the write-ahead log: the write-ahead log has not failed; nothing to reload"
    )]
    NotFailed,
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
    /// Files the log needs are not in the data directory.
    #[error(
        "the write-ahead log in {dir} is missing {}; {expected}. Refusing to start, because acknowledged data would be lost; restore the missing files from a backup, or start once with --repair (SLUICE_REPAIR=true) to start with the files that are there, losing what the missing ones held",
        .missing.join(", ")
    )]
    Missing {
        /// The data directory.
        dir: String,
        /// The missing files (a run of consecutive segments is one entry).
        missing: Vec<String>,
        /// What the manifest (or, without one, the numbering) says the log is made of.
        expected: String,
    },
}

/// What recovery found and did, for the startup log line and Stats.
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
    /// Bytes cut off as a torn tail (a record the broker died while writing).
    pub torn_tail_bytes: u64,
    /// Records (whole or partial) in those bytes.
    pub torn_tail_records: u64,
    /// Files `--repair` changed or did without: cut, set aside as `*.damaged`, missing.
    pub files_repaired: u64,
    /// Files the log needed but that were missing (only with `--repair`).
    pub missing: Vec<String>,
    /// Records that referred to a job or queue that no longer existed (ignored).
    pub anomalies: u64,
}

/// The recovered state.
pub(crate) struct Recovered {
    pub queues: Vec<Queue>,
    pub topics: Vec<Topic>,
    /// Recurring schedules, with their progress.
    pub schedules: Vec<Schedule>,
    /// Every target's schema revisions.
    pub schemas: Vec<(SchemaTarget, SchemaHistory)>,
    /// The segment the new log starts with.
    pub next_segment: u64,
    /// What the manifest on disk claims after recovery.
    pub claimed: Manifest,
    /// The first clean-up write (truncating a torn tail, deleting a leftover, rewriting
    /// the manifest) that failed: the state is complete, but the broker must not write.
    pub write_failure: Option<StoreError>,
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
        // The newest segment may have died while its header was written: part of it, then
        // nothing (or the zeros of a preallocated or reused segment).
        let matched = data
            .iter()
            .zip(FILE_MAGIC)
            .take_while(|(a, b)| a == b)
            .count();
        let torn = newest && all_zero(&data[matched..]);
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
                if all_zero(&data[at..]) {
                    // The space after the last record of a preallocated (or reused, hence
                    // zeroed) segment: the end of what was written to it.
                    return Scan::Clean;
                }
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

fn all_zero(data: &[u8]) -> bool {
    data.iter().all(|b| *b == 0)
}

/// How many bytes from `at` are torn: up to the end of the file, or in a preallocated
/// segment up to the zeros after the records whose headers are readable.
fn torn_bytes(data: &[u8], at: usize) -> usize {
    let mut i = at;
    while let Some(header) = data.get(i..i + FRAME_HEADER) {
        let magic = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        if magic != FRAME_MAGIC || len > MAX_FRAME {
            break;
        }
        i += FRAME_HEADER + len;
    }
    match data.get(i..) {
        Some(rest) if i > at && all_zero(rest) => i - at,
        // Not even a frame header: the bytes up to the zeros, if any.
        _ if i == at => data[at..]
            .iter()
            .rposition(|b| *b != 0)
            .map_or(0, |p| p + 1),
        _ => data.len() - at,
    }
}

/// How many records (whole or partial) the torn bytes from `at` held: frame headers are
/// followed while they are readable; unreadable bytes count as one partial record.
fn torn_records(data: &[u8], at: usize) -> u64 {
    let mut records = 0;
    let mut i = at;
    while i < data.len() {
        records += 1;
        let Some(header) = data.get(i..i + FRAME_HEADER) else {
            break;
        };
        let magic = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        if magic != FRAME_MAGIC || len > MAX_FRAME {
            break;
        }
        i += FRAME_HEADER + len;
    }
    records
}

/// The missing members of `first..=last` given the sorted `present` ids, one entry per
/// run of consecutive ids.
fn missing_segments(first: u64, last: u64, present: &[u64]) -> Vec<String> {
    let mut missing = Vec::new();
    let mut expect = first;
    let mut gap = |from: u64, to: u64| {
        missing.push(if from == to {
            segment_name(from)
        } else {
            format!(
                "{} to {} ({} segments)",
                segment_name(from),
                segment_name(to),
                to - from + 1
            )
        })
    };
    for &id in present.iter().filter(|id| (first..=last).contains(*id)) {
        if id > expect {
            gap(expect, id - 1);
        }
        expect = id + 1;
    }
    if expect <= last {
        gap(expect, last);
    }
    missing
}

/// How recovery treats the directory.
#[derive(Clone, Copy)]
enum Mode {
    /// At startup: cleans up (torn tails, leftovers, the manifest); refuses damage and
    /// missing files unless `repair`.
    Startup { repair: bool },
    /// After a storage failure: reads the log up to `end` and changes nothing.
    Reload { end: DurableEnd },
}

/// The file changes recovery makes at startup. A failure does not stop recovery (the
/// state it reads is the same): the first one is kept, and the broker starts
/// fail-stopped with it, serving reads.
struct Cleanup {
    enabled: bool,
    failure: Option<StoreError>,
}

impl Cleanup {
    /// Runs `op` (a file operation `what` on the file `file()` names), remembering the
    /// first failure; returns whether it ran and succeeded.
    fn run(
        &mut self,
        what: FileOp,
        file: impl FnOnce() -> String,
        op: impl FnOnce() -> std::io::Result<()>,
    ) -> bool {
        if !self.enabled {
            return false;
        }
        match op() {
            Ok(()) => true,
            Err(e) => {
                let reason = StoreError::io(what, file(), e);
                tracing::error!(%reason, "recovery could not change the data directory");
                self.failure.get_or_insert(reason);
                false
            }
        }
    }
}

/// Rebuilds state from `storage` at startup. `now` decides what is due, expired or out
/// of retention.
pub(crate) fn recover(
    storage: &dyn Storage,
    repair: bool,
    now: Millis,
) -> Result<Recovered, RecoveryError> {
    recover_with(storage, Mode::Startup { repair }, now)
}

/// Rebuilds the durable state after a storage failure, reading no record past `end`
/// and changing no file.
pub(crate) fn reload(
    storage: &dyn Storage,
    end: DurableEnd,
    now: Millis,
) -> Result<Recovered, RecoveryError> {
    recover_with(storage, Mode::Reload { end }, now)
}

fn recover_with(
    storage: &dyn Storage,
    mode: Mode,
    now: Millis,
) -> Result<Recovered, RecoveryError> {
    let (repair, end) = match mode {
        Mode::Startup { repair } => (repair, None),
        Mode::Reload { end } => (false, Some(end)),
    };
    let mut run = Recovery {
        storage,
        repair,
        end,
        cleanup: Cleanup {
            enabled: end.is_none(),
            failure: None,
        },
        report: RecoveryReport::default(),
        replay: Replay::default(),
        removed: Vec::new(),
    };
    let files = run.inventory()?;
    let claimed = run.read_manifest(&files)?;
    let base = files.snapshots.last().copied();
    run.check_complete(&files, claimed, base)?;
    if let Some(base) = base {
        run.replay_snapshot(base)?;
        run.remove_files(files.snapshots.iter().filter(|s| **s < base), snapshot_name);
    }
    let base_id = base.unwrap_or(0);
    // Segments before the snapshot are left over from a compaction that stopped before
    // deleting them; the snapshot already holds everything they held.
    run.remove_files(
        files.segments.iter().filter(|s| **s < base_id),
        segment_name,
    );
    let live: Vec<u64> = files
        .segments
        .iter()
        .copied()
        .filter(|s| *s >= base_id)
        .collect();
    let kept = run.replay_segments(&live)?;
    run.finish(&files, claimed, base, kept, now)
}

/// The data directory's snapshot and segment files, each sorted by number.
struct Inventory {
    segments: Vec<u64>,
    snapshots: Vec<u64>,
}

/// How a segment's replay ended.
enum SegmentEnd {
    /// The segment starts past the durable end of a reload: it and later ones hold
    /// nothing durable.
    PastDurableEnd,
    /// Every record was read.
    Clean,
    /// The log ends at this byte offset (a torn tail, or damage cut by `--repair`).
    CutAt(usize),
}

/// One run of recovery over a data directory: what it may change, and what it found.
struct Recovery<'a> {
    storage: &'a dyn Storage,
    repair: bool,
    /// On a reload, where the durable log ends.
    end: Option<DurableEnd>,
    cleanup: Cleanup,
    report: RecoveryReport,
    replay: Replay,
    /// Segments recovery removed (a newest segment torn inside its header): the next
    /// segment takes the number again, so the log stays numbered consecutively.
    removed: Vec<u64>,
}

impl Recovery<'_> {
    /// Lists the directory, removing the leftovers of interrupted writes.
    fn inventory(&mut self) -> Result<Inventory, RecoveryError> {
        let storage = self.storage;
        let names = storage
            .list()
            .map_err(|e| StoreError::io(FileOp::List, storage.describe(""), e))?;
        let mut files = Inventory {
            segments: Vec::new(),
            snapshots: Vec::new(),
        };
        for name in names {
            if name.ends_with(".tmp") {
                // An interrupted snapshot or manifest: the files it would replace are all
                // still there.
                self.cleanup.run(
                    FileOp::Remove,
                    || storage.describe(&name),
                    || storage.remove(&name),
                );
            } else if let Some(id) = parse_snapshot(&name) {
                files.snapshots.push(id);
            } else if let Some(id) = parse_segment(&name) {
                // After a failure, segments past the durable end hold nothing durable.
                if self.end.is_none_or(|end| id <= end.segment) {
                    files.segments.push(id);
                }
            }
        }
        files.segments.sort_unstable();
        files.snapshots.sort_unstable();
        Ok(files)
    }

    /// What the manifest claims; `None` for a directory from before manifests, or one
    /// whose manifest `--repair` rebuilds.
    fn read_manifest(&mut self, files: &Inventory) -> Result<Option<Manifest>, RecoveryError> {
        let claimed = match manifest::read(self.storage) {
            Ok(claimed) => claimed,
            Err(why) if self.repair => {
                self.repaired(
                    1,
                    format!(
                        "--repair: {why}; rebuilt it from the files present, checking their numbering only"
                    ),
                );
                None
            }
            Err(why) => return Err(RecoveryError::Manifest(why)),
        };
        if claimed.is_none()
            && self.end.is_none()
            && (!files.segments.is_empty() || !files.snapshots.is_empty())
        {
            tracing::info!(
                dir = %self.storage.describe(""),
                "no {MANIFEST}: a data directory written by an earlier version; checking that its segments are consecutive, then writing one"
            );
        }
        Ok(claimed)
    }

    /// Refuses a log with missing files (or, with `--repair`, reports them): the snapshot
    /// the manifest names, and the segments numbered from the log's start to its newest.
    fn check_complete(
        &mut self,
        files: &Inventory,
        claimed: Option<Manifest>,
        base: Option<u64>,
    ) -> Result<(), RecoveryError> {
        let storage = self.storage;
        let mut missing = Vec::new();
        let (start, claim) = match (claimed, base) {
            (Some(m), _) => {
                let claim = format!(
                    "{} names {} and {}",
                    storage.describe(MANIFEST),
                    m.snapshot.map_or("no snapshot".to_owned(), |s| format!(
                        "snapshot {}",
                        snapshot_name(s)
                    )),
                    m.newest.map_or("no segment".to_owned(), |n| format!(
                        "newest segment {}",
                        segment_name(n)
                    )),
                );
                let start = match (m.snapshot, base) {
                    (Some(s), b) if b.is_none_or(|b| b < s) => {
                        missing.push(snapshot_name(s));
                        s
                    }
                    (_, Some(b)) => b,
                    _ => 1,
                };
                (start, claim)
            }
            (None, Some(b)) => (
                b,
                format!(
                    "without a {MANIFEST}, the log starts at snapshot {}",
                    snapshot_name(b)
                ),
            ),
            (None, None) => {
                let claim =
                    format!("without a {MANIFEST} or a snapshot, the log starts at segment 1");
                match files.segments.first() {
                    Some(&first) if first > 1 => {
                        missing.push(format!(
                            "the snapshot of the state before {} (snap-*.wal)",
                            segment_name(first)
                        ));
                        (first, claim)
                    }
                    _ => (1, claim),
                }
            }
        };
        let mut last = files
            .segments
            .last()
            .copied()
            .max(claimed.and_then(|m| m.newest))
            .unwrap_or(0);
        if let Some(end) = self.end {
            last = last.min(end.segment);
        }
        let expected = if last >= start {
            format!(
                "{claim}, so the log needs segments {} to {} (numbered consecutively)",
                segment_name(start),
                segment_name(last)
            )
        } else {
            format!("{claim}, so the log needs no segment")
        };
        missing.extend(missing_segments(start, last, &files.segments));
        if missing.is_empty() {
            return Ok(());
        }
        if !self.repair {
            return Err(RecoveryError::Missing {
                dir: storage.describe(""),
                missing,
                expected,
            });
        }
        self.repaired(
            missing.len() as u64,
            format!(
                "--repair: the write-ahead log is missing {} ({expected}); started with the files that are there, losing what the missing ones held",
                missing.join(", ")
            ),
        );
        self.report.missing = missing;
        Ok(())
    }

    /// Replays the snapshot the log starts from; damage to it is refused unless
    /// `--repair`, which keeps what precedes the damage.
    fn replay_snapshot(&mut self, base: u64) -> Result<(), RecoveryError> {
        let name = snapshot_name(base);
        let data = self
            .storage
            .read(&name)
            .map_err(|e| StoreError::io(FileOp::Read, self.storage.describe(&name), e))?;
        let mut complete = false;
        let replay = &mut self.replay;
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
            if !self.repair {
                return Err(RecoveryError::Damaged {
                    file: self.storage.describe(&name),
                    offset: offset as u64,
                    reason,
                });
            }
            self.repaired(
                1,
                format!(
                    "--repair: snapshot {} is damaged at byte offset {offset} ({reason}); kept the {offset} bytes before it, dropped {} bytes",
                    self.storage.describe(&name),
                    data.len() - offset
                ),
            );
        }
        self.report.snapshot = Some(base);
        Ok(())
    }

    /// Removes the files `ids` name (superseded by the snapshot).
    fn remove_files<'i>(&mut self, ids: impl Iterator<Item = &'i u64>, name: fn(u64) -> String) {
        let storage = self.storage;
        for id in ids {
            let old = name(*id);
            self.cleanup.run(
                FileOp::Remove,
                || storage.describe(&old),
                || storage.remove(&old),
            );
        }
    }

    /// Replays the segments after the snapshot, in order, cutting the log where a torn
    /// tail or (with `--repair`) damage ends it. Returns the newest segment still part of
    /// the log.
    fn replay_segments(&mut self, live: &[u64]) -> Result<Option<u64>, RecoveryError> {
        let storage = self.storage;
        let mut kept = None;
        for (i, id) in live.iter().enumerate() {
            let name = segment_name(*id);
            let cut = match self.replay_segment(&name, *id, &live[i + 1..])? {
                SegmentEnd::PastDurableEnd => break,
                SegmentEnd::Clean => {
                    kept = Some(*id);
                    continue;
                }
                SegmentEnd::CutAt(at) => at,
            };
            if cut <= FILE_MAGIC.len() {
                let removed = self.cleanup.run(
                    FileOp::Remove,
                    || storage.describe(&name),
                    || storage.remove(&name),
                );
                if removed {
                    self.removed.push(*id);
                }
            } else {
                kept = Some(*id);
                self.cleanup.run(
                    FileOp::Truncate,
                    || storage.describe(&name),
                    || storage.truncate(&name, cut as u64),
                );
            }
            if i + 1 < live.len() {
                break;
            }
        }
        Ok(kept)
    }

    /// Replays one segment; `later` are the segments after it, set aside when `--repair`
    /// cuts the log inside this one.
    fn replay_segment(
        &mut self,
        name: &str,
        id: u64,
        later: &[u64],
    ) -> Result<SegmentEnd, RecoveryError> {
        let storage = self.storage;
        let mut data = storage
            .read(name)
            .map_err(|e| StoreError::io(FileOp::Read, storage.describe(name), e))?;
        if let Some(end) = self.end.filter(|end| end.segment == id) {
            // What follows the durable end was refused; only a header means no records.
            if end.bytes <= FILE_MAGIC.len() as u64 {
                return Ok(SegmentEnd::PastDurableEnd);
            }
            data.truncate(end.bytes as usize);
        }
        self.report.segments += 1;
        let (report, replay) = (&mut self.report, &mut self.replay);
        let outcome = scan(&data, later.is_empty(), |entry| {
            report.entries += 1;
            replay.apply(entry);
        });
        match outcome {
            Scan::Clean => Ok(SegmentEnd::Clean),
            Scan::Torn(at) => {
                let end = at + torn_bytes(&data, at);
                let (bytes, records) = ((end - at) as u64, torn_records(&data[..end], at));
                let line = format!(
                    "torn tail: cut {bytes} bytes ({records} unacknowledged, partly written record{}) from {} at byte offset {at}",
                    if records == 1 { "" } else { "s" },
                    storage.describe(name)
                );
                tracing::warn!(bytes, records, file = %storage.describe(name), "{line}");
                self.report.truncated.push(line);
                self.report.torn_tail_bytes += bytes;
                self.report.torn_tail_records += records;
                Ok(SegmentEnd::CutAt(at))
            }
            Scan::Damaged(at, reason) => {
                if !self.repair {
                    return Err(RecoveryError::Damaged {
                        file: storage.describe(name),
                        offset: at as u64,
                        reason,
                    });
                }
                let mut line = format!(
                    "--repair: {} is damaged at byte offset {at} ({reason}); dropped its last {} bytes",
                    storage.describe(name),
                    data.len() - at
                );
                for later in later {
                    let later_name = segment_name(*later);
                    let damaged = format!("{later_name}.damaged");
                    self.cleanup.run(
                        FileOp::Rename,
                        || storage.describe(&later_name),
                        || storage.rename(&later_name, &damaged),
                    );
                    line.push_str(&format!(
                        "; set aside the later segment {} as {damaged}",
                        storage.describe(&later_name)
                    ));
                }
                self.repaired(1 + later.len() as u64, line);
                Ok(SegmentEnd::CutAt(at))
            }
        }
    }

    /// Records what `--repair` did to `files` files.
    fn repaired(&mut self, files: u64, line: String) {
        tracing::warn!("{line}");
        self.report.truncated.push(line);
        self.report.files_repaired += files;
    }

    /// Syncs the directory, makes the manifest claim what is there (legacy directories
    /// get their first one, and a repaired log its new shape), and builds the state.
    fn finish(
        mut self,
        files: &Inventory,
        claimed: Option<Manifest>,
        base: Option<u64>,
        kept: Option<u64>,
        now: Millis,
    ) -> Result<Recovered, RecoveryError> {
        let storage = self.storage;
        self.cleanup.run(
            FileOp::Fsync,
            || storage.describe(""),
            || storage.sync_dir(),
        );
        let now_claimed = Manifest {
            snapshot: base,
            newest: kept,
        };
        let mut claimed = claimed.unwrap_or_default();
        if self.cleanup.enabled && self.cleanup.failure.is_none() && claimed != now_claimed {
            match manifest::write(storage, &now_claimed) {
                Ok(()) => claimed = now_claimed,
                Err(e) => {
                    tracing::error!(reason = %e, "recovery could not write the manifest");
                    self.cleanup.failure = Some(e);
                }
            }
        }
        self.report.anomalies = self.replay.anomalies;
        // Numbered after the newest segment still on disk: one removed above is numbered
        // again, or the log would skip a number and the next recovery refuse it as a
        // missing segment.
        let next_segment = files
            .segments
            .iter()
            .rev()
            .find(|id| !self.removed.contains(id))
            .copied()
            .max(claimed.newest)
            .map_or(1, |s| s + 1)
            .max(base.unwrap_or(0))
            .max(1);
        let schemas = std::mem::take(&mut self.replay.schemas)
            .into_iter()
            .collect();
        let (queues, topics, schedules) = self.replay.finish(now);
        Ok(Recovered {
            queues,
            topics,
            schedules,
            schemas,
            next_segment,
            claimed,
            write_failure: self.cleanup.failure,
            report: self.report,
        })
    }
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
    schedules: BTreeMap<String, Schedule>,
    schemas: BTreeMap<SchemaTarget, SchemaHistory>,
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
            Kind::ScheduleDef(def) => {
                let s = schedule_from_pb(def);
                self.schedules.insert(s.spec.name.clone(), s);
            }
            Kind::ScheduleDelete(d) => return self.schedules.remove(&d.name).is_some(),
            Kind::ScheduleFired(f) => {
                let (Some(s), Some(run)) = (self.schedules.get_mut(&f.name), f.run) else {
                    return false;
                };
                apply_run(s, run);
            }
            Kind::SnapshotBegin(_) | Kind::SnapshotEnd(_) => {}
            Kind::SchemaSet(set) => {
                let Some((target, revision)) = schemas::revision_from_pb(set) else {
                    return false;
                };
                self.schemas.entry(target).or_default().push(revision);
            }
            Kind::SchemaCleared(cleared) => {
                let target = schemas::cleared_target(cleared);
                let Some(history) = self.schemas.get_mut(&target) else {
                    return false;
                };
                history.clear();
            }
        }
        true
    }

    fn finish(self, now: Millis) -> (Vec<Queue>, Vec<Topic>, Vec<Schedule>) {
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
        (queues, topics, self.schedules.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_segments_are_named_one_run_at_a_time() {
        assert!(missing_segments(4, 10, &[4, 5, 6, 7, 8, 9, 10]).is_empty());
        assert!(missing_segments(4, 3, &[]).is_empty(), "an empty range");
        assert_eq!(
            missing_segments(4, 10, &[2, 4, 5, 9]),
            [
                format!("{} to {} (3 segments)", segment_name(6), segment_name(8)),
                segment_name(10),
            ]
        );
        assert_eq!(missing_segments(1, 1, &[]), [segment_name(1)]);
    }

    /// A segment file holding one record per name (each defines a queue), then `tail`.
    fn segment(names: &[&str], tail: &[u8]) -> Vec<u8> {
        let mut data = FILE_MAGIC.to_vec();
        for name in names {
            let mut batch = super::super::Batch::enabled();
            batch.queue_paused(name, true);
            data.extend(batch.into_frame(1).expect("one op"));
        }
        data.extend_from_slice(tail);
        data
    }

    /// The queues a scan of `data` defines, and how it ended.
    fn scanned(data: &[u8], newest: bool) -> (Vec<String>, Scan) {
        let mut names = Vec::new();
        let end = scan(data, newest, |entry| {
            for op in entry.ops {
                if let Some(Kind::QueuePaused(p)) = op.op {
                    names.push(p.name);
                }
            }
        });
        (names, end)
    }

    #[test]
    fn the_zeros_after_the_last_record_end_any_segment() {
        let data = segment(&["a", "b"], &[0; 5000]);
        for newest in [true, false] {
            let (names, end) = scanned(&data, newest);
            assert_eq!(names, ["a", "b"]);
            assert!(matches!(end, Scan::Clean), "newest: {newest}");
        }
        // A segment preallocated but never written to (its header too) ends the log only
        // where it may: as the newest segment, which the crash interrupted.
        let zeros = vec![0u8; 4096];
        assert!(matches!(scanned(&zeros, true).1, Scan::Torn(0)));
        assert!(matches!(scanned(&zeros, false).1, Scan::Damaged(0, _)));
        let mut half = b"SLUI".to_vec();
        half.resize(4096, 0);
        assert!(matches!(scanned(&half, true).1, Scan::Torn(0)));
    }

    #[test]
    fn a_torn_record_before_the_zeros_is_cut_and_counted_without_them() {
        let whole = segment(&["a"], &[]);
        let mut data = segment(&["a", "b"], &[]);
        let frame = data.len() - whole.len();
        // The crash kept the header and half the payload of the second record.
        data.truncate(data.len() - 4);
        data.resize(8192, 0);
        let (names, end) = scanned(&data, true);
        assert_eq!(names, ["a"]);
        assert!(matches!(end, Scan::Torn(at) if at == whole.len()));
        assert_eq!(torn_bytes(&data, whole.len()), frame);
        // Bytes that are not even a frame header count up to the zeros.
        let mut junk = whole.clone();
        junk.extend_from_slice(&[7, 7, 7]);
        junk.resize(8192, 0);
        assert_eq!(torn_bytes(&junk, whole.len()), 3);
    }

    #[test]
    fn anything_but_zeros_after_the_last_record_is_not_the_end() {
        // A flipped bit in the zeros: torn in the newest segment, damage in an older one.
        let mut data = segment(&["a"], &[0; 4096]);
        let last = data.len() - 100;
        data[last] = 1;
        assert!(matches!(scanned(&data, true), (_, Scan::Torn(_))));
        assert!(matches!(scanned(&data, false), (_, Scan::Damaged(..))));
        // The records of an earlier use of the file, had it been reused without zeroing:
        // with one starting right where the new records end, it would read as a new
        // record. This is why a segment is zeroed before it is reused (see
        // `Shared::recycle`); a stale record anywhere else is refused as damage.
        let stale = segment(&["old-1", "old-2"], &[]);
        let mut reused = segment(&["new"], &[]);
        let at = reused.len();
        reused.extend_from_slice(&stale[at..]);
        assert!(matches!(scanned(&reused, false), (_, Scan::Damaged(..))));
        let mut aligned = segment(&["new"], &[]);
        aligned.extend_from_slice(&stale[FILE_MAGIC.len()..]);
        assert_eq!(scanned(&aligned, false).0, ["new", "old-1", "old-2"]);
    }

    #[test]
    fn a_torn_tail_counts_the_records_it_cut() {
        let mut data = FILE_MAGIC.to_vec();
        super::super::record::frame_into(&mut data, b"whole");
        let whole = data.len();
        super::super::record::frame_into(&mut data, b"partly written");
        data.truncate(data.len() - 3);
        assert_eq!(torn_records(&data, FILE_MAGIC.len()), 2);
        assert_eq!(torn_records(&data, whole), 1);
        assert_eq!(torn_records(&data, data.len()), 0);
        // Garbage that is not a frame header is one partial record.
        assert_eq!(torn_records(&[0u8; 40], 0), 1);
    }
}
