//! The disk's own limit for durable writes, measured in the same run as the durable table
//! and on the filesystem that holds the durable brokers' data, so that every durable
//! figure can be read against what the hardware allows: a broker that answers after
//! fdatasync cannot answer one writer faster than the disk completes syncs.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::common::*;
use crate::sluice_peer;

/// Bytes written before each sync: about one small durable publish.
const RECORD: usize = 512;
/// Size of the preallocated file; overwrites wrap around at its end.
const PREALLOCATED: u64 = 64 * 1024 * 1024;

/// One sync loop's figures.
#[derive(Debug, Clone)]
pub struct SyncLoop {
    /// Completed write + fdatasync pairs per second of the window.
    pub per_sec: u64,
    /// Latency of one write + fdatasync, µs.
    pub latency: Histogram<u64>,
}

impl SyncLoop {
    /// "p50 101 µs, p99 180 µs, p99.9 260 µs" of one write + fdatasync.
    pub fn latency_text(&self) -> String {
        format!(
            "p50 {} µs, p99 {} µs, p99.9 {} µs",
            thousands(self.latency.value_at_quantile(0.50)),
            thousands(self.latency.value_at_quantile(0.99)),
            thousands(self.latency.value_at_quantile(0.999))
        )
    }
}

/// The disk row: both sync loops and where they ran.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The filesystem measured, e.g. "ext4 on /dev/vda (mounted at /), under /tmp".
    pub filesystem: String,
    /// 512 B appended to a growing file, then fdatasync: the size changes every time, so
    /// every sync also commits file metadata (what an appending log pays).
    pub appending: SyncLoop,
    /// 512 B overwritten in place in a file already written and synced: only the data
    /// block goes to disk (what a log with preallocated segments pays).
    pub preallocated: SyncLoop,
}

impl Disk {
    /// Durable batches per second that `in_flight` writers could have answered if each
    /// waited for a sync of its own on the preallocated file: the ceiling issue 22's S1
    /// batch 1 target is stated against.
    pub fn in_flight_limit(&self, in_flight: usize) -> u64 {
        self.preallocated.per_sec * in_flight as u64
    }
}

/// Measures both sync loops for `warmup` + `window` each, in a fresh directory made the
/// way the durable Sluice's data directory is made. Blocking: call it off the runtime.
pub fn measure(warmup: Duration, window: Duration) -> Res<Disk> {
    let dir = sluice_peer::data_dir()?;
    let appending = {
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(dir.path().join("appending"))?;
        sync_loop(warmup, window, |record| {
            file.write_all(record)?;
            file.sync_data()
        })?
    };
    let preallocated = {
        let file = preallocate(&dir.path().join("preallocated"))?;
        let mut offset = 0;
        sync_loop(warmup, window, |record| {
            if offset + RECORD as u64 > PREALLOCATED {
                offset = 0;
            }
            file.write_all_at(record, offset)?;
            offset += RECORD as u64;
            file.sync_data()
        })?
    };
    Ok(Disk {
        filesystem: filesystem_of(dir.path()),
        appending,
        preallocated,
    })
}

/// A file of [`PREALLOCATED`] zero bytes, written and synced, so that later overwrites
/// find their blocks allocated and the size settled.
fn preallocate(path: &Path) -> std::io::Result<File> {
    let mut file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(path)?;
    let zeros = vec![0u8; 1024 * 1024];
    for _ in 0..PREALLOCATED / zeros.len() as u64 {
        file.write_all(&zeros)?;
    }
    file.sync_all()?;
    Ok(file)
}

/// Runs `write_and_sync` back to back: unrecorded for `warmup`, then counted and timed
/// for `window`.
fn sync_loop(
    warmup: Duration,
    window: Duration,
    mut write_and_sync: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<SyncLoop> {
    let record = [b'x'; RECORD];
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        write_and_sync(&record)?;
    }
    let mut latency = histogram();
    let mut count = 0u64;
    let start = Instant::now();
    loop {
        let t0 = Instant::now();
        write_and_sync(&record)?;
        let done = Instant::now();
        latency.saturating_record(((done - t0).as_micros() as u64).max(1));
        count += 1;
        if done - start >= window {
            return Ok(SyncLoop {
                per_sec: rate(count, done - start),
                latency,
            });
        }
    }
}

/// "ext4 on /dev/vda (mounted at /), under /tmp": the mount holding `dir`, from
/// `/proc/self/mounts` (the longest mount point that prefixes it).
fn filesystem_of(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let under = dir
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            Some((f.next()?, f.next()?, f.next()?))
        })
        .filter(|(_, at, _)| dir.starts_with(at))
        .max_by_key(|(_, at, _)| at.len())
        .map(|(device, at, fs)| format!("{fs} on {device} (mounted at {at}), under {under}"))
        .unwrap_or_else(|| format!("unknown filesystem, under {under}"))
}
