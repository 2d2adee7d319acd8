//! Overlapped fsyncs for the WAL writer (policy `always`).
//!
//! With one fsync at a time, a record that arrives while a sync runs waits for that sync
//! to end and then for its own: up to two syncs of latency, and with few requests in
//! flight (a publisher holding 4 unanswered publishes) the disk idles while answers
//! travel back and the next requests come in. Disks, and virtual disks over a host's
//! cache, take several flushes at once (on the machine this was built on, 2 threads
//! appending and syncing one file do 1.4x the syncs/s of one, 4 do 2x). So the writer
//! hands each written group to one of a few sync threads and goes on writing; a record's
//! latency is about one sync.
//!
//! What keeps it safe:
//! - A group's sync starts only after every write of the group returned: an fdatasync
//!   makes durable what was written to the file before it was called.
//! - Groups are released (listeners told, progress published, requests answered)
//!   strictly in the order they were written, each only once its own sync returned OK and
//!   every earlier group was released: a later sync's success never vouches for an
//!   earlier group.
//! - Each sync thread syncs through its own open file description. Linux reports a
//!   write-back error once per description (errseq): through one shared descriptor, the
//!   error that lost one group's pages could be reported to another thread's sync and
//!   never to the sync of the group that lost them.
//! - Any sync error is final: nothing after the last released group is released, and the
//!   writer fails the log (fail-stop) with that error.
//! - The writer waits for every group in flight before it starts a new segment, so a
//!   sync thread never syncs one segment's group through another segment's file.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::{Listening, Shared, segment_name, tell_listeners};
use crate::broker::store::FileSyncer;
use crate::broker::store::error::{FileOp, StoreError};
use crate::broker::sync::{self, lock};

/// Where a group of written records stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Written, its sync not started: the writer may still add what it writes next.
    Waiting,
    Syncing,
    /// Its sync returned OK; released once every earlier group is.
    Synced,
}

/// Records written since the previous group, synced together.
struct Group {
    /// Log position of its newest record.
    last: u64,
    segment: u64,
    /// The segment's length once the group's records are in it.
    bytes: u64,
    listeners: Vec<Listening>,
    stage: Stage,
}

struct Flights {
    /// Groups not yet released, in the order they were written.
    groups: VecDeque<Group>,
    /// Sync handles on the current segment's file that no thread is using.
    handles: Vec<Box<dyn FileSyncer>>,
    segment: u64,
    /// The segment and length up to which everything was released.
    released: (u64, u64),
    failed: Option<StoreError>,
    closing: bool,
    /// Emptied listener lists, for the next groups.
    spare: Vec<Vec<Listening>>,
}

struct Pool {
    flights: Mutex<Flights>,
    /// Told when a group waits, a group is released, a sync fails or the pool closes.
    changed: Condvar,
    /// Set with `Flights::failed`; the writer reads it under its own lock.
    failed: AtomicBool,
}

/// The sync threads of one log and the groups in flight between them and the writer.
pub(super) struct Syncers {
    pool: Arc<Pool>,
    threads: Vec<JoinHandle<()>>,
}

impl Syncers {
    /// Starts `threads` sync threads for the log of `shared`.
    pub(super) fn start(shared: &Arc<Shared>, threads: usize) -> Self {
        let pool = Arc::new(Pool {
            flights: Mutex::new(Flights {
                groups: VecDeque::new(),
                handles: Vec::new(),
                segment: 0,
                released: (0, 0),
                failed: None,
                closing: false,
                spare: Vec::new(),
            }),
            changed: Condvar::new(),
            failed: AtomicBool::new(false),
        });
        let threads = (0..threads)
            .map(|i| {
                let (pool, shared) = (pool.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("sluice-wal-sync-{i}"))
                    .spawn(move || pool.run(&shared))
                    .expect("spawning a WAL sync thread")
            })
            .collect();
        Self { pool, threads }
    }

    /// How many sync handles a segment needs: one per thread.
    pub(super) fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Waits until every group handed over is released; the error if a sync failed.
    pub(super) fn drain(&self) -> Result<(), StoreError> {
        let mut fl = lock(&self.pool.flights);
        loop {
            if let Some(reason) = &fl.failed {
                return Err(reason.clone());
            }
            if fl.groups.is_empty() {
                return Ok(());
            }
            fl = sync::wait(&self.pool.changed, fl);
        }
    }

    /// Later groups go to `segment`, synced through `handles` (one per thread). Called
    /// once [`Syncers::drain`] returned: no group of the previous segment is in flight.
    pub(super) fn new_segment(&self, segment: u64, handles: Vec<Box<dyn FileSyncer>>) {
        let mut fl = lock(&self.pool.flights);
        fl.segment = segment;
        fl.handles = handles;
    }

    /// Hands over what the writer wrote up to log position `last` (the segment now
    /// `bytes` long) with the listeners of those records. It joins the newest group if
    /// that group's sync has not started, so groups grow while every thread is busy.
    pub(super) fn hand_over(&self, last: u64, bytes: u64, listeners: &mut Vec<Listening>) {
        let mut fl = lock(&self.pool.flights);
        let segment = fl.segment;
        match fl.groups.back_mut() {
            Some(group) if group.stage == Stage::Waiting => {
                group.last = last;
                group.bytes = bytes;
                group.listeners.append(listeners);
            }
            _ => {
                let mut group_listeners = fl.spare.pop().unwrap_or_default();
                group_listeners.append(listeners);
                fl.groups.push_back(Group {
                    last,
                    segment,
                    bytes,
                    listeners: group_listeners,
                    stage: Stage::Waiting,
                });
                self.pool.changed.notify_one();
            }
        }
    }

    /// Whether a sync failed (the writer must then fail the log).
    pub(super) fn failed(&self) -> bool {
        self.pool.failed.load(Ordering::Acquire)
    }

    /// The error of the sync that failed, if one did.
    pub(super) fn failure(&self) -> Option<StoreError> {
        lock(&self.pool.flights).failed.clone()
    }

    /// The segment and length up to which every record was synced and released.
    pub(super) fn released(&self) -> (u64, u64) {
        lock(&self.pool.flights).released
    }

    /// Stops the threads once they are idle (call [`Syncers::drain`] first to wait for
    /// the groups in flight).
    pub(super) fn stop(&mut self) {
        lock(&self.pool.flights).closing = true;
        self.pool.changed.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Syncers {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Pool {
    /// One sync thread: takes the oldest waiting group and a free handle, syncs, then
    /// releases every group that is now synced in order.
    fn run(&self, shared: &Shared) {
        let mut fl = lock(&self.flights);
        loop {
            if fl.closing {
                return;
            }
            let waiting = if fl.failed.is_none() && !fl.handles.is_empty() {
                fl.groups.iter().position(|g| g.stage == Stage::Waiting)
            } else {
                None
            };
            let Some(at) = waiting else {
                fl = sync::wait(&self.changed, fl);
                continue;
            };
            let mut handle = fl.handles.pop().expect("a free handle");
            let group = &mut fl.groups[at];
            group.stage = Stage::Syncing;
            let (segment, last) = (group.segment, group.last);
            drop(fl);
            let synced = handle.sync();
            fl = lock(&self.flights);
            if fl.segment == segment {
                fl.handles.push(handle);
            }
            match synced {
                Ok(()) => {
                    // Groups are never removed out of order, so `last` finds this one.
                    if let Some(group) = fl.groups.iter_mut().find(|g| g.last == last) {
                        group.stage = Stage::Synced;
                    }
                    self.release(&mut fl, shared);
                }
                Err(e) if fl.failed.is_none() => {
                    fl.failed = Some(StoreError::io(
                        FileOp::Fsync,
                        shared.storage.describe(&segment_name(segment)),
                        e,
                    ));
                    self.failed.store(true, Ordering::Release);
                    drop(fl);
                    // Under the writer's lock, so a writer about to sleep hears it.
                    drop(lock(&shared.state));
                    shared.wake.notify_one();
                    fl = lock(&self.flights);
                }
                Err(_) => {}
            }
            self.changed.notify_all();
        }
    }

    /// Releases the synced groups at the front, in order: tells their listeners, then
    /// publishes the new synced position (which answers the requests). Under the
    /// flights lock, so two threads never release out of order.
    fn release(&self, fl: &mut Flights, shared: &Shared) {
        let mut synced = None;
        while fl.failed.is_none() && fl.groups.front().is_some_and(|g| g.stage == Stage::Synced) {
            let mut group = fl.groups.pop_front().expect("a front group");
            tell_listeners(&mut group.listeners);
            fl.released = (group.segment, group.bytes);
            synced = Some(group.last);
            fl.spare.push(group.listeners);
        }
        if let Some(position) = synced {
            shared
                .progress
                .send_modify(|p| p.synced = p.synced.max(position));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use super::super::{DurableListener, Wal};
    use super::*;
    use crate::broker::store::manifest::Manifest;
    use crate::broker::store::{DirStorage, Storage, StorageFile, StoreConfig};

    /// The outcome a test gives each sync, by the order the syncs started in.
    #[derive(Default)]
    struct Gate {
        /// Outcomes given so far: `None` holds that sync.
        outcomes: Mutex<Vec<Option<io::Result<()>>>>,
        changed: Condvar,
        started: AtomicU64,
        returned: AtomicU64,
    }

    impl Gate {
        fn decide(&self, sync: usize, outcome: io::Result<()>) {
            let mut outcomes = self.outcomes.lock().unwrap();
            if outcomes.len() <= sync {
                outcomes.resize_with(sync + 1, || None);
            }
            outcomes[sync] = Some(outcome);
            self.changed.notify_all();
        }

        fn wait_until(&self, what: impl Fn(&Self) -> bool) {
            for _ in 0..5000 {
                if what(self) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            panic!("the syncs never got there");
        }
    }

    struct GatedSyncer(Arc<Gate>);

    impl FileSyncer for GatedSyncer {
        fn sync(&mut self) -> io::Result<()> {
            let gate = &self.0;
            let me = gate.started.fetch_add(1, Ordering::SeqCst) as usize;
            let mut outcomes = gate.outcomes.lock().unwrap();
            let outcome = loop {
                if let Some(decided) = outcomes.get_mut(me).and_then(Option::take) {
                    break decided;
                }
                outcomes = gate.changed.wait(outcomes).unwrap();
            };
            drop(outcomes);
            gate.returned.fetch_add(1, Ordering::SeqCst);
            outcome
        }
    }

    struct GatedFile(Box<dyn StorageFile>, Arc<Gate>);

    impl StorageFile for GatedFile {
        fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
            self.0.write_all(data)
        }
        fn sync(&mut self) -> io::Result<()> {
            self.0.sync()
        }
        fn syncer(&self) -> io::Result<Option<Box<dyn FileSyncer>>> {
            Ok(Some(Box::new(GatedSyncer(self.1.clone()))))
        }
    }

    /// A data directory whose segments are synced through [`GatedSyncer`]s.
    #[derive(Debug)]
    struct GatedStorage(DirStorage);

    impl Storage for GatedStorage {
        fn list(&self) -> io::Result<Vec<String>> {
            self.0.list()
        }
        fn read(&self, name: &str) -> io::Result<Vec<u8>> {
            self.0.read(name)
        }
        fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
            Ok(Box::new(GatedFile(self.0.create(name)?, gate())))
        }
        fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
            self.0.truncate(name, len)
        }
        fn rename(&self, from: &str, to: &str) -> io::Result<()> {
            self.0.rename(from, to)
        }
        fn remove(&self, name: &str) -> io::Result<()> {
            self.0.remove(name)
        }
        fn sync_dir(&self) -> io::Result<()> {
            self.0.sync_dir()
        }
        fn describe(&self, name: &str) -> String {
            self.0.describe(name)
        }
        fn release(&self) {
            self.0.release()
        }
    }

    /// Records the marks it is told, in order.
    #[derive(Default)]
    struct Told(Mutex<Vec<u64>>);

    impl DurableListener for Told {
        fn durable(&self, mark: u64) {
            self.0.lock().unwrap().push(mark);
        }
    }

    static GATE: Mutex<Option<Arc<Gate>>> = Mutex::new(None);

    fn gate() -> Arc<Gate> {
        GATE.lock()
            .unwrap()
            .clone()
            .expect("a gate set by the test")
    }

    /// A log over a fresh directory with two sync threads, and its gate.
    fn gated_log(dir: &tempfile::TempDir) -> (Wal, Arc<Gate>) {
        let gate = Arc::new(Gate::default());
        *GATE.lock().unwrap() = Some(gate.clone());
        let storage = Arc::new(GatedStorage(DirStorage::open(dir.path()).unwrap()));
        let config = StoreConfig {
            sync_threads: 2,
            ..StoreConfig::default()
        };
        (Wal::start(storage, &config, 1, Manifest::default()), gate)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// One test at a time: the gate is process-wide.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn a_later_group_synced_first_waits_for_the_earlier_one() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let (wal, gate) = gated_log(&dir);
        let told = Arc::new(Told::default());
        let listener: Arc<dyn DurableListener> = told.clone();
        let a = wal
            .append(b"record a", Some((listener.clone(), 10)))
            .unwrap();
        gate.wait_until(|g| g.started.load(Ordering::SeqCst) == 1);
        // The first sync is held: the second record gets a sync of its own at once.
        let b = wal.append(b"record b", Some((listener, 20))).unwrap();
        gate.wait_until(|g| g.started.load(Ordering::SeqCst) == 2);
        gate.decide(1, Ok(()));
        gate.wait_until(|g| g.returned.load(Ordering::SeqCst) == 1);
        std::thread::sleep(Duration::from_millis(20));
        assert!(told.0.lock().unwrap().is_empty(), "b released before a");
        let rt = runtime();
        let early = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(20), wal.wait_synced(b)).await
        });
        assert!(early.is_err(), "b answered before a was synced");
        gate.decide(0, Ok(()));
        rt.block_on(wal.wait_synced(b)).unwrap();
        rt.block_on(wal.wait_synced(a)).unwrap();
        // Told in the order the records were written.
        assert_eq!(*told.0.lock().unwrap(), vec![10, 20]);
        wal.close();
    }

    #[test]
    fn a_failed_sync_releases_nothing_after_it_and_fails_the_log() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let (wal, gate) = gated_log(&dir);
        let told = Arc::new(Told::default());
        let listener: Arc<dyn DurableListener> = told.clone();
        let a = wal.append(b"record a", None).unwrap();
        gate.wait_until(|g| g.started.load(Ordering::SeqCst) == 1);
        let b = wal.append(b"record b", Some((listener, 20))).unwrap();
        gate.wait_until(|g| g.started.load(Ordering::SeqCst) == 2);
        // The later sync succeeds, the earlier one fails: neither record is released.
        gate.decide(1, Ok(()));
        gate.decide(0, Err(io::Error::from_raw_os_error(5)));
        let rt = runtime();
        assert!(rt.block_on(wal.wait_synced(a)).is_err());
        assert!(rt.block_on(wal.wait_synced(b)).is_err());
        assert!(told.0.lock().unwrap().is_empty());
        assert!(wal.failure().is_some());
        assert!(wal.append(b"record c", None).is_err());
        // The durable log ends before record a: both were cut off the segment.
        let end = wal.durable_end().expect("a failed log has a durable end");
        assert_eq!(
            end.bytes,
            crate::broker::store::record::FILE_MAGIC.len() as u64
        );
        let segment = std::fs::metadata(dir.path().join(segment_name(end.segment))).unwrap();
        assert_eq!(segment.len(), end.bytes);
        wal.close();
    }
}
