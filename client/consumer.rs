//! Streaming consumption: jobs pushed over one `Consume` stream with credit-based flow
//! control, acks flowing back on the same stream.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::client::Rpc;
use futures::Stream;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::client::error::{ClientError, Result};
use crate::client::{Lease, millis};
use crate::pb;

/// State shared by a consumer's background task and the leases it handed out.
#[derive(Debug, Default)]
pub(crate) struct StreamShared {
    /// Acks waiting to be sent.
    acks: Mutex<Vec<pb::LeaseAck>>,
    /// Credit to grant back (one per settled or dropped lease).
    credits: AtomicU32,
    /// Wakes the task when there is something to send.
    wake: Notify,
    /// The stream is gone: settle through unary calls instead.
    closed: AtomicBool,
    /// The owner asked the broker to stop pushing jobs.
    stop: AtomicBool,
}

impl StreamShared {
    /// Queues an ack on the stream; gives it back if the stream is closed.
    pub(crate) fn push_ack(&self, ack: pb::LeaseAck) -> Option<pb::LeaseAck> {
        // Checked under the buffer lock: the task sets `closed` under it before its last
        // drain, so an ack is either drained or handed back, never stranded.
        let mut acks = self.acks.lock().expect("ack buffer lock");
        if self.closed.load(Ordering::Acquire) {
            return Some(ack);
        }
        acks.push(ack);
        drop(acks);
        self.wake.notify_one();
        None
    }
}

/// Held by a lease (and its clones) from a consume stream: when the last one is dropped,
/// its credit goes back to the broker so another job can be pushed.
#[derive(Debug)]
pub(crate) struct StreamTicket {
    pub(crate) shared: Arc<StreamShared>,
}

impl Drop for StreamTicket {
    fn drop(&mut self) {
        self.shared.credits.fetch_add(1, Ordering::AcqRel);
        self.shared.wake.notify_one();
    }
}

/// A consume stream being set up; see [`crate::client::Client::consume`].
#[must_use = "call .open().await to start consuming"]
#[derive(Debug)]
pub struct ConsumeBuilder {
    pub(crate) rpc: Rpc,
    pub(crate) first: pb::ConsumeRequest,
}

impl ConsumeBuilder {
    /// How many unsettled jobs the worker holds at most (default 100).
    pub fn prefetch(mut self, n: u32) -> Self {
        self.first.credits = n.max(1);
        self
    }

    /// The worker's name, shown by ListConsumers.
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.first.consumer = name.into();
        self
    }

    /// Lease duration (default: the queue's visibility timeout).
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.first.visibility_timeout_ms = millis(d);
        self
    }

    /// Opens the stream. Jobs arrive as [`Lease`]s; their `ack` travels on the stream
    /// (it returns once queued; a refusal arrives on the [`Consumer`] as
    /// [`ClientError::Refused`]). `nack`, `dead_letter` and `extend` stay unary calls, so
    /// they report their outcome. When the consumer is dropped, the broker puts unsettled
    /// jobs back at once.
    pub async fn open(self) -> Result<Consumer> {
        let (out_tx, out_rx) = mpsc::channel::<pb::ConsumeRequest>(16);
        out_tx
            .send(self.first)
            .await
            .expect("the receiver is alive until the call below");
        let mut rpc = self.rpc.clone();
        let inbound = rpc.consume(ReceiverStream::new(out_rx)).await?.into_inner();
        let shared = Arc::new(StreamShared::default());
        let (jobs_tx, jobs_rx) = mpsc::channel(64);
        tokio::spawn(run(self.rpc, inbound, out_tx, shared.clone(), jobs_tx));
        Ok(Consumer {
            jobs: jobs_rx,
            shared,
        })
    }
}

/// Jobs pushed by the broker, as a stream of [`Lease`]s. Ends when the broker shuts down
/// or the stream fails; refused acks arrive as `Err(ClientError::Refused)` items.
#[derive(Debug)]
pub struct Consumer {
    jobs: mpsc::Receiver<Result<Lease>>,
    shared: Arc<StreamShared>,
}

impl Consumer {
    /// Asks the broker to push no more jobs, keeping the stream open so the leases held
    /// can still be acked on it: the first step of a graceful drain. Jobs already on their
    /// way still arrive; drop them (or the consumer) to release them.
    pub fn stop_delivery(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

impl Stream for Consumer {
    type Item = Result<Lease>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.jobs.poll_recv(cx)
    }
}

async fn run(
    rpc: Rpc,
    mut inbound: tonic::Streaming<pb::ConsumeResponse>,
    out: mpsc::Sender<pb::ConsumeRequest>,
    shared: Arc<StreamShared>,
    jobs: mpsc::Sender<Result<Lease>>,
) {
    loop {
        tokio::select! {
            _ = shared.wake.notified() => {
                let acks = std::mem::take(&mut *shared.acks.lock().expect("ack buffer lock"));
                let credits = shared.credits.swap(0, Ordering::AcqRel);
                let stop = shared.stop.swap(false, Ordering::AcqRel);
                if (!acks.is_empty() || credits > 0 || stop)
                    && out.send(pb::ConsumeRequest { credits, acks, stop, ..Default::default() }).await.is_err()
                {
                    break;
                }
            }
            message = inbound.message() => match message {
                Ok(Some(response)) => {
                    for job in response.jobs {
                        let lease = Lease::from_stream(rpc.clone(), job, shared.clone());
                        if jobs.send(Ok(lease)).await.is_err() {
                            break;
                        }
                    }
                    for e in response.errors {
                        let err = ClientError::Refused { lease_id: e.lease_id, code: tonic::Code::from(e.code), message: e.message };
                        if jobs.send(Err(err)).await.is_err() {
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    let _ = jobs.send(Err(status.into())).await;
                    break;
                }
            },
            _ = jobs.closed() => break,
        }
    }
    // Acks queued after the last send go out last on the stream, or, if the stream is
    // gone, through a unary call.
    let leftover = {
        let mut acks = shared.acks.lock().expect("ack buffer lock");
        shared.closed.store(true, Ordering::Release);
        std::mem::take(&mut *acks)
    };
    let leftover = if leftover.is_empty() {
        leftover
    } else {
        let last = pb::ConsumeRequest {
            acks: leftover,
            ..Default::default()
        };
        match out.send(last).await {
            Ok(()) => Vec::new(),
            Err(unsent) => unsent.0.acks,
        }
    };
    // Close our side, then wait for the broker to end its own: it has then applied every
    // settlement sent before. Dropping the response first would reset the call, and a
    // reset can overtake the last acks. Jobs it pushes meanwhile are released by it.
    drop(out);
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
    drop(inbound);
    if !leftover.is_empty() {
        let _ = rpc.clone().ack(pb::AckRequest { acks: leftover }).await;
    }
}

/// How long a closing stream waits for the broker to end its side.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
