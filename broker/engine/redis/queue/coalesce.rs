//! Group commit for enqueue scripts: enqueues to one queue that arrive while a script for
//! that queue is in flight wait and go together, as ONE enqueue.lua call, when it
//! finishes (as the write-ahead log's group commit does for fsync). The first request of
//! an idle queue goes at once, in its caller's task; no request waits for a timer.
//!
//! Every script call carries fixed work (the meta hash, idempotency pruning, counters,
//! the wake-up), so merging N small requests costs Redis about what one does.
//!
//! # Each request keeps its own answer
//!
//! * A merged call passes each request's job count (see enqueue.lua), so idempotency keys
//!   behave as if the requests ran one after another in arrival order, and the reply is
//!   split back per request.
//! * The script is all or none over the whole call. When it refuses a merged call as
//!   full, nothing was stored, and each request runs again alone, in order, so only the
//!   ones that do not fit are refused. The other refusals (stale schema, missing queue)
//!   do not depend on the jobs: every request gets the one each would get alone. Any
//!   other failure (Redis unreachable, a reply lost) leaves the outcome unknown, as it
//!   would for a request alone: each request gets that error, and none runs again, which
//!   could store its jobs twice.
//! * A merged call holds only requests checked against the same schema revision (the
//!   script checks one).
//!
//! # Bounds
//!
//! A merged call holds at most [`MAX_JOBS`] jobs and [`MAX_BYTES`] bytes (a request
//! larger than either goes alone, as it did before). Waiting requests are bounded by the
//! callers waiting: each holds one entry and awaits its answer; a request whose caller
//! gave up before its call was sent is dropped unsent.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::queue::{Enqueued, NewJob};
use crate::broker::sync::lock;

use super::{QueueStore, encode_headers, optional};

/// Most jobs one merged call holds: the default `Limits::max_batch`, so a merged call's
/// arguments are no more than those of the largest request allowed by default.
pub(crate) const MAX_JOBS: usize = 1000;

/// Most bytes (payloads, kinds, headers and keys) one merged call holds.
pub(crate) const MAX_BYTES: usize = 4 << 20;

/// A job as enqueue.lua takes it (its 9 arguments), made once per request so a request
/// that runs again alone keeps its job ids.
pub(crate) struct ScriptJob {
    id: String,
    kind: String,
    payload: Bytes,
    headers: Vec<u8>,
    priority: u8,
    run_at: String,
    max_attempts: String,
    idempotency_key: String,
    ordering_key: String,
}

impl ScriptJob {
    /// `job` with a fresh id.
    pub(crate) fn new(job: &NewJob) -> Self {
        Self {
            id: Uuid::now_v7().to_string(),
            kind: job.kind.clone(),
            payload: job.payload.clone(),
            headers: encode_headers(&job.headers),
            priority: job.priority,
            run_at: job.run_at.map_or_else(String::new, |t| t.to_string()),
            max_attempts: job.max_attempts.map_or_else(String::new, |n| n.to_string()),
            idempotency_key: optional(job.idempotency_key.as_deref()),
            ordering_key: optional(job.ordering_key.as_deref()),
        }
    }

    /// Appends the job's arguments.
    pub(crate) fn args(&self, inv: &mut super::library::Call) {
        inv.arg(&self.id)
            .arg(&self.kind)
            .arg(self.payload.as_ref())
            .arg(&self.headers)
            .arg(self.priority)
            .arg(&self.run_at)
            .arg(&self.max_attempts)
            .arg(&self.idempotency_key)
            .arg(&self.ordering_key);
    }

    /// The bytes the job adds to a call, for [`MAX_BYTES`].
    fn size(&self) -> usize {
        self.kind.len()
            + self.payload.len()
            + self.headers.len()
            + self.idempotency_key.len()
            + self.ordering_key.len()
    }
}

/// What each request gets: one outcome per job, in order.
type Answer = Result<Vec<Enqueued>, BrokerError>;

/// A request waiting for the call in flight on its queue to finish.
struct Waiting {
    jobs: Vec<ScriptJob>,
    revision: u32,
    bytes: usize,
    reply: oneshot::Sender<Answer>,
}

/// The queues with an enqueue call in flight (present = in flight) and the requests
/// waiting for it, in arrival order.
#[derive(Default)]
pub(crate) struct Groups {
    queues: Mutex<HashMap<String, VecDeque<Waiting>>>,
}

/// Stores `jobs` in queue `name`, checked against schema `revision`, all or none: at
/// once when no enqueue to the queue is in flight, else together with the other requests
/// that arrive meanwhile once it finishes.
pub(crate) async fn enqueue(
    store: &QueueStore,
    name: &str,
    jobs: Vec<ScriptJob>,
    revision: u32,
) -> Answer {
    // Joined the requests waiting on the call in flight, or (idle) the jobs to send now.
    let joined = {
        let mut queues = lock(&store.groups.queues);
        match queues.entry(name.to_owned()) {
            Entry::Occupied(mut waiting) => {
                let (reply, rx) = oneshot::channel();
                let bytes = jobs.iter().map(ScriptJob::size).sum();
                waiting.get_mut().push_back(Waiting {
                    jobs,
                    revision,
                    bytes,
                    reply,
                });
                Ok(rx)
            }
            Entry::Vacant(idle) => {
                idle.insert(VecDeque::new());
                Err(jobs)
            }
        }
    };
    match joined {
        Ok(rx) => rx.await.unwrap_or_else(|_| {
            Err(BrokerError::Unavailable(
                "redis: the enqueue call this request joined was abandoned; its outcome is \
                 unknown: retry with the same idempotency keys"
                    .into(),
            ))
        }),
        Err(jobs) => {
            // Dropped when this call ends or its caller gives up: the requests that
            // arrived meanwhile must not be stranded.
            let _hand_on = HandOn { store, name };
            store.enqueue_call(name, &[&jobs], revision).await
        }
    }
}

/// Hands the requests waiting on a queue to a [`drive`] task, or marks the queue idle.
struct HandOn<'a> {
    store: &'a QueueStore,
    name: &'a str,
}

impl Drop for HandOn<'_> {
    fn drop(&mut self) {
        let mut queues = lock(&self.store.groups.queues);
        match queues.get(self.name) {
            Some(waiting) if !waiting.is_empty() => {}
            _ => {
                queues.remove(self.name);
                return;
            }
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(drive(self.store.clone(), self.name.to_owned()));
            }
            // Dropped outside the runtime (it is shutting down): the waiting requests
            // hear that their call was abandoned, and the queue is idle again.
            Err(_) => {
                queues.remove(self.name);
            }
        }
    }
}

/// Runs merged calls for queue `name` while requests wait, then marks it idle.
async fn drive(store: QueueStore, name: String) {
    loop {
        let group = {
            let mut queues = lock(&store.groups.queues);
            let Some(waiting) = queues.get_mut(&name) else {
                return;
            };
            waiting.retain(|w| !w.reply.is_closed());
            if waiting.is_empty() {
                queues.remove(&name);
                return;
            }
            take_group(waiting)
        };
        run_group(&store, &name, group).await;
    }
}

/// The next merged call: the first waiting request and those after it with the same
/// revision, within [`MAX_JOBS`] and [`MAX_BYTES`].
fn take_group(waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let first = waiting.pop_front().expect("a waiting request");
    let (mut jobs, mut bytes) = (first.jobs.len(), first.bytes);
    let mut group = vec![first];
    while let Some(next) = waiting.front() {
        let fits = jobs + next.jobs.len() <= MAX_JOBS && bytes + next.bytes <= MAX_BYTES;
        // An empty request would leave no boundary in the script's job counts.
        if next.revision != group[0].revision || !fits || next.jobs.is_empty() || jobs == 0 {
            break;
        }
        jobs += next.jobs.len();
        bytes += next.bytes;
        group.extend(waiting.pop_front());
    }
    group
}

/// Runs one merged call and answers its requests (see the module's doc for failures).
async fn run_group(store: &QueueStore, name: &str, group: Vec<Waiting>) {
    let parts: Vec<&[ScriptJob]> = group.iter().map(|w| w.jobs.as_slice()).collect();
    let result = store.enqueue_call(name, &parts, group[0].revision).await;
    match result {
        Ok(mut outcomes) => {
            for w in group.into_iter().rev() {
                let mine = outcomes.split_off(outcomes.len() - w.jobs.len());
                // A caller that stopped waiting does not mind.
                let _ = w.reply.send(Ok(mine));
            }
        }
        Err(BrokerError::ResourceExhausted(_)) if group.len() > 1 => {
            for w in group {
                let alone = store.enqueue_call(name, &[&w.jobs], w.revision).await;
                let _ = w.reply.send(alone);
            }
        }
        Err(e) => {
            for w in group {
                let _ = w.reply.send(Err(e.clone()));
            }
        }
    }
}
