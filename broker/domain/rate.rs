//! A per-second event counter over a sliding 10-second window, for stats rates.

use crate::broker::domain::time::Millis;

const WINDOW_SECS: usize = 10;

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
}
