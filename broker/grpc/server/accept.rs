//! The accept loop: admits connections up to `--max-connections`, and runs each one's
//! handshake (TLS if configured, then the 24-byte HTTP/2 client preface) on a task of its
//! own under `--handshake-timeout-ms`. A silent or slow peer so holds only its own slot,
//! only until the deadline, and never delays anyone else's accept; connections that
//! finished their handshake reach tonic through a bounded channel.
//!
//! tonic's own `serve_with_incoming` accepts and hands over in one loop: a connection is
//! served (and holds its slot) from its TCP accept on, with no deadline before the HTTP/2
//! preface, so sockets that never send a byte keep their slots for as long as the peer
//! likes.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::TlsSettings;
use super::idle::{Activity, IdleWatch};

/// What every HTTP/2 connection starts with (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connections past their handshake waiting for tonic to take them: enough to absorb a
/// burst of handshakes finishing together.
const READY_QUEUE: usize = 256;

/// The accept loop's settings.
#[derive(Debug, Clone)]
pub(super) struct AcceptOptions {
    pub(super) max_connections: usize,
    pub(super) handshake_timeout: Duration,
    /// `None`: connections are never closed for idleness.
    pub(super) idle_timeout: Option<Duration>,
}

/// How a connection's transport is set up after its TCP accept.
pub(super) trait Handshake: Clone + Send + Sync + 'static {
    /// The transport tonic serves.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Runs the transport's handshake (nothing for plain TCP).
    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> impl std::future::Future<Output = io::Result<Self::Io>> + Send;
}

/// Plaintext HTTP/2.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;

    async fn handshake(&self, tcp: TcpStream) -> io::Result<TcpStream> {
        Ok(tcp)
    }
}

/// TLS (rustls, ALPN `h2`), with client certificates when a client CA is set.
#[derive(Clone)]
pub(super) struct Tls(tokio_rustls::TlsAcceptor);

impl Tls {
    /// The acceptor of `settings`; errors name what did not parse.
    pub(super) fn new(settings: &TlsSettings) -> Result<Self, String> {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject as _;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(&settings.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("TLS certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&settings.key_pem)
            .map_err(|e| format!("TLS private key: {e}"))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match &settings.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    let cert = cert.map_err(|e| format!("TLS client CA: {e}"))?;
                    roots.add(cert).map_err(|e| format!("TLS client CA: {e}"))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .map_err(|e| format!("TLS client CA: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("TLS certificate and key: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }
}

impl Handshake for Tls {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;

    async fn handshake(&self, tcp: TcpStream) -> io::Result<Self::Io> {
        self.0.accept(tcp).await
    }
}

/// Who is on the other end of a connection: what every request of it carries in its
/// extensions (tonic's `Connected`).
#[derive(Debug, Clone)]
pub(crate) struct ConnectionInfo {
    remote_addr: Option<SocketAddr>,
    pub(super) activity: Arc<Activity>,
}

impl ConnectionInfo {
    /// The peer's address.
    pub(crate) fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }
}

/// A connection past its handshake, holding one of the server's connection slots until it
/// closes. The preface read to admit it is handed to the server first.
pub(super) struct Connection<Io> {
    io: Io,
    /// How much of [`PREFACE`] the server has not read yet.
    preface_left: usize,
    info: ConnectionInfo,
    _slot: OwnedSemaphorePermit,
}

impl<Io> Drop for Connection<Io> {
    fn drop(&mut self) {
        self.info.activity.closed();
    }
}

impl<Io: Send + 'static> Connected for Connection<Io> {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Connection<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // An idle connection is closed by ending its input: the server then closes it.
        if self.info.activity.poll_close(cx) {
            return Poll::Ready(Ok(()));
        }
        if self.preface_left > 0 {
            let start = PREFACE.len() - self.preface_left;
            let n = self.preface_left.min(buf.remaining());
            buf.put_slice(&PREFACE[start..start + n]);
            self.preface_left -= n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Connection<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Paces the warning about connections refused at the limit: a client that reconnects in a
/// tight loop would otherwise write one log line per attempt. The first refusal is
/// reported at once, later ones at most once per [`RefusalReport::INTERVAL`], with the
/// number refused in between.
#[derive(Debug, Default)]
struct RefusalReport {
    last: Option<Instant>,
    unreported: u64,
}

impl RefusalReport {
    const INTERVAL: Duration = Duration::from_secs(1);

    /// Counts one refusal at `now`; returns how many refusals to report now, if any.
    fn refused(&mut self, now: Instant) -> Option<u64> {
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

/// Accepts on `listener` until `stop` is cancelled or the receiver is dropped, and
/// returns the connections that completed their handshake, for tonic to serve.
pub(super) fn incoming<H: Handshake>(
    listener: TcpListener,
    handshake: H,
    options: AcceptOptions,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Connection<H::Io>>> {
    let (ready, connections) = mpsc::channel(READY_QUEUE);
    tokio::spawn(accept_loop(listener, handshake, options, stop, ready));
    tokio_stream::wrappers::ReceiverStream::new(connections)
}

async fn accept_loop<H: Handshake>(
    listener: TcpListener,
    handshake: H,
    options: AcceptOptions,
    stop: CancellationToken,
    ready: mpsc::Sender<io::Result<Connection<H::Io>>>,
) {
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut refusals = RefusalReport::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
            _ = ready.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Per-connection failures (reset before accept) and running out of file
                // descriptors: log, pause briefly so a full fd table is not spun on.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        // A gRPC client cannot be told why before the HTTP/2 handshake, so the refusal is
        // logged here and the client sees its connection closed (UNAVAILABLE).
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(refused) = refusals.refused(Instant::now()) {
                tracing::warn!(
                    %peer,
                    refused,
                    "connection refused: {} connections are open, the limit of --max-connections",
                    options.max_connections
                );
            }
            continue;
        };
        // Nagle's algorithm meeting delayed ACKs would hold every small response back
        // ~40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let handshake = handshake.clone();
        let ready = ready.clone();
        let options = options.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let admitted = tokio::time::timeout(
                options.handshake_timeout,
                admit(&handshake, tcp, slot, &options),
            );
            let connection = tokio::select! {
                admitted = admitted => match admitted {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "handshake failed; connection closed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(
                            %peer,
                            timeout = ?options.handshake_timeout,
                            "no HTTP/2 preface within --handshake-timeout-ms; connection closed"
                        );
                        return;
                    }
                },
                _ = stop.cancelled() => return,
            };
            // Dropped (and so closed) if the server stopped taking connections.
            let _ = ready.send(Ok(connection)).await;
        });
    }
}

/// Runs the transport handshake, then reads the HTTP/2 client preface.
async fn admit<H: Handshake>(
    handshake: &H,
    tcp: TcpStream,
    slot: OwnedSemaphorePermit,
    options: &AcceptOptions,
) -> io::Result<Connection<H::Io>> {
    let remote_addr = tcp.peer_addr().ok();
    let mut io = handshake.handshake(tcp).await?;
    let mut preface = [0u8; PREFACE.len()];
    io.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an HTTP/2 client preface (gRPC needs HTTP/2)",
        ));
    }
    let activity = Arc::new(Activity::new());
    if let Some(timeout) = options.idle_timeout {
        tokio::spawn(IdleWatch::new(activity.clone(), timeout).run());
    }
    Ok(Connection {
        io,
        preface_left: PREFACE.len(),
        info: ConnectionInfo {
            remote_addr,
            activity,
        },
        _slot: slot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_reported_at_once_then_at_most_once_per_interval() {
        let mut report = RefusalReport::default();
        let start = Instant::now();
        assert_eq!(report.refused(start), Some(1));
        for i in 1..=5 {
            assert_eq!(report.refused(start + Duration::from_millis(i * 100)), None);
        }
        // The next report carries the five held back and the one that triggers it.
        assert_eq!(report.refused(start + RefusalReport::INTERVAL), Some(6));
        assert_eq!(report.refused(start + RefusalReport::INTERVAL * 3), Some(1));
    }
}
