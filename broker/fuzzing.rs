//! Entry points for the fuzz targets of `tests/fuzz` and their corpus replay
//! (`tests/fuzz_corpus.rs`): crate-private functions they drive, exposed as they are and
//! nothing more. Not part of the broker's API.

use crate::broker::queue::Queue;
use crate::broker::store::{RecoveryError, RecoveryReport, Storage};
use crate::broker::time::Millis;
use crate::broker::topic::Topic;

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
