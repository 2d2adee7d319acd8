//! The queue's side of topic bindings: the state kept in the queue's slot and the one
//! script that turns topic messages into jobs. The pump that reads topics and calls these
//! is [`crate::broker::engine::redis::binding`].
//!
//! The `:bind` hash of the queue holds `p:<pattern>` for each binding the pump has
//! started, `c:<topic>` = `<epoch>/<seq>` (the next sequence to pump, within the
//! topic's incarnation `epoch`) per bound topic, and `trimmed` (messages retention
//! dropped before they were pumped). Queue deletion drops it.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use uuid::Uuid;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::Headers;
use crate::broker::engine::redis::conn::unavailable;

use super::library::Call;
use super::{QueueKeys, QueueStore, encode_headers, malformed};

/// A queue's binding state as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct BindState {
    /// Binding patterns the pump has started (their start cursors are set).
    pub(crate) started: BTreeSet<String>,
    /// Cursors by topic, as stored (`<epoch>/<seq>`; compare-and-set compares this text).
    pub(crate) cursors: BTreeMap<String, String>,
    /// Messages retention dropped before they were pumped, since the queue was created.
    pub(crate) trimmed: u64,
}

/// A cursor's parts: the topic's incarnation and the next sequence to pump.
pub(crate) fn parse_cursor(text: &str) -> Option<(&str, u64)> {
    let (epoch, seq) = text.split_once('/')?;
    Some((epoch, seq.parse().ok()?))
}

/// A cursor as stored.
pub(crate) fn cursor(epoch: &str, next: u64) -> String {
    format!("{epoch}/{next}")
}

/// A topic message to enqueue: its sequence, payload and the job's headers.
#[derive(Debug, Clone)]
pub(crate) struct BoundMessage {
    /// Its sequence in the topic.
    pub(crate) sequence: u64,
    /// Payload.
    pub(crate) payload: Bytes,
    /// The job's headers (the message's, with its sequence added).
    pub(crate) headers: Headers,
}

/// What [`QueueStore::bind_pump`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pumped {
    /// The cursor moved since it was read (another pump got there first): nothing done.
    Moved,
    /// `taken` messages became jobs; `full` if the rest did not fit under max depth.
    Taken {
        /// Jobs enqueued.
        taken: u64,
        /// Whether messages were left for want of room.
        full: bool,
    },
}

impl QueueStore {
    /// The queue's binding state (empty for a queue without, or a missing queue).
    pub(crate) async fn bind_state(&self, queue: &str) -> Result<BindState, BrokerError> {
        let mut c = self.conn.clone();
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(QueueKeys::new(queue).key("bind"))
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("reading the bindings of queue {queue:?}"), e))?;
        let mut state = BindState::default();
        for (field, value) in all {
            if let Some(pattern) = field.strip_prefix("p:") {
                state.started.insert(pattern.to_owned());
            } else if let Some(topic) = field.strip_prefix("c:") {
                state.cursors.insert(topic.to_owned(), value);
            } else if field == "trimmed" {
                state.trimmed = value
                    .parse()
                    .map_err(|e| malformed("the bindings' trimmed count", e))?;
            }
        }
        Ok(state)
    }

    /// The stored cursor of `topic`'s binding into `queue`.
    pub(crate) async fn bind_cursor(
        &self,
        queue: &str,
        topic: &str,
    ) -> Result<Option<String>, BrokerError> {
        let mut c = self.conn.clone();
        redis::cmd("HGET")
            .arg(QueueKeys::new(queue).key("bind"))
            .arg(format!("c:{topic}"))
            .query_async(&mut c)
            .await
            .map_err(|e| unavailable(&format!("reading the bindings of queue {queue:?}"), e))
    }

    /// Sets start cursors (only for topics that have none), marks `started` patterns
    /// started, and drops `fields` of the state (`p:<pattern>`, `c:<topic>`).
    /// NotFound if the queue does not exist.
    pub(crate) async fn bind_sync(
        &self,
        queue: &str,
        starts: &[(String, String)],
        started: &[&str],
        fields: &[String],
    ) -> Result<(), BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("bind_sync", keys.base());
        inv.arg(queue).arg(starts.len());
        for (topic, cursor) in starts {
            inv.arg(topic).arg(cursor);
        }
        inv.arg(started.len()).arg(started).arg(fields);
        self.run::<i64>(
            &format!("starting the bindings of queue {queue:?}"),
            None,
            &inv,
        )
        .await
        .map(|_| ())
    }

    /// Enqueues `messages` of `topic` (consecutive, from the cursor on) and sets the
    /// cursor to `<epoch>/<next>` (or to the first message that did not fit), if the
    /// stored cursor is still `expected`; counts `trimmed` messages retention dropped
    /// before this pump. NotFound if the queue does not exist.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn bind_pump(
        &self,
        queue: &str,
        topic: &str,
        expected: Option<&str>,
        epoch: &str,
        next: u64,
        trimmed: u64,
        messages: &[BoundMessage],
    ) -> Result<Pumped, BrokerError> {
        let keys = QueueKeys::new(queue);
        let mut inv = Call::new("bind_pump", keys.base());
        inv.arg(queue)
            .arg(topic)
            .arg(expected.unwrap_or(""))
            .arg(epoch)
            .arg(next)
            .arg(trimmed)
            .arg(messages.len());
        for m in messages {
            inv.arg(m.sequence)
                .arg(Uuid::now_v7().to_string())
                .arg(m.payload.as_ref())
                .arg(encode_headers(&m.headers));
        }
        let (taken, full): (i64, i64) = self
            .run(
                &format!("enqueueing messages of topic {topic:?} to queue {queue:?}"),
                None,
                &inv,
            )
            .await?;
        Ok(match u64::try_from(taken) {
            Ok(taken) => Pumped::Taken {
                taken,
                full: full == 1,
            },
            Err(_) => Pumped::Moved,
        })
    }
}
