//! How the client reaches a broker: the HTTP/2 channel, TLS, and the bearer token every
//! request carries when the broker asks for one.

use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http::{self, HeaderValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::client::error::{ClientError, Result};
use crate::pb::broker_client::BrokerClient;

/// The generated gRPC client over a [`Transport`]: what [`crate::client::Client::rpc`]
/// returns, for RPCs the typed client does not wrap.
pub type Rpc = BrokerClient<Transport>;

/// Largest HTTP/2 frame the client accepts (advertised in its SETTINGS; the HTTP/2 default
/// is 16 KiB), so a batch of leased jobs or messages usually arrives in one frame. The
/// broker advertises the same.
pub const MAX_FRAME_BYTES: u32 = 256 * 1024;

/// A channel that adds `authorization: Bearer <token>` to each request when a token is
/// set. The header value is built once; each request clones it (a reference count).
#[derive(Clone, Debug)]
pub struct Transport {
    channel: Channel,
    authorization: Option<HeaderValue>,
}

impl Transport {
    /// A transport over `channel` that sends no token.
    pub fn new(channel: Channel) -> Self {
        Self {
            channel,
            authorization: None,
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Transport {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value.clone());
        }
        // The caller's trace context, so the broker's span of this call joins its trace
        // (the generated stubs call this inside the caller's span).
        if let Some(traceparent) = crate::client::trace::current_traceparent()
            && let Ok(value) = HeaderValue::try_from(traceparent)
        {
            request
                .headers_mut()
                .insert(crate::client::trace::TRACEPARENT, value);
        }
        tower::Service::call(&mut self.channel, request)
    }
}

/// What a connection needs besides the URL: a bearer token, and for an `https://` URL
/// the CA that signed the broker's certificate (and a client certificate if the broker
/// asks for one).
///
/// ```no_run
/// # async fn demo() -> sluice::client::Result<()> {
/// use sluice::client::{Client, ConnectOptions};
/// let options = ConnectOptions::new()
///     .token(std::env::var("SLUICE_TOKEN").unwrap_or_default())
///     .ca_certificate_pem(std::fs::read("ca.pem").expect("the CA certificate"));
/// let client = Client::connect_with("https://broker.internal:50051", options).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct ConnectOptions {
    token: Option<String>,
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl std::fmt::Debug for ConnectOptions {
    // Secrets are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| c.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("domain", &self.domain)
            .finish()
    }
}

impl ConnectOptions {
    /// No token, no TLS settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `token` as `authorization: Bearer <token>` on every request (an empty token
    /// sends nothing).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.token = (!token.is_empty()).then_some(token);
        self
    }

    /// Trusts this PEM CA for the broker's certificate (needed for `https://` URLs).
    pub fn ca_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents this PEM certificate and key to a broker that requires client
    /// certificates (mutual TLS).
    pub fn client_identity_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Checks the broker's certificate against this name instead of the URL's host.
    pub fn tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// The endpoint for `url` with these settings and the client's HTTP/2 tuning.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| invalid(e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024)
            .max_frame_size(MAX_FRAME_BYTES);
        let https = url.starts_with("https://");
        match (&self.ca_pem, https) {
            (Some(ca), true) => {
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                if let Some((cert, key)) = &self.identity {
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                if let Some(domain) = &self.domain {
                    tls = tls.domain_name(domain.clone());
                }
                endpoint = endpoint.tls_config(tls)?;
            }
            (None, true) => {
                return Err(invalid(
                    "an https:// URL needs the CA that signed the broker's certificate (ConnectOptions::ca_certificate_pem)".into(),
                ));
            }
            (Some(_), false) => {
                return Err(invalid(
                    "a CA certificate was given but the URL is not https://".into(),
                ));
            }
            (None, false) => {}
        }
        Ok(endpoint)
    }

    /// A transport over `channel` that sends this token.
    pub fn transport(&self, channel: Channel) -> Result<Transport> {
        let authorization = match &self.token {
            None => None,
            Some(token) => {
                let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    ClientError::Config(
                        "token: must be printable ASCII without spaces (as `sluice token` makes)"
                            .into(),
                    )
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Transport {
            channel,
            authorization,
        })
    }
}
