//! One channel over several brokers: requests are spread over the brokers that accept
//! connections, and a broker that stops accepting them is left out until it does again.
//!
//! tonic's balanced channel (`Channel::balance_channel`, power-of-two-choices over the
//! endpoints) connects lazily and keeps an endpoint whose connection failed: a request
//! sent to it fails with UNAVAILABLE rather than going elsewhere. So a task probes each
//! endpoint (a TCP connect, every [`PROBE_INTERVAL`]) and takes one that refuses out of
//! the set, and puts it back once it accepts again.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::mpsc::Sender;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};

use crate::client::error::{ClientError, Result};

/// How often each endpoint's reachability is checked (and so, about how long requests
/// may still go to a broker that died).
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// A balanced channel over `endpoints` (at least one; all of them to start with) and the
/// probe task that keeps the set to the reachable ones.
pub(crate) fn balanced(endpoints: Vec<Endpoint>) -> Result<Channel> {
    if endpoints.is_empty() {
        return Err(ClientError::Config(
            "urls: at least one broker URL is needed, got none".into(),
        ));
    }
    let (channel, changes) = Channel::balance_channel::<usize>(endpoints.len().max(16));
    for (i, endpoint) in endpoints.iter().enumerate() {
        changes
            .try_send(Change::Insert(i, endpoint.clone()))
            .expect("the change buffer holds every endpoint");
    }
    tokio::spawn(probe(endpoints, changes));
    Ok(channel)
}

/// Whether something accepts TCP connections at `endpoint`'s host and port.
async fn reachable(endpoint: &Endpoint) -> bool {
    let uri = endpoint.uri();
    let Some(host) = uri.host() else {
        return false;
    };
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    // An IPv6 literal comes bracketed in a URI; `TcpStream::connect` wants it bare.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let connect = tokio::net::TcpStream::connect((host, port));
    matches!(
        tokio::time::timeout(PROBE_INTERVAL, connect).await,
        Ok(Ok(_))
    )
}

/// Removes endpoints that refuse connections and re-inserts them once they accept, until
/// the channel is dropped. The last endpoint in the set is never removed: with every
/// broker down, requests fail at once with UNAVAILABLE instead of waiting for one.
async fn probe(endpoints: Vec<Endpoint>, changes: Sender<Change<usize, Endpoint>>) {
    let mut present: HashSet<usize> = (0..endpoints.len()).collect();
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if changes.is_closed() {
            // The channel and every clone of it are gone.
            return;
        }
        for (i, endpoint) in endpoints.iter().enumerate() {
            let up = reachable(endpoint).await;
            let change = match (up, present.contains(&i)) {
                (true, false) => {
                    present.insert(i);
                    Change::Insert(i, endpoint.clone())
                }
                (false, true) if present.len() > 1 => {
                    present.remove(&i);
                    Change::Remove(i)
                }
                _ => continue,
            };
            if changes.send(change).await.is_err() {
                // The channel and every clone of it are gone.
                return;
            }
        }
    }
}
