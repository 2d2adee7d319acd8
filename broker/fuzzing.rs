//! Entry points for the fuzz targets of `tests/fuzz` and their corpus replay
//! (`tests/fuzz_corpus.rs`): crate-private functions they drive, exposed as they are and
//! nothing more. Not part of the broker's API.

use crate::broker::domain::queue::Queue;
use crate::broker::domain::time::Millis;
use crate::broker::domain::topic::Topic;
use crate::broker::store::{RecoveryError, RecoveryReport, Storage};

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
