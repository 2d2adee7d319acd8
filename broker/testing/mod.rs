//! Internals that the integration tests (`tests/`), the fuzz targets (`tests/fuzz`, replayed
//! by `tests/fuzz_corpus.rs`) and the benchmarks drive directly: the domain types the
//! [`Broker`](crate::broker::Broker)'s in-process methods take and return, the gRPC service
//! without a server around it, and the write-ahead log's framing and recovery.
//!
//! **Not part of the API**: hidden from the docs, and it changes with the broker's insides
//! without notice. Programs use [`crate::broker`]'s documented items and [`crate::client`].

use crate::broker::domain::time::Millis;
use crate::broker::store::{RecoveryError, RecoveryReport, Storage};

pub use crate::broker::domain::names::{MAX_NAME_BYTES, Pattern, validate_name};
pub use crate::broker::domain::queue::policy::RateLimit;
pub use crate::broker::domain::queue::{JobState, LeaseId, NewJob, Queue};
pub use crate::broker::domain::topic::{NewMessage, Retention, Topic};
pub use crate::broker::engine::local::admin::PolicyPatch;
pub use crate::broker::engine::local::queues::LeaseParams;
pub use crate::broker::engine::local::subscription::{Start, SubscribeSpec, Subscription};
pub use crate::broker::grpc::service::BrokerService;
pub use crate::broker::grpc::wire::broker_server;

/// Recovery as [`crate::broker::Broker::open`] runs it (the framed record reader, the
/// record decoder and the replay) over the log in `storage`: the queues and topics it
/// rebuilds and its report.
pub fn recover(
    storage: &dyn Storage,
    repair: bool,
    now: Millis,
) -> Result<(Vec<Queue>, Vec<Topic>, RecoveryReport), RecoveryError> {
    let recovered = crate::broker::store::recover(storage, repair, now)?;
    Ok((recovered.queues, recovered.topics, recovered.report))
}

/// The header every log file starts with.
pub const FILE_MAGIC: &[u8] = crate::broker::store::FILE_MAGIC;

/// Appends one framed record holding `payload` to `out`, as the writer frames records, so
/// a target can build logs whose framing and checksums are valid.
pub fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    crate::broker::store::frame_into(out, payload);
}

pub mod redis;
