//! The WAL writer: group commit on a dedicated thread.
//!
//! Appenders copy a framed record into the shared buffer under a short mutex and get a
//! position. The writer thread takes everything buffered at once, writes it (one write
//! for many requests), fsyncs once (policy `always`; policy `interval` fsyncs on its
//! timer) and publishes the new written and synced positions on a watch channel, which
//! every waiting request reads: one write and one fsync serve every request that arrived
//! while the previous ones ran. An append may carry a [`DurableListener`], told (on the
//! writer thread, before any waiter is woken) once its record is durable under the
//! policy, whether or not the request that appended it is still waiting.
//! With more than one sync thread ([`StoreConfig::sync_threads`]) the writer hands each
//! written group to a sync thread instead and goes on writing (see `syncers`).
//! Any write or fsync error is final (fail-stop): the writer records the reason, logs
//! it, wakes every waiter with it and stops; nothing is acknowledged after it, because
//! the page cache can no longer be trusted to match the disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{Notify, watch};

use super::error::{FileOp, StoreError};
use super::manifest::{self, Manifest};
use super::record::FILE_MAGIC;
use super::{FsyncPolicy, Storage, StorageFile, StoreConfig};
use crate::broker::sync::{self, lock};

mod syncers;

use self::syncers::Syncers;

/// File name of segment `id`.
pub(crate) fn segment_name(id: u64) -> String {
    format!("{id:020}.wal")
}

/// File name of the zeroed former segment `id`, kept to be reused as a new segment.
pub(crate) fn free_name(id: u64) -> String {
    format!("{id:020}.free")
}

/// Parses a free segment's file name.
fn parse_free(name: &str) -> Option<u64> {
    parse_segment(&format!("{}.wal", name.strip_suffix(".free")?))
}

/// Segments freed by compaction kept for reuse, at most: enough for the log to roll
/// through while the next compaction runs, without holding much disk.
pub(super) const MAX_FREE_SEGMENTS: usize = 2;

/// File name of the snapshot holding the state before segment `base`.
pub(crate) fn snapshot_name(base: u64) -> String {
    format!("snap-{base:020}.wal")
}

/// What the writer has written and made durable, or why it stopped.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every record up to here is written to the kernel (survives a process crash).
    written: u64,
    /// Every record up to here is fsynced (survives a machine crash).
    synced: u64,
    failed: Option<StoreError>,
}

/// Told when the record an append carried it with is durable under the fsync policy
/// (fsynced with `always`, written with `interval`).
pub(crate) trait DurableListener: Send + Sync {
    /// The record appended with `mark` is durable, and so is everything before it.
    fn durable(&self, mark: u64);
}

/// A listener and the mark it is told, registered by one append.
type Listening = (Arc<dyn DurableListener>, u64);

/// Framed records appended for one segment, not yet handed to the writer.
struct SegmentBuffer {
    segment: u64,
    data: Vec<u8>,
}

struct State {
    chunks: Vec<SegmentBuffer>,
    buffered: usize,
    /// Segment that new appends go to.
    segment: u64,
    /// Whether anything was appended to `segment` yet. A roll past a segment nothing was
    /// appended to would leave its number without a file: a later crash before the
    /// snapshot that covers it lands would then find the log missing a segment.
    segment_used: bool,
    /// Position of the newest append (positions start at 1).
    last: u64,
    /// Listeners of the buffered records, in append order.
    listeners: Vec<Listening>,
    closing: bool,
    /// Whether the writer waits for appends on `Shared::wake`: only then does an append
    /// need to notify it (a futex wake-up each), and the first one to see it clears it.
    writer_asleep: bool,
    /// Emptied buffers of written chunks, for the next chunks: appends copy into grown
    /// capacity instead of reallocating from empty every round.
    spare: Vec<Vec<u8>>,
}

/// Emptied chunk buffers kept for reuse, at most, and the largest kept (a burst must
/// not pin its memory).
const SPARE_BUFFERS: usize = 2;
const SPARE_BYTES: usize = 4 * 1024 * 1024;

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    progress: watch::Sender<Progress>,
    failed: AtomicBool,
    space: Notify,
    compact: Notify,
    storage: Arc<dyn Storage>,
    fsync: FsyncPolicy,
    segment_bytes: u64,
    compact_after: u64,
    max_buffered: usize,
    /// What the log holds beside the newest snapshot; decides when to compact.
    growth: Mutex<LogSize>,
    /// What the manifest on disk claims. Held while the manifest is rewritten, so the
    /// writer (new segments) and the compactor (new snapshots) never overwrite each
    /// other's claim.
    manifest: Mutex<Manifest>,
    /// The first segment this writer appends to: nothing at or after it is durable until
    /// the writer has written it.
    first: u64,
    /// Where the durable log ends, set when the writer fails (see [`DurableEnd`]).
    durable_end: Mutex<Option<DurableEnd>>,
    /// Whether segments are preallocated and reused ([`StoreConfig::preallocate`]).
    preallocate: bool,
    /// Zeroed former segments ([`free_name`]) the writer takes before creating a new one.
    free: Mutex<Vec<String>>,
    /// Fsyncs at once ([`StoreConfig::sync_threads`]).
    sync_threads: usize,
}

/// Where the durable part of the log ends once the writer failed: everything before
/// byte `bytes` of segment `segment` (and nothing in later segments). With `always`
/// that is what was fsynced; with `interval`, what was written (acknowledged records
/// the kernel holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DurableEnd {
    /// The last segment with durable records.
    pub segment: u64,
    /// Its durable length; the records after it were refused.
    pub bytes: u64,
}

/// The bytes of the segments a snapshot has not yet replaced, per segment, and that
/// snapshot's size. Compaction is due once these segments outgrow both the configured
/// threshold and twice the snapshot.
///
/// Counted per segment because a compaction takes time: what is written to the segments
/// after its roll stays in the log once it finishes, so it must still count then.
#[derive(Default)]
struct LogSize {
    segments: Vec<(u64, u64)>,
    snapshot: u64,
}

impl LogSize {
    fn add(&mut self, segment: u64, written: u64) {
        match self.segments.last_mut() {
            Some((id, bytes)) if *id == segment => *bytes += written,
            _ => self.segments.push((segment, written)),
        }
    }

    /// A snapshot of everything before segment `base`, `size` bytes long, replaced them.
    fn replaced(&mut self, base: u64, size: u64) {
        self.segments.retain(|&(id, _)| id >= base);
        self.snapshot = size;
    }

    /// Bytes in the segments no snapshot replaced (a handful between compactions).
    fn bytes(&self) -> u64 {
        self.segments.iter().map(|&(_, bytes)| bytes).sum()
    }

    fn compaction_due(&self, threshold: u64) -> bool {
        self.bytes() >= threshold.max(2 * self.snapshot)
    }
}

pub(crate) struct Wal {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Wal {
    /// Starts the writer thread; `claimed` is what the manifest on disk says now.
    pub(crate) fn start(
        storage: Arc<dyn Storage>,
        config: &StoreConfig,
        first: u64,
        claimed: Manifest,
    ) -> Self {
        let (progress, _) = watch::channel(Progress::default());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                chunks: Vec::new(),
                buffered: 0,
                segment: first,
                segment_used: false,
                last: 0,
                listeners: Vec::new(),
                closing: false,
                writer_asleep: false,
                spare: Vec::new(),
            }),
            wake: Condvar::new(),
            progress,
            failed: AtomicBool::new(false),
            space: Notify::new(),
            compact: Notify::new(),
            storage,
            fsync: config.fsync,
            segment_bytes: config.segment_bytes.max(4096),
            compact_after: config
                .compact_after_bytes
                .unwrap_or(config.segment_bytes.max(4096)),
            max_buffered: config.max_buffered_bytes.max(1024 * 1024),
            growth: Mutex::new(LogSize::default()),
            manifest: Mutex::new(claimed),
            first,
            durable_end: Mutex::new(None),
            preallocate: config.preallocate,
            free: Mutex::new(Vec::new()),
            sync_threads: config.sync_threads.max(1),
        });
        shared.adopt_free_segments();
        let thread = std::thread::Builder::new()
            .name("sluice-wal".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    let writer = Writer::new(shared.clone());
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                        writer.run()
                    }));
                    // A panic in the writer is a bug, and nothing it had not made durable
                    // may be acknowledged: fail the log so every waiter is refused at once
                    // (fail-stop) instead of waiting for a writer that is gone.
                    if ran.is_err() && !shared.failed.load(Ordering::Acquire) {
                        shared.mark_failed(StoreError::WriterStopped);
                    }
                }
            })
            .expect("spawning the WAL writer thread");
        Self {
            shared,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub(crate) fn failure(&self) -> Option<StoreError> {
        if !self.shared.failed.load(Ordering::Acquire) {
            return None;
        }
        self.shared.progress.borrow().failed.clone()
    }

    /// Resolves with the reason once the log has failed.
    pub(crate) async fn failed(&self) -> StoreError {
        let mut rx = self.shared.progress.subscribe();
        match rx.wait_for(|p| p.failed.is_some()).await {
            Ok(p) => p.failed.clone().unwrap_or(StoreError::WriterStopped),
            Err(_) => StoreError::WriterStopped,
        }
    }

    /// Fails the log from outside the writer (the startup snapshot could not be written):
    /// from now on every change is refused.
    pub(crate) fn fail_stop(&self, reason: StoreError) {
        lock(&self.shared.durable_end).get_or_insert(DurableEnd {
            segment: self.shared.first,
            bytes: 0,
        });
        self.shared.mark_failed(reason);
    }

    /// Where the durable log ends, once the log has failed.
    pub(crate) fn durable_end(&self) -> Option<DurableEnd> {
        *lock(&self.shared.durable_end)
    }

    pub(crate) fn storage(&self) -> &dyn Storage {
        &*self.shared.storage
    }

    pub(crate) fn last_position(&self) -> u64 {
        lock(&self.shared.state).last
    }

    /// Buffers one framed record; returns its position. `listener` is told once the
    /// record is durable under the policy (never, if the log fails first).
    pub(crate) fn append(
        &self,
        frame: &[u8],
        listener: Option<Listening>,
    ) -> Result<u64, StoreError> {
        if let Some(reason) = self.failure() {
            return Err(reason);
        }
        let (position, wake) = {
            let mut st = lock(&self.shared.state);
            if st.closing {
                return Err(StoreError::Closed);
            }
            let segment = st.segment;
            st.segment_used = true;
            match st.chunks.last_mut() {
                Some(chunk) if chunk.segment == segment => chunk.data.extend_from_slice(frame),
                _ => {
                    let mut data = st.spare.pop().unwrap_or_default();
                    data.extend_from_slice(frame);
                    st.chunks.push(SegmentBuffer { segment, data });
                }
            }
            st.buffered += frame.len();
            st.last += 1;
            if let Some(listener) = listener {
                st.listeners.push(listener);
            }
            // A busy writer takes this append when it next looks: no wake-up needed.
            (st.last, std::mem::take(&mut st.writer_asleep))
        };
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(position)
    }

    pub(crate) async fn wait_for_space(&self) {
        loop {
            let notified = self.shared.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.shared.state).buffered < self.shared.max_buffered
                || self.shared.failed.load(Ordering::Acquire)
            {
                return;
            }
            notified.await;
        }
    }

    /// Waits until `position` is fsynced.
    pub(crate) async fn wait_synced(&self, position: u64) -> Result<(), StoreError> {
        self.wait_for(position, |p| p.synced).await
    }

    /// Waits until `position` is written to the kernel.
    pub(crate) async fn wait_written(&self, position: u64) -> Result<(), StoreError> {
        self.wait_for(position, |p| p.written).await
    }

    async fn wait_for(
        &self,
        position: u64,
        reached: fn(&Progress) -> u64,
    ) -> Result<(), StoreError> {
        let mut rx = self.shared.progress.subscribe();
        let progress = rx
            .wait_for(|p| reached(p) >= position || p.failed.is_some())
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        match &progress.failed {
            Some(reason) if reached(&progress) < position => Err(reason.clone()),
            _ => Ok(()),
        }
    }

    /// Blocking variant for the compactor's thread: waits until `position` is written
    /// and synced.
    pub(crate) fn wait_written_blocking(&self, position: u64) -> Result<(), StoreError> {
        if position == 0 {
            return self.failure().map_or(Ok(()), Err);
        }
        let handle = tokio::runtime::Handle::try_current().map_err(|_| StoreError::NoRuntime)?;
        handle.block_on(self.wait_durable_any_policy(position))
    }

    async fn wait_durable_any_policy(&self, position: u64) -> Result<(), StoreError> {
        // With `interval` the writer syncs on its timer; a snapshot must not delete the
        // segments before that, so it asks for a sync now.
        self.shared.wake.notify_one();
        self.wait_synced(position).await
    }

    pub(crate) async fn compaction_due(&self) {
        self.shared.compact.notified().await
    }

    /// Whether the log is still big enough to compact: a wake-up stored while the last
    /// compaction ran may be stale once it finished.
    pub(crate) fn compaction_still_due(&self) -> bool {
        lock(&self.shared.growth).compaction_due(self.shared.compact_after)
    }

    /// Sends later appends to a new segment; returns it and the last position before it.
    /// When nothing was appended to the current segment yet, it is that new segment: the
    /// numbers of the files stay consecutive.
    pub(crate) fn roll(&self) -> (u64, u64) {
        let mut st = lock(&self.shared.state);
        if st.segment_used {
            st.segment += 1;
            st.segment_used = false;
        }
        (st.segment, st.last)
    }

    /// Writes a snapshot file atomically (temporary name, fsync, rename, directory fsync)
    /// and deletes the segments and snapshots before `base`. Returns the snapshot's size.
    pub(crate) fn install_snapshot(&self, base: u64, frames: &[u8]) -> Result<u64, StoreError> {
        let storage = &self.shared.storage;
        let name = snapshot_name(base);
        let tmp = format!("{name}.tmp");
        let io = |op: FileOp, e: std::io::Error| {
            StoreError::Compaction(Box::new(StoreError::io(op, storage.describe(&tmp), e)))
        };
        let written = storage.create(&tmp).and_then(|mut file| {
            file.write_all(frames)?;
            file.sync()
        });
        if let Err(e) = written {
            // A partial snapshot must not eat the space the log needs (e.g. on ENOSPC).
            let _ = storage.remove(&tmp);
            return Err(io(FileOp::Write, e));
        }
        storage
            .rename(&tmp, &name)
            .map_err(|e| io(FileOp::Rename, e))?;
        storage.sync_dir().map_err(|e| io(FileOp::FsyncDir, e))?;
        // The old files go only once the manifest no longer needs them; until then a crash
        // leaves both, and recovery starts from the newest snapshot.
        self.shared
            .claim(|m| {
                m.snapshot = Some(base);
                if m.newest.is_some_and(|n| n < base) {
                    m.newest = None;
                }
            })
            .map_err(|e| StoreError::Compaction(Box::new(e)))?;
        let names = storage.list().map_err(|e| io(FileOp::List, e))?;
        for old in names {
            if let Some(id) = parse_segment(&old).filter(|id| *id < base)
                && self.shared.recycle(&old, id)
            {
                continue;
            }
            let obsolete = parse_segment(&old).is_some_and(|id| id < base)
                || parse_snapshot(&old).is_some_and(|id| id < base);
            if obsolete && let Err(e) = storage.remove(&old) {
                // A leftover is only disk space: recovery skips files older than the
                // newest snapshot.
                tracing::warn!(file = %storage.describe(&old), error = %e, "compaction could not delete an old file");
            }
        }
        let size = frames.len() as u64;
        lock(&self.shared.growth).replaced(base, size);
        Ok(size)
    }

    pub(crate) fn close(&self) {
        lock(&self.shared.state).closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
        self.shared.storage.release();
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        lock(&self.shared.state).closing = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    /// Rewrites the manifest with `change` applied; what it claims changes only if the
    /// new manifest is on disk.
    fn claim(&self, change: impl FnOnce(&mut Manifest)) -> Result<(), StoreError> {
        let mut claimed = lock(&self.manifest);
        let mut next = *claimed;
        change(&mut next);
        if next != *claimed {
            manifest::write(&*self.storage, &next)?;
            *claimed = next;
        }
        Ok(())
    }

    /// Keeps the obsolete segment `name` (number `id`) for reuse, if preallocating and
    /// fewer than [`MAX_FREE_SEGMENTS`] are kept: zeroes it durably, then renames it.
    ///
    /// Zeroed first so that the space after the last record of every segment reads as
    /// zeros, which recovery takes for the end of the log: the old records would
    /// otherwise follow the new ones, and one starting where the new ones end would pass
    /// its checksum and be replayed as new. Zeroed under its old name, which recovery
    /// already ignores (it is before the snapshot), so a crash midway leaves no file that
    /// could be taken for a zeroed one. Returns whether it was kept.
    fn recycle(&self, name: &str, id: u64) -> bool {
        if !self.preallocate || lock(&self.free).len() >= MAX_FREE_SEGMENTS {
            return false;
        }
        let free = free_name(id);
        let kept = self
            .storage
            .zero(name)
            .and_then(|()| self.storage.rename(name, &free));
        match kept {
            Ok(()) => {
                lock(&self.free).push(free);
                true
            }
            Err(e) => {
                tracing::warn!(file = %self.storage.describe(name), error = %e, "compaction could not keep an old segment for reuse; deleting it");
                false
            }
        }
    }

    /// Takes the free segments a previous run left as the first to reuse (when
    /// preallocating; beyond [`MAX_FREE_SEGMENTS`], and otherwise, they are deleted).
    fn adopt_free_segments(&self) {
        let Ok(names) = self.storage.list() else {
            return;
        };
        let mut free = lock(&self.free);
        for name in names.into_iter().filter(|n| parse_free(n).is_some()) {
            if self.preallocate && free.len() < MAX_FREE_SEGMENTS {
                free.push(name);
            } else if let Err(e) = self.storage.remove(&name) {
                tracing::warn!(file = %self.storage.describe(&name), error = %e, "could not delete a free segment");
            }
        }
    }

    fn mark_failed(&self, reason: StoreError) {
        let reason = StoreError::FailStopped(Box::new(reason));
        tracing::error!(%reason, "storage failure: every later change is refused with UNAVAILABLE; fix the disk and restart the broker");
        self.failed.store(true, Ordering::Release);
        self.progress
            .send_modify(|p| p.failed = Some(reason.clone()));
        self.space.notify_waiters();
    }
}

/// Tells the listeners of records just made durable, in append order, and empties the
/// list. Of a run of appends with one listener (a busy topic) only the last is told: marks
/// only grow.
fn tell_listeners(listeners: &mut Vec<Listening>) {
    let mut listeners = listeners.drain(..).peekable();
    while let Some((listener, mark)) = listeners.next() {
        let same_next = listeners
            .peek()
            .is_some_and(|(next, _)| std::ptr::addr_eq(Arc::as_ptr(next), Arc::as_ptr(&listener)));
        if !same_next {
            listener.durable(mark);
        }
    }
}

/// Parses a segment file name.
pub(crate) fn parse_segment(name: &str) -> Option<u64> {
    let id = name.strip_suffix(".wal")?;
    (id.len() == 20 && id.bytes().all(|b| b.is_ascii_digit()))
        .then(|| id.parse().ok())
        .flatten()
}

/// Parses a snapshot file name.
pub(crate) fn parse_snapshot(name: &str) -> Option<u64> {
    parse_segment(name.strip_prefix("snap-")?)
}

struct Writer {
    shared: Arc<Shared>,
    /// The segment being appended to and the bytes written to it.
    file: Option<(u64, Box<dyn StorageFile>, u64)>,
    /// Bytes of the open segment known to be fsynced.
    synced: u64,
    /// Newest position written but not yet synced.
    unsynced: Option<u64>,
    last_sync: Instant,
    /// Listeners of the records being written, moved from the buffer's list each round
    /// (both keep their capacity, so neither allocates once grown).
    listeners: Vec<Listening>,
    /// The chunks being written, swapped with the buffer's list each round (likewise).
    taken: Vec<SegmentBuffer>,
    /// Buffers of chunks written, handed back to the appenders at the next round.
    emptied: Vec<Vec<u8>>,
    /// The threads that sync while the writer writes (policy `always`, more than one
    /// sync at a time).
    syncers: Option<Syncers>,
    /// Whether the open segment is synced by `syncers` (its storage gave sync handles).
    overlapped: bool,
}

impl Writer {
    fn new(shared: Arc<Shared>) -> Self {
        let syncers = (shared.fsync == FsyncPolicy::Always && shared.sync_threads > 1)
            .then(|| Syncers::start(&shared, shared.sync_threads));
        Self {
            syncers,
            overlapped: false,
            shared,
            file: None,
            synced: 0,
            unsynced: None,
            last_sync: Instant::now(),
            listeners: Vec::new(),
            taken: Vec::new(),
            emptied: Vec::new(),
        }
    }

    fn run(mut self) {
        loop {
            let (last, closing) = {
                let mut st = lock(&self.shared.state);
                for data in self.emptied.drain(..) {
                    if st.spare.len() < SPARE_BUFFERS && data.capacity() <= SPARE_BYTES {
                        st.spare.push(data);
                    }
                }
                loop {
                    if !st.chunks.is_empty() || st.closing || self.sync_failed() {
                        break;
                    }
                    st.writer_asleep = true;
                    match (self.shared.fsync, self.unsynced) {
                        (FsyncPolicy::Interval(every), Some(_)) => {
                            let left = every.saturating_sub(self.last_sync.elapsed());
                            if left.is_zero() {
                                st.writer_asleep = false;
                                break;
                            }
                            st = sync::wait_timeout(&self.shared.wake, st, left);
                            if self.last_sync.elapsed() >= every {
                                st.writer_asleep = false;
                                break;
                            }
                        }
                        _ => {
                            st = sync::wait(&self.shared.wake, st);
                        }
                    }
                    st.writer_asleep = false;
                }
                st.buffered = 0;
                self.listeners.append(&mut st.listeners);
                std::mem::swap(&mut st.chunks, &mut self.taken);
                (st.last, st.closing)
            };
            self.shared.space.notify_waiters();
            // The flag first: the error itself is behind the sync threads' lock.
            if self.sync_failed()
                && let Some(reason) = self.syncers.as_ref().and_then(Syncers::failure)
            {
                self.fail(reason);
                return;
            }
            if let Err(reason) = self.write(last, closing) {
                self.fail(reason);
                return;
            }
            if closing && lock(&self.shared.state).chunks.is_empty() {
                return;
            }
        }
    }

    /// Whether a sync thread failed (the log must then fail).
    fn sync_failed(&self) -> bool {
        self.syncers.as_ref().is_some_and(Syncers::failed)
    }

    /// Writes the chunks taken (everything appended up to `last`), fsyncs when the
    /// policy says so, tells the listeners of these records once they are durable under
    /// the policy, and only then publishes the progress that answers the requests:
    /// whoever hears a request's answer can already read what it made visible.
    fn write(&mut self, last: u64, closing: bool) -> Result<(), StoreError> {
        let mut taken = std::mem::take(&mut self.taken);
        let wrote = !taken.is_empty();
        for SegmentBuffer { segment, mut data } in taken.drain(..) {
            self.write_chunk(segment, &data)?;
            data.clear();
            self.emptied.push(data);
        }
        self.taken = taken;
        if self.overlapped
            && let (Some(syncers), Some((_, _, bytes))) = (&self.syncers, &self.file)
        {
            // A sync thread syncs these (with whatever is written before it starts) and
            // answers them; the writer goes on writing meanwhile.
            if wrote {
                syncers.hand_over(last, *bytes, &mut self.listeners);
                // Nobody waits for `written` under `always` (answers wait for `synced`),
                // so this wakes no one.
                self.shared.progress.send_if_modified(|p| {
                    p.written = last;
                    false
                });
            }
            if closing {
                syncers.drain()?;
            }
            return Ok(());
        }
        if wrote {
            self.unsynced = Some(last);
        }
        let sync_now = match self.shared.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(every) => closing || self.last_sync.elapsed() >= every,
        };
        let synced = match self.unsynced {
            Some(position) if sync_now => {
                self.sync()?;
                self.unsynced = None;
                Some(position)
            }
            _ => None,
        };
        // Under `interval` a record is durable once written: a process crash keeps it.
        if synced.is_some() || matches!(self.shared.fsync, FsyncPolicy::Interval(_)) {
            self.notify_listeners();
        }
        if wrote || synced.is_some() {
            self.shared.progress.send_modify(|p| {
                if wrote {
                    p.written = last;
                }
                if let Some(position) = synced {
                    p.synced = position;
                }
            });
        }
        Ok(())
    }

    /// Tells the listeners of the records just made durable.
    fn notify_listeners(&mut self) {
        tell_listeners(&mut self.listeners);
    }

    fn write_chunk(&mut self, segment: u64, data: &[u8]) -> Result<(), StoreError> {
        if self.file.as_ref().map(|f| f.0) != Some(segment) {
            self.open_segment(segment)?;
        }
        let (id, file, size) = self.file.as_mut().expect("segment open");
        file.write_all(data).map_err(|e| StoreError::Append {
            bytes: data.len(),
            file: self.shared.storage.describe(&segment_name(*id)),
            source: Arc::new(e),
        })?;
        *size += data.len() as u64;
        let written = data.len() as u64;
        let full = *size >= self.shared.segment_bytes;
        let segment = *id;
        let due = {
            let mut growth = lock(&self.shared.growth);
            growth.add(segment, written);
            growth.compaction_due(self.shared.compact_after)
        };
        if full {
            let mut st = lock(&self.shared.state);
            if st.segment == segment {
                st.segment += 1;
                st.segment_used = false;
            }
        }
        if due {
            self.shared.compact.notify_one();
        }
        Ok(())
    }

    fn open_segment(&mut self, id: u64) -> Result<(), StoreError> {
        // Everything in the previous segment is synced before a newer one exists:
        // recovery treats damage anywhere but in the newest segment as real damage. The
        // groups in flight go first, so no sync thread still holds the old file's group.
        if self.file.is_some() {
            if let Some(syncers) = &self.syncers {
                syncers.drain()?;
            }
            self.sync()?;
        }
        let storage = &self.shared.storage;
        let name = segment_name(id);
        let len = self.shared.segment_bytes;
        let free = if self.shared.preallocate {
            lock(&self.shared.free).pop()
        } else {
            None
        };
        let mut file = match (&free, self.shared.preallocate) {
            (Some(free), _) => storage.reuse(free, &name, len),
            (None, true) => storage.create_preallocated(&name, len),
            (None, false) => storage.create(&name),
        }
        .map_err(|e| StoreError::io(FileOp::Create, storage.describe(&name), e))?;
        file.write_all(FILE_MAGIC)
            .map_err(|e| StoreError::io(FileOp::Write, storage.describe(&name), e))?;
        self.overlapped = false;
        if let Some(syncers) = &self.syncers {
            // Opened before any record is written, so each handle hears of every
            // write-back error of the records.
            let handles = (0..syncers.threads())
                .map(|_| file.syncer())
                .collect::<Result<Option<Vec<_>>, _>>()
                .map_err(|e| StoreError::io(FileOp::Open, storage.describe(&name), e))?;
            if let Some(handles) = handles {
                syncers.new_segment(id, handles);
                self.overlapped = true;
            }
        }
        self.file = Some((id, file, FILE_MAGIC.len() as u64));
        self.synced = FILE_MAGIC.len() as u64;
        storage
            .sync_dir()
            .map_err(|e| StoreError::io(FileOp::FsyncDir, storage.describe(&name), e))?;
        // Claimed only once it exists, so a crash in between never makes a complete log
        // look damaged.
        self.shared.claim(|m| m.newest = Some(id))
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        self.last_sync = Instant::now();
        let Some((id, file, size)) = self.file.as_mut() else {
            return Ok(());
        };
        file.sync().map_err(|e| {
            StoreError::io(
                FileOp::Fsync,
                self.shared.storage.describe(&segment_name(*id)),
                e,
            )
        })?;
        self.synced = *size;
        Ok(())
    }

    /// Records where the durable log ends, cuts what was refused off the segment (so a
    /// restart does not bring it back), then fails every waiter.
    fn fail(&self, reason: StoreError) {
        let end = match &self.file {
            None => DurableEnd {
                segment: self.shared.first,
                bytes: 0,
            },
            Some((id, _, written)) => DurableEnd {
                segment: *id,
                bytes: match self.shared.fsync {
                    FsyncPolicy::Always => match self.syncers.as_ref().map(Syncers::released) {
                        Some((segment, bytes)) if segment == *id => bytes.max(self.synced),
                        _ => self.synced,
                    },
                    FsyncPolicy::Interval(_) => *written,
                },
            },
        };
        if let Some((id, _, written)) = &self.file {
            // Bytes past `written` are a partial write; with `always`, those past the last
            // fsync were never acknowledged. Cutting them frees space on a full disk.
            let name = segment_name(*id);
            if let Err(e) = self.shared.storage.truncate(&name, end.bytes) {
                tracing::error!(
                    file = %self.shared.storage.describe(&name),
                    written = *written,
                    durable = end.bytes,
                    error = %e,
                    "cannot cut the refused records off the segment; a restart may bring them back"
                );
            }
        }
        *lock(&self.shared.durable_end) = Some(end);
        self.shared.mark_failed(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_during_a_compaction_still_count_after_it() {
        let mut log = LogSize::default();
        log.add(1, 6000);
        log.add(2, 6000);
        assert!(log.compaction_due(8192));
        // The compaction rolled to segment 3; while it wrote its snapshot, 9000 bytes
        // went to segments 3 and 4, which stay in the log.
        log.add(3, 5000);
        log.add(4, 4000);
        log.replaced(3, 4000);
        assert_eq!(log.bytes(), 9000);
        assert!(log.compaction_due(8192), "9000 >= max(8192, 2 * 4000)");
        log.replaced(5, 6000);
        assert_eq!(log.bytes(), 0);
        log.add(5, 11_000);
        assert!(!log.compaction_due(8192), "11000 < 2 * 6000");
        log.add(5, 1000);
        assert!(log.compaction_due(8192));
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_segment(&segment_name(42)), Some(42));
        assert_eq!(parse_free(&free_name(42)), Some(42));
        assert_eq!(parse_segment(&free_name(42)), None);
        assert_eq!(parse_free(&segment_name(42)), None);
        assert_eq!(parse_snapshot(&snapshot_name(7)), Some(7));
        assert_eq!(parse_segment(&snapshot_name(7)), None);
        assert_eq!(parse_segment("00000000000000000001.wal.tmp"), None);
        assert_eq!(parse_segment("1.wal"), None);
    }
}
