//! The raw-tonic baseline: the same `sluice.v1` RPCs served by a bare tonic server with no
//! broker behind them. Publish (and each request of PublishStream) hands its batch to a
//! broadcast channel that Subscribe streams out; Enqueue appends to an in-memory deque
//! that Lease pops; Ack only answers.
//! No validation, no retention, no lease bookkeeping: what is left is the cost of gRPC
//! (HTTP/2, protobuf, tonic, tokio) for the same bytes, which marks the transport's limit.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use sluice::pb;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tonic::codegen::{BoxFuture, http};
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
            .max_frame_size(Some(sluice::broker::MAX_FRAME_BYTES))
            .tcp_nodelay(true)
            .add_service(Router(svc))
            .serve_with_incoming_shutdown(
                // `Server::tcp_nodelay` is ignored for a caller-supplied incoming stream, so
                // the accepted sockets get TCP_NODELAY here.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                token.cancelled_owned(),
            );
        if let Err(e) = server.await {
            eprintln!("raw-tonic baseline server failed: {e}");
        }
    });
    Ok(RawServer { addr, stop })
}

/// Serves the baseline on its own (the harness re-run as `--serve-raw`): prints the
/// address on stdout, then serves until stdin closes, which happens when the harness
/// kills its [`RawProcess`] or exits.
pub fn serve_alone() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // The same runtime shape as `sluice serve` (one worker per core).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let server = start().await?;
        println!("{}", server.addr);
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await??;
        Ok(())
    })
}

/// The baseline in a process of its own, as a broker runs, so that its rows pay for the
/// same cross-process hand-offs as every broker's; stopped on drop.
pub struct RawProcess {
    /// Its address.
    pub addr: SocketAddr,
    child: std::process::Child,
}

impl RawProcess {
    /// Starts the harness binary again as `--serve-raw` and reads the address it prints.
    pub fn start() -> Result<RawProcess, Box<dyn std::error::Error + Send + Sync>> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve-raw")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        match line.trim().parse() {
            Ok(addr) => Ok(RawProcess { addr, child }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("the raw-tonic process printed {line:?}, not its address").into())
            }
        }
    }
}

impl Drop for RawProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Routes the six RPCs of the baseline; anything else is UNIMPLEMENTED.
#[derive(Clone)]
struct Router(RawService);

impl tonic::server::NamedService for Router {
    const NAME: &'static str = "sluice.v1.Broker";
}

/// A unary handler from a closure.
struct Unary<F>(F);

impl<Req, Resp, F, Fut> tonic::server::UnaryService<Req> for Unary<F>
where
    F: FnMut(Request<Req>) -> Fut,
    Fut: Future<Output = Reply<Resp>> + Send + 'static,
{
    type Response = Resp;
    type Future = Fut;

    fn call(&mut self, request: Request<Req>) -> Fut {
        (self.0)(request)
    }
}

/// The Subscribe handler.
struct SubscribeSvc(RawService);

impl tonic::server::ServerStreamingService<pb::SubscribeRequest> for SubscribeSvc {
    type Response = pb::SubscribeResponse;
    type ResponseStream = BoxStream<pb::SubscribeResponse>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, _request: Request<pb::SubscribeRequest>) -> Self::Future {
        let rx = self.0.topic.subscribe();
        Box::pin(async move {
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(b) => return Some((Ok((*b).clone()), rx)),
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
            Ok(Response::new(
                Box::pin(stream) as BoxStream<pb::SubscribeResponse>
            ))
        })
    }
}

/// The PublishStream handler: the producer side of the baseline for clients that pipeline
/// over one stream (the Rust client's `Publisher`), so Sluice's stream path has a transport
/// limit to be compared with.
struct PublishStreamSvc(RawService);

impl tonic::server::StreamingService<pb::PublishRequest> for PublishStreamSvc {
    type Response = pb::PublishStreamResponse;
    type ResponseStream = BoxStream<pb::PublishStreamResponse>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<tonic::Streaming<pb::PublishRequest>>) -> Self::Future {
        let s = self.0.clone();
        // Answering inside the request stream's own poll keeps the answers in request order
        // with no task or queue per stream; a request the codec cannot read passes its status
        // through, which ends the stream as the broker does.
        let answers = request.into_inner().map(move |r| {
            r.map(|req| pb::PublishStreamResponse {
                results: s.publish_batch(req),
                refused: None,
            })
        });
        Box::pin(async move {
            Ok(Response::new(
                Box::pin(answers) as BoxStream<pb::PublishStreamResponse>
            ))
        })
    }
}

fn grpc<Req, Resp>() -> tonic::server::Grpc<tonic_prost::ProstCodec<Resp, Req>>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
{
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
        .apply_max_message_size_config(Some(64 * 1024 * 1024), None)
}

impl<B> tonic::codegen::Service<http::Request<B>> for Router
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let s = self.0.clone();
        match req.uri().path() {
            "/sluice.v1.Broker/Publish" => Box::pin(async move {
                let svc = Unary(move |r| {
                    let s = s.clone();
                    async move { s.publish(r) }
                });
                Ok(grpc().unary(svc, req).await)
            }),
            "/sluice.v1.Broker/PublishStream" => {
                Box::pin(async move { Ok(grpc().streaming(PublishStreamSvc(s), req).await) })
            }
            "/sluice.v1.Broker/Subscribe" => {
                Box::pin(async move { Ok(grpc().server_streaming(SubscribeSvc(s), req).await) })
            }
            "/sluice.v1.Broker/Enqueue" => Box::pin(async move {
                let svc = Unary(move |r| {
                    let s = s.clone();
                    async move { s.enqueue(r) }
                });
                Ok(grpc().unary(svc, req).await)
            }),
            "/sluice.v1.Broker/Lease" => Box::pin(async move {
                let svc = Unary(move |r| {
                    let s = s.clone();
                    async move { s.lease(r).await }
                });
                Ok(grpc().unary(svc, req).await)
            }),
            "/sluice.v1.Broker/Ack" => Box::pin(async move {
                let svc = Unary(|_r: Request<pb::AckRequest>| async move {
                    Ok(Response::new(pb::AckResponse {}))
                });
                Ok(grpc().unary(svc, req).await)
            }),
            _ => Box::pin(async move {
                Ok(Status::unimplemented(
                    "the raw-tonic baseline serves only Publish, PublishStream, Subscribe, \
                     Enqueue, Lease and Ack",
                )
                .into_http())
            }),
        }
    }
}

impl RawService {
    fn publish(&self, request: Request<pb::PublishRequest>) -> Reply<pb::PublishResponse> {
        Ok(Response::new(pb::PublishResponse {
            results: self.publish_batch(request.into_inner()),
        }))
    }

    /// One publish as both Publish and PublishStream apply it, so the unary and the stream
    /// rows of the baseline pay for exactly the same work per batch.
    fn publish_batch(&self, req: pb::PublishRequest) -> Vec<pb::PublishResult> {
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
        (0..n)
            .map(|i| pb::PublishResult {
                sequence: first + i,
                duplicate: false,
            })
            .collect()
    }

    fn enqueue(&self, request: Request<pb::EnqueueRequest>) -> Reply<pb::EnqueueResponse> {
        let req = request.into_inner();
        let n = req.jobs.len() as u64;
        let first = self.next_id.fetch_add(n, Ordering::Relaxed);
        self.jobs.lock().expect("jobs lock").extend(req.jobs);
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
}
