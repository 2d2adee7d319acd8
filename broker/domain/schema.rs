//! Message schemas: what a queue's or topic's payloads must look like.
//!
//! A target (a queue or a topic, by name) carries a history of schema revisions, 1, 2, ...
//! The newest one that was not deleted is current: Publish and Enqueue check each payload
//! against it before anything of the batch is written. A revision is either a JSON Schema
//! or a protobuf message type of a registered descriptor set; each is compiled once, into
//! a [`Validator`], and engines cache that per revision (never per message).
//!
//! A payload is checked when its `content-type` header is absent or names the schema's
//! encoding ([`SchemaDefinition::applies_to`]); one that says it is something else passes
//! unchecked, so a target can carry an occasional payload of another encoding on purpose.
//!
//! Nothing here knows tonic or how a revision is stored.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use prost_reflect::{
    DescriptorPool, DynamicMessage, MapKey, MessageDescriptor, ReflectMessage, Value as ProtoValue,
};

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::Headers;
use crate::broker::domain::time::Millis;

/// Largest schema accepted: a JSON Schema's text, or a descriptor set's bytes plus its
/// message type name. Schemas are kept with every revision and on every node, so they
/// stay small; 256 KiB holds descriptor sets of hundreds of messages.
pub(crate) const MAX_SCHEMA_BYTES: usize = 256 * 1024;

/// Revisions a target keeps; the oldest go first. The current revision is always kept.
pub(crate) const HISTORY_LIMIT: usize = 32;

/// What carries a schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    /// A work queue: Enqueue is checked.
    Queue,
    /// A topic: Publish is checked.
    Topic,
}

/// A queue or a topic, by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SchemaTarget {
    pub kind: TargetKind,
    pub name: String,
}

impl SchemaTarget {
    /// Queue `name`.
    pub fn queue(name: &str) -> Self {
        Self {
            kind: TargetKind::Queue,
            name: name.to_owned(),
        }
    }

    /// Topic `name`.
    pub fn topic(name: &str) -> Self {
        Self {
            kind: TargetKind::Topic,
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for SchemaTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            TargetKind::Queue => "queue",
            TargetKind::Topic => "topic",
        };
        write!(f, "{kind} {:?}", self.name)
    }
}

/// A schema as the user gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaDefinition {
    /// A JSON Schema document (any draft the validator knows; 2020-12 by default).
    /// `format` is asserted, not just annotated: `"format": "email"` refuses non-emails.
    JsonSchema {
        /// The schema's JSON text.
        text: String,
    },
    /// A message type of a `FileDescriptorSet` (as `protoc --include_imports
    /// --descriptor_set_out` writes it).
    Protobuf {
        /// The encoded `FileDescriptorSet`.
        descriptor_set: Bytes,
        /// The message's full name, e.g. `shop.v1.Order`.
        message_type: String,
    },
}

impl SchemaDefinition {
    /// `json_schema` or `protobuf`, as the API names the kinds.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::JsonSchema { .. } => "json_schema",
            Self::Protobuf { .. } => "protobuf",
        }
    }

    /// Whether a payload with these headers is checked against this schema: when it has
    /// no `content-type` header (any case), or one naming this schema's encoding
    /// (`application/json` or any `*+json` for JSON Schema; `application/protobuf`,
    /// `application/x-protobuf` or `application/vnd.google.protobuf` for protobuf;
    /// parameters such as `; charset=utf-8` are ignored).
    pub fn applies_to(&self, headers: &Headers) -> bool {
        let Some(value) = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v)
        else {
            return true;
        };
        let media = value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match self {
            Self::JsonSchema { .. } => media == "application/json" || media.ends_with("+json"),
            Self::Protobuf { .. } => matches!(
                media.as_str(),
                "application/protobuf"
                    | "application/x-protobuf"
                    | "application/vnd.google.protobuf"
            ),
        }
    }

    /// Compiles the schema. A bad one is INVALID_ARGUMENT naming the request field
    /// (`json_schema.text`, `protobuf.descriptor_set`, `protobuf.message_type`).
    pub fn compile(&self) -> Result<Validator, BrokerError> {
        match self {
            Self::JsonSchema { text } => {
                let field = "json_schema.text";
                check_size(field, text.len())?;
                let doc: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| BrokerError::invalid(field, format!("is not JSON: {e}")))?;
                let validator = jsonschema::options()
                    .should_validate_formats(true)
                    .build(&doc)
                    .map_err(|e| {
                        BrokerError::invalid(field, format!("is not a valid JSON Schema: {e}"))
                    })?;
                Ok(Validator::Json(Arc::new(validator)))
            }
            Self::Protobuf {
                descriptor_set,
                message_type,
            } => {
                check_size(
                    "protobuf.descriptor_set",
                    descriptor_set.len() + message_type.len(),
                )?;
                let pool = DescriptorPool::decode(descriptor_set.as_ref()).map_err(|e| {
                    BrokerError::invalid(
                        "protobuf.descriptor_set",
                        format!("is not a FileDescriptorSet with every import included: {e}"),
                    )
                })?;
                let message = pool.get_message_by_name(message_type).ok_or_else(|| {
                    let known: Vec<String> = pool
                        .all_messages()
                        .map(|m| m.full_name().to_owned())
                        .take(20)
                        .collect();
                    BrokerError::invalid(
                        "protobuf.message_type",
                        format!(
                            "{message_type:?} is not a message of the descriptor set (it has: {})",
                            known.join(", ")
                        ),
                    )
                })?;
                Ok(Validator::Protobuf(message))
            }
        }
    }
}

fn check_size(field: &str, len: usize) -> Result<(), BrokerError> {
    if len > MAX_SCHEMA_BYTES {
        return Err(BrokerError::over_limit(
            field,
            len as u64,
            MAX_SCHEMA_BYTES as u64,
            "bytes",
        ));
    }
    if len == 0 {
        return Err(BrokerError::invalid(field, "must not be empty"));
    }
    Ok(())
}

/// One revision of a target's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaRevision {
    /// 1 for the first schema a target got, then one more for each replacement.
    pub revision: u32,
    /// When it was set (unix ms).
    pub created_at: Millis,
    /// The schema.
    pub definition: SchemaDefinition,
}

/// A target's revisions (at most [`HISTORY_LIMIT`], oldest first) and which is current.
///
/// Deleting a schema keeps the history and only clears `current`; the next schema set
/// continues the numbering, so a revision number never names two schemas (nodes compare
/// numbers to know their cached validator is the current one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaHistory {
    /// Oldest first.
    pub revisions: Vec<SchemaRevision>,
    /// The revision in force; 0 when none (never set, or deleted).
    pub current: u32,
}

impl SchemaHistory {
    /// The revision in force, if any.
    pub fn current(&self) -> Option<&SchemaRevision> {
        (self.current > 0)
            .then(|| {
                self.revisions
                    .iter()
                    .rev()
                    .find(|r| r.revision == self.current)
            })
            .flatten()
    }

    /// The number the next revision gets.
    pub fn next_revision(&self) -> u32 {
        self.revisions.last().map_or(1, |r| r.revision + 1)
    }

    /// Makes `definition` current at `now`. When it is the current schema already,
    /// nothing changes (so setting a schema at every start is idempotent); returns the
    /// current revision and whether it is new.
    pub fn set(&mut self, definition: SchemaDefinition, now: Millis) -> (u32, bool) {
        if let Some(current) = self.current()
            && current.definition == definition
        {
            return (current.revision, false);
        }
        let revision = self.next_revision();
        self.push(SchemaRevision {
            revision,
            created_at: now,
            definition,
        });
        (revision, true)
    }

    /// Adds a revision as set (or replayed): it becomes current; the oldest beyond
    /// [`HISTORY_LIMIT`] go.
    pub fn push(&mut self, revision: SchemaRevision) {
        self.current = revision.revision;
        self.revisions.push(revision);
        if self.revisions.len() > HISTORY_LIMIT {
            let excess = self.revisions.len() - HISTORY_LIMIT;
            self.revisions.drain(..excess);
        }
    }

    /// Stops validation; returns the revision that was current (0 if none).
    pub fn clear(&mut self) -> u32 {
        std::mem::take(&mut self.current)
    }
}

/// A compiled schema, cheap to clone.
#[derive(Clone)]
pub enum Validator {
    /// A compiled JSON Schema.
    Json(Arc<jsonschema::Validator>),
    /// The protobuf message type payloads must decode as.
    Protobuf(MessageDescriptor),
}

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Json(_) => f.write_str("Validator::Json"),
            Self::Protobuf(m) => write!(f, "Validator::Protobuf({})", m.full_name()),
        }
    }
}

/// Why a payload does not match its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Where in the payload: a JSON pointer (`/user/email`, empty for the whole
    /// document) or a protobuf field path (`user.email`, `items[2].sku`).
    pub path: String,
    /// The rule broken: a JSON Schema keyword (`required`, `type`, `format "email"`) or,
    /// for protobuf, `wire format`, `unknown field` or `required`.
    pub rule: String,
    /// The validator's words.
    pub detail: String,
}

impl Validator {
    /// Checks one payload; the first violation found.
    pub fn check(&self, payload: &[u8]) -> Result<(), Violation> {
        match self {
            Self::Json(validator) => check_json(validator, payload),
            Self::Protobuf(message) => check_protobuf(message, payload),
        }
    }
}

fn check_json(validator: &jsonschema::Validator, payload: &[u8]) -> Result<(), Violation> {
    let doc: serde_json::Value = serde_json::from_slice(payload).map_err(|e| Violation {
        path: String::new(),
        rule: "JSON syntax".into(),
        detail: format!("the payload is not JSON: {e}"),
    })?;
    match validator.iter_errors(&doc).next() {
        None => Ok(()),
        Some(error) => {
            let rule = match error.kind() {
                jsonschema::error::ValidationErrorKind::Format { format } => {
                    format!("format {format:?}")
                }
                kind => kind.keyword().to_owned(),
            };
            Err(Violation {
                path: error.instance_path().as_str().to_owned(),
                rule,
                detail: error.to_string(),
            })
        }
    }
}

fn check_protobuf(message: &MessageDescriptor, payload: &[u8]) -> Result<(), Violation> {
    let decoded = DynamicMessage::decode(message.clone(), payload).map_err(|e| Violation {
        // prost names the message and field it failed in within its text.
        path: String::new(),
        rule: "wire format".into(),
        detail: format!("the payload is not a {}: {e}", message.full_name()),
    })?;
    check_message(&decoded, "")
}

/// Walks a decoded message: a field the type does not have (a payload of another type
/// often decodes into one) and a missing proto2 `required` field are violations.
fn check_message(message: &DynamicMessage, path: &str) -> Result<(), Violation> {
    let join = |name: &str| {
        if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    if let Some(unknown) = message.unknown_fields().next() {
        return Err(Violation {
            path: join(&unknown.number().to_string()),
            rule: "unknown field".into(),
            detail: format!(
                "{} has no field number {}",
                message.descriptor().full_name(),
                unknown.number()
            ),
        });
    }
    for field in message.descriptor().fields() {
        if field.is_required() && !message.has_field(&field) {
            return Err(Violation {
                path: join(field.name()),
                rule: "required".into(),
                detail: format!("required field {} is missing", field.full_name()),
            });
        }
    }
    for (field, value) in message.fields() {
        check_value(value, &join(field.name()))?;
    }
    Ok(())
}

fn check_value(value: &ProtoValue, path: &str) -> Result<(), Violation> {
    match value {
        ProtoValue::Message(m) => check_message(m, path),
        ProtoValue::List(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_value(v, &format!("{path}[{i}]"))),
        ProtoValue::Map(entries) => entries
            .iter()
            .try_for_each(|(k, v)| check_value(v, &format!("{path}[{}]", map_key(k)))),
        _ => Ok(()),
    }
}

/// A map entry's key as a path shows it: `["sku"]`, `[7]`, `[true]`.
fn map_key(key: &MapKey) -> String {
    match key {
        MapKey::String(s) => format!("{s:?}"),
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(n) => n.to_string(),
        MapKey::I64(n) => n.to_string(),
        MapKey::U32(n) => n.to_string(),
        MapKey::U64(n) => n.to_string(),
    }
}

/// The schema in force on a target, compiled: what Publish and Enqueue check against.
#[derive(Debug, Clone)]
pub(crate) struct ActiveSchema {
    /// Its revision.
    pub revision: u32,
    /// Which payloads it checks (by content type).
    pub definition: Arc<SchemaDefinition>,
    /// The compiled schema.
    pub validator: Validator,
}

impl ActiveSchema {
    /// Compiles `revision`.
    pub(crate) fn compile(revision: &SchemaRevision) -> Result<Self, BrokerError> {
        Ok(Self {
            revision: revision.revision,
            validator: revision.definition.compile()?,
            definition: Arc::new(revision.definition.clone()),
        })
    }

    /// Checks a batch whole: the first payload (of a matching content type) that fails
    /// refuses it, naming `<entries>[i].payload`, the path in the payload and the rule.
    pub(crate) fn check_batch<'a>(
        &self,
        target: &SchemaTarget,
        entries: &str,
        batch: impl Iterator<Item = (&'a [u8], &'a Headers)>,
    ) -> Result<(), BrokerError> {
        for (i, (payload, headers)) in batch.enumerate() {
            if !self.definition.applies_to(headers) {
                continue;
            }
            if let Err(v) = self.validator.check(payload) {
                return Err(BrokerError::SchemaViolation {
                    entry: format!("{entries}[{i}].payload"),
                    target: target.to_string(),
                    revision: self.revision,
                    path: v.path,
                    rule: v.rule,
                    detail: v.detail,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> SchemaDefinition {
        SchemaDefinition::JsonSchema { text: text.into() }
    }

    const USER: &str = r#"{
        "type": "object",
        "required": ["user"],
        "properties": {
            "user": {
                "type": "object",
                "required": ["email", "id"],
                "properties": {
                    "email": {"type": "string", "format": "email"},
                    "id": {"type": "integer"}
                }
            }
        }
    }"#;

    fn active(definition: SchemaDefinition) -> ActiveSchema {
        ActiveSchema::compile(&SchemaRevision {
            revision: 1,
            created_at: 0,
            definition,
        })
        .expect("compiles")
    }

    fn refusal(schema: &ActiveSchema, payloads: &[&[u8]]) -> BrokerError {
        let headers = Headers::new();
        schema
            .check_batch(
                &SchemaTarget::topic("t"),
                "messages",
                payloads.iter().map(|p| (*p, &headers)),
            )
            .expect_err("refused")
    }

    fn violation(e: BrokerError) -> (String, String, String) {
        match e {
            BrokerError::SchemaViolation {
                entry, path, rule, ..
            } => (entry, path, rule),
            other => panic!("not a violation: {other}"),
        }
    }

    #[test]
    fn json_schema_names_entry_path_and_rule() {
        let schema = active(json(USER));
        let good = br#"{"user": {"email": "a@example.com", "id": 1}}"#;
        let headers = Headers::new();
        schema
            .check_batch(
                &SchemaTarget::topic("t"),
                "messages",
                [&good[..]; 2].into_iter().map(|p| (p, &headers)),
            )
            .expect("valid payloads pass");

        let bad_email = br#"{"user": {"email": "not an email", "id": 1}}"#;
        let e = refusal(&schema, &[good, bad_email]);
        assert!(e.to_string().contains("messages[1].payload"), "{e}");
        assert_eq!(
            violation(e),
            (
                "messages[1].payload".into(),
                "/user/email".into(),
                "format \"email\"".into()
            )
        );

        let missing = br#"{"user": {"email": "a@example.com"}}"#;
        let (_, path, rule) = violation(refusal(&schema, &[missing]));
        assert_eq!((path.as_str(), rule.as_str()), ("/user", "required"));

        let wrong_type = br#"{"user": {"email": "a@example.com", "id": "7"}}"#;
        let (_, path, rule) = violation(refusal(&schema, &[wrong_type]));
        assert_eq!((path.as_str(), rule.as_str()), ("/user/id", "type"));

        let (_, path, rule) = violation(refusal(&schema, &[b"{not json"]));
        assert_eq!((path.as_str(), rule.as_str()), ("", "JSON syntax"));
    }

    #[test]
    fn bad_json_schemas_are_refused_naming_the_field() {
        for (text, why) in [
            ("{", "is not JSON"),
            (r#"{"type": "no-such-type"}"#, "is not a valid JSON Schema"),
            (
                r#"{"$ref": "https://example.com/s.json"}"#,
                "is not a valid JSON Schema",
            ),
            ("", "is not JSON"),
        ] {
            let e = json(text).compile().expect_err(text);
            let msg = e.to_string();
            assert!(msg.starts_with("json_schema.text: "), "{msg}");
            if !text.is_empty() {
                assert!(msg.contains(why), "{text}: {msg}");
            }
        }
        let huge = format!("\"{}\"", "x".repeat(MAX_SCHEMA_BYTES));
        let e = json(&huge).compile().expect_err("too big");
        assert!(
            e.to_string().contains("exceeds the limit of 262144 bytes"),
            "{e}"
        );
    }

    fn descriptor_set() -> Bytes {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("shop.proto"),
            r#"syntax = "proto2";
            package shop.v1;
            message Item { required string sku = 1; optional uint32 count = 2; }
            message Order { optional string id = 1; repeated Item items = 2; map<string, Item> by_sku = 3; }
            "#,
        )
        .expect("write proto");
        let set = protox::compile(["shop.proto"], [dir.path()]).expect("compiles");
        Bytes::from(prost::Message::encode_to_vec(&set))
    }

    fn protobuf(message_type: &str) -> SchemaDefinition {
        SchemaDefinition::Protobuf {
            descriptor_set: descriptor_set(),
            message_type: message_type.into(),
        }
    }

    fn encode(message: &DynamicMessage) -> Vec<u8> {
        prost::Message::encode_to_vec(message)
    }

    #[test]
    fn protobuf_payloads_are_decoded_and_walked() {
        let schema = active(protobuf("shop.v1.Order"));
        let Validator::Protobuf(order) = &schema.validator else {
            panic!("a protobuf validator")
        };
        let item = order
            .parent_pool()
            .get_message_by_name("shop.v1.Item")
            .expect("Item");
        let mut good_item = DynamicMessage::new(item.clone());
        good_item.set_field_by_name("sku", ProtoValue::String("A-1".into()));
        let mut order_msg = DynamicMessage::new(order.clone());
        order_msg.set_field_by_name("id", ProtoValue::String("o1".into()));
        order_msg.set_field_by_name(
            "items",
            ProtoValue::List(vec![
                ProtoValue::Message(good_item.clone()),
                ProtoValue::Message(DynamicMessage::new(item.clone())),
            ]),
        );
        let (entry, path, rule) = violation(refusal(&schema, &[&encode(&order_msg)]));
        assert_eq!(
            (entry.as_str(), path.as_str(), rule.as_str()),
            ("messages[0].payload", "items[1].sku", "required")
        );

        order_msg.set_field_by_name(
            "items",
            ProtoValue::List(vec![ProtoValue::Message(good_item)]),
        );
        let good = encode(&order_msg);
        schema
            .validator
            .check(&good)
            .expect("a complete order passes");

        // A map value is walked too, and its key shows in the path.
        let mut keyed = order_msg.clone();
        keyed.set_field_by_name(
            "by_sku",
            ProtoValue::Map(
                [(
                    MapKey::String("A-1".into()),
                    ProtoValue::Message(DynamicMessage::new(item.clone())),
                )]
                .into(),
            ),
        );
        let (_, path, rule) = violation(refusal(&schema, &[&encode(&keyed)]));
        assert_eq!(
            (path.as_str(), rule.as_str()),
            ("by_sku[\"A-1\"].sku", "required")
        );

        // Field 9 as a varint: Order has no field 9.
        let mut unknown = good.clone();
        unknown.extend_from_slice(&[9 << 3, 1]);
        let (_, path, rule) = violation(refusal(&schema, &[&unknown]));
        assert_eq!((path.as_str(), rule.as_str()), ("9", "unknown field"));

        // Field 1 (a string) with a truncated length.
        let (_, _, rule) = violation(refusal(&schema, &[&[0x0a, 0x05, b'a']]));
        assert_eq!(rule, "wire format");
    }

    #[test]
    fn bad_protobuf_schemas_are_refused_naming_the_field() {
        let e = protobuf("shop.v1.Nope")
            .compile()
            .expect_err("unknown type");
        let msg = e.to_string();
        assert!(msg.starts_with("protobuf.message_type: "), "{msg}");
        assert!(
            msg.contains("shop.v1.Order"),
            "lists the known types: {msg}"
        );

        let e = SchemaDefinition::Protobuf {
            descriptor_set: Bytes::from_static(b"\xff\xff not a descriptor set"),
            message_type: "shop.v1.Order".into(),
        }
        .compile()
        .expect_err("undecodable");
        assert!(
            e.to_string().starts_with("protobuf.descriptor_set: "),
            "{e}"
        );
    }

    #[test]
    fn content_type_decides_what_is_checked() {
        let headers = |v: &str| Headers::from([("Content-Type".to_owned(), v.to_owned())]);
        let j = json("{}");
        assert!(j.applies_to(&Headers::new()));
        assert!(j.applies_to(&headers("application/json")));
        assert!(j.applies_to(&headers("Application/JSON; charset=utf-8")));
        assert!(j.applies_to(&headers("application/cloudevents+json")));
        assert!(!j.applies_to(&headers("text/plain")));
        assert!(!j.applies_to(&headers("application/protobuf")));
        let p = protobuf("shop.v1.Order");
        assert!(p.applies_to(&Headers::new()));
        assert!(p.applies_to(&headers("application/x-protobuf")));
        assert!(p.applies_to(&headers("application/protobuf")));
        assert!(!p.applies_to(&headers("application/json")));

        // A payload that says it is text passes a JSON Schema unchecked.
        let schema = active(json(USER));
        let text = headers("text/plain");
        schema
            .check_batch(
                &SchemaTarget::queue("q"),
                "jobs",
                std::iter::once((&b"hello"[..], &text)),
            )
            .expect("another content type is not checked");
    }

    #[test]
    fn revisions_number_up_and_survive_a_delete() {
        let mut h = SchemaHistory::default();
        assert_eq!(h.set(json("{}"), 10), (1, true));
        assert_eq!(
            h.set(json("{}"), 20),
            (1, false),
            "same schema: same revision"
        );
        assert_eq!(h.set(json(r#"{"type":"object"}"#), 30), (2, true));
        assert_eq!(h.current().map(|r| r.created_at), Some(30));
        assert_eq!(h.clear(), 2);
        assert!(h.current().is_none());
        assert_eq!(
            h.set(json(r#"{"type":"object"}"#), 40),
            (3, true),
            "numbering goes on"
        );
        assert_eq!(h.revisions.len(), 3);
        for i in 0..HISTORY_LIMIT as u64 {
            h.set(json(&format!("{{\"maxLength\": {i}}}")), 50 + i);
        }
        assert_eq!(h.revisions.len(), HISTORY_LIMIT);
        assert_eq!(h.current, 3 + HISTORY_LIMIT as u32);
        assert_eq!(h.revisions[0].revision, 4);
    }
}
