//! A queue's rate and in-flight limits: how many jobs a lease may take at `now`, when
//! capacity returns, and how long the limits held visible jobs back.

use crate::broker::domain::rate::TokenBucket;
use crate::broker::domain::time::Millis;

use super::{Queue, RateLimit};

/// The limit that decided how many jobs a lease could take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Limit {
    /// `rate_limit`: the bucket had fewer tokens.
    Rate,
    /// `max_in_flight`: fewer free lease slots.
    InFlight,
}

/// The limits' state beside the policy that sets them.
#[derive(Debug, Clone, Default)]
pub(super) struct Throttle {
    /// The rate limit's bucket; `None` without a rate limit.
    bucket: Option<TokenBucket>,
    /// Time the rate limit held visible jobs back: the union, over every lease it cut
    /// short, of the time from that lease until the bucket's next token. Counted when
    /// the lease is cut short, so it may run ahead of the clock until `rate_until`.
    rate_ms: u64,
    /// End of the last interval counted in `rate_ms`, so overlapping ones count once.
    rate_until: Millis,
    /// Time `max_in_flight` held visible jobs back: from a lease it cut short until a
    /// lease ended (freeing a slot), summed. Open intervals are in `in_flight_since`.
    in_flight_ms: u64,
    /// Start of the open in-flight interval.
    in_flight_since: Option<Millis>,
}

/// What the limits allow and have done, for stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ThrottleCounts {
    /// Whole tokens in the bucket (0 without a rate limit).
    pub(super) tokens: u64,
    /// Milliseconds the rate limit held visible jobs back.
    pub(super) rate_limited_ms: u64,
    /// Milliseconds `max_in_flight` held visible jobs back.
    pub(super) in_flight_limited_ms: u64,
}

impl Throttle {
    /// The state for a policy's rate limit: a full bucket.
    pub(super) fn new(rate: Option<RateLimit>) -> Self {
        Self {
            bucket: bucket_of(rate),
            ..Self::default()
        }
    }
}

fn bucket_of(rate: Option<RateLimit>) -> Option<TokenBucket> {
    rate.map(|r| TokenBucket::new(r.per_second, r.burst))
}

impl Queue {
    /// How many jobs the limits let a lease take at `now`, and which limit says so;
    /// `None` without limits.
    pub(super) fn lease_room(&self, now: Millis) -> Option<(u64, Limit)> {
        let in_flight = self.in_flight_room().map(|n| (n, Limit::InFlight));
        let rate = self
            .throttle
            .bucket
            .as_ref()
            .map(|b| (b.available(now), Limit::Rate));
        match (in_flight, rate) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// Free lease slots under `max_in_flight`; `None` without the limit.
    fn in_flight_room(&self) -> Option<u64> {
        self.policy
            .max_in_flight
            .map(|max| u64::from(max).saturating_sub(self.leases.len() as u64))
    }

    /// Takes the tokens of `n` jobs leased at `now`.
    pub(super) fn spend(&mut self, now: Millis, n: u64) {
        if let Some(bucket) = &mut self.throttle.bucket {
            bucket.take(now, n);
        }
    }

    /// Counts a lease at `now` that `limit` cut short while jobs were visible.
    pub(super) fn note_throttled(&mut self, now: Millis, limit: Limit) {
        let t = &mut self.throttle;
        match limit {
            Limit::InFlight => {
                t.in_flight_since.get_or_insert(now);
            }
            Limit::Rate => {
                let Some(until) = t.bucket.as_ref().and_then(|b| b.next_token_at(now)) else {
                    return;
                };
                let from = now.max(t.rate_until);
                t.rate_ms += until.saturating_sub(from);
                t.rate_until = t.rate_until.max(until);
            }
        }
    }

    /// A lease ended at `now`: a slot under `max_in_flight` is free again.
    pub(super) fn note_lease_ended(&mut self, now: Millis) {
        let t = &mut self.throttle;
        if let Some(since) = t.in_flight_since.take() {
            t.in_flight_ms += now.saturating_sub(since);
        }
    }

    /// When the rate limit will let a waiting lease have a job, if that is what holds
    /// visible jobs back: the bucket's next token, while `max_in_flight` has room.
    pub(super) fn throttle_due(&self) -> Option<Millis> {
        if self.paused || self.ready.is_empty() || self.in_flight_room() == Some(0) {
            return None;
        }
        // Counted from the bucket's last change: a time before it adds no tokens.
        self.throttle.bucket.as_ref()?.next_token_at(0)
    }

    /// Brings the bucket up to `now`, so [`Queue::next_due`] reports the next token after
    /// `now` rather than one already there.
    pub(super) fn refill(&mut self, now: Millis) {
        if let Some(bucket) = &mut self.throttle.bucket {
            bucket.take(now, 0);
        }
    }

    /// A new policy's rate limit starts with a full bucket; the same one keeps its state.
    pub(super) fn rate_limit_changed(&mut self, old: Option<RateLimit>) {
        if old != self.policy.rate_limit {
            self.throttle.bucket = bucket_of(self.policy.rate_limit);
        }
    }

    /// The limits' counters at `now`.
    pub(super) fn throttle_counts(&self, now: Millis) -> ThrottleCounts {
        let t = &self.throttle;
        let open = t
            .in_flight_since
            .map_or(0, |since| now.saturating_sub(since));
        ThrottleCounts {
            tokens: t.bucket.as_ref().map_or(0, |b| b.available(now)),
            // Not past `now`: a wait counted ahead is shown as it happens.
            rate_limited_ms: t.rate_ms.saturating_sub(t.rate_until.saturating_sub(now)),
            in_flight_limited_ms: t.in_flight_ms + open,
        }
    }
}
