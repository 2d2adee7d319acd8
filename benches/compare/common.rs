//! Shared pieces of the harness: settings, outcomes, clocks, payloads, pacing, histograms,
//! process memory.

use std::future::Future;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Boxed error used by every runner.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Result of a runner.
pub type Res<T> = Result<T, BoxError>;

/// Run-wide settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Quick mode: shorter windows, smaller backlogs.
    pub quick: bool,
    /// Warm-up before each throughput window.
    pub warmup: Duration,
    /// Length of each measurement window.
    pub window: Duration,
    /// Jobs in the S5 backlog.
    pub backlog: u64,
    /// Leases in the S5 expiry test.
    pub expiring: u64,
    /// Extra arguments for `sluice serve` (durable table).
    pub sluice_durable_args: Vec<String>,
    /// In-flight batches per publisher / producer (same for every system).
    pub in_flight: usize,
}

/// Storage class of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Memory only, no disk.
    Memory,
    /// Durable: written to disk before acknowledged.
    Durable,
}

impl Storage {
    /// Label used in tables.
    pub fn label(self) -> &'static str {
        match self {
            Storage::Memory => "memory",
            Storage::Durable => "durable",
        }
    }
}

/// One measured figure set, or why there is none.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Measured: the main figure and extra labelled figures.
    Measured {
        /// Main figure, e.g. "1,234,567 msg/s".
        main: String,
        /// Secondary figures, e.g. "p99 120 µs".
        extra: String,
    },
    /// The peer could not be reached.
    Unavailable(String),
    /// The combination does not apply (e.g. no durable storage).
    NotApplicable(String),
    /// The run failed.
    Failed(String),
}

impl Outcome {
    /// Converts a runner's result into an outcome.
    pub fn from_result(r: Res<Outcome>) -> Outcome {
        match r {
            Ok(o) => o,
            Err(e) => Outcome::Failed(one_line(&e.to_string())),
        }
    }
}

/// Shortens an error text to one line.
pub fn one_line(s: &str) -> String {
    let s = s.replace(['\n', '|'], " ");
    if s.len() > 160 {
        let mut end = 160;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else {
        s
    }
}

/// Formats an integer with thousands separators.
pub fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Formats a rate per second.
pub fn rate(count: u64, elapsed: Duration) -> u64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        0
    } else {
        (count as f64 / secs).round() as u64
    }
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since the harness's clock base (one process, so comparable everywhere).
pub fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// Starts the clock base.
pub fn init_clock() {
    let _ = base();
}

/// A payload of `size` bytes whose first 8 bytes carry `stamp_ns` (little endian) and the
/// next 8 a sequence number; the rest is a fixed filler.
pub fn payload(size: usize, seq: u64, stamp_ns: u64) -> Vec<u8> {
    let mut v = vec![b'x'; size.max(16)];
    v[..8].copy_from_slice(&stamp_ns.to_le_bytes());
    v[8..16].copy_from_slice(&seq.to_le_bytes());
    v.truncate(size.max(16));
    v
}

/// The stamp written by [`payload`].
pub fn stamp_of(p: &[u8]) -> Option<u64> {
    p.get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// A latency histogram in microseconds (1 µs .. 60 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Stamps (intended send times) before this are warm-up traffic of the running open-loop
/// generator and are not recorded (see [`open_loop`]).
static MEASURE_FROM_NS: AtomicU64 = AtomicU64::new(0);

/// Records `now - stamp` in µs, unless the stamp belongs to an open-loop warm-up.
pub fn record_since(h: &mut Histogram<u64>, stamp_ns: u64) {
    if stamp_ns < MEASURE_FROM_NS.load(Ordering::Relaxed) {
        return;
    }
    let us = now_ns().saturating_sub(stamp_ns) / 1_000;
    h.saturating_record(us.max(1));
}

/// p50 / p99 / p99.9 / max text of a histogram.
pub fn percentiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".to_string();
    }
    format!(
        "p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs ({} samples)",
        thousands(h.value_at_quantile(0.50)),
        thousands(h.value_at_quantile(0.99)),
        thousands(h.value_at_quantile(0.999)),
        thousands(h.max()),
        thousands(h.len()),
    )
}

/// Shared stop flag and counter of a closed-loop throughput test.
#[derive(Clone, Default)]
pub struct Meter {
    /// Set when workers must stop.
    pub stop: Arc<AtomicBool>,
    /// Items counted (delivered / acked).
    pub count: Arc<AtomicU64>,
    /// Errors seen by workers.
    pub errors: Arc<AtomicU64>,
}

impl Meter {
    /// A fresh meter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether workers must stop.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Adds `n` to the count.
    pub fn add(&self, n: u64) {
        self.count.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts an error.
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The outcome of a measured window: `items` counted in `elapsed` as a rate (`unit`
    /// says of what, e.g. "msg/s delivered"), and the errors the workers saw.
    pub fn outcome(&self, items: u64, elapsed: Duration, unit: &str) -> Outcome {
        Outcome::Measured {
            main: format!("{} {unit}", thousands(rate(items, elapsed))),
            extra: format!("errors {}", self.errors.load(Ordering::Relaxed)),
        }
    }

    /// Waits for the warm-up, then measures the count's growth over the window, then sets
    /// the stop flag. Returns (items, elapsed).
    pub async fn measure(&self, s: &Settings) -> (u64, Duration) {
        tokio::time::sleep(s.warmup).await;
        let c0 = self.count.load(Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(s.window).await;
        let c1 = self.count.load(Ordering::Relaxed);
        let elapsed = t0.elapsed();
        self.stop.store(true, Ordering::Relaxed);
        (c1 - c0, elapsed)
    }
}

/// Statistics of an open-loop generator (measured part, after the warm-up).
#[derive(Debug, Clone, Copy)]
pub struct OpenLoopStats {
    /// Messages whose send was started.
    pub sent: u64,
    /// Sends that failed.
    pub failed: u64,
    /// Wall time of the measured part.
    pub elapsed: Duration,
    /// Generator lag, µs: how late sends started after their intended time (p99 and max).
    /// It is part of every recorded latency, so it bounds what the harness can resolve.
    pub lag_p99_us: u64,
    /// See `lag_p99_us`.
    pub lag_max_us: u64,
}

impl OpenLoopStats {
    /// "generator lag p99 X µs, max Y µs".
    pub fn lag_text(&self) -> String {
        format!(
            "generator lag p99 {} µs, max {} µs",
            thousands(self.lag_p99_us),
            thousands(self.lag_max_us)
        )
    }
}

/// Open-loop generator: starts `send(seq, intended_ns)` at `rate` per second for `warmup`
/// and then for `duration`, each on its own tokio task, paced by a dedicated OS thread so a
/// slow send never delays the next one (no coordinated omission: receivers record latency
/// against `intended_ns`, the time the message was due, not the time it was actually sent).
///
/// Messages due during the warm-up are sent like the others (connections, HTTP/2 windows,
/// allocator and thread pools reach their steady state) but [`record_since`] drops their
/// samples: the first few ms of a cold connection otherwise made up most of a 0.7 s run's
/// p99.
pub async fn open_loop<F, Fut>(
    rate: u64,
    warmup: Duration,
    duration: Duration,
    send: F,
) -> OpenLoopStats
where
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Res<()>> + Send + 'static,
{
    let handle = tokio::runtime::Handle::current();
    let failed = Arc::new(AtomicU64::new(0));
    let failed2 = failed.clone();
    let send = Arc::new(send);
    let interval_ns = 1_000_000_000 / rate.max(1);
    let warm = rate * warmup.as_millis() as u64 / 1000;
    let total = warm + rate * duration.as_millis() as u64 / 1000;
    let lag = Arc::new(std::sync::Mutex::new(histogram()));
    let lag2 = lag.clone();
    let started = Arc::new(std::sync::Mutex::new(Instant::now()));
    let started2 = started.clone();
    let pacer = std::thread::spawn(move || {
        let start = now_ns();
        MEASURE_FROM_NS.store(start + warm * interval_ns, Ordering::Relaxed);
        let mut tasks = Vec::with_capacity(total as usize);
        for seq in 0..total {
            let intended = start + seq * interval_ns;
            let now = now_ns();
            if intended > now {
                std::thread::sleep(Duration::from_nanos(intended - now));
            }
            if seq == warm {
                *started2.lock().expect("clock lock") = Instant::now();
            }
            let send = send.clone();
            let failed = failed2.clone();
            let lag = lag2.clone();
            let measured = seq >= warm;
            tasks.push((
                measured,
                handle.spawn(async move {
                    if measured {
                        let late_us = now_ns().saturating_sub(intended) / 1_000;
                        lag.lock()
                            .expect("lag lock")
                            .saturating_record(late_us.max(1));
                    }
                    if send(seq, intended).await.is_err() && measured {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }),
            ));
        }
        tasks
    });
    let tasks = tokio::task::spawn_blocking(move || pacer.join().expect("pacer thread"))
        .await
        .expect("pacer join");
    let elapsed = started.lock().expect("clock lock").elapsed();
    // Sends still unanswered 2 s after the last one was due are abandoned (and counted as
    // failed), so a saturated peer cannot stretch the run.
    let deadline = Instant::now() + Duration::from_secs(2);
    for (measured, t) in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            if !t.is_finished() && measured {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            t.abort();
            continue;
        }
        let abort = t.abort_handle();
        if tokio::time::timeout(left, t).await.is_err() {
            abort.abort();
            if measured {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let lag = lag.lock().expect("lag lock");
    OpenLoopStats {
        sent: total - warm,
        failed: failed.load(Ordering::Relaxed),
        elapsed,
        lag_p99_us: lag.value_at_quantile(0.99),
        lag_max_us: lag.max(),
    }
}

/// Resident set size of a process, bytes, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The pid of the first process whose `comm` is `name`.
pub fn pid_by_name(name: &str) -> Option<u32> {
    let dir = std::fs::read_dir("/proc").ok()?;
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            && comm.trim() == name
        {
            return Some(pid);
        }
    }
    None
}

/// Formats bytes as MiB.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Signed difference of two RSS readings.
pub fn rss_delta(before: Option<u64>, after: Option<u64>) -> Option<i64> {
    Some(after? as i64 - before? as i64)
}

/// Polls `check` every `every` until it returns true or `limit` passes; returns the time
/// it took, or `None` on time-out.
pub async fn wait_until<F, Fut>(every: Duration, limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let t0 = Instant::now();
    loop {
        if check().await {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits (up to 300 s, polling every 5 ms) until `meter` has counted `n` drained jobs,
/// then stops it and awaits `workers`; returns the time since `started`. Every peer's
/// backlog drain ends through this one wait, so none is timed differently.
pub async fn drained<T>(
    meter: &Meter,
    n: u64,
    started: Instant,
    workers: Vec<tokio::task::JoinHandle<T>>,
) -> Res<Duration> {
    let done = wait_until(Duration::from_millis(5), Duration::from_secs(300), || {
        let c = meter.count.load(Ordering::Relaxed);
        async move { c >= n }
    })
    .await;
    let drain_time = started.elapsed();
    meter.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    match done {
        Some(_) => Ok(drain_time),
        None => Err("drain did not finish within 300 s".into()),
    }
}

/// The outcome of a backlog run (`n` jobs filled in `fill_time`, drained in
/// `drain_time`): both rates, and the RSS growth of the `server` process per queued item
/// (`item` names it, with any note).
pub fn backlog_outcome(
    n: u64,
    fill_time: Duration,
    drain_time: Duration,
    rss_growth: Option<i64>,
    server: &str,
    item: &str,
) -> Outcome {
    Outcome::Measured {
        main: format!(
            "N={}: enqueue {} jobs/s, drain {} jobs/s",
            thousands(n),
            thousands(rate(n, fill_time)),
            thousands(rate(n, drain_time))
        ),
        extra: match rss_growth {
            Some(d) => format!(
                "{server} RSS +{} = {:.0} B per queued {item}",
                mib(d.max(0) as u64),
                d as f64 / n as f64
            ),
            None => "RSS n/a".into(),
        },
    }
}

/// The outcome of a fan-out run: deliveries per second over the open-loop window `st`
/// with their latencies `h`, against what `subs` subscribers were offered at
/// `rate_per_s`, and the RSS growth `mem` of the `server` process per subscriber.
pub fn fanout_outcome(
    h: &Histogram<u64>,
    st: OpenLoopStats,
    mem: Option<i64>,
    rate_per_s: u64,
    subs: usize,
    server: &str,
) -> Outcome {
    Outcome::Measured {
        main: format!(
            "{} deliveries/s, p99 {} µs",
            thousands(rate(h.len(), st.elapsed)),
            thousands(h.value_at_quantile(0.99))
        ),
        extra: format!(
            "offered {} deliveries/s; {}; {server} RSS per subscriber {}",
            thousands(rate_per_s * subs as u64),
            percentiles(h),
            mem.map(|d| format!("{} B", thousands(d.max(0) as u64 / subs as u64)))
                .unwrap_or_else(|| "n/a".into())
        ),
    }
}

/// A unique suffix for names the harness creates in peers.
pub fn run_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        format!("{}{}", std::process::id(), t % 1_000_000)
    })
}
