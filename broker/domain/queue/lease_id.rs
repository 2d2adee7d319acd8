//! Lease ids: `queue/seq/nonce`, fresh per delivery, so a stale lease is told apart from
//! the current one without a lookup table.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Identifies one delivery: `<queue>/<job seq>/<nonce hex>`. The nonce is random per
/// delivery, so a lease id from an earlier delivery (or an earlier broker run) never
/// matches the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseId {
    /// Queue name.
    pub queue: Arc<str>,
    /// The job's seq in that queue.
    pub seq: u64,
    /// The delivery nonce.
    pub nonce: u64,
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{:x}", self.queue, self.seq, self.nonce)
    }
}

/// Why a string is not a lease id (`<queue>/<seq>/<nonce hex>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseIdError {
    /// Fewer than three `/`-separated parts.
    #[error("it has {found} of the 3 parts separated by \"/\"")]
    MissingParts {
        /// How many parts it has.
        found: usize,
    },
    /// Nothing before the seq.
    #[error("the queue name is empty")]
    EmptyQueue,
    /// The middle part is not a decimal `u64`.
    #[error("the seq is not a number")]
    SeqNotANumber,
    /// The last part is not a hexadecimal `u64`.
    #[error("the nonce is not hexadecimal")]
    NonceNotHex,
    /// The bytes are not UTF-8 text (a consume stream's acks carry raw bytes).
    #[error("it is not UTF-8 text")]
    NotUtf8,
}

impl LeaseId {
    /// Splits a lease id into its queue name, seq and nonce.
    fn split(s: &str) -> Result<(&str, u64, u64), LeaseIdError> {
        // The queue name may itself hold "/": the seq and the nonce are the last two parts.
        let mut parts = s.rsplitn(3, '/');
        let nonce = parts.next().unwrap_or_default();
        let seq = parts
            .next()
            .ok_or(LeaseIdError::MissingParts { found: 1 })?;
        let queue = parts
            .next()
            .ok_or(LeaseIdError::MissingParts { found: 2 })?;
        if queue.is_empty() {
            return Err(LeaseIdError::EmptyQueue);
        }
        let seq = seq.parse().map_err(|_| LeaseIdError::SeqNotANumber)?;
        let nonce = u64::from_str_radix(nonce, 16).map_err(|_| LeaseIdError::NonceNotHex)?;
        Ok((queue, seq, nonce))
    }

    /// The queue a lease id names, if it is well formed, without building a [`LeaseId`].
    pub fn queue_of(s: &str) -> Option<&str> {
        Self::split(s).ok().map(|(queue, _, _)| queue)
    }

    /// Parses a lease id that most likely names `queue`, sharing its name if so (settling
    /// a stream's leases then allocates nothing).
    pub fn parse_for(s: &str, queue: &Arc<str>) -> Option<Self> {
        Self::try_parse_for(s, queue).ok()
    }

    /// [`LeaseId::parse_for`], saying why `s` is not a lease id.
    pub fn try_parse_for(s: &str, queue: &Arc<str>) -> Result<Self, LeaseIdError> {
        let (name, seq, nonce) = Self::split(s)?;
        let queue = if name == &**queue {
            queue.clone()
        } else {
            Arc::from(name)
        };
        Ok(Self { queue, seq, nonce })
    }
}

impl FromStr for LeaseId {
    type Err = LeaseIdError;

    fn from_str(s: &str) -> Result<Self, LeaseIdError> {
        let (queue, seq, nonce) = Self::split(s)?;
        Ok(Self {
            queue: Arc::from(queue),
            seq,
            nonce,
        })
    }
}
