//! Request limits, checked before anything is written so a rejected request changes nothing.

use std::collections::HashMap;

use crate::broker::error::BrokerError;

/// Application headers of a message or job.
pub type Headers = HashMap<String, String>;

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
            max_topics: 100_000,
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

/// Checks a duration against an inclusive maximum.
pub fn check_duration_ms(field: &str, value: u64, max: u64) -> Result<(), BrokerError> {
    if value > max {
        return Err(BrokerError::over_limit(field, value, max, "ms"));
    }
    Ok(())
}

/// Runs a limit check with a placeholder field name and, only if it fails, again with the
/// real one: formatting `messages[{i}].payload` (or `jobs[{i}].payload`) and friends for
/// every message of every publish or enqueue was several percent of the broker's CPU.
pub fn checked(
    field: impl Fn(&str) -> String,
    name: &str,
    check: impl Fn(&str) -> Result<(), BrokerError>,
) -> Result<(), BrokerError> {
    check("").or_else(|_| check(&field(name)))
}
