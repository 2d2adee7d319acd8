//! Pipelined producing: Publish and Enqueue requests sent over one long-lived
//! `PublishStream` / `EnqueueStream` call instead of one call each.
//!
//! A [`Publisher`] (or [`Enqueuer`]) is a cheap-clone handle on a background task that owns
//! the stream. Each request waits for its own answer, so callers see the same results and
//! refusals as with the unary calls (the broker refuses one request and goes on with the
//! next); many callers share the stream and their requests are in flight together, which
//! saves the per-call HTTP/2 set-up that dominates small batches.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use crate::client::Rpc;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::client::error::{ClientError, Result};
use crate::client::{Enqueued, Job, Message, enqueue_request, enqueued, publish_request, trace};
use crate::pb;

/// Requests one stream keeps unanswered at most; the broker holds as many (it answers each
/// once durable), so more would only wait in its socket buffer.
const PIPELINE: usize = 256;

/// A request waiting for its answer.
struct Pending<Req, Resp> {
    request: Req,
    reply: oneshot::Sender<Result<Resp>>,
}

type Opened<Resp> = Pin<
    Box<dyn Future<Output = std::result::Result<tonic::Streaming<Resp>, tonic::Status>> + Send>,
>;

/// Opens the stream RPC over a stream of requests.
type Open<Req, Resp> = fn(Rpc, ReceiverStream<Req>) -> Opened<Resp>;

/// The caller's side of a pipelined stream.
#[derive(Debug)]
struct Pipeline<Req, Resp> {
    requests: mpsc::Sender<Pending<Req, Resp>>,
    name: &'static str,
}

impl<Req, Resp> Clone for Pipeline<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            requests: self.requests.clone(),
            name: self.name,
        }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Pipeline<Req, Resp> {
    fn start(rpc: Rpc, name: &'static str, open: Open<Req, Resp>) -> Self {
        let (requests, rx) = mpsc::channel(PIPELINE);
        tokio::spawn(drive(rpc, name, open, rx));
        Self { requests, name }
    }

    async fn call(&self, request: Req) -> Result<Resp> {
        let (reply, answer) = oneshot::channel();
        let gone = || ClientError::Unanswered {
            rpc: self.name,
            reason: "the stream's task has stopped".into(),
        };
        self.requests
            .send(Pending { request, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Owns the stream: opens it on the first request (and again after it ended), forwards
/// requests while fewer than [`PIPELINE`] are unanswered, and hands each answer to the
/// oldest waiting caller. Stops when every handle is dropped, after the answers of what
/// was sent.
async fn drive<Req, Resp>(
    rpc: Rpc,
    name: &'static str,
    open: Open<Req, Resp>,
    mut incoming: mpsc::Receiver<Pending<Req, Resp>>,
) {
    while let Some(first) = incoming.recv().await {
        let (out, out_rx) = mpsc::channel(PIPELINE);
        let mut answers = match open(rpc.clone(), ReceiverStream::new(out_rx)).await {
            Ok(answers) => answers,
            Err(status) => {
                let _ = first.reply.send(Err(status.into()));
                continue;
            }
        };
        let mut waiting = VecDeque::with_capacity(PIPELINE);
        let mut next = Some(first);
        let mut out = Some(out);
        let ended = loop {
            if let Some(p) = next.take() {
                let Some(sender) = &out else { break None };
                if sender.send(p.request).await.is_err() {
                    // The call is gone; its status arrives on `answers` below.
                    let _ = p.reply.send(Err(ClientError::Unanswered {
                        rpc: name,
                        reason: "the stream closed before the request was sent".into(),
                    }));
                } else {
                    waiting.push_back(p.reply);
                }
            }
            tokio::select! {
                p = incoming.recv(), if out.is_some() && waiting.len() < PIPELINE => match p {
                    Some(p) => next = Some(p),
                    // Every handle is gone: close our side and collect what is owed.
                    None => out = None,
                },
                answer = answers.message() => match answer {
                    Ok(Some(resp)) => {
                        if let Some(reply) = waiting.pop_front() {
                            let _ = reply.send(Ok(resp));
                        }
                        if out.is_none() && waiting.is_empty() {
                            break None;
                        }
                    }
                    Ok(None) => break Some("the broker ended the stream".to_owned()),
                    Err(status) => {
                        let reason = format!("{}: {}", status.code(), status.message());
                        if let Some(reply) = waiting.pop_front() {
                            let _ = reply.send(Err(status.into()));
                        }
                        break Some(reason);
                    }
                },
            }
        };
        if let Some(reason) = ended {
            for reply in waiting {
                let _ = reply.send(Err(ClientError::Unanswered {
                    rpc: name,
                    reason: reason.clone(),
                }));
            }
        }
        if out.is_none() {
            return;
        }
    }
}

/// A refusal on the stream as the error the unary call would have returned.
fn refused(refusal: Option<pb::Refusal>) -> Result<()> {
    match refusal {
        Some(r) => Err(tonic::Status::new(tonic::Code::from(r.code), r.message).into()),
        None => Ok(()),
    }
}

/// Publishes over one `PublishStream` call; see [`crate::client::Client::publisher`].
/// Cheap to clone: clones share the stream.
#[derive(Clone, Debug)]
pub struct Publisher {
    pipeline: Pipeline<pb::PublishRequest, pb::PublishStreamResponse>,
}

impl Publisher {
    pub(crate) fn new(rpc: Rpc) -> Self {
        let open: Open<_, _> = |mut rpc, requests| {
            Box::pin(async move { Ok(rpc.publish_stream(requests).await?.into_inner()) })
        };
        Self {
            pipeline: Pipeline::start(rpc, "PublishStream", open),
        }
    }

    /// Publishes one message; returns its sequence number once it is durable.
    pub async fn publish(&self, topic: &str, message: Message) -> Result<u64> {
        let results = self.publish_batch(topic, vec![message]).await?;
        Ok(results[0].sequence)
    }

    /// Publishes up to 1,000 messages to one topic as one request; returns one result per
    /// message, in order.
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<pb::PublishResult>> {
        let span = trace::producer_span("publish", topic);
        let request = publish_request(&span, topic, messages);
        let answer = self.pipeline.call(request).instrument(span).await?;
        refused(answer.refused)?;
        Ok(answer.results)
    }
}

/// Enqueues over one `EnqueueStream` call; see [`crate::client::Client::enqueuer`].
/// Cheap to clone: clones share the stream.
#[derive(Clone, Debug)]
pub struct Enqueuer {
    pipeline: Pipeline<pb::EnqueueRequest, pb::EnqueueStreamResponse>,
}

impl Enqueuer {
    pub(crate) fn new(rpc: Rpc) -> Self {
        let open: Open<_, _> = |mut rpc, requests| {
            Box::pin(async move { Ok(rpc.enqueue_stream(requests).await?.into_inner()) })
        };
        Self {
            pipeline: Pipeline::start(rpc, "EnqueueStream", open),
        }
    }

    /// Enqueues one job; returns its id once it is durable.
    pub async fn enqueue(&self, queue: &str, job: Job) -> Result<Enqueued> {
        let mut results = self.enqueue_batch(queue, vec![job]).await?;
        Ok(results.swap_remove(0))
    }

    /// Enqueues up to 1,000 jobs into one queue as one request, all or none.
    pub async fn enqueue_batch(&self, queue: &str, jobs: Vec<Job>) -> Result<Vec<Enqueued>> {
        let span = trace::producer_span("enqueue", queue);
        let request = enqueue_request(&span, queue, jobs);
        let answer = self.pipeline.call(request).instrument(span).await?;
        refused(answer.refused)?;
        Ok(enqueued(answer.results))
    }
}
