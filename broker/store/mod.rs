//! Durability: a write-ahead log (WAL) with group commit, recovery and compaction.
//!
//! * [`Storage`] is the file system as the WAL sees it (a directory of segment files);
//!   [`DirStorage`] is the real one, tests inject faulty ones.
//! * `wal` runs one writer thread that batches appended records, writes them and fsyncs
//!   once per batch (group commit), then tells the [`DurableListener`]s of the records
//!   and publishes the written and synced positions.
//! * `record` frames records (length + CRC32C) and converts domain changes into the
//!   internal record messages of `broker/store/wal.proto`.
//! * `recovery` replays the newest snapshot and the segments after it into queues and
//!   topics, truncating a torn tail and refusing to start on other damage or on missing
//!   files; after a failure it reloads what is durable, read-only.
//! * `manifest` names the files the log is made of (the MANIFEST file).
//!
//! The broker appends a [`Batch`] of records *while holding the lock of the queue or topic
//! it changed*, so the log order is the state order, gets a [`Commit`] position, releases
//! the lock, and only then awaits [`Journal::durable`] before answering OK.

mod error;
mod manifest;
mod record;
mod recovery;
mod schedule_record;
mod wal;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

pub use self::error::{FileOp, ManifestDefect, StoreError};
pub(crate) use self::record::Batch;
pub(crate) use self::record::{
    FILE_MAGIC, SnapshotQueue, SnapshotState, SnapshotTopic, frame_into,
};
pub(crate) use self::record::{decode_policy, encode_policy};
pub(crate) use self::recovery::{Recovered, recover};
pub use self::recovery::{RecoveryError, RecoveryReport};
pub(crate) use self::schedule_record::{decode_schedule_def, encode_schedule_def};
pub(crate) use self::wal::DurableListener;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::time::Millis;
use crate::broker::sync::{self, lock};

/// When appended records are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before any request that changed state is answered; concurrent requests share one
    /// fsync (group commit).
    Always,
    /// Every so often; requests are answered as soon as their record is written to the
    /// kernel, so a crash of the process loses nothing acknowledged, and a crash of the
    /// machine up to this much.
    Interval(Duration),
}

impl FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "always" {
            return Ok(Self::Always);
        }
        if let Some(ms) = s.strip_prefix("interval:") {
            let ms: u64 = ms
                .parse()
                .map_err(|_| format!("--fsync {s:?}: {ms:?} is not a number of milliseconds"))?;
            if ms == 0 || ms > 60_000 {
                return Err(format!(
                    "--fsync {s:?}: the interval must be 1..=60000 ms, got {ms}"
                ));
            }
            return Ok(Self::Interval(Duration::from_millis(ms)));
        }
        Err(format!(
            "--fsync {s:?}: expected \"always\" or \"interval:<ms>\""
        ))
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::Interval(d) => write!(f, "interval:{}", d.as_millis()),
        }
    }
}

/// WAL settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// When records are fsynced.
    pub fsync: FsyncPolicy,
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// Truncate at the first damaged record instead of refusing to start.
    pub repair: bool,
    /// Appends wait (before changing anything) while this many bytes are buffered and not
    /// yet written, so a slow disk slows producers down instead of filling memory.
    pub max_buffered_bytes: usize,
    /// Compaction runs once the log written since the last snapshot exceeds both this and
    /// twice that snapshot's size; `None` means one segment. (Tests that need a log of
    /// many segments set it very high.)
    pub compact_after_bytes: Option<u64>,
    /// Segments are written into space allocated (zero-filled) ahead of the appends, and
    /// the segments a compaction frees are zeroed and reused, so the fdatasync of an
    /// append has no file size or block map to write (see [`DirStorage`]). Off by
    /// default, so a segment's length is what it holds (tests read records off file
    /// sizes); the broker binary turns it on.
    pub preallocate: bool,
    /// How many fsyncs of the log may run at once under [`FsyncPolicy::Always`]: above 1,
    /// the writer keeps writing while up to this many threads each sync a group written
    /// before it started, so a record waits for about one sync instead of up to two, for a
    /// thread hand-off per group. 1 (the default) syncs on the writer's thread, one sync
    /// at a time: on a machine short of cores the hand-off costs more than it saves.
    pub sync_threads: usize,
}

impl StoreConfig {
    /// Fsyncs of the log at once by default (see [`StoreConfig::sync_threads`]).
    pub const DEFAULT_SYNC_THREADS: usize = 1;
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::Always,
            segment_bytes: 64 * 1024 * 1024,
            repair: false,
            max_buffered_bytes: 64 * 1024 * 1024,
            compact_after_bytes: None,
            preallocate: false,
            sync_threads: Self::DEFAULT_SYNC_THREADS,
        }
    }
}

/// A file of the log, open for appending.
pub trait StorageFile: Send {
    /// Appends all of `data`.
    fn write_all(&mut self, data: &[u8]) -> io::Result<()>;
    /// Makes everything written so far durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
    /// Another handle on this file that makes what was written to it durable, for a
    /// thread other than the appender's, while appends go on. Each handle must open its
    /// own file description: Linux reports a write-back error once per description, so
    /// handles sharing one could each miss an error another's sync consumed. `Ok(None)`
    /// when the storage has no such handles: the log then syncs through
    /// [`StorageFile::sync`] alone, one sync at a time.
    fn syncer(&self) -> io::Result<Option<Box<dyn FileSyncer>>> {
        Ok(None)
    }
}

/// A handle that makes a [`StorageFile`]'s writes durable from another thread (see
/// [`StorageFile::syncer`]).
pub trait FileSyncer: Send {
    /// Makes everything written to the file before this call durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
}

/// The directory the WAL lives in. Names are plain file names, never paths.
pub trait Storage: Send + Sync + fmt::Debug {
    /// File names in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// A whole file.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Creates (or empties) a file for appending.
    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;
    /// Cuts a file to `len` bytes, durably.
    fn truncate(&self, name: &str, len: u64) -> io::Result<()>;
    /// Renames a file (atomically replacing `to`).
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Deletes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and deletions durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// How to name `name` to a user (its path).
    fn describe(&self, name: &str) -> String;
    /// Gives up exclusive use of the storage, once the log on it is closed, so another
    /// broker may open it.
    fn release(&self);
    /// Creates (or empties) a segment expected to grow to about `len` bytes, for
    /// appending into space allocated ahead of the appends: what follows the appended
    /// bytes reads as zeros. The default allocates nothing ahead ([`Storage::create`]).
    fn create_preallocated(&self, name: &str, len: u64) -> io::Result<Box<dyn StorageFile>> {
        let _ = len;
        self.create(name)
    }
    /// Overwrites every byte of `name` with zeros, keeping its length and its blocks, and
    /// makes that durable, so the file can be reused as a new segment. The default empties
    /// it ([`Storage::create`]).
    fn zero(&self, name: &str) -> io::Result<()> {
        self.create(name).map(drop)
    }
    /// Renames the zeroed file `from` (see [`Storage::zero`]) to `to` and opens it for
    /// appending from its start over its zeros, expected to grow to about `len` bytes. The
    /// default renames it and empties it ([`Storage::create`]).
    fn reuse(&self, from: &str, to: &str, len: u64) -> io::Result<Box<dyn StorageFile>> {
        self.rename(from, to)?;
        self.create_preallocated(to, len)
    }
}

/// The file in a data directory whose lock marks the directory as in use.
pub(super) const LOCK_FILE: &str = "LOCK";

/// The real [`Storage`]: a directory, mode 0700, with files of mode 0600.
#[derive(Debug)]
pub struct DirStorage {
    dir: PathBuf,
    /// [`LOCK_FILE`], exclusively locked until [`Storage::release`] (or the process ends):
    /// two brokers appending to one log would corrupt it.
    lock: Mutex<Option<std::fs::File>>,
}

impl DirStorage {
    /// Opens `dir`, creating it (and its parents) if needed, restricts it to its owner and
    /// takes its lock. A directory another broker holds is refused (`WouldBlock`).
    pub fn open(dir: &Path) -> io::Result<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        #[cfg(not(unix))]
        std::fs::create_dir_all(dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let lock = options.open(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "the directory is in use by another broker (it holds the lock on {})",
                        lock_path.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot lock {}: {e}", lock_path.display()),
                ));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            lock: Mutex::new(Some(lock)),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Space allocated ahead of the appends at most this much at a time, so a fresh segment
/// costs no more than this in zeros before its first record.
const ALLOCATE_STEP: u64 = 1024 * 1024;

/// A file of a [`DirStorage`], appended to at `at`.
///
/// A preallocated segment (`step > 0`) is written into space already written with zeros:
/// an append that would pass the end of that space writes its bytes and the zeros of the
/// next step in one write. Zeros are written rather than `fallocate`d because on ext4
/// and XFS `fallocate` leaves "unwritten" extents, and the first write into one converts
/// it, a metadata change every fdatasync after it must commit to the journal; and a file
/// extended by `set_len` is sparse, so each write allocates blocks. Over blocks written
/// once, an append changes only data (and the timestamps, which fdatasync skips), so its
/// fdatasync is one data write and a cache flush, with no journal commit. Only the
/// appends that grow the file (one per step, none in a reused segment) pay for one.
struct DirFile {
    file: std::fs::File,
    /// Where it is, to open sync handles ([`StorageFile::syncer`]).
    path: PathBuf,
    /// Where the next append goes.
    at: u64,
    /// The file's bytes written so far, appended records and zeros ahead of them.
    allocated: u64,
    /// Zeros written ahead of the appends at a time; 0 appends plainly.
    step: u64,
}

impl DirFile {
    fn plain(file: std::fs::File, path: PathBuf) -> Self {
        Self {
            file,
            path,
            at: 0,
            allocated: 0,
            step: 0,
        }
    }

    /// Writes `data` at the append position (positioned writes: the file's own offset
    /// stays where opening put it).
    #[cfg(unix)]
    fn write_at(&mut self, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, self.at)
    }

    #[cfg(not(unix))]
    fn write_at(&mut self, data: &[u8]) -> io::Result<()> {
        use std::io::Seek as _;
        self.file.seek(io::SeekFrom::Start(self.at))?;
        io::Write::write_all(&mut self.file, data)
    }
}

impl StorageFile for DirFile {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let end = self.at + data.len() as u64;
        if self.step == 0 || end <= self.allocated {
            if self.step == 0 {
                io::Write::write_all(&mut self.file, data)?;
            } else {
                self.write_at(data)?;
            }
        } else {
            let grown = end.next_multiple_of(self.step);
            let mut ahead = Vec::with_capacity((grown - self.at) as usize);
            ahead.extend_from_slice(data);
            ahead.resize((grown - self.at) as usize, 0);
            self.write_at(&ahead)?;
            self.allocated = grown;
        }
        self.at = end;
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn syncer(&self) -> io::Result<Option<Box<dyn FileSyncer>>> {
        let file = std::fs::OpenOptions::new().write(true).open(&self.path)?;
        Ok(Some(Box::new(DirSyncer(file))))
    }
}

/// A [`DirFile`]'s sync handle: its own open file description of the file.
struct DirSyncer(std::fs::File);

impl FileSyncer for DirSyncer {
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl Storage for DirStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.path(name))
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let path = self.path(name);
        Ok(Box::new(DirFile::plain(options.open(&path)?, path)))
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(name))?;
        file.set_len(len)?;
        file.sync_all()
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path(from), self.path(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        #[cfg(unix)]
        {
            std::fs::File::open(&self.dir)?.sync_all()
        }
        #[cfg(not(unix))]
        Ok(())
    }

    fn describe(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn release(&self) {
        // Closing the file drops its lock.
        lock(&self.lock).take();
    }

    fn create_preallocated(&self, name: &str, len: u64) -> io::Result<Box<dyn StorageFile>> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let path = self.path(name);
        Ok(Box::new(DirFile {
            file: options.open(&path)?,
            path,
            at: 0,
            allocated: 0,
            step: len.clamp(4096, ALLOCATE_STEP),
        }))
    }

    fn zero(&self, name: &str) -> io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(name))?;
        let len = file.metadata()?.len();
        let zeros = vec![0u8; ALLOCATE_STEP.min(len) as usize];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            io::Write::write_all(&mut file, &zeros[..n])?;
            left -= n as u64;
        }
        file.sync_data()
    }

    fn reuse(&self, from: &str, to: &str, len: u64) -> io::Result<Box<dyn StorageFile>> {
        self.rename(from, to)?;
        let path = self.path(to);
        let file = std::fs::OpenOptions::new().write(true).open(&path)?;
        let allocated = file.metadata()?.len();
        Ok(Box::new(DirFile {
            file,
            path,
            at: 0,
            allocated,
            step: len.clamp(4096, ALLOCATE_STEP),
        }))
    }
}

/// A log position to wait for before answering. `Commit::NONE` waits for nothing; a
/// later commit is greater, and once durable so is every earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
#[must_use = "a change is acknowledged only after its commit is durable"]
#[allow(unreachable_pub)] // Named by the sealed `Engine` trait's `Commit`; not constructible outside.
pub struct Commit(u64);

impl Commit {
    /// Nothing to wait for (memory storage, or a request that changed nothing and saw
    /// nothing unwritten).
    pub(crate) const NONE: Commit = Commit(0);
    /// A change appended after the log failed: never durable.
    const NEVER: Commit = Commit(u64::MAX);
}

/// The broker's handle on its WAL. Cheap to share behind an `Arc`.
pub(super) struct Journal {
    wal: wal::Wal,
    /// Mutations hold it shared from their first state change until every record of the
    /// change is appended (including dead letters routed after the queue lock is
    /// released); compaction holds it exclusively for a moment to take a snapshot that is
    /// exactly the state at a segment boundary.
    gate: RwLock<()>,
    fsync: FsyncPolicy,
    /// Held for a whole compaction; `true` once the log is closed, so a compaction never
    /// deletes files under a broker that has stopped (or a test that reads them).
    compaction: Mutex<bool>,
    /// `true` once the broker, after a failure, shows only what is durable (see
    /// [`Journal::settled`]); requests refused by the failure get their answer then, so
    /// nobody can see what was refused after being told so.
    settled: tokio::sync::watch::Sender<bool>,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("fsync", &self.fsync)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Starts the writer on `storage` with what `recovered` found, appending to its next
    /// segment onwards.
    pub(crate) fn start(
        storage: Arc<dyn Storage>,
        config: &StoreConfig,
        recovered: &Recovered,
    ) -> Self {
        Self {
            wal: wal::Wal::start(storage, config, recovered.next_segment, recovered.claimed),
            gate: RwLock::new(()),
            fsync: config.fsync,
            compaction: Mutex::new(false),
            settled: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The fsync policy.
    pub(super) fn fsync(&self) -> FsyncPolicy {
        self.fsync
    }

    /// Why the log failed (fail-stop), if it did.
    pub(super) fn failure(&self) -> Option<StoreError> {
        self.wal.failure()
    }

    /// Resolves with the reason once the log has failed.
    pub(super) async fn failed(&self) -> StoreError {
        self.wal.failed().await
    }

    /// Fails the log without a write error (the startup snapshot or a recovery clean-up
    /// could not be written): the broker serves reads and refuses every change.
    pub(crate) fn fail_stop(&self, reason: StoreError) {
        self.wal.fail_stop(reason);
        self.settle();
    }

    /// Reads the state that is durable on disk, without changing any file: everything up
    /// to where the writer knew the log was durable when it failed, and nothing after.
    /// Call only after [`Journal::failed`], under [`Journal::exclusive`] and the
    /// compaction slot, so nothing changes the state or the files meanwhile.
    pub(crate) fn reload(&self, now: Millis) -> Result<Recovered, RecoveryError> {
        let end = self.wal.durable_end().ok_or(RecoveryError::NotFailed)?;
        recovery::reload(self.wal.storage(), end, now)
    }

    /// Marks the state shown as the durable one, releasing the answers of the requests
    /// the failure refused.
    pub(crate) fn settle(&self) {
        self.settled.send_replace(true);
    }

    /// Waits (after a failure) until the broker shows only the durable state.
    async fn settled(&self) {
        let mut rx = self.settled.subscribe();
        let _ = rx.wait_for(|settled| *settled).await;
    }

    /// Fails with UNAVAILABLE once the log has failed (fail-stop).
    pub(super) fn check(&self) -> Result<(), BrokerError> {
        match self.wal.failure() {
            Some(reason) => Err(BrokerError::StorageFailed(reason)),
            None => Ok(()),
        }
    }

    /// Waits while too much is buffered, then checks for fail-stop. Call before taking
    /// any lock.
    pub(super) async fn wait_for_log_space(&self) -> Result<(), BrokerError> {
        self.wal.wait_for_space().await;
        self.check()
    }

    /// Starts a mutation (see the `gate` field). Hold the guard only in sync code.
    pub(super) fn begin(&self) -> Result<RwLockReadGuard<'_, ()>, BrokerError> {
        self.check()?;
        Ok(sync::read(&self.gate))
    }

    pub(crate) fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        sync::write(&self.gate)
    }

    /// Appends a batch as one atomic record. An empty batch appends nothing and returns
    /// the newest position, so a request that changed nothing still waits for whatever
    /// it may have observed.
    pub(super) fn append(&self, batch: Batch, at: Millis) -> Result<Commit, BrokerError> {
        self.append_with(batch, at, None)
    }

    /// [`Journal::append`], and once the record is durable under the fsync policy (what
    /// [`Journal::durable`] waits for) tells `listener` its mark, whether or not anyone
    /// still waits for the commit. The listener runs on the writer's thread before any
    /// request of the same write is answered: it must be quick and never block. An empty
    /// batch appends nothing and tells nothing.
    pub(super) fn append_with(
        &self,
        batch: Batch,
        at: Millis,
        listener: Option<(Arc<dyn DurableListener>, u64)>,
    ) -> Result<Commit, BrokerError> {
        let Some(frame) = batch.into_frame(at) else {
            return Ok(Commit(self.wal.last_position()));
        };
        match self.wal.append(&frame, listener) {
            Ok(position) => Ok(Commit(position)),
            // The change was applied in memory already: its commit never becomes durable,
            // so it is refused by `durable`, once the state shown is the durable one.
            Err(_) if self.wal.failure().is_some() => Ok(Commit::NEVER),
            Err(reason) => Err(BrokerError::StorageFailed(reason)),
        }
    }

    /// Resolves once `commit` is durable under the fsync policy (fsynced with `always`,
    /// written to the kernel with `interval`); fails if the log failed.
    pub(super) async fn durable(&self, commit: Commit) -> Result<(), BrokerError> {
        if commit == Commit::NONE {
            return self.check();
        }
        let reached = match self.fsync {
            FsyncPolicy::Always => self.wal.wait_synced(commit.0).await,
            FsyncPolicy::Interval(_) => self.wal.wait_written(commit.0).await,
        };
        let result = reached.map_err(BrokerError::StorageFailed);
        if result.is_err() {
            // The refused change may still show until the broker reloaded the durable
            // state; the refusal is answered once it cannot be seen any more.
            self.settled().await;
        }
        result
    }

    /// Resolves when the log has grown enough since the last snapshot to compact.
    pub(crate) async fn compaction_due(&self) {
        self.wal.compaction_due().await
    }

    /// Whether the log is still big enough to compact when a compaction could start.
    pub(crate) fn compaction_still_due(&self) -> bool {
        self.wal.compaction_still_due()
    }

    /// Starts a new segment for the records appended from now on. Call under
    /// [`Journal::exclusive`]; returns the new segment and the last position before it.
    pub(crate) fn roll(&self) -> (u64, u64) {
        self.wal.roll()
    }

    /// Writes a snapshot of the state before segment `base` (taken under
    /// [`Journal::exclusive`] right after [`Journal::roll`] returned `(base, last)`), then
    /// deletes the segments and snapshots it replaces. Blocks: run it off the runtime.
    pub(crate) fn write_snapshot(
        &self,
        base: u64,
        last: u64,
        state: SnapshotState,
        now: Millis,
    ) -> Result<u64, StoreError> {
        // The records before the roll must be on disk before the files holding them go.
        self.wal.wait_written_blocking(last)?;
        let frames = record::snapshot_frames(base, state, now);
        self.wal.install_snapshot(base, &frames)
    }

    /// The right to compact, held for the whole compaction; `None` once closed.
    pub(crate) fn compaction_slot(&self) -> Option<MutexGuard<'_, bool>> {
        let slot = lock(&self.compaction);
        (!*slot).then_some(slot)
    }

    /// Waits for a running compaction, then stops the writer after it wrote (and
    /// synced) everything appended so far.
    pub(super) fn close(&self) {
        *lock(&self.compaction) = true;
        self.wal.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_is_held_by_one_storage_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirStorage::open(dir.path()).unwrap();
        let refused = DirStorage::open(dir.path()).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::WouldBlock);
        let message = refused.to_string();
        assert!(
            message.contains("in use by another broker")
                && message.contains(&dir.path().join(LOCK_FILE).display().to_string()),
            "{message}"
        );
        // The lock file is not a log file: recovery ignores it.
        assert!(first.list().unwrap().contains(&LOCK_FILE.to_owned()));
        first.release();
        let second = DirStorage::open(dir.path()).unwrap();
        drop(second);
        DirStorage::open(dir.path()).unwrap();
    }

    /// Appends one record per name (each pauses a queue of that name) and waits until
    /// they are durable.
    async fn append_queues(journal: &Journal, names: impl Iterator<Item = String>) {
        for name in names {
            let mut batch = Batch::enabled();
            batch.queue_paused(&name, true);
            let commit = journal.append(batch, 1).unwrap();
            journal.durable(commit).await.unwrap();
        }
    }

    fn files(dir: &Path, suffix: &str) -> Vec<(String, Vec<u8>)> {
        let mut found: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(suffix) && !n.starts_with("snap-"))
            .map(|n| {
                let data = std::fs::read(dir.join(&n)).unwrap();
                (n, data)
            })
            .collect();
        found.sort();
        found
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segments_freed_by_compaction_are_zeroed_reused_and_never_replay_old_records() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            segment_bytes: 4096,
            compact_after_bytes: Some(u64::MAX / 4),
            preallocate: true,
            ..StoreConfig::default()
        };
        let storage: Arc<dyn Storage> = Arc::new(DirStorage::open(dir.path()).unwrap());
        let recovered = recover(&*storage, false, 0).unwrap();
        let journal = Arc::new(Journal::start(storage.clone(), &config, &recovered));
        append_queues(&journal, (0..600).map(|i| format!("old-{i}"))).await;
        let segments = files(dir.path(), ".wal");
        assert!(segments.len() >= 4, "{} segments", segments.len());
        // Preallocated: each segment is written ahead of its records in zeros.
        assert!(segments.iter().all(|(_, data)| data.len() >= 4096));

        // A compaction replaces every segment so far by an (empty) snapshot.
        let (base, last) = journal.roll();
        let compactor = journal.clone();
        tokio::task::spawn_blocking(move || {
            compactor.write_snapshot(base, last, SnapshotState::default(), 1)
        })
        .await
        .unwrap()
        .unwrap();
        let free = files(dir.path(), ".free");
        assert_eq!(free.len(), wal::MAX_FREE_SEGMENTS);
        for (name, data) in &free {
            assert!(data.len() >= 4096, "{name} kept its length");
            assert!(data.iter().all(|b| *b == 0), "{name} is zeroed");
        }
        assert!(files(dir.path(), ".wal").is_empty());

        // The next segments are the free ones, full length from their first record, and
        // the log read back holds the new records only.
        append_queues(&journal, (0..3).map(|i| format!("new-{i}"))).await;
        assert_eq!(files(dir.path(), ".free").len(), wal::MAX_FREE_SEGMENTS - 1);
        let reused = files(dir.path(), ".wal");
        assert_eq!(reused.len(), 1);
        assert!(free.iter().any(|(_, data)| data.len() == reused[0].1.len()));
        journal.close();
        drop(journal);
        let storage: Arc<dyn Storage> = Arc::new(DirStorage::open(dir.path()).unwrap());
        let recovered = recover(&*storage, false, 1).unwrap();
        let mut names: Vec<String> = recovered
            .queues
            .iter()
            .map(|q| q.name().to_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["new-0", "new-1", "new-2"]);
        assert!(
            recovered.report.truncated.is_empty(),
            "{:?}",
            recovered.report.truncated
        );
    }

    #[test]
    fn fsync_policies_parse_and_bad_ones_name_the_flag_and_value() {
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!(
            "interval:25".parse(),
            Ok(FsyncPolicy::Interval(Duration::from_millis(25)))
        );
        assert_eq!(
            FsyncPolicy::Interval(Duration::from_millis(25)).to_string(),
            "interval:25"
        );
        let err = "interval:0".parse::<FsyncPolicy>().unwrap_err();
        assert!(
            err.contains("--fsync") && err.contains("1..=60000") && err.contains('0'),
            "{err}"
        );
        let err = "sometimes".parse::<FsyncPolicy>().unwrap_err();
        assert!(
            err.contains("\"sometimes\"") && err.contains("interval:<ms>"),
            "{err}"
        );
        assert!(
            "interval:soon"
                .parse::<FsyncPolicy>()
                .unwrap_err()
                .contains("soon")
        );
    }
}
