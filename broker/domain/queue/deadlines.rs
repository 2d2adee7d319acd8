//! Lease deadlines, grouped by the millisecond they fall on.
//!
//! One lease call hands out many jobs with one deadline, so a group per deadline costs one
//! ordered-map operation per call instead of one per job. Settling a lease only counts it
//! out of its group; its seq stays in the group's list until the group expires, empties
//! (then it is dropped at once) or holds mostly settled seqs (then it is compacted).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use crate::broker::domain::time::Millis;

#[derive(Debug, Default)]
struct Group {
    seqs: Vec<u64>,
    /// Live leases in `seqs`.
    live: usize,
}

/// Live leases by deadline. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    groups: BTreeMap<Millis, Group>,
}

impl Deadlines {
    /// Records a lease of `seq` ending at `deadline`.
    pub(super) fn insert(&mut self, deadline: Millis, seq: u64) {
        let group = self.groups.entry(deadline).or_default();
        group.seqs.push(seq);
        group.live += 1;
    }

    /// Counts out a lease of `seq` that ended or moved away from `deadline`; `live(seq)`
    /// says whether a seq still has a live lease ending at `deadline`.
    pub(super) fn remove(&mut self, deadline: Millis, live: impl Fn(u64) -> bool) {
        let Entry::Occupied(mut entry) = self.groups.entry(deadline) else {
            return;
        };
        let group = entry.get_mut();
        group.live -= 1;
        if group.live == 0 {
            entry.remove();
        } else if group.seqs.len() > 2 * group.live + 64 {
            group.seqs.retain(|s| live(*s));
            group.seqs.sort_unstable();
            group.seqs.dedup();
            group.live = group.seqs.len();
        }
    }

    /// The earliest deadline of a live lease.
    pub(super) fn first(&self) -> Option<Millis> {
        self.groups.keys().next().copied()
    }

    /// Takes out the earliest group if it is due at `now`: its deadline and seqs, some of
    /// which may have been settled since (the caller checks each).
    pub(super) fn pop_due(&mut self, now: Millis) -> Option<(Millis, Vec<u64>)> {
        let entry = self.groups.first_entry()?;
        if *entry.key() > now {
            return None;
        }
        let (deadline, group) = entry.remove_entry();
        Some((deadline, group.seqs))
    }

    /// Whether no lease is live.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_drop_when_settled_and_compact_when_mostly_settled() {
        let mut d = Deadlines::default();
        d.insert(10, 1);
        d.insert(10, 2);
        d.insert(20, 3);
        assert_eq!(d.first(), Some(10));
        d.remove(10, |_| true);
        d.remove(10, |_| true);
        assert_eq!(d.first(), Some(20));
        assert_eq!(d.pop_due(19), None);
        assert_eq!(d.pop_due(20), Some((20, vec![3])));
        assert!(d.is_empty());

        for seq in 0..200 {
            d.insert(30, seq);
        }
        // Settle all but seq 199, in order; the group is compacted on the way.
        for settled in 0..199 {
            d.remove(30, |s| s > settled);
        }
        assert_eq!(d.groups[&30].seqs.len(), 1);
        assert_eq!(d.pop_due(30), Some((30, vec![199])));
    }
}
