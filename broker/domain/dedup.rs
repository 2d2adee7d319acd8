//! The idempotency-key window of queues (Enqueue) and topics (Publish): a key seen within
//! the window names what it created (a job id, a topic sequence), and a repeat gets that
//! back instead of creating another.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::broker::domain::time::Millis;

/// Keys are client strings, so the map is keyed with a per-process random seed.
type KeyMap<V> = HashMap<String, (V, Millis), foldhash::fast::RandomState>;

/// Idempotency keys remembered until their expiry, pruned oldest first.
#[derive(Debug, Clone)]
pub(crate) struct DedupWindow<V> {
    keys: KeyMap<V>,
    /// Every remembered key by expiry, in expiry order. A key remembered again keeps its
    /// older entry here; pruning skips an entry whose key now expires later.
    expiry: VecDeque<(Millis, String)>,
}

impl<V> Default for DedupWindow<V> {
    fn default() -> Self {
        Self {
            keys: KeyMap::default(),
            expiry: VecDeque::new(),
        }
    }
}

impl<V: Copy> DedupWindow<V> {
    /// Forgets the keys whose expiry is at or before `now`.
    pub(crate) fn prune(&mut self, now: Millis) {
        while let Some((expires, _)) = self.expiry.front() {
            if *expires > now {
                break;
            }
            let (expires, key) = self.expiry.pop_front().expect("front exists");
            if self.keys.get(&key).is_some_and(|(_, e)| *e == expires) {
                self.keys.remove(&key);
            }
        }
    }

    /// What `key` named, while it is remembered (call [`DedupWindow::prune`] first).
    pub(crate) fn get(&self, key: &str) -> Option<V> {
        self.keys.get(key).map(|(v, _)| *v)
    }

    /// Whether `key` is remembered.
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// Remembers `key` as naming `value` until `expires`. Expiries arrive out of order
    /// when a queue's window shrank, or when a snapshot is restored (its keys come in map
    /// order), so the entry is placed by expiry; the usual case appends.
    pub(crate) fn insert(&mut self, key: String, value: V, expires: Millis) {
        self.keys.insert(key.clone(), (value, expires));
        let at = match self.expiry.back() {
            Some((last, _)) if *last > expires => {
                self.expiry.partition_point(|(e, _)| *e <= expires)
            }
            _ => self.expiry.len(),
        };
        self.expiry.insert(at, (expires, key));
    }

    /// How many of these idempotency keys (`None`: no key) would create something new:
    /// neither remembered at `now` nor repeated earlier in `keys`. Prunes first. A batch
    /// checks its room with this before storing anything.
    pub(crate) fn count_new(
        &mut self,
        now: Millis,
        keys: impl Iterator<Item = Option<String>>,
    ) -> u64 {
        self.prune(now);
        let mut seen = HashSet::new();
        keys.filter(|k| match k {
            Some(k) => !self.contains(k) && seen.insert(k.clone()),
            None => true,
        })
        .count() as u64
    }

    /// Every remembered key with its value and expiry, for snapshots.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&str, V, Millis)> {
        self.keys.iter().map(|(k, (v, e))| (k.as_str(), *v, *e))
    }

    /// Whether nothing is remembered (not even an entry waiting to be pruned).
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.expiry.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_remembered_until_its_expiry() {
        let mut w = DedupWindow::default();
        w.insert("a".into(), 1u64, 100);
        w.prune(99);
        assert_eq!(w.get("a"), Some(1));
        w.prune(100);
        assert_eq!(w.get("a"), None);
        assert!(w.is_empty());
    }

    #[test]
    fn keys_inserted_out_of_expiry_order_are_each_pruned_at_their_own_expiry() {
        // A snapshot restores keys in map order: a late expiry may come first.
        let mut w = DedupWindow::default();
        w.insert("late".into(), 1u64, 300);
        w.insert("early".into(), 2, 100);
        w.insert("middle".into(), 3, 200);
        w.prune(150);
        assert_eq!(w.get("early"), None, "expired at 100");
        assert_eq!(w.get("middle"), Some(3));
        assert_eq!(w.get("late"), Some(1));
        w.prune(250);
        assert!(!w.contains("middle"));
        assert!(w.contains("late"));
    }

    #[test]
    fn a_key_remembered_again_lives_until_its_newer_expiry() {
        let mut w = DedupWindow::default();
        w.insert("k".into(), 1u64, 100);
        w.insert("k".into(), 2, 200);
        w.prune(150);
        assert_eq!(w.get("k"), Some(2), "the stale entry at 100 is skipped");
        w.prune(200);
        assert!(w.is_empty());
    }

    #[test]
    fn count_new_skips_remembered_and_repeated_keys() {
        let mut w = DedupWindow::default();
        w.insert("old".into(), 1u64, 100);
        let keys = ["old", "a", "a", "b"].map(|k| Some(k.to_owned()));
        let batch = || keys.clone().into_iter().chain([None, None]);
        assert_eq!(w.count_new(99, batch()), 4, "a, b and two keyless");
        assert_eq!(w.count_new(100, batch()), 5, "old expired at 100");
    }

    #[test]
    fn entries_list_what_a_snapshot_must_keep() {
        let mut w = DedupWindow::default();
        w.insert("a".into(), 7u64, 100);
        w.insert("b".into(), 8, 200);
        let mut got: Vec<_> = w.entries().map(|(k, v, e)| (k.to_owned(), v, e)).collect();
        got.sort();
        assert_eq!(got, [("a".to_owned(), 7, 100), ("b".to_owned(), 8, 200)]);
    }
}
