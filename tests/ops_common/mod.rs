//! Shared harness of the `ops_*` integration tests: a broker served in-process on
//! `127.0.0.1:0` over real gRPC and the operations HTTP server, and a small HTTP client.

#![allow(dead_code)]

#[path = "../common/mod.rs"]
pub mod test_broker;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{HOST, HeaderMap};
use hyper::{Method, Request, StatusCode};
use sluice::broker::{Broker, BrokerConfig};
use sluice::broker::{HttpOptions, serve_http_with};
use sluice::client::Rpc;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use test_broker::TestBroker;

/// A running broker with gRPC (the integration tests' [`TestBroker`]) and the
/// operations HTTP server on ephemeral loopback ports.
pub struct Harness {
    pub broker: Broker,
    pub grpc: TestBroker,
    pub http: SocketAddr,
    pub http_task: JoinHandle<std::io::Result<()>>,
}

impl Harness {
    /// Starts a broker; the dashboard samples every `sample_ms`.
    pub async fn start(sample_ms: u64) -> Self {
        Self::serve(Broker::new(BrokerConfig::default()), sample_ms).await
    }

    /// Serves an existing broker (e.g. one opened on a data directory).
    pub async fn serve(broker: Broker, sample_ms: u64) -> Self {
        let grpc = TestBroker::serving(broker.clone()).await;
        let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
        let http = http_listener.local_addr().expect("HTTP addr");
        let http_task = tokio::spawn(serve_http_with(
            http_listener,
            broker.clone(),
            HttpOptions {
                sample_interval: Duration::from_millis(sample_ms),
                ..HttpOptions::default()
            },
            std::future::pending(),
        ));
        Self {
            broker,
            grpc,
            http,
            http_task,
        }
    }

    /// The gRPC endpoint URL.
    pub fn url(&self) -> String {
        self.grpc.url()
    }

    /// A raw gRPC client of the broker.
    pub async fn rpc(&self) -> Rpc {
        self.grpc.rpc().await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.broker.shutdown();
    }
}

/// A response read whole.
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

/// Opens an HTTP/1.1 request and returns the response head and its body stream.
pub async fn http_open(addr: SocketAddr, path: &str) -> hyper::Response<hyper::body::Incoming> {
    http_send(addr, Request::get(path), Full::new(Bytes::new())).await
}

/// Sends `request` (with a `Host` header added) with `body`.
async fn http_send(
    addr: SocketAddr,
    request: hyper::http::request::Builder,
    body: Full<Bytes>,
) -> hyper::Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect HTTP");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
    tokio::spawn(conn);
    let request = request
        .header(HOST, addr.to_string())
        .body(body)
        .expect("request");
    sender.send_request(request).await.expect("HTTP request")
}

/// GETs `path` and reads the whole body.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, Method::GET, path, &[], "").await
}

/// Sends a request with `headers` and `body` and reads the whole response.
pub async fn http_request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let mut request = Request::builder().method(method.clone()).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = Full::new(Bytes::from(body.to_owned()));
    let response = tokio::time::timeout(Duration::from_secs(10), async {
        let res = http_send(addr, request, body).await;
        let status = res.status();
        let headers = res.headers().clone();
        let body = res
            .into_body()
            .collect()
            .await
            .expect("HTTP body")
            .to_bytes();
        HttpResponse {
            status,
            headers,
            body: String::from_utf8(body.to_vec()).expect("UTF-8 body"),
        }
    })
    .await;
    response.unwrap_or_else(|_| panic!("{method} {path} timed out"))
}

/// Creates queue `name` with both limits: two leases at once at most, and 1 job a second
/// in bursts of 3.
pub async fn create_limited_queue(c: &mut Rpc, name: &str) {
    c.create_queue(sluice::pb::CreateQueueRequest {
        name: name.into(),
        policy: Some(sluice::pb::QueuePolicy {
            max_in_flight: Some(2),
            rate_limit: Some(sluice::pb::RateLimit {
                per_second: 1,
                burst: 3,
            }),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
}
