//! Topic and queue names, and NATS-style subscription patterns.
//!
//! A name is 1-255 bytes of `[A-Za-z0-9_-]` tokens separated by `.`, with no empty token.
//! A pattern is a name whose tokens may also be `*` (exactly one token) or, as the last
//! token, `>` (one or more trailing tokens). Matching walks both token lists once: it is
//! linear in the name's length and never backtracks.

use crate::broker::domain::error::BrokerError;

/// Longest name or pattern, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks a topic or queue name; `field` names the request field in the error.
pub fn validate_name(field: &str, name: &str) -> Result<(), BrokerError> {
    check_length(field, name)?;
    if let Some(token) = name.split('.').find(|t| !valid_token(t)) {
        return Err(BrokerError::invalid(
            field,
            format!(
                "{name:?} is not a valid name: token {token:?} must be 1 or more of [A-Za-z0-9_-] (tokens are separated by '.')"
            ),
        ));
    }
    Ok(())
}

fn check_length(field: &str, name: &str) -> Result<(), BrokerError> {
    if name.is_empty() {
        return Err(BrokerError::invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(BrokerError::invalid(
            field,
            format!(
                "{} bytes exceeds the limit of {MAX_NAME_BYTES} bytes",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// Edits (inserted, removed or changed characters) at most between a name and the name
/// [`closest_name`] suggests for it: one or two slips of the keyboard, not another word.
const MAX_SUGGESTION_EDITS: usize = 2;

/// The candidate `name` was most likely meant to be: the one fewest edits away, at most
/// [`MAX_SUGGESTION_EDITS`] and fewer than half of `name`'s length (so a short name does
/// not match every other short name); ties go to the first in name order. `None` when no
/// candidate is that close. `name` itself is never suggested.
pub(crate) fn closest_name<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let within = MAX_SUGGESTION_EDITS.min(name.chars().count().saturating_sub(1) / 2);
    candidates
        .into_iter()
        .filter(|c| *c != name)
        .map(|c| (strsim::levenshtein(name, c), c))
        .filter(|(edits, _)| *edits <= within)
        .min()
        .map(|(_, c)| c)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternToken {
    Literal(String),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more trailing tokens.
    Rest,
}

/// A compiled subscription or binding pattern such as `user.*` or `todo.>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    tokens: Vec<PatternToken>,
}

impl Pattern {
    /// Parses a pattern; `field` names the request field in the error.
    pub fn parse(field: &str, pattern: &str) -> Result<Self, BrokerError> {
        check_length(field, pattern)?;
        let parts: Vec<&str> = pattern.split('.').collect();
        let mut tokens = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let token = match *part {
                "*" => PatternToken::One,
                ">" if i + 1 == parts.len() => PatternToken::Rest,
                ">" => {
                    return Err(BrokerError::invalid(
                        field,
                        format!("{pattern:?}: '>' must be the last token"),
                    ));
                }
                literal if valid_token(literal) => PatternToken::Literal(literal.to_owned()),
                other => {
                    return Err(BrokerError::invalid(
                        field,
                        format!(
                            "{pattern:?} is not a valid pattern: token {other:?} must be '*', '>' or 1 or more of [A-Za-z0-9_-]"
                        ),
                    ));
                }
            };
            tokens.push(token);
        }
        Ok(Self {
            source: pattern.to_owned(),
            tokens,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern has no wildcard (it names exactly one topic).
    pub fn is_literal(&self) -> bool {
        self.tokens
            .iter()
            .all(|t| matches!(t, PatternToken::Literal(_)))
    }

    /// Whether `name` (a valid name) matches. One pass over both token lists.
    pub fn matches(&self, name: &str) -> bool {
        let mut names = name.split('.');
        for token in &self.tokens {
            match token {
                PatternToken::Rest => return names.next().is_some(),
                PatternToken::One => {
                    if names.next().is_none() {
                        return false;
                    }
                }
                PatternToken::Literal(lit) => {
                    if names.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        names.next().is_none()
    }

    /// Whether every name `other` matches is also matched by `self`: a permission rule
    /// `user.>` covers a subscription to `user.*`, but `user.*` does not cover `user.>`.
    /// One pass over both token lists.
    pub fn covers(&self, other: &Pattern) -> bool {
        let mut theirs = other.tokens.iter();
        for token in &self.tokens {
            let Some(their) = theirs.next() else {
                return false;
            };
            let ok = match (token, their) {
                (PatternToken::Rest, _) => return true,
                (PatternToken::One, PatternToken::Rest) => false,
                (PatternToken::One, _) => true,
                (PatternToken::Literal(a), PatternToken::Literal(b)) => a == b,
                (PatternToken::Literal(_), _) => false,
            };
            if !ok {
                return false;
            }
        }
        theirs.next().is_none()
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closest_name_is_a_slip_away() {
        let queues = ["emails", "emails.dlq", "notifications", "ab"];
        assert_eq!(closest_name("email", queues), Some("emails"));
        assert_eq!(closest_name("emials", queues), Some("emails"));
        assert_eq!(closest_name("notifcation", queues), Some("notifications"));
        // Three edits is another word; the name itself is no suggestion.
        assert_eq!(closest_name("mail", queues), None);
        assert_eq!(closest_name("emails", queues), None);
        // Short names need proportionally closer matches: "ac" is not a typo of "ab".
        assert_eq!(closest_name("ac", queues), None);
        // Ties go to the first in name order.
        assert_eq!(
            closest_name("emailsx", ["emailsy", "emailsa"]),
            Some("emailsa")
        );
    }

    #[test]
    fn names_follow_the_token_rules() {
        for ok in ["a", "user.registered", "a-b_c.D9", &"x".repeat(255)] {
            validate_name("topic", ok).unwrap();
        }
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "é", &"x".repeat(256)] {
            let err = validate_name("topic", bad).unwrap_err().to_string();
            assert!(err.starts_with("topic: "), "{err}");
        }
        let err = validate_name("queue", &"x".repeat(256))
            .unwrap_err()
            .to_string();
        assert!(err.contains("256 bytes") && err.contains("255"), "{err}");
    }

    #[test]
    fn wildcards_match_like_nats() {
        let cases = [
            ("user.*", "user.registered", true),
            ("user.*", "user", false),
            ("user.*", "user.a.b", false),
            ("todo.>", "todo.completed", true),
            ("todo.>", "todo.a.b.c", true),
            ("todo.>", "todo", false),
            (">", "anything.at.all", true),
            ("*.completed", "todo.completed", true),
            ("*.completed", "todo.done", false),
            ("a.b", "a.b", true),
            ("a.b", "a.b.c", false),
            ("*.*", "a.b", true),
        ];
        for (pattern, name, expected) in cases {
            let p = Pattern::parse("pattern", pattern).unwrap();
            assert_eq!(p.matches(name), expected, "{pattern} vs {name}");
        }
    }

    #[test]
    fn bad_patterns_are_rejected_with_the_field() {
        for bad in ["a.>.b", "a..b", "a.b c", "", "**"] {
            let err = Pattern::parse("pattern", bad).unwrap_err().to_string();
            assert!(err.starts_with("pattern: "), "{err}");
        }
        assert!(Pattern::parse("p", "a.b").unwrap().is_literal());
        assert!(!Pattern::parse("p", "a.*").unwrap().is_literal());
    }
}
