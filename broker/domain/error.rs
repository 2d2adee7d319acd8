//! The broker's one error type, and the one place it becomes a gRPC status.

use crate::broker::store::StoreError;

/// Why the broker refused a request. Every variant's text is written for the user: it
/// names the field, the limit and the value, or the state that made the request invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// A field is malformed or over a limit (INVALID_ARGUMENT).
    #[error("{field}: {problem}")]
    InvalidArgument {
        /// The request field, e.g. `jobs[3].payload`.
        field: String,
        /// What is wrong with it, with the limit and the value.
        problem: String,
    },
    /// A payload does not match the schema of its queue or topic (INVALID_ARGUMENT):
    /// which entry, where in the payload and which rule. Nothing of the batch is written.
    #[error(
        "{entry} does not match schema revision {revision} of {target}: at {path:?}: {detail} (rule: {rule})"
    )]
    SchemaViolation {
        /// The request field, e.g. `jobs[3].payload`.
        entry: String,
        /// The queue or topic, e.g. `topic "user.registered"`.
        target: String,
        /// The schema revision checked against.
        revision: u32,
        /// Where in the payload: a JSON pointer (`/user/email`) or a protobuf field path.
        path: String,
        /// The rule broken, e.g. `required`, `type`, `format "email"`.
        rule: String,
        /// The validator's words.
        detail: String,
    },
    /// The Redis engine's script found a newer schema than the node checked the batch
    /// with, and wrote nothing. The node reloads the schema and checks again; a client
    /// sees this only if the schema kept changing through every retry (UNAVAILABLE).
    #[error(
        "the schema changed (now revision {revision}) while the request was checked; nothing was written: send it again"
    )]
    SchemaStale {
        /// The revision the script found current.
        revision: u32,
    },
    /// The named queue, topic, job or lease does not exist (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the state forbids it, e.g. a stale lease
    /// (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A capacity limit is reached, e.g. a full queue (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A subscriber fell behind retention under the end-stream gap policy (DATA_LOSS).
    #[error("{0}")]
    DataLoss(String),
    /// The request carried no known bearer token while the broker requires one
    /// (UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// The token is known but its grant does not cover the action on that name
    /// (PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDenied(String),
    /// The storage engine (Redis) cannot be reached, or could not confirm a change in
    /// time (UNAVAILABLE); the text says which, and whether the change may have happened.
    #[error("{0}")]
    Unavailable(String),
    /// The broker is shutting down (UNAVAILABLE).
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The write-ahead log failed (a write or fsync error, e.g. a full disk): the broker
    /// stopped acknowledging changes (fail-stop) until it is restarted (UNAVAILABLE).
    #[error("{0}")]
    StorageFailed(#[from] StoreError),
}

impl BrokerError {
    /// An INVALID_ARGUMENT error for `field`.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// An INVALID_ARGUMENT error for a value over a limit.
    pub fn over_limit(field: impl Into<String>, value: u64, limit: u64, unit: &str) -> Self {
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        Self::invalid(
            field,
            format!("{value}{unit} exceeds the limit of {limit}{unit}"),
        )
    }
}
