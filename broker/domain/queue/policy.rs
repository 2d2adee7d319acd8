//! A queue's policy (visibility, attempts, backoff, dead-letter queue, history, rate and
//! in-flight limits) and the limits on it.

/// Longest visibility timeout: 12 hours.
pub(crate) const MAX_VISIBILITY_MS: u64 = 12 * 3600 * 1000;
/// Highest priority.
pub(crate) const MAX_PRIORITY: u8 = 9;
/// Most deliveries a job may be given (per job or by policy).
pub(crate) const MAX_ATTEMPTS: u32 = 10_000;
/// Highest rate limit and burst, jobs per second: past it a limit limits nothing a
/// broker could hand out anyway.
pub(crate) const MAX_RATE_PER_SECOND: u32 = 1_000_000;
/// Highest `max_in_flight` (leases held at once).
pub(crate) const MAX_IN_FLIGHT: u32 = 1_000_000;

/// How fast a queue hands out jobs: a token bucket of `burst` tokens refilled at
/// `per_second`; every job leased takes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens added a second (at least 1).
    pub per_second: u32,
    /// Most tokens held, so most jobs leased at once after a pause (at least 1).
    pub burst: u32,
}

/// How long to wait before retry number `n` (1-based) of a failed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backoff {
    /// `initial * 2^(n-1)`, capped at `max`; with `jitter`, a uniformly random delay between
    /// half and all of that, so retries of a burst of failures spread out.
    Exponential {
        /// First delay, ms.
        initial_ms: u64,
        /// Cap, ms.
        max_ms: u64,
        /// Randomise each delay between half and all of it.
        jitter: bool,
    },
    /// The n-th retry waits the n-th entry; the last entry repeats.
    Schedule(Vec<u64>),
}

impl Default for Backoff {
    fn default() -> Self {
        Self::Exponential {
            initial_ms: Self::DEFAULT_INITIAL_MS,
            max_ms: Self::DEFAULT_MAX_MS,
            jitter: true,
        }
    }
}

impl Backoff {
    /// First delay of the default exponential backoff, and of one that sets only its cap.
    pub const DEFAULT_INITIAL_MS: u64 = 1_000;
    /// Cap of the default exponential backoff, and of one that sets only its first delay.
    pub const DEFAULT_MAX_MS: u64 = 300_000;

    /// Delay before retry number `retry` (1 for the first retry).
    pub fn delay_ms(&self, retry: u32) -> u64 {
        match self {
            Self::Schedule(delays) => {
                let i = (retry.max(1) as usize - 1).min(delays.len().saturating_sub(1));
                delays.get(i).copied().unwrap_or(0)
            }
            Self::Exponential {
                initial_ms,
                max_ms,
                jitter,
            } => {
                let shift = retry.saturating_sub(1).min(40);
                let full = initial_ms.saturating_mul(1u64 << shift).min(*max_ms);
                if *jitter && full > 1 {
                    fastrand::u64(full / 2..=full)
                } else {
                    full
                }
            }
        }
    }
}

/// A queue's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePolicy {
    /// Default lease duration.
    pub visibility_timeout_ms: u64,
    /// Default deliveries before dead-lettering.
    pub max_attempts: u32,
    /// Retry delays.
    pub backoff: Backoff,
    /// Where dead jobs go; empty keeps them here as dead records.
    pub dead_letter_queue: String,
    /// Most live jobs.
    pub max_depth: u64,
    /// How long an idempotency key is remembered.
    pub dedup_window_ms: u64,
    /// Topic patterns whose messages are enqueued here.
    pub topic_bindings: Vec<String>,
    /// Finished jobs kept for inspection.
    pub history_limit: u32,
    /// How fast jobs are handed out; `None` is no limit.
    pub rate_limit: Option<RateLimit>,
    /// Most jobs leased at once, by every consumer together; `None` is no limit.
    pub max_in_flight: Option<u32>,
}

impl QueuePolicy {
    /// The default policy of the queue `name`: its dead-letter queue is `<name>.dlq`, except
    /// for a queue that is itself named `*.dlq`, which keeps its dead jobs.
    pub fn default_for(name: &str) -> Self {
        Self {
            visibility_timeout_ms: 30_000,
            max_attempts: 5,
            backoff: Backoff::default(),
            dead_letter_queue: if name.ends_with(".dlq") {
                String::new()
            } else {
                format!("{name}.dlq")
            },
            max_depth: 1_000_000,
            dedup_window_ms: 300_000,
            topic_bindings: Vec::new(),
            history_limit: 1_000,
            rate_limit: None,
            max_in_flight: None,
        }
    }
}
