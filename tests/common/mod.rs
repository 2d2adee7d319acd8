//! Starts a real broker on 127.0.0.1:0 inside the test process.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use sluice::broker::{Broker, BrokerConfig, ServeOptions, serve};
use sluice::client::{Client, ClientError, Lease, Rpc};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod storage;

/// A broker serving gRPC on an ephemeral loopback port.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub broker: Broker,
    stop: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<()>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(BrokerConfig::default()).await
    }

    pub async fn start_with(config: BrokerConfig) -> Self {
        Self::serving(Broker::new(config)).await
    }

    /// Serves an existing broker (e.g. one opened on a data directory).
    pub async fn serving(broker: Broker) -> Self {
        let options = ServeOptions {
            drain_timeout: Duration::from_secs(2),
            ..ServeOptions::default()
        };
        Self::serving_with(broker, options).await
    }

    /// Serves an existing broker with these server options (TLS, tokens, limits).
    pub async fn serving_with(broker: Broker, options: ServeOptions) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn({
            let broker = broker.clone();
            async move {
                serve(listener, broker, options, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            }
        });
        Self {
            addr,
            broker,
            stop: Some(stop),
            handle,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.url()).await.unwrap()
    }

    pub async fn rpc(&self) -> Rpc {
        self.client().await.rpc()
    }

    /// Triggers shutdown and returns the server task to await.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Awaits `fut` for at most 10 s, so a broken test fails instead of hanging.
pub async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("timed out after 10 s")
}

/// A long-polling Lease of one job from `queue`, waiting up to `wait`, on a task of its
/// own so the test can change the queue meanwhile.
pub fn long_poll(
    client: &Client,
    queue: &str,
    wait: Duration,
) -> JoinHandle<Result<Vec<Lease>, ClientError>> {
    let client = client.clone();
    let queue = queue.to_owned();
    tokio::spawn(async move { client.lease(&queue).wait(wait).send().await })
}

/// A loopback port that was free a moment ago, for a broker started as a process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
