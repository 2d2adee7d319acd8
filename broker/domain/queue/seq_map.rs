//! Hash maps keyed by enqueue seq that keep seq order in memory.
//!
//! Leases and finished jobs are looked up by seq, and mostly in seq order: a batch of acks
//! settles the jobs of one lease batch, and a million leases taken together expire
//! together. With a scrambling hasher each lookup is a cache miss in a table of a million
//! entries; with [`SeqHasher`] consecutive seqs sit in consecutive buckets, so such a run
//! reads the table front to back. Seqs are made by the broker, never by a client, so no
//! caller can choose keys that collide. A set of seqs spaced by a large power of two would
//! crowd a few buckets (still correct, only slower); jobs are leased and finished in runs
//! of nearby seqs, not in such strides.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map from enqueue seq to `V`; see the module docs.
pub(super) type SeqMap<V> = HashMap<u64, V, BuildHasherDefault<SeqHasher>>;

/// Bits of the hash that carry the seq itself (the table's bucket index is the low bits).
const SEQ_BITS: u32 = 57;

/// The hash of a seq: the seq in the low 57 bits, so the bucket follows seq order, and a
/// mix of it in the top 7 bits, which the table keeps as each entry's tag: probing a group
/// compares keys only where the tags match, instead of at every full bucket.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, seq: u64) {
        let tag = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> SEQ_BITS;
        self.0 = (seq & ((1 << SEQ_BITS) - 1)) | (tag << SEQ_BITS);
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; anything else still gets a usable hash.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(self.0.rotate_left(5) ^ u64::from_le_bytes(word));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    fn hash(seq: u64) -> u64 {
        BuildHasherDefault::<SeqHasher>::default().hash_one(seq)
    }

    #[test]
    fn consecutive_seqs_get_consecutive_buckets_and_varied_tags() {
        for seq in [0, 1, 1_000, 999_999, (1 << 40) + 7] {
            assert_eq!(
                hash(seq + 1) & 0xFFFF,
                (hash(seq) + 1) & 0xFFFF,
                "seq {seq}"
            );
        }
        let tags: std::collections::HashSet<u64> = (0..1_000).map(|s| hash(s) >> 57).collect();
        assert!(tags.len() > 100, "only {} distinct tags", tags.len());
    }

    #[test]
    fn a_seq_map_behaves_as_a_map() {
        let mut map = SeqMap::default();
        for seq in (0..10_000u64).rev() {
            map.insert(seq * 3, seq);
        }
        assert_eq!(map.len(), 10_000);
        assert!((0..10_000u64).all(|s| map.get(&(s * 3)) == Some(&s)));
        assert_eq!(map.get(&1), None);
        assert_eq!(map.remove(&300), Some(100));
        assert_eq!(map.get(&300), None);
    }
}
