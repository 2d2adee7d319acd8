//! The client's one error type.

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL given to `connect` is not usable.
    #[error("invalid broker URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The connection could not be made.
    #[error("cannot connect to the broker: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The broker refused the request; the status message says why.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// A payload could not be encoded.
    #[error("cannot encode payload: {0}")]
    Encode(String),
    /// A payload could not be decoded as the expected type.
    #[error("cannot decode payload of {context}: {reason}")]
    Decode {
        /// What was being decoded (topic and sequence, or job id).
        context: String,
        /// Why.
        reason: String,
    },
    /// Messages were lost to retention before this subscriber read them. The subscription
    /// goes on from `next_available`.
    #[error(
        "gap in topic {topic:?}: sequences {first_missing}..{next_available} were evicted before delivery"
    )]
    Gap {
        /// Topic.
        topic: String,
        /// First missed sequence.
        first_missing: u64,
        /// Where delivery goes on.
        next_available: u64,
    },
    /// The broker refused an ack sent on a consume stream (e.g. the lease was stale).
    #[error("ack of lease {lease_id} refused: {code}: {message}")]
    Refused {
        /// The lease.
        lease_id: String,
        /// The status code a unary Ack would have returned.
        code: tonic::Code,
        /// Why.
        message: String,
    },
    /// A request sent on a [`crate::client::Publisher`] or [`crate::client::Enqueuer`]
    /// stream got no answer: the stream broke first (the connection failed, or the broker
    /// could not read an earlier request). It may or may not have been applied: send it
    /// again with an idempotency key to be sure. The next request opens a new stream.
    #[error("no answer on the {rpc} stream: it ended first ({reason})")]
    Unanswered {
        /// The streaming RPC.
        rpc: &'static str,
        /// How the stream ended.
        reason: String,
    },
    /// A request/reply call got no reply in time.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// A client-side setting is out of range; the message names the setting, the allowed
    /// range and the value.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The responder of a request/reply call answered with an error.
    #[error("request to {topic:?} failed at the responder: {message}")]
    Remote {
        /// The request topic.
        topic: String,
        /// The responder's error text.
        message: String,
    },
    /// A message could not be replied to because it carries no `reply-to` header.
    #[error("message {topic}#{sequence} has no {header:?} header to reply to")]
    NoReplyTo {
        /// Topic of the message.
        topic: String,
        /// Its sequence.
        sequence: u64,
        /// The missing header's name.
        header: &'static str,
    },
}

impl ClientError {
    /// Why the call failed at bottom, for a log line: see [`root_cause`].
    pub fn root_cause(&self) -> String {
        root_cause(self)
    }

    /// The gRPC status code, if the broker answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status(s) => Some(s.code()),
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The text of the innermost error in `error`'s `source()` chain, e.g. `Connection refused
/// (os error 111)` under a transport error whose own text is only "transport error"; a
/// gRPC status reads as its message (its `Display` lists metadata and details too).
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    match innermost.downcast_ref::<tonic::Status>() {
        Some(status) => status.message().to_owned(),
        None => innermost.to_string(),
    }
}

/// Result of client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that, like tonic's and hyper's, says little itself and keeps the cause
    /// as its source.
    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Wrapper(#[source] std::io::Error);

    #[test]
    fn root_cause_walks_to_the_innermost_error() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let expected = refused.to_string();
        assert_eq!(root_cause(&Wrapper(refused)), expected);
    }

    #[test]
    fn root_cause_of_a_status_is_its_message() {
        let refused = ClientError::from(tonic::Status::not_found("queue \"email\" does not exist"));
        assert_eq!(refused.root_cause(), "queue \"email\" does not exist");
        let config = ClientError::Config("concurrency: 0".into());
        assert_eq!(config.root_cause(), config.to_string());
    }
}
