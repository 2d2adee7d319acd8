//! Assembles the gRPC server: the broker service, health checking and reflection.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;

use crate::broker::core::Broker;
use crate::broker::service::BrokerService;
use crate::broker::wire::broker_server::BrokerServer;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Largest request message, bytes.
    pub max_request_bytes: usize,
    /// Most concurrent streams per HTTP/2 connection.
    pub max_streams_per_connection: u32,
    /// How long open requests may take to finish after shutdown starts.
    pub drain_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_request_bytes: 64 * 1024 * 1024,
            max_streams_per_connection: 1_024,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Largest HTTP/2 frame the broker accepts (advertised in its SETTINGS; the HTTP/2
/// default is 16 KiB). A batch of a hundred 256 B jobs is about 40 KiB: in one frame it
/// costs the sender and receiver one frame's bookkeeping instead of three, while the cap
/// still bounds how long one stream's frame holds up others on a shared connection.
pub const MAX_FRAME_BYTES: u32 = 256 * 1024;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The transport failed.
    #[error("gRPC transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not load the descriptor set.
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves `broker` on `listener` until `shutdown` resolves, then ends open streams, waits
/// up to the drain timeout for requests in flight, and returns.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().ok();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BrokerServer<BrokerService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let service = BrokerServer::new(BrokerService::new(broker.clone()))
        .max_decoding_message_size(options.max_request_bytes);

    let token = broker.shutdown_token();
    // `Server::tcp_nodelay` only applies to listeners tonic binds itself; on this one,
    // Nagle's algorithm meeting delayed ACKs held every small response back ~40 ms.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn
            && let Err(e) = stream.set_nodelay(true)
        {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        conn
    });
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(options.max_streams_per_connection))
        .initial_stream_window_size(Some(1024 * 1024))
        .initial_connection_window_size(Some(4 * 1024 * 1024))
        .tcp_nodelay(true)
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, {
            let token = token.clone();
            async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = token.cancelled() => {}
                }
                // Ending the broker's token ends open subscriptions and long polls, so the
                // server's graceful drain can finish.
                token.cancel();
                health_reporter
                    .set_not_serving::<BrokerServer<BrokerService>>()
                    .await;
            }
        });
    tracing::info!(?addr, "sluice serving gRPC");
    let drain_limit = async {
        token.cancelled().await;
        tokio::time::sleep(options.drain_timeout).await;
    };
    tokio::select! {
        result = server => {
            result?;
            tracing::info!("sluice stopped");
        }
        _ = drain_limit => {
            tracing::warn!(timeout = ?options.drain_timeout, "drain timed out; closing open requests");
        }
    }
    Ok(())
}
