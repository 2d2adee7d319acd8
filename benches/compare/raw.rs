//! The raw-tonic baseline: the same `sluice.v1` RPCs served by a bare tonic server with no
//! broker behind them. Publish hands each batch to a broadcast channel that Subscribe
//! streams out; Enqueue appends to an in-memory deque that Lease pops; Ack only answers.
//! No validation, no retention, no lease bookkeeping: what is left is the cost of gRPC
//! (HTTP/2, protobuf, tonic, tokio) for the same bytes, which marks the transport's limit.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use sluice::pb;
use sluice::pb::broker_server::{Broker, BrokerServer};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

type Reply<T> = Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// State of the baseline service.
#[derive(Clone)]
struct RawService {
    topic: broadcast::Sender<Arc<pb::SubscribeResponse>>,
    sequence: Arc<AtomicU64>,
    jobs: Arc<Mutex<VecDeque<pb::JobSpec>>>,
    job_added: Arc<Notify>,
    next_id: Arc<AtomicU64>,
}

/// A running baseline server, stopped on drop.
pub struct RawServer {
    /// Its address.
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts the baseline on 127.0.0.1:0 with the same HTTP/2 settings as Sluice's server.
pub async fn start() -> Result<RawServer, Box<dyn std::error::Error + Send + Sync>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, _) = broadcast::channel(4096);
    let svc = RawService {
        topic: tx,
        sequence: Arc::new(AtomicU64::new(0)),
        jobs: Arc::new(Mutex::new(VecDeque::new())),
        job_added: Arc::new(Notify::new()),
        next_id: Arc::new(AtomicU64::new(0)),
    };
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(1024))
            .initial_stream_window_size(Some(1024 * 1024))
            .initial_connection_window_size(Some(4 * 1024 * 1024))
            .tcp_nodelay(true)
            .add_service(BrokerServer::new(svc).max_decoding_message_size(64 * 1024 * 1024))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                token.cancelled_owned(),
            );
        if let Err(e) = server.await {
            eprintln!("raw-tonic baseline server failed: {e}");
        }
    });
    Ok(RawServer { addr, stop })
}

fn not_in_baseline<T>() -> Reply<T> {
    Err(Status::unimplemented(
        "the raw-tonic baseline serves only Publish, Subscribe, Enqueue, Lease and Ack",
    ))
}

#[tonic::async_trait]
impl Broker for RawService {
    async fn publish(&self, request: Request<pb::PublishRequest>) -> Reply<pb::PublishResponse> {
        let req = request.into_inner();
        let n = req.messages.len() as u64;
        let first = self.sequence.fetch_add(n, Ordering::Relaxed) + 1;
        let batch = pb::SubscribeResponse {
            messages: req
                .messages
                .into_iter()
                .enumerate()
                .map(|(i, m)| pb::Message {
                    topic: req.topic.clone(),
                    sequence: first + i as u64,
                    payload: m.payload,
                    ..Default::default()
                })
                .collect(),
            gaps: vec![],
        };
        let _ = self.topic.send(Arc::new(batch));
        Ok(Response::new(pb::PublishResponse {
            results: (0..n)
                .map(|i| pb::PublishResult {
                    sequence: first + i,
                    duplicate: false,
                })
                .collect(),
        }))
    }

    type SubscribeStream = BoxStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        _request: Request<pb::SubscribeRequest>,
    ) -> Reply<Self::SubscribeStream> {
        let rx = self.topic.subscribe();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(b) => return Some((Ok((*b).clone()), rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn create_topic(&self, _r: Request<pb::CreateTopicRequest>) -> Reply<pb::TopicInfo> {
        not_in_baseline()
    }

    async fn delete_topic(
        &self,
        _r: Request<pb::DeleteTopicRequest>,
    ) -> Reply<pb::DeleteTopicResponse> {
        not_in_baseline()
    }

    async fn enqueue(&self, request: Request<pb::EnqueueRequest>) -> Reply<pb::EnqueueResponse> {
        let req = request.into_inner();
        let n = req.jobs.len() as u64;
        let first = self.next_id.fetch_add(n, Ordering::Relaxed);
        self.jobs
            .lock()
            .expect("jobs lock")
            .extend(req.jobs.into_iter());
        self.job_added.notify_waiters();
        Ok(Response::new(pb::EnqueueResponse {
            results: (0..n)
                .map(|i| pb::EnqueueResult {
                    job_id: format!("{:032x}", first + i),
                    duplicate: false,
                })
                .collect(),
        }))
    }

    async fn lease(&self, request: Request<pb::LeaseRequest>) -> Reply<pb::LeaseResponse> {
        let req = request.into_inner();
        let max = req.max_jobs.max(1) as usize;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms);
        loop {
            let notified = self.job_added.notified();
            let taken: Vec<pb::JobSpec> = {
                let mut q = self.jobs.lock().expect("jobs lock");
                let k = q.len().min(max);
                q.drain(..k).collect()
            };
            if !taken.is_empty() {
                let jobs = taken
                    .into_iter()
                    .map(|j| {
                        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        pb::LeasedJob {
                            job_id: format!("{id:032x}"),
                            lease_id: format!("{id:032x}"),
                            queue: req.queue.clone(),
                            payload: j.payload,
                            attempt: 1,
                            ..Default::default()
                        }
                    })
                    .collect();
                return Ok(Response::new(pb::LeaseResponse { jobs }));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Response::new(pb::LeaseResponse { jobs: vec![] }));
            }
        }
    }

    async fn ack(&self, _request: Request<pb::AckRequest>) -> Reply<pb::AckResponse> {
        Ok(Response::new(pb::AckResponse {}))
    }

    async fn nack(&self, _r: Request<pb::NackRequest>) -> Reply<pb::NackResponse> {
        not_in_baseline()
    }

    async fn extend_lease(
        &self,
        _r: Request<pb::ExtendLeaseRequest>,
    ) -> Reply<pb::ExtendLeaseResponse> {
        not_in_baseline()
    }

    async fn get_job(&self, _r: Request<pb::GetJobRequest>) -> Reply<pb::Job> {
        not_in_baseline()
    }

    async fn cancel_job(&self, _r: Request<pb::CancelJobRequest>) -> Reply<pb::Job> {
        not_in_baseline()
    }

    async fn list_jobs(&self, _r: Request<pb::ListJobsRequest>) -> Reply<pb::ListJobsResponse> {
        not_in_baseline()
    }

    async fn job_history(
        &self,
        _r: Request<pb::JobHistoryRequest>,
    ) -> Reply<pb::JobHistoryResponse> {
        not_in_baseline()
    }

    async fn create_queue(&self, _r: Request<pb::CreateQueueRequest>) -> Reply<pb::QueueInfo> {
        not_in_baseline()
    }

    async fn update_queue(&self, _r: Request<pb::UpdateQueueRequest>) -> Reply<pb::QueueInfo> {
        not_in_baseline()
    }

    async fn purge_queue(
        &self,
        _r: Request<pb::PurgeQueueRequest>,
    ) -> Reply<pb::PurgeQueueResponse> {
        not_in_baseline()
    }

    async fn delete_queue(
        &self,
        _r: Request<pb::DeleteQueueRequest>,
    ) -> Reply<pb::DeleteQueueResponse> {
        not_in_baseline()
    }

    async fn pause_queue(&self, _r: Request<pb::PauseQueueRequest>) -> Reply<pb::QueueInfo> {
        not_in_baseline()
    }

    async fn resume_queue(&self, _r: Request<pb::ResumeQueueRequest>) -> Reply<pb::QueueInfo> {
        not_in_baseline()
    }

    async fn redrive(&self, _r: Request<pb::RedriveRequest>) -> Reply<pb::RedriveResponse> {
        not_in_baseline()
    }

    async fn list_queues(
        &self,
        _r: Request<pb::ListQueuesRequest>,
    ) -> Reply<pb::ListQueuesResponse> {
        not_in_baseline()
    }

    async fn stats(&self, _r: Request<pb::StatsRequest>) -> Reply<pb::StatsResponse> {
        not_in_baseline()
    }

    type WatchStatsStream = BoxStream<pb::StatsResponse>;

    async fn watch_stats(
        &self,
        _r: Request<pb::WatchStatsRequest>,
    ) -> Reply<Self::WatchStatsStream> {
        not_in_baseline()
    }

    async fn list_consumers(
        &self,
        _r: Request<pb::ListConsumersRequest>,
    ) -> Reply<pb::ListConsumersResponse> {
        not_in_baseline()
    }
}
