//! Message schemas of queues and topics (SetSchema, GetSchema, DeleteSchema; see the
//! README, Message schemas): [`Client::queue_schema`] and [`Client::topic_schema`].

use bytes::Bytes;

use crate::client::Client;
use crate::client::error::Result;
use crate::client::transport::Rpc;
use crate::pb;

/// The schema of one queue or topic: set, read or delete it.
///
/// ```no_run
/// # async fn demo(client: sluice::client::Client) -> sluice::client::Result<()> {
/// let schema = client.topic_schema("user.registered");
/// let set = schema
///     .set_json_schema(r#"{"type": "object", "required": ["email"]}"#)
///     .await?;
/// println!("revision {} (new: {})", set.revision, set.created);
/// let history = schema.get().await?;
/// assert_eq!(history.current_revision, set.revision);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TargetSchema {
    rpc: Rpc,
    target: pb::SchemaTarget,
}

/// What [`TargetSchema::set_json_schema`] and [`TargetSchema::set_protobuf`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaSet {
    /// The target's current revision.
    pub revision: u32,
    /// False when the schema was current already (nothing changed).
    pub created: bool,
}

impl Client {
    /// The schema of queue `queue`: checked on Enqueue.
    pub fn queue_schema(&self, queue: &str) -> TargetSchema {
        self.schema_of(pb::schema_target::Target::Queue(queue.to_owned()))
    }

    /// The schema of topic `topic`: checked on Publish.
    pub fn topic_schema(&self, topic: &str) -> TargetSchema {
        self.schema_of(pb::schema_target::Target::Topic(topic.to_owned()))
    }

    fn schema_of(&self, target: pb::schema_target::Target) -> TargetSchema {
        TargetSchema {
            rpc: self.rpc(),
            target: pb::SchemaTarget {
                target: Some(target),
            },
        }
    }
}

impl TargetSchema {
    /// Makes a JSON Schema the target's schema (a new revision, unless it is current).
    pub async fn set_json_schema(&self, text: impl Into<String>) -> Result<SchemaSet> {
        self.set(pb::set_schema_request::Schema::JsonSchema(pb::JsonSchema {
            text: text.into(),
        }))
        .await
    }

    /// Makes message type `message_type` (a full name, e.g. `shop.v1.Order`) of
    /// `descriptor_set` (an encoded `FileDescriptorSet` with its imports) the target's
    /// schema.
    pub async fn set_protobuf(
        &self,
        descriptor_set: impl Into<Bytes>,
        message_type: impl Into<String>,
    ) -> Result<SchemaSet> {
        self.set(pb::set_schema_request::Schema::Protobuf(
            pb::ProtobufSchema {
                descriptor_set: descriptor_set.into(),
                message_type: message_type.into(),
            },
        ))
        .await
    }

    async fn set(&self, schema: pb::set_schema_request::Schema) -> Result<SchemaSet> {
        let reply = self
            .rpc
            .clone()
            .set_schema(pb::SetSchemaRequest {
                target: Some(self.target.clone()),
                schema: Some(schema),
            })
            .await?
            .into_inner();
        Ok(SchemaSet {
            revision: reply.revision,
            created: reply.created,
        })
    }

    /// The current revision and the history (NOT_FOUND if it never had a schema).
    pub async fn get(&self) -> Result<pb::GetSchemaResponse> {
        let request = pb::GetSchemaRequest {
            target: Some(self.target.clone()),
        };
        Ok(self.rpc.clone().get_schema(request).await?.into_inner())
    }

    /// Stops validation (the history stays); returns the revision that was current.
    pub async fn delete(&self) -> Result<u32> {
        let request = pb::DeleteSchemaRequest {
            target: Some(self.target.clone()),
        };
        let reply = self.rpc.clone().delete_schema(request).await?.into_inner();
        Ok(reply.deleted_revision)
    }
}
