//! `sluice schema set|get|delete`: a queue's or topic's message schema (see the README,
//! Message schemas). The schema is read from a file: a JSON Schema's text, or a
//! descriptor set as `protoc --include_imports --descriptor_set_out` writes it.

use std::path::PathBuf;

use serde_json::json;
use sluice::pb;

use super::{CliError, Connection, Result, connect, print_json, print_text};

/// `sluice schema`.
#[derive(Debug, Clone, clap::Args)]
pub struct SchemaArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: SchemaAction,
}

/// `sluice schema <action>`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SchemaAction {
    /// Set the schema (a new revision, unless it is the current one already).
    Set(SetArgs),
    /// Show the current revision and the history.
    Get(TargetArgs),
    /// Stop validating (the history stays).
    Delete(TargetArgs),
}

/// The queue or topic, and the connection.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// A queue.
    #[arg(long, conflicts_with = "topic", required_unless_present = "topic")]
    pub queue: Option<String>,
    /// A topic.
    #[arg(long)]
    pub topic: Option<String>,
}

/// `sluice schema set`.
#[derive(Debug, Clone, clap::Args)]
pub struct SetArgs {
    /// The target.
    #[command(flatten)]
    pub target: TargetArgs,
    /// A JSON Schema file.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "descriptor_set",
        required_unless_present = "descriptor_set"
    )]
    pub json_schema: Option<PathBuf>,
    /// A FileDescriptorSet file (`protoc --include_imports --descriptor_set_out=FILE`).
    #[arg(long, value_name = "FILE", requires = "message_type")]
    pub descriptor_set: Option<PathBuf>,
    /// The message type's full name in the descriptor set, e.g. `shop.v1.Order`.
    #[arg(long, requires = "descriptor_set")]
    pub message_type: Option<String>,
}

impl TargetArgs {
    fn target(&self) -> Option<pb::SchemaTarget> {
        use pb::schema_target::Target;
        let target = match (&self.queue, &self.topic) {
            (Some(q), _) => Target::Queue(q.clone()),
            (None, Some(t)) => Target::Topic(t.clone()),
            (None, None) => return None,
        };
        Some(pb::SchemaTarget {
            target: Some(target),
        })
    }

    /// `queue "name"` or `topic "name"`, as the broker names targets.
    fn name(&self) -> String {
        match (&self.queue, &self.topic) {
            (Some(q), _) => format!("queue {q:?}"),
            (None, Some(t)) => format!("topic {t:?}"),
            (None, None) => String::new(),
        }
    }
}

fn read(flag: &str, path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
}

/// Runs `sluice schema ...`.
pub(super) async fn schema(a: SchemaArgs) -> Result<()> {
    match a.action {
        SchemaAction::Set(s) => set(s).await,
        SchemaAction::Get(t) => get(t).await,
        SchemaAction::Delete(t) => delete(t).await,
    }
}

async fn set(a: SetArgs) -> Result<()> {
    use pb::set_schema_request::Schema;
    let schema = match (&a.json_schema, &a.descriptor_set, &a.message_type) {
        (Some(path), _, _) => {
            let text = String::from_utf8(read("--json-schema", path)?).map_err(|_| {
                CliError::Usage(format!("--json-schema {}: not UTF-8 text", path.display()))
            })?;
            Schema::JsonSchema(pb::JsonSchema { text })
        }
        (None, Some(path), Some(message_type)) => Schema::Protobuf(pb::ProtobufSchema {
            descriptor_set: read("--descriptor-set", path)?.into(),
            message_type: message_type.clone(),
        }),
        _ => {
            return Err(CliError::Usage(
                "give --json-schema FILE, or --descriptor-set FILE and --message-type NAME".into(),
            ));
        }
    };
    let mut client = connect(&a.target.conn).await?;
    let reply = client
        .set_schema(pb::SetSchemaRequest {
            target: a.target.target(),
            schema: Some(schema),
        })
        .await?
        .into_inner();
    if a.target.conn.json {
        return print_json(&json!({ "revision": reply.revision, "created": reply.created }));
    }
    let what = if reply.created {
        "set"
    } else {
        "unchanged (already current)"
    };
    print_text(&format!(
        "{}: schema revision {} {what}\n",
        a.target.name(),
        reply.revision
    ))
}

async fn get(a: TargetArgs) -> Result<()> {
    use pb::schema_revision::Schema;
    let mut client = connect(&a.conn).await?;
    let reply = client
        .get_schema(pb::GetSchemaRequest { target: a.target() })
        .await?
        .into_inner();
    let content = |r: &pb::SchemaRevision| match &r.schema {
        Some(Schema::JsonSchema(j)) => ("json_schema", json!({ "text": j.text })),
        Some(Schema::Protobuf(p)) => (
            "protobuf",
            json!({
                "message_type": p.message_type,
                "descriptor_set_bytes": p.descriptor_set.len(),
            }),
        ),
        None => ("none", json!(null)),
    };
    if a.conn.json {
        let history: Vec<_> = reply
            .history
            .iter()
            .map(|r| {
                let (kind, content) = content(r);
                json!({
                    "revision": r.revision,
                    "created_unix_ms": r.created_unix_ms,
                    "kind": kind,
                    "schema": content,
                })
            })
            .collect();
        return print_json(&json!({
            "current_revision": reply.current_revision,
            "history": history,
        }));
    }
    let mut out = match reply.current_revision {
        0 => format!("{}: no schema in force (deleted)\n", a.name()),
        n => format!("{}: schema revision {n} in force\n", a.name()),
    };
    for r in &reply.history {
        let (kind, content) = content(r);
        let current = if r.revision == reply.current_revision {
            " (current)"
        } else {
            ""
        };
        out.push_str(&format!(
            "\nrevision {}{current}, {kind}, set at {} ms\n",
            r.revision, r.created_unix_ms
        ));
        match &r.schema {
            Some(Schema::JsonSchema(j)) => out.push_str(&format!("{}\n", j.text.trim_end())),
            _ => out.push_str(&format!("{content}\n")),
        }
    }
    print_text(&out)
}

async fn delete(a: TargetArgs) -> Result<()> {
    let mut client = connect(&a.conn).await?;
    let reply = client
        .delete_schema(pb::DeleteSchemaRequest { target: a.target() })
        .await?
        .into_inner();
    if a.conn.json {
        return print_json(&json!({ "deleted_revision": reply.deleted_revision }));
    }
    print_text(&format!(
        "{}: schema revision {} deleted; payloads are no longer checked\n",
        a.name(),
        reply.deleted_revision
    ))
}
