//! Reconnecting to a broker that went away: delays that double up to a cap, and a log
//! that says why once per cause instead of once per attempt.

use std::time::Duration;

/// The state of a reconnect loop: the delay before the next attempt and the cause of the
/// last failure. A broker that is down for a minute costs a handful of attempts and one
/// warning, not hundreds of identical lines.
#[derive(Debug)]
pub(crate) struct Reconnect {
    first: Duration,
    cap: Duration,
    next: Duration,
    cause: Option<String>,
}

/// What a failed attempt leads to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Failed {
    /// Wait this long before the next attempt.
    pub(crate) delay: Duration,
    /// The cause differs from the last failure's (or there was none): worth a warning.
    pub(crate) new_cause: bool,
}

impl Reconnect {
    /// Starts at `first` and doubles after each failure up to `cap`.
    pub(crate) fn new(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            cap,
            next: first,
            cause: None,
        }
    }

    /// Records a failed attempt and its cause.
    pub(crate) fn failed(&mut self, cause: String) -> Failed {
        let delay = self.next_delay();
        let new_cause = self.cause.as_ref() != Some(&cause);
        self.cause = Some(cause);
        Failed { delay, new_cause }
    }

    /// The delay before the next attempt; the one after it is twice as long, up to the
    /// cap. For loops that retry without reporting a cause.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        delay
    }

    /// Records a successful attempt: the next failure starts from the first delay again.
    /// Returns the cause of the failures it ends, if any (worth saying it recovered).
    pub(crate) fn succeeded(&mut self) -> Option<String> {
        self.next = self.first;
        self.cause.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_start_over_after_a_success() {
        let mut retry = Reconnect::new(Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<u64> = (0..9)
            .map(|_| retry.failed("refused".into()).delay.as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1_600, 3_200, 5_000, 5_000, 5_000]
        );
        assert_eq!(retry.succeeded().as_deref(), Some("refused"));
        assert_eq!(retry.succeeded(), None);
        assert_eq!(
            retry.failed("refused".into()).delay,
            Duration::from_millis(100)
        );
    }

    #[test]
    fn a_cause_is_new_only_when_it_changes() {
        let mut retry = Reconnect::new(Duration::from_millis(100), Duration::from_secs(5));
        let news: Vec<bool> = ["refused", "refused", "timed out", "timed out", "refused"]
            .into_iter()
            .map(|cause| retry.failed(cause.into()).new_cause)
            .collect();
        assert_eq!(news, [true, false, true, false, true]);
        retry.succeeded();
        assert!(retry.failed("refused".into()).new_cause);
    }
}
