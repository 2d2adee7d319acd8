//! Every Redis key the engine uses, built in one place.
//!
//! A queue's keys share the hash tag `{q:<name>}` and a topic's `{t:<name>}`, so each
//! queue or topic lives in one cluster slot and each of its operations is one script.
//! Names are `[A-Za-z0-9_-.]`, so they never hold the `{` or `}` of a tag. The catalog
//! (which queues and topics exist) has its own tag, `{sluice}`.

/// The prefix of every key, so a Redis shared with other programs shows what is ours.
const PREFIX: &str = "sluice";

/// A queue's keys.
#[derive(Debug, Clone)]
pub(crate) struct QueueKeys {
    tag: String,
}

impl QueueKeys {
    /// The keys of queue `name`.
    pub(crate) fn new(name: &str) -> Self {
        Self {
            tag: format!("{PREFIX}:{{q:{name}}}"),
        }
    }

    /// `<prefix>:{q:<name>}:<part>`.
    pub(crate) fn key(&self, part: &str) -> String {
        format!("{}:{part}", self.tag)
    }

    /// The prefix of every key of this queue (for keys built inside scripts, e.g. a job
    /// hash `<base>:job:<seq>`).
    pub(crate) fn base(&self) -> &str {
        &self.tag
    }
}

/// A topic's keys.
#[derive(Debug, Clone)]
pub(crate) struct TopicKeys {
    tag: String,
}

impl TopicKeys {
    /// The keys of topic `name`.
    pub(crate) fn new(name: &str) -> Self {
        Self {
            tag: format!("{PREFIX}:{{t:{name}}}"),
        }
    }

    /// `<prefix>:{t:<name>}:<part>`.
    pub(crate) fn key(&self, part: &str) -> String {
        format!("{}:{part}", self.tag)
    }

    /// The prefix of every key of this topic.
    pub(crate) fn base(&self) -> &str {
        &self.tag
    }

    /// This topic's [`slot_guard`], declared by each of its scripts.
    pub(crate) fn slot_guard(&self) -> String {
        slot_guard(&self.tag)
    }
}

/// The slot guard of a script on the keys under `base`: a key of the same slot that is
/// never written, declared as the script's second key.
///
/// A queue's or topic's script builds most of its keys from `base` (job hashes, the ready
/// set, the log), so Redis cannot check them before it runs. While a cluster moves the
/// slot to another primary (resharding), its keys are copied one at a time: a script
/// running then on either node would see half of the queue, and write beside keys still
/// to be copied. Redis refuses a command with several declared keys while any of them is
/// missing in a slot being migrated (`ASK` from the old owner, `TRYAGAIN` from the new
/// one), and the guard is always missing: so no script runs during a migration (the
/// cluster client retries `TRYAGAIN` until it ends, and the request is refused UNAVAILABLE,
/// having changed nothing, if it lasts longer), and outside one the guard costs nothing.
pub(crate) fn slot_guard(base: &str) -> String {
    format!("{base}:slot-guard")
}

/// The catalog: the set of queue names and the set of topic names.
pub(crate) fn catalog(part: &str) -> String {
    format!("{PREFIX}:{{sluice}}:{part}")
}
