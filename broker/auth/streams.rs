//! Long-lived streams and token reloads: a stream is authorized once, when it opens, so a
//! reload that revokes its token (or withdraws the grant it relies on) must reach it.
//!
//! Each open stream registers the hash of the token it was opened with and a re-check of
//! what it needs (e.g. `subscribe` on its pattern). A reload walks the open streams once:
//! a stream whose token is gone, or whose re-check fails, gets its reason recorded and its
//! cancellation token cancelled; the others get the token's new grant, which their
//! [`Access`] reads from then on. Streams already end on the broker's shutdown token; a
//! child of it costs them nothing more per message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use tokio_util::sync::CancellationToken;

use super::{Access, Grant, Tokens};
use crate::broker::domain::error::BrokerError;
use crate::broker::sync::{self, lock};

/// What a request authenticated with: the SHA-256 of its token and the token's grant.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub(super) digest: [u8; 32],
    pub(super) grant: Arc<Grant>,
}

impl Credentials {
    /// What the request may do.
    pub fn access(&self) -> Access {
        Access::granted(self.grant.clone())
    }
}

/// A re-check of what an open stream needs, run against its token's new grant after a
/// reload.
pub(crate) type Recheck = Box<dyn Fn(&Access) -> Result<(), BrokerError> + Send + Sync>;

/// One open stream, as the registry sees it.
pub(super) struct HeldStream {
    digest: [u8; 32],
    /// The token's grant as of the last reload; what the stream's [`Access`] checks.
    pub(super) grant: RwLock<Arc<Grant>>,
    recheck: Recheck,
    /// Why the stream was ended, set once before `token` is cancelled.
    ended: OnceLock<BrokerError>,
    token: CancellationToken,
}

impl std::fmt::Debug for HeldStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldStream")
            .field("ended", &self.ended.get())
            .finish_non_exhaustive()
    }
}

impl HeldStream {
    /// Re-checks the stream against `tokens`: keeps it with its token's grant there, or
    /// ends it; returns whether it stays open.
    fn recheck_with(&self, tokens: &Tokens) -> bool {
        let Some(grant) = tokens.by_hash.get(&self.digest) else {
            self.end(BrokerError::Unauthenticated(
                "authorization: the bearer token was revoked (it is no longer in the tokens file); the stream ends".into(),
            ));
            return false;
        };
        match (self.recheck)(&Access::granted(grant.clone())) {
            Ok(()) => {
                *sync::write(&self.grant) = grant.clone();
                true
            }
            Err(BrokerError::PermissionDenied(why)) => {
                self.end(BrokerError::PermissionDenied(format!(
                    "{why}; the tokens file was reloaded without this grant, so the stream ends"
                )));
                false
            }
            Err(other) => {
                self.end(other);
                false
            }
        }
    }

    fn end(&self, why: BrokerError) {
        // The first reason stays: a stream is ended once.
        let _ = self.ended.set(why);
        self.token.cancel();
    }
}

/// The streams open under an authenticator.
#[derive(Debug, Default)]
pub(super) struct OpenStreams {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<HeldStream>>>,
}

impl OpenStreams {
    /// Registers a stream opened with `credentials`; it ends when `parent` is cancelled or
    /// a reload withdraws what `recheck` needs.
    ///
    /// `current` gives the tokens in use: the stream is checked against them once it is
    /// registered, so a reload between its authentication and its registration (which
    /// would not see it) still reaches it.
    pub(super) fn hold(
        self: &Arc<Self>,
        credentials: Credentials,
        parent: &CancellationToken,
        recheck: Recheck,
        current: impl FnOnce() -> Arc<Tokens>,
    ) -> StreamGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let held = Arc::new(HeldStream {
            digest: credentials.digest,
            grant: RwLock::new(credentials.grant),
            recheck,
            ended: OnceLock::new(),
            token: parent.child_token(),
        });
        {
            // Under the registry lock, like a review: a review that ran before saw new
            // tokens already in `current`, one that runs after sees this stream.
            let mut open = lock(&self.open);
            open.insert(id, held.clone());
            held.recheck_with(&current());
        }
        StreamGuard {
            registry: self.clone(),
            id,
            held,
        }
    }

    /// Re-checks every open stream against freshly loaded `tokens`. Returns how many
    /// streams were ended.
    pub(super) fn review(&self, tokens: &Tokens) -> usize {
        let open = lock(&self.open);
        open.values()
            .filter(|held| !held.recheck_with(tokens))
            .count()
    }

    /// How many streams are registered.
    pub(super) fn len(&self) -> usize {
        lock(&self.open).len()
    }
}

/// An open stream's registration; dropping it (with the stream) unregisters it.
#[derive(Debug)]
pub struct StreamGuard {
    registry: Arc<OpenStreams>,
    id: u64,
    held: Arc<HeldStream>,
}

impl StreamGuard {
    /// What the stream may do: the grant of its token as of the last reload.
    pub fn access(&self) -> Access {
        Access::live(self.held.clone())
    }

    /// Cancelled when the stream must end: the broker shuts down or a reload revoked it.
    pub fn token(&self) -> CancellationToken {
        self.held.token.clone()
    }

    /// Why a reload ended the stream, if it did.
    pub fn ended(&self) -> Option<BrokerError> {
        self.held.ended.get().cloned()
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        lock(&self.registry.open).remove(&self.id);
    }
}
