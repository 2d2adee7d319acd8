//! Wall-clock time as unix milliseconds: the only clock the domain modules see, passed in
//! as `now` so the state machines are tested without sleeping.

/// Unix epoch milliseconds.
pub(crate) type Millis = u64;

/// The current wall-clock time.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}
