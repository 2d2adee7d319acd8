//! The fuzz targets' bodies, shared by the `cargo fuzz` binaries of `tests/fuzz` (this file
//! is their library) and by the corpus replay test `tests/fuzz_corpus.rs` (which includes
//! it as a module), so the suite replays every committed input through exactly the checks
//! the fuzzer ran.
//!
//! Each target takes arbitrary bytes and panics only on a defect: a panic in the broker
//! code, or a broken property checked here (against a naive reference where there is one).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use prost::Message as _;
use sluice::broker::testing::broker_server::Broker as _;
use sluice::broker::testing::{
    self, BrokerService, LeaseId, MAX_NAME_BYTES, NewJob, Pattern, PolicyPatch, Queue, Retention,
    Topic, validate_name,
};
use sluice::broker::{Broker, BrokerConfig, Limits, Storage, StorageFile, StoreConfig};
use sluice::pb;

// ---- (1) WAL records ------------------------------------------------------------------

/// The recovery clock: any fixed time works, a fixed one keeps runs reproducible.
const NOW: u64 = 1_800_000_000_000;

/// A data directory in memory.
#[derive(Debug, Default, Clone)]
struct MemStorage {
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl MemStorage {
    fn with(files: Vec<(String, Vec<u8>)>) -> Self {
        let storage = Self::default();
        storage.files.lock().unwrap().extend(files);
        storage
    }

    fn deep_copy(&self) -> Self {
        Self::with(self.files.lock().unwrap().clone().into_iter().collect())
    }

    fn missing(name: &str) -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, name.to_owned())
    }
}

struct MemFile {
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    name: String,
}

impl StorageFile for MemFile {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let mut files = self.files.lock().unwrap();
        files.entry(self.name.clone()).or_default().extend(data);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Storage for MemStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.files.lock().unwrap().keys().cloned().collect())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let files = self.files.lock().unwrap();
        files.get(name).cloned().ok_or_else(|| Self::missing(name))
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        self.files
            .lock()
            .unwrap()
            .insert(name.to_owned(), Vec::new());
        Ok(Box::new(MemFile {
            files: self.files.clone(),
            name: name.to_owned(),
        }))
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let mut files = self.files.lock().unwrap();
        let file = files.get_mut(name).ok_or_else(|| Self::missing(name))?;
        assert!(
            len <= file.len() as u64,
            "recovery cut {name} to {len} bytes, past its end ({} bytes)",
            file.len()
        );
        file.truncate(len as usize);
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut files = self.files.lock().unwrap();
        let data = files.remove(from).ok_or_else(|| Self::missing(from))?;
        files.insert(to.to_owned(), data);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut files = self.files.lock().unwrap();
        files
            .remove(name)
            .map(drop)
            .ok_or_else(|| Self::missing(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }

    fn describe(&self, name: &str) -> String {
        format!("mem/{name}")
    }

    fn release(&self) {}
}

/// What recovery rebuilt, in a comparable form.
fn recovered_state(queues: &[Queue], topics: &[Topic]) -> Vec<String> {
    let mut state: Vec<String> = queues
        .iter()
        .map(|q| {
            let c = q.counts(NOW);
            let (jobs, _) = q.list(None, 0, usize::MAX);
            let jobs: Vec<_> = jobs.iter().map(|j| (j.id, j.state, j.attempts)).collect();
            format!(
                "queue {:?} {:?} paused={} pending={} scheduled={} retrying={} {jobs:?}",
                q.name(),
                q.policy(),
                q.is_paused(),
                c.pending,
                c.scheduled,
                c.retrying
            )
        })
        .chain(topics.iter().map(|t| {
            format!(
                "topic {:?} next={} first={} retained={:?} {:?}",
                t.name(),
                t.next_seq(),
                t.first_seq(),
                t.retained(),
                t.retention()
            )
        }))
        .collect();
    state.sort();
    state
}

/// Starts a broker on `storage` as the binary does (recovery, then a snapshot of what it
/// recovered that replaces the old log files) and stops it.
fn reopen(storage: &MemStorage, repair: bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        let store = StoreConfig {
            repair,
            ..StoreConfig::default()
        };
        let (broker, _) = Broker::open(BrokerConfig::default(), Arc::new(storage.clone()), store)
            .unwrap_or_else(|e| panic!("a broker does not start on a log recovery accepted: {e}"));
        broker.shutdown();
        broker.close_storage();
    });
}

/// WAL recovery (the framed record reader, the record decoder and the replay of
/// `broker/store`) over a data directory built from `data`; it must refuse damage with an
/// error, never panic or allocate without bound.
///
/// `data[0]` is a set of flags, the rest the log:
/// * bit 0: recover with `--repair`;
/// * bit 1: the rest is records, each a `u16 LE` length and that many bytes, written as
///   frames with a valid checksum after a file header (so the decoder and the replay see
///   them); otherwise the rest is the raw file, header and framing included;
/// * bit 2: the first file is a snapshot rather than a segment;
/// * bit 3: the log is two files: the records (or bytes) are split between them at the
///   fraction `data[0] >> 4` / 16.
///
/// Properties: recovery that succeeds leaves every log file no longer than before (it may
/// write the MANIFEST, the log's index), a second
/// recovery of what it left succeeds with the same state, and so does the recovery of the
/// snapshot a broker started on it writes; recovery that refuses damage succeeds with
/// `--repair`.
pub fn wal(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let repair = flags & 1 != 0;
    let framed = flags & 2 != 0;
    let snapshot_first = flags & 4 != 0;
    let two_files = flags & 8 != 0;
    let fraction = usize::from(flags >> 4);

    let mut bodies: Vec<Vec<u8>> = Vec::new();
    if framed {
        let mut records = Vec::new();
        let mut input = rest;
        while input.len() >= 2 {
            let len = usize::from(u16::from_le_bytes([input[0], input[1]])).min(input.len() - 2);
            records.push(&input[2..2 + len]);
            input = &input[2 + len..];
        }
        let split = if two_files {
            records.len() * fraction / 16
        } else {
            records.len()
        };
        for part in [&records[..split], &records[split..]] {
            let mut body = testing::FILE_MAGIC.to_vec();
            for record in part {
                testing::frame(&mut body, record);
            }
            bodies.push(body);
        }
        if !two_files {
            bodies.pop();
        }
    } else if two_files {
        let split = rest.len() * fraction / 16;
        bodies.push(rest[..split].to_vec());
        bodies.push(rest[split..].to_vec());
    } else {
        bodies.push(rest.to_vec());
    }
    let mut names = Vec::new();
    if snapshot_first {
        names.push("snap-00000000000000000001.wal".to_owned());
    }
    names.extend((1..).map(|id| format!("{id:020}.wal")).take(2));
    let files: Vec<(String, Vec<u8>)> = names.into_iter().zip(bodies).collect();
    let sizes: BTreeMap<String, usize> = files.iter().map(|(n, d)| (n.clone(), d.len())).collect();

    let storage = MemStorage::with(files);
    let original = storage.deep_copy();
    match testing::recover(&storage, repair, NOW) {
        Ok((queues, topics, _)) => {
            for (name, data) in storage.files.lock().unwrap().iter() {
                // The MANIFEST is the log's index, which recovery writes (for a directory
                // that had none, too); it holds no records.
                if name == "MANIFEST" {
                    continue;
                }
                let before = name.strip_suffix(".damaged").unwrap_or(name);
                assert!(
                    sizes.get(before).is_some_and(|len| data.len() <= *len),
                    "recovery left {name} with {} bytes, more than it found",
                    data.len()
                );
            }
            let first = recovered_state(&queues, &topics);
            let (queues, topics, _) = testing::recover(&storage, repair, NOW)
                .unwrap_or_else(|e| panic!("a second recovery of what recovery left fails: {e}"));
            assert_eq!(
                first,
                recovered_state(&queues, &topics),
                "a second recovery of what recovery left rebuilds another state"
            );
            reopen(&storage, repair);
            let (queues, topics, _) = testing::recover(&storage, false, NOW).unwrap_or_else(|e| {
                panic!("recovery of the snapshot a broker started on this log wrote fails: {e}")
            });
            assert_eq!(
                first,
                recovered_state(&queues, &topics),
                "the snapshot a broker started on this log wrote holds another state"
            );
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!repair, "recovery with --repair still refuses: {message}");
            testing::recover(&original, true, NOW)
                .unwrap_or_else(|e| panic!("--repair does not recover from {message}: {e}"));
        }
    }
}

// ---- (2) Lease ids --------------------------------------------------------------------

/// The reference reading of a lease id: everything before the last two `/` is the queue
/// (not empty), then a decimal seq and a hex nonce.
fn naive_lease_id(s: &str) -> Option<(String, u64, u64)> {
    let parts: Vec<&str> = s.split('/').collect();
    let n = parts.len();
    if n < 3 {
        return None;
    }
    let nonce = u64::from_str_radix(parts[n - 1], 16).ok()?;
    let seq = parts[n - 2].parse().ok()?;
    let queue = parts[..n - 2].join("/");
    (!queue.is_empty()).then_some((queue, seq, nonce))
}

/// `LeaseId` parsing (`broker/domain/queue/mod.rs`): `FromStr` reads every string as the reference
/// does, `queue_of` and `parse_for` agree with it, a parsed id prints back to an id that parses equal, and an id built from
/// a valid queue name and any seq and nonce survives printing and parsing unchanged.
/// `data` is the text; from 16 bytes on, its first 16 bytes are also a seq and a nonce
/// and the rest a queue name.
pub fn lease_id(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let parsed = text.parse::<LeaseId>();
    assert_eq!(
        parsed
            .as_ref()
            .ok()
            .map(|id| (id.queue.to_string(), id.seq, id.nonce)),
        naive_lease_id(&text),
        "{text:?} parses unlike the reference"
    );
    assert_eq!(
        LeaseId::queue_of(&text),
        parsed.as_ref().ok().map(|id| &*id.queue),
        "queue_of({text:?}) disagrees with parse"
    );
    for hint in ["q", parsed.as_ref().map_or("q", |id| &*id.queue)] {
        assert_eq!(
            LeaseId::parse_for(&text, &Arc::from(hint)),
            parsed.clone().ok(),
            "parse_for({text:?}) disagrees with parse"
        );
    }
    if let Ok(id) = parsed {
        let printed = id.to_string();
        assert_eq!(
            printed.parse::<LeaseId>(),
            Ok(id),
            "{text:?} printed {printed:?}"
        );
    }
    if data.len() >= 16 {
        let seq = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let nonce = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
        let queue = String::from_utf8_lossy(&data[16..]);
        if validate_name("queue", &queue).is_ok() {
            let id = LeaseId {
                queue: Arc::from(&*queue),
                seq,
                nonce,
            };
            let printed = id.to_string();
            assert_eq!(LeaseId::queue_of(&printed), Some(&*queue));
            assert_eq!(printed.parse::<LeaseId>(), Ok(id), "{printed:?}");
        }
    }
}

// ---- (3) Names and patterns -----------------------------------------------------------

fn naive_literal(token: &str) -> bool {
    !token.is_empty()
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn naive_name(name: &str) -> bool {
    (1..=MAX_NAME_BYTES).contains(&name.len()) && name.split('.').all(naive_literal)
}

fn naive_pattern(pattern: &str) -> bool {
    let tokens: Vec<&str> = pattern.split('.').collect();
    (1..=MAX_NAME_BYTES).contains(&pattern.len())
        && tokens
            .iter()
            .enumerate()
            .all(|(i, t)| *t == "*" || (*t == ">" && i + 1 == tokens.len()) || naive_literal(t))
}

/// The reference matcher: tries every way `>` could end, where the broker's matcher walks
/// once.
fn naive_matches(pattern: &[&str], name: &[&str]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((&">", rest)) => (1..=name.len()).any(|k| naive_matches(rest, &name[k..])),
        Some((&"*", rest)) => !name.is_empty() && naive_matches(rest, &name[1..]),
        Some((literal, rest)) => name.first() == Some(literal) && naive_matches(rest, &name[1..]),
    }
}

/// Name validation and pattern parsing and matching (`broker/domain/names.rs`) against a naive
/// reference. `data` is up to three lines: a pattern, a second pattern and a name (a
/// missing line is the first one again). Checked: validity of each line both as a name and
/// as a pattern, refusals that name their field, `matches` of both patterns against the
/// name, `is_literal`, and that `covers` never claims more than `matches` shows.
pub fn names(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let first = lines.next().unwrap_or_default();
    let second = lines.next().unwrap_or(first);
    let name = lines.next().unwrap_or(first);

    let mut patterns = Vec::new();
    for line in [first, second, name] {
        match validate_name("topic", line) {
            Ok(()) => assert!(naive_name(line), "{line:?} passes as a name"),
            Err(e) => {
                assert!(!naive_name(line), "{line:?} is refused as a name: {e}");
                assert!(e.to_string().starts_with("topic: "), "{e}");
            }
        }
        match Pattern::parse("pattern", line) {
            Ok(p) => {
                assert!(naive_pattern(line), "{line:?} passes as a pattern");
                assert_eq!(p.as_str(), line);
                assert_eq!(
                    p.is_literal(),
                    naive_name(line),
                    "{line:?}: is_literal is wrong"
                );
                patterns.push(p);
            }
            Err(e) => {
                assert!(
                    !naive_pattern(line),
                    "{line:?} is refused as a pattern: {e}"
                );
                assert!(e.to_string().starts_with("pattern: "), "{e}");
            }
        }
    }
    if !naive_name(name) {
        return;
    }
    let name_tokens: Vec<&str> = name.split('.').collect();
    for p in &patterns {
        let tokens: Vec<&str> = p.as_str().split('.').collect();
        assert_eq!(
            p.matches(name),
            naive_matches(&tokens, &name_tokens),
            "{p} vs {name:?}"
        );
        if p.is_literal() {
            assert_eq!(p.matches(name), p.as_str() == name, "{p} vs {name:?}");
        }
        for q in &patterns {
            if p.covers(q) && q.matches(name) {
                assert!(
                    p.matches(name),
                    "{p} covers {q}, which matches {name:?}, but {p} does not"
                );
            }
        }
        assert!(p.covers(p), "{p} does not cover itself");
    }
}

// ---- (4) Request validation -----------------------------------------------------------

/// Small limits, so short inputs reach both sides of each.
fn fuzz_limits() -> Limits {
    Limits {
        max_payload_bytes: 64,
        max_headers: 4,
        max_header_bytes: 32,
        max_batch: 8,
        max_key_bytes: 16,
        max_error_bytes: 64,
        max_subscriptions: 8,
        max_queues: 6,
        max_topics: 4,
        max_memory_bytes: 512,
        strict_queues: false,
    }
}

/// Everything a request could change, in a comparable form (rates and ages, which move
/// with the clock alone, left out).
fn broker_state(broker: &Broker) -> Vec<String> {
    let mut state = Vec::new();
    for info in broker.list_queues() {
        let (jobs, _) = broker
            .list_jobs(&info.name, None, broker.limits().max_batch, "")
            .expect("listing a listed queue");
        let jobs: Vec<_> = jobs
            .iter()
            .map(|j| (j.id, j.state, j.attempts, j.run_at, j.priority))
            .collect();
        state.push(format!(
            "queue {:?} {:?} {} {jobs:?}",
            info.name, info.policy, info.paused
        ));
    }
    let stats = broker.stats(&[], &[]);
    for (name, c) in stats.queues {
        state.push(format!(
            "counts {name} {} {} {} {} {} {} {} {} {}",
            c.pending,
            c.scheduled,
            c.leased,
            c.retrying,
            c.enqueued,
            c.completed,
            c.failed,
            c.dead,
            c.cancelled
        ));
    }
    for t in stats.topics {
        state.push(format!(
            "topic {} {} {} {} {} {}",
            t.name,
            t.first_sequence,
            t.last_sequence,
            t.retained_messages,
            t.retained_bytes,
            t.published
        ));
    }
    state
}

/// Request mapping and validation (`broker/grpc/service.rs`, `broker/domain/limits.rs`,
/// `broker/engine/`) through the gRPC service itself, called in process on an in-memory
/// broker with small limits that already holds queues `q` (one job), `dlq` and `bound`
/// (bound to `t.>`) and topic `t.a`.
///
/// `data` is a sequence of requests, each a kind byte (`% 3`: Enqueue, Publish,
/// CreateQueue), a `u16 LE` length and that many bytes of the request's protobuf encoding.
/// Properties: nothing panics, a refusal is a client error with a message, a refused
/// request changes nothing, and the broker never holds more queues or topics than its
/// limits, or a queue with a name it would refuse.
pub fn requests(data: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        let broker = Broker::new(BrokerConfig {
            limits: fuzz_limits(),
            ..BrokerConfig::default()
        });
        broker
            .create_queue("q", PolicyPatch::default())
            .await
            .unwrap();
        broker
            .create_queue("dlq", PolicyPatch::default())
            .await
            .unwrap();
        let bound = PolicyPatch {
            topic_bindings: Some(vec!["t.>".into()]),
            dead_letter_queue: Some("dlq".into()),
            ..PolicyPatch::default()
        };
        broker.create_queue("bound", bound).await.unwrap();
        broker
            .create_topic("t.a", Retention::default())
            .await
            .unwrap();
        let job = NewJob {
            payload: "job".into(),
            idempotency_key: Some("once".into()),
            ..NewJob::default()
        };
        broker.enqueue("q", vec![job]).await.unwrap();
        let service = BrokerService::new(broker.clone(), None);

        let mut input = data;
        while input.len() >= 3 {
            let kind = input[0] % 3;
            let len = usize::from(u16::from_le_bytes([input[1], input[2]])).min(input.len() - 3);
            let body = &input[3..3 + len];
            input = &input[3 + len..];
            let before = broker_state(&broker);
            let refused = match kind {
                0 => match pb::EnqueueRequest::decode(body) {
                    Ok(req) => service.enqueue(tonic::Request::new(req)).await.err(),
                    Err(_) => continue,
                },
                1 => match pb::PublishRequest::decode(body) {
                    Ok(req) => service.publish(tonic::Request::new(req)).await.err(),
                    Err(_) => continue,
                },
                _ => match pb::CreateQueueRequest::decode(body) {
                    Ok(req) => service.create_queue(tonic::Request::new(req)).await.err(),
                    Err(_) => continue,
                },
            };
            let queues = broker.list_queues();
            let limits = broker.limits();
            assert!(
                queues.len() <= limits.max_queues,
                "{} queues, past the limit of {}",
                queues.len(),
                limits.max_queues
            );
            for info in &queues {
                validate_name("name", &info.name)
                    .unwrap_or_else(|e| panic!("the broker holds a queue it should refuse: {e}"));
            }
            let topics = broker.stats(&[], &[]).topics.len();
            assert!(
                topics <= limits.max_topics,
                "{topics} topics, past the limit"
            );
            if let Some(status) = refused {
                assert!(
                    !matches!(
                        status.code(),
                        tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::Unavailable
                    ),
                    "a request is refused as a server fault: {status:?}"
                );
                assert!(
                    !status.message().is_empty(),
                    "a refusal without a message: {status:?}"
                );
                assert_eq!(
                    before,
                    broker_state(&broker),
                    "a refused request changed the broker: {status:?}"
                );
            }
        }
        broker.shutdown();
    });
}
