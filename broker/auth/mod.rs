//! Who may do what: bearer tokens, kept only as SHA-256 hashes, each granting actions on
//! queue and topic name patterns. Deny by default: a token may do exactly what its
//! patterns cover, and nothing is allowed without a token once a tokens file is set.
//!
//! The tokens file is TOML, one `[[token]]` table per client identity:
//!
//! ```toml
//! [[token]]
//! name = "todo-app"
//! # SHA-256 of the token in hex (`sluice token` makes one); list two while rotating.
//! sha256 = ["9f2c...", "41d0..."]
//! publish = ["user.*", "todo.>"]
//! enqueue = ["emails"]
//! ```
//!
//! Actions are `publish`, `subscribe`, `enqueue`, `consume` and `admin`; each takes name
//! patterns with the same wildcards as subscriptions (`*` one token, `>` the rest). Tokens
//! are random and long, so one unsalted SHA-256 is enough to keep a stolen file useless
//! and still costs one hash per request, not a password-hashing delay.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use tokio_util::sync::CancellationToken;

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::names::Pattern;
use crate::broker::sync;

pub(super) mod streams;

pub(crate) use streams::{Credentials, Recheck, StreamGuard};

/// Something a token may be allowed to do on a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Publish to a topic.
    Publish,
    /// Subscribe to a topic or pattern.
    Subscribe,
    /// Enqueue into a queue, and follow or cancel its jobs.
    Enqueue,
    /// Lease, ack, nack and extend jobs of a queue, and read them.
    Consume,
    /// Create, change, purge, delete, pause, resume, redrive and inspect.
    Admin,
}

impl Action {
    /// Every action, in the order of [`Grant`]'s rule table.
    pub const ALL: [Action; 5] = [
        Action::Publish,
        Action::Subscribe,
        Action::Enqueue,
        Action::Consume,
        Action::Admin,
    ];

    /// The action's name, as written in the tokens file.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Enqueue => "enqueue",
            Action::Consume => "consume",
            Action::Admin => "admin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one token may do: name patterns per action.
#[derive(Debug, Clone)]
pub struct Grant {
    name: String,
    rules: [Vec<Pattern>; 5],
}

impl Grant {
    /// A grant named `name` with no permission at all.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            rules: Default::default(),
        }
    }

    /// Adds a pattern to an action's rules.
    pub fn allow(mut self, action: Action, pattern: Pattern) -> Self {
        self.rules[action.index()].push(pattern);
        self
    }

    /// The identity the token stands for (the `name` of its `[[token]]`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the grant lets `action` act on every name `pattern` matches (a plain name is
    /// a pattern matching only itself).
    pub fn allows(&self, action: Action, pattern: &Pattern) -> bool {
        self.rules[action.index()]
            .iter()
            .any(|rule| rule.covers(pattern))
    }

    /// Whether the grant lets `action` act on the name `name`.
    pub fn allows_name(&self, action: Action, name: &str) -> bool {
        self.rules[action.index()]
            .iter()
            .any(|rule| rule.matches(name))
    }

    /// Refuses `action` on `name` unless allowed; `field` names the request field.
    pub fn check(&self, action: Action, field: &str, name: &str) -> Result<(), BrokerError> {
        if self.allows_name(action, name) {
            Ok(())
        } else {
            Err(self.denied(action, field, name))
        }
    }

    /// Refuses `action` on every name of `pattern` unless allowed.
    pub fn check_pattern(
        &self,
        action: Action,
        field: &str,
        pattern: &Pattern,
    ) -> Result<(), BrokerError> {
        if self.allows(action, pattern) {
            Ok(())
        } else {
            Err(self.denied(action, field, pattern.as_str()))
        }
    }

    /// Refuses unless any of `actions` is allowed on `name`.
    pub fn check_any(
        &self,
        actions: &[Action],
        field: &str,
        name: &str,
    ) -> Result<(), BrokerError> {
        if actions.iter().any(|&a| self.allows_name(a, name)) {
            return Ok(());
        }
        let wanted: Vec<&str> = actions.iter().map(|a| a.as_str()).collect();
        Err(BrokerError::PermissionDenied(format!(
            "{field}: token {:?} may not act on {name:?} (needs one of: {})",
            self.name,
            wanted.join(", ")
        )))
    }

    fn denied(&self, action: Action, field: &str, name: &str) -> BrokerError {
        let granted: Vec<&str> = self.rules[action.index()]
            .iter()
            .map(|p| p.as_str())
            .collect();
        let granted = if granted.is_empty() {
            "none".to_owned()
        } else {
            granted.join(", ")
        };
        BrokerError::PermissionDenied(format!(
            "{field}: token {:?} may not {action} {name:?} (its {action} patterns: {granted})",
            self.name
        ))
    }
}

/// What one request may do: anything (the broker runs without tokens) or what its
/// token's grant allows. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Access(Holder);

#[derive(Debug, Clone, Default)]
enum Holder {
    /// Authentication is off.
    #[default]
    Open,
    /// A grant fixed for the request.
    Granted(Arc<Grant>),
    /// An open stream's grant, replaced at each tokens reload (see [`streams`]).
    Stream(Arc<streams::HeldStream>),
}

impl Access {
    /// Everything is allowed: authentication is off.
    pub fn open() -> Self {
        Self(Holder::Open)
    }

    /// What `grant` allows.
    pub fn granted(grant: Arc<Grant>) -> Self {
        Self(Holder::Granted(grant))
    }

    fn live(held: Arc<streams::HeldStream>) -> Self {
        Self(Holder::Stream(held))
    }

    /// See [`Grant::check`].
    pub fn check(&self, action: Action, field: &str, name: &str) -> Result<(), BrokerError> {
        self.with_grant(|g| g.check(action, field, name))
    }

    /// See [`Grant::check_pattern`].
    pub fn check_pattern(
        &self,
        action: Action,
        field: &str,
        pattern: &Pattern,
    ) -> Result<(), BrokerError> {
        self.with_grant(|g| g.check_pattern(action, field, pattern))
    }

    /// See [`Grant::check_any`].
    pub fn check_any(
        &self,
        actions: &[Action],
        field: &str,
        name: &str,
    ) -> Result<(), BrokerError> {
        self.with_grant(|g| g.check_any(actions, field, name))
    }

    /// Runs a grant's check, or allows when there is no grant (authentication is off).
    fn with_grant(
        &self,
        check: impl FnOnce(&Grant) -> Result<(), BrokerError>,
    ) -> Result<(), BrokerError> {
        self.read(Ok(()), check)
    }

    /// `f` of the grant in force, or `open` when authentication is off.
    fn read<R>(&self, open: R, f: impl FnOnce(&Grant) -> R) -> R {
        match &self.0 {
            Holder::Open => open,
            Holder::Granted(grant) => f(grant),
            Holder::Stream(held) => f(&sync::read(&held.grant)),
        }
    }

    /// The name of the token in force (`None` when authentication is off).
    pub fn token_name(&self) -> Option<String> {
        self.read(None, |g| Some(g.name().to_owned()))
    }

    /// Whether `action` on `name` is allowed (for listings that show only what may be seen).
    pub fn allows_name(&self, action: Action, name: &str) -> bool {
        self.read(true, |g| g.allows_name(action, name))
    }
}

/// Who may read a job: its producer, its workers, its admins (GetJob, and the console's
/// job page).
pub(crate) const JOB_READERS: &[Action] = &[Action::Enqueue, Action::Consume, Action::Admin];
/// Who may put jobs into a queue or take them back out (cancel): its producers and
/// admins.
pub(crate) const QUEUE_WRITERS: &[Action] = &[Action::Enqueue, Action::Admin];

/// What a request carrying `authorization` (an `authorization` header's or metadata's
/// value) may do: anything when `auth` is `None` (no tokens file), else its token's
/// grant. gRPC and the operations console both ask this, so one token means the same on
/// both.
pub(crate) fn request_access(
    auth: Option<&Authenticator>,
    authorization: Option<&[u8]>,
) -> Result<Access, BrokerError> {
    match auth {
        None => Ok(Access::open()),
        Some(auth) => auth
            .authenticate(authorization)
            .map(Access::granted)
            .map_err(AuthFailure::into_error),
    }
}

/// The SHA-256 of a token, in lower-case hex: what the tokens file stores.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random token: 32 bytes from the OS's generator (via two v4 UUIDs), in hex.
pub fn generate_token() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("sk_{}{}", a.simple(), b.simple())
}

/// One `[[token]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: OneOrMany,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    enqueue: Vec<String>,
    #[serde(default)]
    consume: Vec<String>,
    #[serde(default)]
    admin: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// The tokens of a tokens file, by hash.
#[derive(Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], Arc<Grant>>,
}

impl Tokens {
    /// Parses a tokens file's text; errors name the token and the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: TokensFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_hash = HashMap::new();
        for (i, entry) in file.token.into_iter().enumerate() {
            let at = format!("token[{i}] ({:?})", entry.name);
            if entry.name.is_empty() {
                return Err(format!("token[{i}].name: must not be empty"));
            }
            let mut grant = Grant::new(entry.name.clone());
            for (action, patterns) in Action::ALL.into_iter().zip([
                &entry.publish,
                &entry.subscribe,
                &entry.enqueue,
                &entry.consume,
                &entry.admin,
            ]) {
                for p in patterns {
                    let field = format!("{at}.{action}");
                    let pattern = Pattern::parse(&field, p).map_err(|e| e.to_string())?;
                    grant = grant.allow(action, pattern);
                }
            }
            let hashes = match entry.sha256 {
                OneOrMany::One(h) => vec![h],
                OneOrMany::Many(hs) => hs,
            };
            if hashes.is_empty() {
                return Err(format!("{at}.sha256: must list at least one hash"));
            }
            let grant = Arc::new(grant);
            for h in hashes {
                let digest = parse_hex32(&h).ok_or_else(|| {
                    format!(
                        "{at}.sha256: {h:?} is not a SHA-256 in hex (64 characters of 0-9a-f); `sluice token` prints one"
                    )
                })?;
                if by_hash.insert(digest, grant.clone()).is_some() {
                    return Err(format!("{at}.sha256: {h:?} is listed twice in the file"));
                }
            }
        }
        Ok(Self { by_hash })
    }

    /// Reads and parses a tokens file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read tokens file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("tokens file {}: {e}", path.display()))
    }

    /// The grant of `token`, if it is one of these.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Grant>> {
        self.credentials(token).map(|c| c.grant)
    }

    /// The hash and grant of `token`, if it is one of these.
    fn credentials(&self, token: &str) -> Option<Credentials> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let grant = self.by_hash.get(&digest)?.clone();
        Some(Credentials { digest, grant })
    }

    /// How many distinct hashes are known.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether no token is known (then nothing is allowed).
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The broker's authenticator: a tokens file, reloadable while the broker runs (to add
/// a token's new hash, then drop the old one, without a restart). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Authenticator {
    path: Option<PathBuf>,
    tokens: Arc<RwLock<Arc<Tokens>>>,
    /// Open streams, re-checked at each reload.
    streams: Arc<streams::OpenStreams>,
}

/// Why a request carried no acceptable credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `authorization` metadata.
    Missing,
    /// Metadata that is not `Bearer <token>`.
    Malformed,
    /// A token that is not in the tokens file.
    Unknown,
}

impl AuthFailure {
    /// The refusal, for the user.
    pub fn into_error(self) -> BrokerError {
        BrokerError::Unauthenticated(
            match self {
                AuthFailure::Missing => {
                    "authorization: missing; this broker needs a bearer token (metadata \"authorization: Bearer <token>\")"
                }
                AuthFailure::Malformed => {
                    "authorization: expected \"Bearer <token>\""
                }
                AuthFailure::Unknown => "authorization: the bearer token is not known to this broker",
            }
            .to_owned(),
        )
    }
}

impl Authenticator {
    /// Loads a tokens file.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self, String> {
        let path = path.into();
        let tokens = Tokens::load(&path)?;
        Ok(Self {
            path: Some(path),
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
            streams: Arc::default(),
        })
    }

    /// An authenticator over fixed tokens (tests, embedding).
    pub fn from_tokens(tokens: Tokens) -> Self {
        Self {
            path: None,
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
            streams: Arc::default(),
        }
    }

    /// Reads the tokens file again. On an error the tokens in use stay as they were.
    /// Returns how many hashes are now known. Open streams are re-checked as in
    /// [`Authenticator::replace`].
    pub fn reload(&self) -> Result<usize, String> {
        let Some(path) = &self.path else {
            return Ok(self.current().len());
        };
        let tokens = Tokens::load(path)?;
        let n = tokens.len();
        self.replace(tokens);
        Ok(n)
    }

    /// Puts `tokens` in use (what a reload does once the file is read), then ends every
    /// open stream whose token is no longer known (UNAUTHENTICATED) or no longer grants
    /// what the stream needs (PERMISSION_DENIED). Returns how many streams it ended.
    pub fn replace(&self, tokens: Tokens) -> usize {
        let tokens = Arc::new(tokens);
        *sync::write(&self.tokens) = tokens.clone();
        let ended = self.streams.review(&tokens);
        if ended > 0 {
            tracing::info!(
                ended,
                open = self.streams.len(),
                "tokens reloaded: streams whose token was revoked or lost its grant were ended"
            );
        }
        ended
    }

    /// Registers a stream opened with `credentials`, to be re-checked with `recheck` at
    /// each reload. The stream must end when the guard's token is cancelled (a child of
    /// `parent`, normally the broker's shutdown token) and report the guard's reason.
    pub fn hold_stream(
        &self,
        credentials: Credentials,
        parent: &CancellationToken,
        recheck: Recheck,
    ) -> StreamGuard {
        self.streams
            .hold(credentials, parent, recheck, || self.current())
    }

    fn current(&self) -> Arc<Tokens> {
        sync::read(&self.tokens).clone()
    }

    /// The grant of an `authorization` header value (`Bearer <token>`), or why none.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Arc<Grant>, AuthFailure> {
        self.credentials(authorization).map(|c| c.grant)
    }

    /// The token hash and grant of an `authorization` header value, or why none: what a
    /// stream needs to be re-checked at reloads ([`Authenticator::hold_stream`]).
    pub fn credentials(&self, authorization: Option<&[u8]>) -> Result<Credentials, AuthFailure> {
        let value = authorization.ok_or(AuthFailure::Missing)?;
        let value = std::str::from_utf8(value).map_err(|_| AuthFailure::Malformed)?;
        let (scheme, token) = value.trim().split_once(' ').ok_or(AuthFailure::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthFailure::Malformed);
        }
        self.current()
            .credentials(token.trim())
            .ok_or(AuthFailure::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(p: &str) -> Pattern {
        Pattern::parse("p", p).unwrap()
    }

    fn file(hash: &str) -> String {
        format!(
            r#"
[[token]]
name = "todo-app"
sha256 = "{hash}"
publish = ["user.*", "todo.>"]
enqueue = ["emails"]

[[token]]
name = "ops"
sha256 = ["{}", "{}"]
admin = [">"]
"#,
            hash_token("old-ops"),
            hash_token("new-ops")
        )
    }

    #[test]
    fn a_token_is_known_by_its_hash_only() {
        let tokens = Tokens::parse(&file(&hash_token("s3cret"))).unwrap();
        assert_eq!(tokens.len(), 3);
        assert!(!file(&hash_token("s3cret")).contains("s3cret"));
        let grant = tokens.authenticate("s3cret").unwrap();
        assert_eq!(grant.name(), "todo-app");
        assert!(tokens.authenticate("s3cret ").is_none());
        assert!(tokens.authenticate("other").is_none());
        // Rotation: both hashes of one identity are accepted.
        assert_eq!(tokens.authenticate("old-ops").unwrap().name(), "ops");
        assert_eq!(tokens.authenticate("new-ops").unwrap().name(), "ops");
    }

    #[test]
    fn hashes_are_sha256_hex() {
        // The SHA-256 of "abc" (FIPS 180-2 test vector).
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let t = generate_token();
        assert!(t.starts_with("sk_") && t.len() == 67, "{t}");
        assert_ne!(t, generate_token());
    }

    #[test]
    fn permissions_deny_by_default_and_follow_patterns() {
        let tokens = Tokens::parse(&file(&hash_token("s3cret"))).unwrap();
        let g = tokens.authenticate("s3cret").unwrap();
        assert!(g.allows_name(Action::Publish, "user.registered"));
        assert!(g.allows_name(Action::Publish, "todo.a.b"));
        assert!(!g.allows_name(Action::Publish, "user"));
        assert!(!g.allows_name(Action::Publish, "billing.paid"));
        assert!(g.allows_name(Action::Enqueue, "emails"));
        assert!(!g.allows_name(Action::Enqueue, "emails.dlq"));
        for action in [Action::Subscribe, Action::Consume, Action::Admin] {
            assert!(!g.allows_name(action, "emails"), "{action}");
        }
        let err = g.check(Action::Consume, "queue", "emails").unwrap_err();
        assert_eq!(
            err.to_string(),
            "queue: token \"todo-app\" may not consume \"emails\" (its consume patterns: none)"
        );
        let err = g
            .check(Action::Publish, "topic", "billing.paid")
            .unwrap_err();
        assert!(err.to_string().contains("user.*, todo.>"), "{err}");
        let ops = tokens.authenticate("new-ops").unwrap();
        assert!(ops.allows_name(Action::Admin, "anything.at.all"));
        assert!(!ops.allows_name(Action::Publish, "anything"));
        let err = g.check_any(&[Action::Enqueue, Action::Admin], "id", "jobs");
        assert!(err.unwrap_err().to_string().contains("enqueue, admin"));
    }

    #[test]
    fn subscriptions_need_a_rule_covering_the_whole_pattern() {
        let g = Grant::new("reader")
            .allow(Action::Subscribe, pattern("user.>"))
            .allow(Action::Subscribe, pattern("todo.*"));
        for (p, ok) in [
            ("user.registered", true),
            ("user.*", true),
            ("user.>", true),
            ("user.*.x", true),
            ("todo.done", true),
            ("todo.*", true),
            ("todo.>", false),
            ("todo.*.x", false),
            ("*.done", false),
            (">", false),
            ("user", false),
        ] {
            assert_eq!(g.allows(Action::Subscribe, &pattern(p)), ok, "{p}");
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_place() {
        let bad = [
            (
                "[[token]]\nname = \"a\"\nsha256 = \"xyz\"\n",
                "token[0] (\"a\").sha256",
            ),
            ("[[token]]\nname = \"\"\nsha256 = []\n", "token[0].name"),
            (
                "[[token]]\nname = \"a\"\nsha256 = []\n",
                "at least one hash",
            ),
            (
                "[[token]]\nname = \"a\"\nsha256 = \"00\"\npublish = [\"a..b\"]\n",
                "token[0] (\"a\").publish",
            ),
            (
                &format!(
                    "[[token]]\nname = \"a\"\nsha256 = \"{}\"\npublish = [\"a.>.b\"]\n",
                    hash_token("t")
                ),
                "token[0] (\"a\").publish",
            ),
            (
                "[[token]]\nname = \"a\"\nsha256 = \"00\"\nwrite = []\n",
                "write",
            ),
            (
                &format!(
                    "[[token]]\nname = \"a\"\nsha256 = \"{h}\"\n[[token]]\nname = \"b\"\nsha256 = \"{h}\"\n",
                    h = hash_token("t")
                ),
                "listed twice",
            ),
        ];
        for (text, expected) in bad {
            let err = Tokens::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
        assert!(Tokens::parse("").unwrap().is_empty());
    }

    #[test]
    fn the_authorization_header_must_be_a_known_bearer_token() {
        let tokens = Tokens::parse(&file(&hash_token("s3cret"))).unwrap();
        let auth = Authenticator::from_tokens(tokens);
        assert_eq!(auth.authenticate(None).unwrap_err(), AuthFailure::Missing);
        assert_eq!(
            auth.authenticate(Some(b"s3cret")).unwrap_err(),
            AuthFailure::Malformed
        );
        assert_eq!(
            auth.authenticate(Some(b"Basic s3cret")).unwrap_err(),
            AuthFailure::Malformed
        );
        assert_eq!(
            auth.authenticate(Some(b"Bearer nope")).unwrap_err(),
            AuthFailure::Unknown
        );
        assert_eq!(
            auth.authenticate(Some(b"Bearer s3cret")).unwrap().name(),
            "todo-app"
        );
        assert_eq!(
            auth.authenticate(Some(b"bearer s3cret")).unwrap().name(),
            "todo-app"
        );
        let err = AuthFailure::Missing.into_error().to_string();
        assert!(err.contains("Bearer"), "{err}");
    }

    #[test]
    fn reload_swaps_tokens_and_keeps_them_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, file(&hash_token("first"))).unwrap();
        let auth = Authenticator::from_file(&path).unwrap();
        assert!(auth.authenticate(Some(b"Bearer first")).is_ok());
        std::fs::write(&path, file(&hash_token("second"))).unwrap();
        assert_eq!(auth.reload().unwrap(), 3);
        assert!(auth.authenticate(Some(b"Bearer first")).is_err());
        assert!(auth.authenticate(Some(b"Bearer second")).is_ok());
        std::fs::write(&path, "not toml [").unwrap();
        assert!(auth.reload().unwrap_err().contains("tokens.toml"));
        assert!(auth.authenticate(Some(b"Bearer second")).is_ok());
    }
}
