//! A per-second event counter over a sliding 10-second window, for stats rates, and the
//! token bucket of a queue's rate limit.

use crate::broker::domain::time::Millis;

/// The seconds a [`RateMeter`] counts over (the Redis engine's scripts count over as many).
pub(crate) const WINDOW_SECS: usize = 10;

/// Counts events per second over the last [`WINDOW_SECS`] seconds. Recording is O(1) and
/// allocation-free; the caller passes `now`, so it is tested without sleeping.
#[derive(Debug, Clone, Default)]
pub(crate) struct RateMeter {
    /// Events per second, indexed by `second % WINDOW_SECS`.
    buckets: [u64; WINDOW_SECS],
    /// The second each bucket currently counts.
    seconds: [u64; WINDOW_SECS],
}

impl RateMeter {
    /// Records `n` events at `now`.
    pub(crate) fn record(&mut self, now: Millis, n: u64) {
        let second = now / 1000;
        let slot = (second as usize) % WINDOW_SECS;
        if self.seconds[slot] != second {
            self.seconds[slot] = second;
            self.buckets[slot] = 0;
        }
        self.buckets[slot] += n;
    }

    /// Events per second over the last window, ending at `now`.
    pub(crate) fn per_second(&self, now: Millis) -> f64 {
        let second = now / 1000;
        let total: u64 = self
            .seconds
            .iter()
            .zip(&self.buckets)
            .filter(|(s, _)| **s + (WINDOW_SECS as u64) > second && **s <= second)
            .map(|(_, n)| *n)
            .sum();
        total as f64 / WINDOW_SECS as f64
    }
}

/// Thousandths of a token: the bucket counts in them so that `per_second` tokens a second
/// refill exactly `per_second` thousandths a millisecond, in integers.
const MILLI: u64 = 1_000;

/// A token bucket refilled continuously by the caller's `now`: it holds up to `burst`
/// tokens and gains `per_second` a second. It starts full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenBucket {
    per_second: u64,
    burst: u64,
    /// Thousandths of a token held at `at`.
    milli: u64,
    at: Millis,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `per_second` (both at least 1).
    pub(crate) fn new(per_second: u32, burst: u32) -> Self {
        let burst = u64::from(burst.max(1));
        Self {
            per_second: u64::from(per_second.max(1)),
            burst,
            milli: burst * MILLI,
            at: 0,
        }
    }

    /// Thousandths of a token held at `now` (a `now` before the last refill adds none).
    fn milli_at(&self, now: Millis) -> u64 {
        let gained = now.saturating_sub(self.at).saturating_mul(self.per_second);
        self.milli.saturating_add(gained).min(self.burst * MILLI)
    }

    /// Whole tokens available at `now`.
    pub(crate) fn available(&self, now: Millis) -> u64 {
        self.milli_at(now) / MILLI
    }

    /// Takes `n` tokens at `now`; the caller checked [`TokenBucket::available`].
    pub(crate) fn take(&mut self, now: Millis, n: u64) {
        self.milli = self.milli_at(now).saturating_sub(n * MILLI);
        self.at = self.at.max(now);
    }

    /// When the next whole token is there, if none is at `now`.
    pub(crate) fn next_token_at(&self, now: Millis) -> Option<Millis> {
        let milli = self.milli_at(now);
        (milli < MILLI).then(|| {
            let at = self.at.max(now);
            // The refill is counted from `at`: the time the bucket was last taken from,
            // or `now` if that is later (and then `milli` already counts up to `now`).
            let missing = MILLI - milli;
            at + missing.div_ceil(self.per_second)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_last_ten_seconds_only() {
        let mut meter = RateMeter::default();
        meter.record(1_000, 50);
        meter.record(5_500, 50);
        assert_eq!(meter.per_second(9_999), 10.0);
        // At t=11s the bucket of second 1 is out of the window.
        assert_eq!(meter.per_second(11_000), 5.0);
        assert_eq!(meter.per_second(30_000), 0.0);
    }

    #[test]
    fn a_bucket_starts_full_and_refills_by_the_clock() {
        let mut bucket = TokenBucket::new(10, 5);
        assert_eq!(bucket.available(1_000), 5);
        bucket.take(1_000, 5);
        assert_eq!(bucket.available(1_000), 0);
        assert_eq!(bucket.next_token_at(1_000), Some(1_100));
        assert_eq!(bucket.available(1_099), 0);
        assert_eq!(bucket.available(1_100), 1);
        assert_eq!(bucket.next_token_at(1_100), None);
        // Never more than the burst, however long it rested.
        assert_eq!(bucket.available(60_000), 5);
        // A clock that steps back refills nothing and takes nothing twice.
        bucket.take(60_000, 5);
        assert_eq!(bucket.available(59_000), 0);
        assert_eq!(bucket.next_token_at(59_000), Some(60_100));
    }

    #[test]
    fn a_fast_rate_refills_fractions_of_a_millisecond() {
        let mut bucket = TokenBucket::new(3_000, 1);
        bucket.take(0, 1);
        // 3 tokens a millisecond: the next one is there after one.
        assert_eq!(bucket.next_token_at(0), Some(1));
        assert_eq!(bucket.available(1), 1);
        let mut slow = TokenBucket::new(3, 1);
        slow.take(0, 1);
        // 3 tokens a second: one per 333.3 ms, rounded up.
        assert_eq!(slow.next_token_at(0), Some(334));
        assert_eq!(slow.available(333), 0);
        assert_eq!(slow.available(334), 1);
    }
}
