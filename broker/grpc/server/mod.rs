//! Assembles the gRPC server: the broker service, health checking and reflection, with
//! TLS (and client certificates) when configured, a cap on open connections, a deadline
//! on each connection's handshake, idle connections closed and dead peers dropped by
//! keepalive pings.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;

mod accept;
mod idle;

pub(crate) use accept::ConnectionInfo;

use crate::broker::auth::Authenticator;
use crate::broker::engine::Engine;
use crate::broker::grpc::service::BrokerService;
use crate::broker::grpc::wire::broker_server::BrokerServer;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Largest request message, bytes.
    pub max_request_bytes: usize,
    /// Most concurrent streams per HTTP/2 connection.
    pub max_streams_per_connection: u32,
    /// How long open requests may take to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// Most open client connections; more are closed as they arrive (and logged).
    pub max_connections: usize,
    /// Longest a connection may take from its TCP accept to the HTTP/2 client preface,
    /// TLS handshake included; a connection still silent then is closed, freeing its slot.
    pub handshake_timeout: Duration,
    /// A connection with no open request (call or stream) for this long is closed;
    /// `None`: never.
    pub idle_timeout: Option<Duration>,
    /// How often an HTTP/2 PING is sent to check the peer is alive; `None`: never.
    pub keepalive_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Serve TLS with this certificate (and require client certificates if it has a CA).
    pub tls: Option<TlsSettings>,
    /// Require a bearer token on every broker RPC (health and reflection stay open).
    pub auth: Option<Authenticator>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_request_bytes: 64 * 1024 * 1024,
            max_streams_per_connection: 1_024,
            drain_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(300)),
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
            tls: None,
            auth: None,
        }
    }
}

/// The server's TLS material, PEM-encoded.
#[derive(Clone)]
pub struct TlsSettings {
    /// Certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// Its private key.
    pub key_pem: Vec<u8>,
    /// With a CA, clients must present a certificate it signed (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsSettings {
    // The private key is never printed, not even in a debug dump of the options.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert_pem", &format!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field(
                "client_ca_pem",
                &self.client_ca_pem.as_ref().map(|c| c.len()),
            )
            .finish()
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
    /// The TLS certificate, key or client CA did not load.
    #[error("{0}")]
    Tls(String),
}

/// Serves `broker` on `listener` until `shutdown` resolves, then ends open streams, waits
/// up to the drain timeout for requests in flight, and returns.
pub async fn serve<E: Engine>(
    listener: TcpListener,
    broker: E,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().ok();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BrokerServer<BrokerService<E>>>()
        .await;
    tokio::spawn(report_storage_failure(
        broker.clone(),
        health_reporter.clone(),
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let service = BrokerServer::new(BrokerService::new(broker.clone(), options.auth.clone()))
        .max_decoding_message_size(options.max_request_bytes);

    let token = broker.shutdown_token();
    let accept = accept::AcceptOptions {
        max_connections: options.max_connections,
        handshake_timeout: options.handshake_timeout,
        idle_timeout: options.idle_timeout,
    };
    // TLS handshakes run in the accept loop's per-connection tasks, not in tonic.
    let tls = options
        .tls
        .as_ref()
        .map(accept::Tls::new)
        .transpose()
        .map_err(ServeError::Tls)?;
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(options.max_streams_per_connection))
        .initial_stream_window_size(Some(1024 * 1024))
        .initial_connection_window_size(Some(4 * 1024 * 1024))
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .http2_keepalive_interval(options.keepalive_interval)
        .http2_keepalive_timeout(Some(options.keepalive_timeout))
        .layer(idle::CountRequests)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service);
    let stop = token.child_token();
    let signal = {
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
                .set_not_serving::<BrokerServer<BrokerService<E>>>()
                .await;
        }
    };
    let server = async move {
        match tls {
            Some(tls) => {
                let incoming = accept::incoming(listener, tls, accept, stop);
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
            None => {
                let incoming = accept::incoming(listener, accept::Plain, accept, stop);
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
        }
    };
    tracing::info!(
        ?addr,
        tls = options.tls.is_some(),
        client_certificates = options
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_pem.is_some()),
        tokens = options.auth.is_some(),
        "sluice serving gRPC"
    );
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

/// Turns health NOT_SERVING (for the broker service and the whole server, `""`) once
/// the write-ahead log fails: the broker is read-only then (fail-stop), and a load
/// balancer must stop sending it traffic. Ends with the broker.
async fn report_storage_failure<E: Engine>(
    broker: E,
    health_reporter: tonic_health::server::HealthReporter,
) {
    let token = broker.shutdown_token();
    let reason = tokio::select! {
        reason = broker.storage_failed() => reason,
        _ = token.cancelled() => return,
    };
    health_reporter
        .set_not_serving::<BrokerServer<BrokerService<E>>>()
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    tracing::error!(%reason, "health is NOT_SERVING: the broker is fail-stopped (read-only)");
}
