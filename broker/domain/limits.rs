//! Request limits, checked before anything is written so a rejected request changes nothing.

use std::collections::HashMap;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::queue::BROKER_HEADER_PREFIX;

/// Application headers of a message or job.
pub(crate) type Headers = HashMap<String, String>;

/// Longest backoff delay (`initial_ms`, `max_ms`, each schedule entry) and explicit nack
/// retry delay: 12 hours, the longest lease.
pub(crate) const MAX_RETRY_DELAY_MS: u64 = 12 * 3600 * 1000;
/// Most entries in a backoff schedule.
pub(crate) const MAX_BACKOFF_STEPS: usize = 100;
/// Longest dedup window of a queue: 7 days.
pub(crate) const MAX_DEDUP_WINDOW_MS: u64 = 7 * 24 * 3600 * 1000;
/// Highest `max_depth` of a queue.
pub(crate) const MAX_QUEUE_DEPTH: u64 = 1_000_000_000;
/// Highest `history_limit` of a queue.
pub(crate) const MAX_HISTORY_LIMIT: u64 = 100_000;
/// Most topic bindings of a queue.
pub(crate) const MAX_TOPIC_BINDINGS: u64 = 100;
/// Highest retention `max_messages` of a topic.
pub(crate) const MAX_RETENTION_MESSAGES: u64 = 1_000_000_000;
/// Highest retention `max_bytes` of a topic: 1 TiB.
pub(crate) const MAX_RETENTION_BYTES: u64 = 1 << 40;
/// Longest retention `max_age_ms` of a topic: 365 days.
pub(crate) const MAX_RETENTION_AGE_MS: u64 = 365 * 24 * 3600 * 1000;
/// Longest `delay_ms` of a job, and furthest `run_at_unix_ms` ahead: 365 days.
pub(crate) const MAX_DELAY_MS: u64 = 365 * 24 * 3600 * 1000;
/// Longest WatchStats `interval_ms`: 1 hour.
pub(crate) const MAX_WATCH_INTERVAL_MS: u64 = 3600 * 1000;
/// Highest Redrive `rate_per_second`.
pub(crate) const MAX_REDRIVE_RATE: u64 = 100_000;

/// The limits a broker enforces on requests.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest payload (and ack result) in bytes.
    pub max_payload_bytes: usize,
    /// Most headers on one message or job.
    pub max_headers: usize,
    /// Longest header key or value, in bytes.
    pub max_header_bytes: usize,
    /// Most entries in one batch RPC.
    pub max_batch: usize,
    /// Longest `kind`, idempotency key or ordering key, in bytes.
    pub max_key_bytes: usize,
    /// Longest nack error text, in bytes.
    pub max_error_bytes: usize,
    /// Most open subscriptions on the broker.
    pub max_subscriptions: usize,
    /// Most queues on the broker.
    pub max_queues: usize,
    /// Most topics on the broker.
    pub max_topics: usize,
    /// Budget for retained payload bytes across the broker (topic logs and queued or held
    /// jobs); 0 is no budget. Past it, Publish and Enqueue are RESOURCE_EXHAUSTED.
    pub max_memory_bytes: u64,
    /// Whether Lease and Consume refuse a queue that does not exist (NOT_FOUND) instead of
    /// creating it (`--strict-queues`).
    pub strict_queues: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
            max_headers: 64,
            max_header_bytes: 4096,
            max_batch: 1000,
            max_key_bytes: 255,
            max_error_bytes: 4096,
            max_subscriptions: 10_000,
            max_queues: 10_000,
            max_topics: 10_000,
            max_memory_bytes: 0,
            strict_queues: false,
        }
    }
}

impl Limits {
    /// Checks a batch's entry count before its entries are looked at.
    pub fn check_batch(&self, field: &str, len: usize) -> Result<(), BrokerError> {
        if len == 0 {
            return Err(BrokerError::invalid(field, "must hold at least 1 entry"));
        }
        if len > self.max_batch {
            return Err(BrokerError::over_limit(
                field,
                len as u64,
                self.max_batch as u64,
                "entries",
            ));
        }
        Ok(())
    }

    /// Checks a payload's size.
    pub fn check_payload(&self, field: &str, len: usize) -> Result<(), BrokerError> {
        if len > self.max_payload_bytes {
            return Err(BrokerError::over_limit(
                field,
                len as u64,
                self.max_payload_bytes as u64,
                "bytes",
            ));
        }
        Ok(())
    }

    /// Checks header count and sizes; `field` is the headers field, e.g. `jobs[2].headers`.
    pub fn check_headers(&self, field: &str, headers: &Headers) -> Result<(), BrokerError> {
        if headers.len() > self.max_headers {
            return Err(BrokerError::over_limit(
                field,
                headers.len() as u64,
                self.max_headers as u64,
                "headers",
            ));
        }
        for (key, value) in headers {
            if key.is_empty() {
                return Err(BrokerError::invalid(field, "a header key is empty"));
            }
            if is_reserved_header(key) {
                return Err(BrokerError::invalid(
                    format!("{field}[{key:?}]"),
                    format!(
                        "header keys starting with {BROKER_HEADER_PREFIX:?} (in any case) are reserved for headers the broker sets"
                    ),
                ));
            }
            if key.len() > self.max_header_bytes {
                return Err(BrokerError::over_limit(
                    format!("{field}[{}...]", key.chars().take(16).collect::<String>()),
                    key.len() as u64,
                    self.max_header_bytes as u64,
                    "bytes (key)",
                ));
            }
            if value.len() > self.max_header_bytes {
                return Err(BrokerError::over_limit(
                    format!("{field}[{key:?}]"),
                    value.len() as u64,
                    self.max_header_bytes as u64,
                    "bytes",
                ));
            }
        }
        Ok(())
    }

    /// Checks a short key such as `kind`, an idempotency key or an ordering key.
    pub fn check_key(&self, field: &str, key: &str) -> Result<(), BrokerError> {
        if key.len() > self.max_key_bytes {
            return Err(BrokerError::over_limit(
                field,
                key.len() as u64,
                self.max_key_bytes as u64,
                "bytes",
            ));
        }
        Ok(())
    }

    /// Checks one entry of a publish or enqueue batch: its payload, its headers and its
    /// short keys (`(name, value)`, absent ones skipped). `field` turns a name into the
    /// entry's field path (`jobs[3].kind`); it runs only for a refusal.
    pub fn check_entry(
        &self,
        field: impl Fn(&str) -> String,
        payload_len: usize,
        headers: &Headers,
        keys: &[(&str, Option<&str>)],
    ) -> Result<(), BrokerError> {
        checked(&field, "payload", |f| self.check_payload(f, payload_len))?;
        checked(&field, "headers", |f| self.check_headers(f, headers))?;
        for (name, key) in keys {
            if let Some(key) = key {
                checked(&field, name, |f| self.check_key(f, key))?;
            }
        }
        Ok(())
    }

    /// Checks a nack's error text.
    pub fn check_error_text(&self, field: &str, text: &str) -> Result<(), BrokerError> {
        if text.len() > self.max_error_bytes {
            return Err(BrokerError::over_limit(
                field,
                text.len() as u64,
                self.max_error_bytes as u64,
                "bytes",
            ));
        }
        Ok(())
    }
}

/// Whether a header key is in the broker's namespace (`x-sluice-`, compared without case,
/// so a worker reading `X-Sluice-Attempts` is not fooled either). Producers may not set
/// such headers: what the broker records there (the queue a dead letter came from, its
/// attempts and last error, a binding's topic sequence) is then always its own.
pub(crate) fn is_reserved_header(key: &str) -> bool {
    key.len() >= BROKER_HEADER_PREFIX.len()
        && key.as_bytes()[..BROKER_HEADER_PREFIX.len()]
            .eq_ignore_ascii_case(BROKER_HEADER_PREFIX.as_bytes())
}

/// Checks a count against an inclusive maximum.
pub(crate) fn check_count(field: &str, value: u64, max: u64) -> Result<(), BrokerError> {
    if value > max {
        return Err(BrokerError::over_limit(field, value, max, ""));
    }
    Ok(())
}

/// Checks a duration against an inclusive maximum.
pub(crate) fn check_duration_ms(field: &str, value: u64, max: u64) -> Result<(), BrokerError> {
    if value > max {
        return Err(BrokerError::over_limit(field, value, max, "ms"));
    }
    Ok(())
}

/// Runs a limit check with a placeholder field name and, only if it fails, again with the
/// real one: formatting `messages[{i}].payload` (or `jobs[{i}].payload`) and friends for
/// every message of every publish or enqueue was several percent of the broker's CPU.
pub(crate) fn checked(
    field: impl Fn(&str) -> String,
    name: &str,
    check: impl Fn(&str) -> Result<(), BrokerError>,
) -> Result<(), BrokerError> {
    check("").or_else(|_| check(&field(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producers_may_not_write_the_brokers_headers() {
        let limits = Limits::default();
        for key in ["x-sluice-original-queue", "X-SLUICE-attempts", "x-sluice-"] {
            let headers = Headers::from([(key.to_owned(), "payments".to_owned())]);
            let err = limits
                .check_headers("jobs[0].headers", &headers)
                .unwrap_err();
            assert!(
                err.to_string().starts_with(&format!(
                    "jobs[0].headers[{key:?}]: header keys starting with"
                )),
                "{err}"
            );
        }
        for key in ["x-sluice", "sluice-x", "x-sluicer", "trace"] {
            let headers = Headers::from([(key.to_owned(), String::new())]);
            limits.check_headers("h", &headers).unwrap();
        }
    }
}
