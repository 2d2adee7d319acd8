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
}

/// The catalog: the set of queue names and the set of topic names.
pub(crate) fn catalog(part: &str) -> String {
    format!("{PREFIX}:{{sluice}}:{part}")
}
