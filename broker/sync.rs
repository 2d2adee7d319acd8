//! The broker's one policy on lock poisoning.
//!
//! A panic while a broker lock is held is a bug that may have left the state behind that
//! lock half-changed (a job moved out of one index and not into the next, a log buffer
//! counted but not filled). Carrying on with such state would answer clients from data
//! that breaks the broker's own invariants, and could write it to the log, so a poisoned
//! lock is not papered over: every helper here panics with the same message, and the
//! panic reaches whoever touches that state next. Take every broker `Mutex`, `RwLock`
//! and `Condvar` through these helpers, so no module quietly picks the opposite policy.

use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

const POISONED: &str = "a broker lock was poisoned by an earlier panic";

/// Locks a mutex; panics if an earlier panic poisoned it (see the module docs).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect(POISONED)
}

/// Takes a read lock; panics if an earlier panic poisoned it (see the module docs).
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().expect(POISONED)
}

/// Takes a write lock; panics if an earlier panic poisoned it (see the module docs).
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().expect(POISONED)
}

/// Waits on a condition variable; panics if the mutex was poisoned meanwhile.
pub(crate) fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).expect(POISONED)
}

/// Waits on a condition variable for at most `timeout`; panics if the mutex was
/// poisoned meanwhile.
pub(crate) fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    cv.wait_timeout(guard, timeout).expect(POISONED).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_lock_poisoned_by_a_panic_is_not_papered_over() {
        let m = Arc::new(Mutex::new(0));
        let held = m.clone();
        let _ = std::thread::spawn(move || {
            let _guard = lock(&held);
            panic!("a bug while holding the lock");
        })
        .join();
        let again = std::panic::catch_unwind(|| *lock(&m));
        assert!(again.is_err(), "locking a poisoned mutex must panic");
        assert_eq!(*lock(&Mutex::new(7)), 7);
    }
}
