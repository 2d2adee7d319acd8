//! Assembles the gRPC server: the broker service, health checking and reflection, with
//! TLS (and client certificates) when configured, and a cap on open connections.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::broker::auth::Authenticator;
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
    /// Most open client connections; more are closed as they arrive (and logged).
    pub max_connections: usize,
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

impl TlsSettings {
    fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        let config = tonic::transport::ServerTlsConfig::new().identity(identity);
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(tonic::transport::Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// Paces the warning about connections refused at the limit: a client that reconnects in a
/// tight loop would otherwise write one log line per attempt. The first refusal is
/// reported at once, later ones at most once per [`RefusalReport::INTERVAL`], with the
/// number refused in between.
#[derive(Debug, Default)]
struct RefusalReport {
    last: Option<std::time::Instant>,
    unreported: u64,
}

impl RefusalReport {
    const INTERVAL: Duration = Duration::from_secs(1);

    /// Counts one refusal at `now`; returns how many refusals to report now, if any.
    fn refused(&mut self, now: std::time::Instant) -> Option<u64> {
        self.unreported += 1;
        let due = self
            .last
            .is_none_or(|last| now.duration_since(last) >= Self::INTERVAL);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

/// An accepted connection holding one of the server's connection slots until it closes.
struct AdmittedConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for AdmittedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for AdmittedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdmittedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
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
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let max_connections = options.max_connections;
    let mut refusals = RefusalReport::default();
    let incoming = TcpListenerStream::new(listener).filter_map(move |conn| {
        let stream = match conn {
            Ok(stream) => stream,
            Err(e) => return Some(Err(e)),
        };
        // A gRPC client cannot be told why before the HTTP/2 handshake, so the refusal is
        // logged here and the client sees its connection closed (UNAVAILABLE).
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(refused) = refusals.refused(std::time::Instant::now()) {
                tracing::warn!(
                    peer = ?stream.peer_addr().ok(),
                    refused,
                    "connection refused: {max_connections} connections are open, the limit of --max-connections"
                );
            }
            return None;
        };
        // `Server::tcp_nodelay` only applies to listeners tonic binds itself; on this one,
        // Nagle's algorithm meeting delayed ACKs held every small response back ~40 ms.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        Some(Ok::<_, std::io::Error>(AdmittedConnection {
            stream,
            _slot: slot,
        }))
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &options.tls {
        builder = builder.tls_config(tls.server_config())?;
    }
    let server = builder
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
async fn report_storage_failure(
    broker: Broker,
    health_reporter: tonic_health::server::HealthReporter,
) {
    let token = broker.shutdown_token();
    let reason = tokio::select! {
        reason = broker.storage_failed() => reason,
        _ = token.cancelled() => return,
    };
    health_reporter
        .set_not_serving::<BrokerServer<BrokerService>>()
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    tracing::error!(%reason, "health is NOT_SERVING: the broker is fail-stopped (read-only)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_reported_at_once_then_at_most_once_per_interval() {
        let mut report = RefusalReport::default();
        let start = std::time::Instant::now();
        assert_eq!(report.refused(start), Some(1));
        for i in 1..=5 {
            assert_eq!(report.refused(start + Duration::from_millis(i * 100)), None);
        }
        // The next report carries the five held back and the one that triggers it.
        assert_eq!(report.refused(start + RefusalReport::INTERVAL), Some(6));
        assert_eq!(report.refused(start + RefusalReport::INTERVAL * 3), Some(1));
    }
}
