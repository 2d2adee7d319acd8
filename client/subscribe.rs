//! Subscriptions that resume where they left off after a reconnect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::client::Rpc;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::client::codec::{Codec, Json, Raw};
use crate::client::error::{ClientError, Result};
use crate::client::retry::Reconnect;
use crate::pb;

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// Only messages published from now on (the default).
    #[default]
    Latest,
    /// The oldest retained message of each matching topic.
    Earliest,
    /// This sequence in each matching topic.
    Sequence(u64),
    /// The first message published at or after this time.
    Time(SystemTime),
}

/// A delivered topic message with its payload decoded as `T`.
#[derive(Debug, Clone)]
pub struct Delivery<T> {
    /// Topic.
    pub topic: String,
    /// Sequence in the topic.
    pub sequence: u64,
    /// The publisher's key.
    pub key: String,
    /// Headers.
    pub headers: HashMap<String, String>,
    /// The decoded payload.
    pub value: T,
    /// When the broker appended it, unix ms.
    pub publish_time_unix_ms: u64,
}

impl<T> Delivery<T> {
    /// A consumer span (`process <topic>`) to handle this message in: the child of the
    /// publisher's trace context the message carries (see [`crate::client::trace`]).
    ///
    /// ```no_run
    /// # async fn demo(client: sluice::client::Client) -> sluice::client::Result<()> {
    /// use futures::StreamExt;
    /// use tracing::Instrument;
    ///
    /// let mut events = client.subscribe("user.*").raw().await?;
    /// while let Some(delivery) = events.next().await {
    ///     let delivery = delivery?;
    ///     async { /* handle it */ }.instrument(delivery.span()).await;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn span(&self) -> tracing::Span {
        crate::client::trace::consumer_span(&self.topic, &self.headers)
    }
}

/// A subscription being set up; see [`crate::client::Client::subscribe`].
#[must_use = "finish with .raw(), .json() or .decoded()"]
#[derive(Debug)]
pub struct Subscribe {
    rpc: Rpc,
    request: pb::SubscribeRequest,
    reconnect: bool,
    buffer: usize,
}

/// How long to wait before the first reconnect attempt after a connection loss.
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(50);
/// How long to wait between reconnect attempts, at most.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);

impl Subscribe {
    pub(crate) fn new(rpc: Rpc, pattern: &str) -> Self {
        Self {
            rpc,
            request: pb::SubscribeRequest {
                pattern: pattern.to_owned(),
                ..Default::default()
            },
            reconnect: true,
            buffer: 1024,
        }
    }

    /// Where to start (default: latest).
    pub fn start(mut self, start: StartAt) -> Self {
        let r = &mut self.request;
        match start {
            StartAt::Latest => r.start = pb::StartPosition::Latest as i32,
            StartAt::Earliest => r.start = pb::StartPosition::Earliest as i32,
            StartAt::Sequence(seq) => {
                r.start = pb::StartPosition::Sequence as i32;
                r.start_sequence = seq;
            }
            StartAt::Time(t) => {
                r.start = pb::StartPosition::Time as i32;
                r.start_time_unix_ms = t
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
            }
        }
        self
    }

    /// Resumes `topic` at `next_sequence` (overrides `start` for that topic).
    pub fn resume_from(mut self, topic: impl Into<String>, next_sequence: u64) -> Self {
        self.request.resume_from.insert(topic.into(), next_sequence);
        self
    }

    /// End with a DATA_LOSS error instead of reporting gaps and going on.
    pub fn end_on_gap(mut self) -> Self {
        self.request.on_gap = pb::GapPolicy::EndStream as i32;
        self
    }

    /// Most messages per streamed batch.
    pub fn max_batch(mut self, n: u32) -> Self {
        self.request.max_batch = n;
        self
    }

    /// Whether to reconnect (resuming from the last delivered sequence of each topic) when
    /// the connection drops or the broker restarts. Default: true.
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Opens the subscription with raw payloads.
    pub async fn raw(
        self,
    ) -> Result<impl Stream<Item = Result<Delivery<Bytes>>> + Send + Unpin + 'static> {
        self.decoded(Raw).await
    }

    /// Opens the subscription with JSON payloads decoded as `T`.
    pub async fn json<T>(
        self,
    ) -> Result<impl Stream<Item = Result<Delivery<T>>> + Send + Unpin + 'static>
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
    {
        self.decoded(Json).await
    }

    /// Opens the subscription, decoding payloads with `codec`. The call returns once the
    /// broker has registered the subscription, so a publish after it is delivered.
    ///
    /// The stream yields deliveries in sequence order per topic. A gap (messages evicted
    /// before this subscriber read them) arrives as an `Err(ClientError::Gap)` item and the
    /// stream goes on; an undecodable payload arrives as `Err(ClientError::Decode)`.
    /// Other errors end the stream, except connection losses, after which it reconnects
    /// with backoff and resumes from the last delivered sequence of each topic.
    pub async fn decoded<T, C>(
        self,
        codec: C,
    ) -> Result<impl Stream<Item = Result<Delivery<T>>> + Send + Unpin + 'static>
    where
        T: Send + 'static,
        C: Codec<T>,
    {
        let mut rpc = self.rpc.clone();
        let opened_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let first = rpc.subscribe(self.request.clone()).await?.into_inner();
        let (tx, rx) = mpsc::channel(self.buffer);
        tokio::spawn(follow(
            rpc,
            self.request,
            first,
            self.reconnect,
            opened_at,
            tx,
        ));
        let codec = Arc::new(codec);
        Ok(ReceiverStream::new(rx).map(move |item| {
            item.and_then(|m: pb::Message| {
                let context = format!("{}#{}", m.topic, m.sequence);
                Ok(Delivery {
                    value: codec.decode(&m.payload, &context)?,
                    topic: m.topic,
                    sequence: m.sequence,
                    key: m.key,
                    headers: m.headers,
                    publish_time_unix_ms: m.publish_time_unix_ms,
                })
            })
        }))
    }
}

/// Whether an error means "the connection went away" (reconnect) rather than "the
/// broker refused" (give up).
fn is_connection_loss(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
    )
}

/// Forwards messages, remembering each topic's last sequence; reconnects on connection
/// loss with `resume_from` set to last + 1 for every topic seen.
async fn follow(
    mut rpc: Rpc,
    mut request: pb::SubscribeRequest,
    first: tonic::Streaming<pb::SubscribeResponse>,
    reconnect: bool,
    opened_at_unix_ms: u64,
    tx: mpsc::Sender<Result<pb::Message>>,
) {
    let mut stream = Some(first);
    let mut retry = Reconnect::new(FIRST_RECONNECT_DELAY, MAX_RECONNECT_DELAY);
    loop {
        if let Some(mut s) = stream.take() {
            loop {
                let item = tokio::select! {
                    item = s.message() => item,
                    _ = tx.closed() => return,
                };
                match item {
                    Ok(Some(batch)) => {
                        retry.succeeded();
                        for gap in batch.gaps {
                            request
                                .resume_from
                                .insert(gap.topic.clone(), gap.next_available);
                            let err = ClientError::Gap {
                                topic: gap.topic,
                                first_missing: gap.first_missing,
                                next_available: gap.next_available,
                            };
                            if tx.send(Err(err)).await.is_err() {
                                return;
                            }
                        }
                        for m in batch.messages {
                            request.resume_from.insert(m.topic.clone(), m.sequence + 1);
                            if tx.send(Ok(m)).await.is_err() {
                                return;
                            }
                        }
                    }
                    // The broker ended the stream (it is shutting down).
                    Ok(None) => break,
                    Err(status) if is_connection_loss(&status) => break,
                    Err(status) => {
                        let _ = tx.send(Err(status.into())).await;
                        return;
                    }
                }
            }
        }
        if !reconnect {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry.next_delay()) => {}
            _ = tx.closed() => return,
        }
        // Topics already delivered from resume by sequence. For the others, "latest" on
        // reconnect would skip what was published while disconnected: they restart at the
        // time the subscription was first opened instead (nothing from them was delivered
        // since, so nothing is repeated).
        if request.start == pb::StartPosition::Latest as i32
            || request.start == pb::StartPosition::Unspecified as i32
        {
            request.start = pb::StartPosition::Time as i32;
            request.start_time_unix_ms = opened_at_unix_ms;
        }
        match rpc.subscribe(request.clone()).await {
            Ok(response) => stream = Some(response.into_inner()),
            Err(status) if is_connection_loss(&status) => {}
            Err(status) => {
                let _ = tx.send(Err(status.into())).await;
                return;
            }
        }
    }
}
