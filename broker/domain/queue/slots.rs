//! Compact storage of a queue's live jobs.
//!
//! A backlog of millions of small jobs is the case to optimise for memory (SPEC §9 S5), so
//! a live job is a 40-byte [`LiveJob`] and nothing else in the common case:
//! * slots live in fixed pages addressed by enqueue seq, so finding a job by seq (a lease
//!   id) or by id (which encodes the seq, see [`IdCodec`]) needs no hash map;
//! * payloads are copied into shared [`Payloads`] chunks, one per enqueue batch, so a job
//!   holds three `u32`s instead of a `Bytes` and the decoded request buffer is freed;
//! * job kinds are interned per queue ([`Kinds`]);
//! * what changes after enqueue (delays, retries) sits in a lazily allocated [`Extra`],
//!   and what few jobs carry (headers, keys, ids from elsewhere) in its [`Rare`] part.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use super::JobState;
use crate::broker::domain::limits::Headers;
use crate::broker::domain::time::Millis;

/// Where a job's payload lives: a byte range of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PayloadRef {
    chunk: u32,
    offset: u32,
    len: u32,
}

impl PayloadRef {
    /// The empty payload, which needs no chunk.
    const EMPTY: Self = Self {
        chunk: u32::MAX,
        offset: 0,
        len: 0,
    };
}

#[derive(Debug)]
struct Chunk {
    data: Bytes,
    /// Jobs still referring to this chunk; it is dropped at zero.
    live: u32,
}

/// Payload bytes of live jobs, packed into chunks.
///
/// Small payloads of one enqueue batch are copied into one chunk of at most
/// [`Payloads::CHUNK_BYTES`]; a large payload keeps its own buffer. A chunk is freed when
/// its last job finishes, so for a FIFO backlog nothing is held beyond the jobs themselves.
#[derive(Debug, Default)]
pub(super) struct Payloads {
    chunks: Vec<Option<Chunk>>,
    free: Vec<u32>,
    /// Sum of the lengths of the payloads stored and not yet released.
    bytes: u64,
}

impl Payloads {
    /// Largest chunk that small payloads are packed into.
    const CHUNK_BYTES: usize = 64 * 1024;
    /// Payloads at least this big are kept as they arrived, not copied.
    const OWN_CHUNK_BYTES: usize = 16 * 1024;

    fn add_chunk(&mut self, data: Bytes, live: u32) -> u32 {
        let chunk = Some(Chunk { data, live });
        match self.free.pop() {
            Some(i) => {
                self.chunks[i as usize] = chunk;
                i
            }
            None => {
                self.chunks.push(chunk);
                (self.chunks.len() - 1) as u32
            }
        }
    }

    /// Stores payloads, returning one reference each, in order. Each reference must be
    /// given back with [`Payloads::release`] exactly once.
    pub(super) fn store<'a>(
        &mut self,
        payloads: impl Iterator<Item = &'a Bytes> + Clone,
    ) -> Vec<PayloadRef> {
        let small_total: usize = payloads
            .clone()
            .map(Bytes::len)
            .filter(|n| *n < Self::OWN_CHUNK_BYTES)
            .sum();
        let mut out = Vec::with_capacity(payloads.size_hint().0);
        self.bytes += payloads.clone().map(|p| p.len() as u64).sum::<u64>();
        let mut left = small_total;
        let mut buf: Vec<u8> = Vec::new();
        // Refs into `buf` wait here for its chunk number, given when it is sealed.
        let mut pending: Vec<usize> = Vec::new();
        for payload in payloads {
            let len = payload.len();
            if len == 0 {
                out.push(PayloadRef::EMPTY);
            } else if len >= Self::OWN_CHUNK_BYTES {
                let chunk = self.add_chunk(payload.clone(), 1);
                out.push(PayloadRef {
                    chunk,
                    offset: 0,
                    len: len as u32,
                });
            } else {
                if buf.len() + len > buf.capacity() {
                    self.seal(std::mem::take(&mut buf), &mut pending, &mut out);
                    buf = Vec::with_capacity(left.clamp(len, Self::CHUNK_BYTES.max(len)));
                }
                pending.push(out.len());
                out.push(PayloadRef {
                    chunk: u32::MAX,
                    offset: buf.len() as u32,
                    len: len as u32,
                });
                buf.extend_from_slice(payload);
                left -= len;
            }
        }
        self.seal(buf, &mut pending, &mut out);
        out
    }

    fn seal(&mut self, buf: Vec<u8>, pending: &mut Vec<usize>, out: &mut [PayloadRef]) {
        if pending.is_empty() {
            return;
        }
        let chunk = self.add_chunk(Bytes::from(buf), pending.len() as u32);
        for i in pending.drain(..) {
            out[i].chunk = chunk;
        }
    }

    /// Payload bytes stored and not yet released (what the memory budget counts).
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The payload bytes (no copy).
    pub(super) fn get(&self, r: PayloadRef) -> Bytes {
        match self.chunks.get(r.chunk as usize) {
            Some(Some(c)) => c
                .data
                .slice(r.offset as usize..r.offset as usize + r.len as usize),
            _ => Bytes::new(),
        }
    }

    /// Gives a reference back; frees its chunk with the last one.
    pub(super) fn release(&mut self, r: PayloadRef) {
        if r.chunk == u32::MAX {
            return;
        }
        self.bytes -= u64::from(r.len);
        let i = r.chunk as usize;
        let Some(Some(c)) = self.chunks.get_mut(i) else {
            return;
        };
        c.live -= 1;
        if c.live == 0 {
            self.chunks[i] = None;
            self.free.push(r.chunk);
        }
    }
}

/// Interned job kinds of one queue. Bounded: past [`Kinds::MAX`] distinct kinds, new ones
/// are stored per job (in its [`Extra`]) so unique kinds cannot grow the table forever.
#[derive(Debug, Default)]
pub(super) struct Kinds {
    names: Vec<Arc<str>>,
    index: HashMap<Arc<str>, u32, foldhash::fast::RandomState>,
}

impl Kinds {
    const MAX: usize = 4_096;
    /// The slot value for "kind stored in the job's extra".
    pub(super) const OWN: u32 = u32::MAX;

    /// The kind's number, or [`Kinds::OWN`] if the table is full.
    pub(super) fn intern(&mut self, kind: &str) -> u32 {
        if let Some(i) = self.index.get(kind) {
            return *i;
        }
        if self.names.len() >= Self::MAX {
            return Self::OWN;
        }
        let name: Arc<str> = Arc::from(kind);
        let i = self.names.len() as u32;
        self.names.push(name.clone());
        self.index.insert(name, i);
        i
    }

    /// The kind with number `i`, shared.
    pub(super) fn shared(&self, i: u32) -> Arc<str> {
        self.names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from(""))
    }

    /// The kind with number `i`.
    pub(super) fn name(&self, i: u32) -> &str {
        self.names.get(i as usize).map(|s| &**s).unwrap_or("")
    }
}

/// The parts of a job that change after its enqueue (retries, delays), allocated on the
/// first such change. Kept small: a million expiring leases allocate a million of these.
#[derive(Debug, Clone, Default)]
pub(super) struct Extra {
    /// When the job is (or was) visible for its next attempt.
    pub(super) run_at: Millis,
    pub(super) updated_at: Millis,
    /// Shared: leases that expire together share one text.
    pub(super) last_error: Option<Arc<str>>,
    pub(super) rare: Option<Box<Rare>>,
}

/// What few jobs carry: headers, keys, an id from elsewhere, a kind past the table.
#[derive(Debug, Clone, Default)]
pub(super) struct Rare {
    /// The job's id when it is not derived from its seq (dead letters, redriven and
    /// recovered jobs keep the id they were given elsewhere).
    pub(super) id: Option<Uuid>,
    /// The kind when it is not interned.
    pub(super) kind: Option<String>,
    pub(super) headers: Headers,
    pub(super) idempotency_key: Option<String>,
    pub(super) ordering_key: Option<Arc<str>>,
    /// Where a dead job was sent.
    pub(super) dead_letter_queue: Option<String>,
    /// The queue a dead letter was moved from (see [`super::Job::origin`]).
    pub(super) origin: Option<String>,
}

/// One live job, compact. Finished jobs leave the slots for the history.
#[derive(Debug)]
pub(super) struct LiveJob {
    pub(super) payload: PayloadRef,
    /// Interned kind, or [`Kinds::OWN`].
    pub(super) kind: u32,
    pub(super) enqueued_at: Millis,
    pub(super) attempts: u16,
    pub(super) max_attempts: u16,
    pub(super) priority: u8,
    pub(super) state: JobState,
    /// Waiting behind an earlier job with the same ordering key.
    pub(super) blocked: bool,
    pub(super) extra: Option<Box<Extra>>,
}

impl LiveJob {
    /// When the job is (or was) visible for its next attempt.
    pub(super) fn run_at(&self) -> Millis {
        self.extra.as_ref().map_or(self.enqueued_at, |e| e.run_at)
    }

    /// The extra part, allocated on first use.
    pub(super) fn extra_mut(&mut self) -> &mut Extra {
        let enqueued_at = self.enqueued_at;
        self.extra.get_or_insert_with(|| {
            Box::new(Extra {
                run_at: enqueued_at,
                updated_at: enqueued_at,
                ..Extra::default()
            })
        })
    }

    /// The rare part, allocated on first use.
    pub(super) fn rare_mut(&mut self) -> &mut Rare {
        self.extra_mut().rare.get_or_insert_with(Box::default)
    }

    /// The rare part, if any.
    pub(super) fn rare(&self) -> Option<&Rare> {
        self.extra.as_ref().and_then(|e| e.rare.as_deref())
    }

    /// Records a change at `now` (only jobs with an extra part have a change time of their
    /// own; the others have not changed since their enqueue).
    pub(super) fn touch(&mut self, now: Millis) {
        if let Some(e) = &mut self.extra {
            e.updated_at = now;
        }
    }

    /// The id given elsewhere, if not derived from the seq.
    pub(super) fn own_id(&self) -> Option<Uuid> {
        self.rare().and_then(|r| r.id)
    }
}

const PAGE_BITS: u32 = 8;
const PAGE_SLOTS: usize = 1 << PAGE_BITS;

#[derive(Debug)]
struct Page {
    slots: Box<[Option<LiveJob>]>,
    live: u32,
}

/// Live jobs by seq, in pages of 256. Seqs only grow, so pages are added at the back; a
/// page is freed when its last job leaves, so one long-lived job pins one page, not the
/// whole range behind it.
#[derive(Debug, Default)]
pub(super) struct Slots {
    /// Page number of `pages[0]`.
    base: u64,
    pages: VecDeque<Option<Page>>,
    len: usize,
}

impl Slots {
    fn locate(seq: u64) -> (u64, usize) {
        (seq >> PAGE_BITS, (seq as usize) & (PAGE_SLOTS - 1))
    }

    /// Number of live jobs.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Stores the job at `seq`, which must be above every seq stored before.
    pub(super) fn insert(&mut self, seq: u64, slot: LiveJob) {
        let (page_no, i) = Self::locate(seq);
        if self.pages.is_empty() {
            self.base = page_no;
        }
        debug_assert!(page_no >= self.base, "seqs only grow");
        let at = (page_no - self.base) as usize;
        while self.pages.len() <= at {
            self.pages.push_back(None);
        }
        let page = self.pages[at].get_or_insert_with(|| Page {
            slots: (0..PAGE_SLOTS).map(|_| None).collect(),
            live: 0,
        });
        debug_assert!(page.slots[i].is_none(), "seq {seq} stored twice");
        page.slots[i] = Some(slot);
        page.live += 1;
        self.len += 1;
    }

    fn page_index(&self, seq: u64) -> Option<(usize, usize)> {
        let (page_no, i) = Self::locate(seq);
        let at = page_no.checked_sub(self.base)? as usize;
        (at < self.pages.len()).then_some((at, i))
    }

    /// The job at `seq`.
    pub(super) fn get(&self, seq: u64) -> Option<&LiveJob> {
        let (at, i) = self.page_index(seq)?;
        self.pages[at].as_ref()?.slots[i].as_ref()
    }

    /// The job at `seq`, to change it.
    pub(super) fn get_mut(&mut self, seq: u64) -> Option<&mut LiveJob> {
        let (at, i) = self.page_index(seq)?;
        self.pages[at].as_mut()?.slots[i].as_mut()
    }

    /// Takes the job at `seq` out.
    pub(super) fn remove(&mut self, seq: u64) -> Option<LiveJob> {
        let (at, i) = self.page_index(seq)?;
        let page = self.pages[at].as_mut()?;
        let slot = page.slots[i].take()?;
        page.live -= 1;
        self.len -= 1;
        if page.live == 0 {
            self.pages[at] = None;
            while matches!(self.pages.front(), Some(None)) {
                self.pages.pop_front();
                self.base += 1;
            }
            while matches!(self.pages.back(), Some(None)) {
                self.pages.pop_back();
            }
        }
        Some(slot)
    }

    /// Live jobs with seq at least `from`, in seq order.
    pub(super) fn iter_from(&self, from: u64) -> impl Iterator<Item = (u64, &LiveJob)> {
        let (first_page, _) = Self::locate(from);
        let skip = first_page.saturating_sub(self.base) as usize;
        let base = self.base;
        self.pages
            .iter()
            .enumerate()
            .skip(skip)
            .filter_map(|(at, p)| p.as_ref().map(|p| (at, p)))
            .flat_map(move |(at, p)| {
                let first = (base + at as u64) << PAGE_BITS;
                p.slots
                    .iter()
                    .enumerate()
                    .filter_map(move |(i, s)| s.as_ref().map(|s| (first + i as u64, s)))
            })
            .filter(move |(seq, _)| *seq >= from)
    }
}

/// Job ids that encode the job's seq, so looking a job up by id needs no map.
///
/// An id is a valid UUIDv7: 48 bits of enqueue time (unix ms), then 74 "random" bits that
/// hold a 32-bit tag drawn when the queue was created and the 42-bit seq. A lookup checks
/// the tag and that the enqueue time matches the job at that seq, so an id of another
/// queue (or of an earlier incarnation of this one) is not mistaken for this job.
#[derive(Debug, Clone, Copy)]
pub(super) struct IdCodec {
    tag: u32,
}

impl IdCodec {
    /// Highest seq an id can carry; later jobs get random ids kept in a map.
    pub(super) const MAX_SEQ: u64 = (1 << 42) - 1;

    /// A codec with a fresh random tag.
    pub(super) fn random() -> Self {
        Self {
            tag: fastrand::u32(..),
        }
    }

    /// The id of the job with `seq` enqueued at `enqueued_at`.
    pub(super) fn encode(self, seq: u64, enqueued_at: Millis) -> Uuid {
        debug_assert!(seq <= Self::MAX_SEQ);
        let random = (u128::from(self.tag) << 42) | u128::from(seq & Self::MAX_SEQ);
        let rand_a = (random >> 62) & 0xfff;
        let rand_b = random & ((1 << 62) - 1);
        let ts = u128::from(enqueued_at) & ((1 << 48) - 1);
        Uuid::from_u128((ts << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)
    }

    /// The seq and enqueue time an id of this queue carries, if it is one.
    pub(super) fn decode(self, id: &Uuid) -> Option<(u64, Millis)> {
        let v = id.as_u128();
        if (v >> 76) & 0xf != 0x7 || (v >> 62) & 0b11 != 0b10 {
            return None;
        }
        let random = (((v >> 64) & 0xfff) << 62) | (v & ((1 << 62) - 1));
        if (random >> 42) as u32 != self.tag {
            return None;
        }
        Some(((random as u64) & Self::MAX_SEQ, (v >> 80) as Millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_job_costs_forty_bytes() {
        assert_eq!(std::mem::size_of::<Option<LiveJob>>(), 40);
    }

    #[test]
    fn ids_round_trip_and_are_version_7() {
        let codec = IdCodec::random();
        let id = codec.encode(123_456, 1_700_000_000_123);
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(codec.decode(&id), Some((123_456, 1_700_000_000_123)));
        assert_eq!(
            codec.decode(&codec.encode(IdCodec::MAX_SEQ, 1)),
            Some((IdCodec::MAX_SEQ, 1))
        );
        let other = IdCodec {
            tag: codec.tag.wrapping_add(1),
        };
        assert_eq!(other.decode(&id), None);
        assert_eq!(codec.decode(&Uuid::now_v7()).map(|_| ()), None);
    }

    #[test]
    fn payload_chunks_are_shared_by_a_batch_and_freed_with_its_last_job() {
        let mut p = Payloads::default();
        let big = Bytes::from(vec![7u8; Payloads::OWN_CHUNK_BYTES]);
        let batch = [
            Bytes::from_static(b"one"),
            Bytes::new(),
            big.clone(),
            Bytes::from_static(b"three"),
        ];
        let refs = p.store(batch.iter());
        assert_eq!(refs[0].chunk, refs[3].chunk);
        assert_eq!(refs[1], PayloadRef::EMPTY);
        for (r, b) in refs.iter().zip(&batch) {
            assert_eq!(&p.get(*r), b);
        }
        assert_eq!(p.chunks.iter().flatten().count(), 2);
        assert_eq!(
            p.bytes(),
            3 + 16 * 1024 + 5,
            "what the memory budget counts"
        );
        p.release(refs[0]);
        assert_eq!(p.get(refs[3]), Bytes::from_static(b"three"));
        for r in &refs[1..] {
            p.release(*r);
        }
        assert_eq!(p.chunks.iter().flatten().count(), 0);
        assert_eq!(p.bytes(), 0);
        // Freed chunk numbers are reused.
        let again = p.store([Bytes::from_static(b"x")].iter());
        assert!(again[0].chunk < 2);
    }

    #[test]
    fn small_payloads_spill_into_several_chunks() {
        let mut p = Payloads::default();
        let payload = Bytes::from(vec![1u8; 10_000]);
        let batch: Vec<Bytes> = (0..20).map(|_| payload.clone()).collect();
        let refs = p.store(batch.iter());
        let chunks: std::collections::HashSet<u32> = refs.iter().map(|r| r.chunk).collect();
        assert_eq!(chunks.len(), 4, "200 kB in chunks of at most 64 kB");
        assert!(refs.iter().all(|r| p.get(*r) == payload));
    }

    #[test]
    fn pages_are_freed_when_empty_and_iterated_in_order() {
        let mut s = Slots::default();
        let slot = |enqueued_at| LiveJob {
            payload: PayloadRef::EMPTY,
            kind: 0,
            enqueued_at,
            attempts: 0,
            max_attempts: 1,
            priority: 0,
            state: JobState::Pending,
            blocked: false,
            extra: None,
        };
        for seq in 1..=1_000 {
            s.insert(seq, slot(seq));
        }
        assert_eq!(s.len(), 1_000);
        for seq in 1..1_000 {
            s.remove(seq);
        }
        // Only the last job's page is left.
        assert_eq!(s.pages.len(), 1);
        assert_eq!(s.get(1_000).unwrap().enqueued_at, 1_000);
        assert!(s.get(999).is_none());
        s.insert(1_001, slot(1_001));
        s.insert(5_000, slot(5_000));
        let seqs: Vec<u64> = s.iter_from(1_001).map(|(seq, _)| seq).collect();
        assert_eq!(seqs, vec![1_001, 5_000]);
    }
}
