//! Schema records: a revision set (`SchemaSet`) and a schema deleted (`SchemaCleared`),
//! in the log as they happen and in a snapshot as every kept revision, oldest first,
//! then `SchemaCleared` if none is current. Replaying them in order rebuilds each
//! target's [`SchemaHistory`].

use crate::broker::domain::schema::{
    SchemaDefinition, SchemaHistory, SchemaRevision, SchemaTarget, TargetKind,
};

use super::{Batch, Kind, pb};

impl Batch {
    /// A schema revision set on `target`; it is the current one from now on.
    pub(crate) fn schema_set(&mut self, target: &SchemaTarget, revision: &SchemaRevision) {
        self.push(set_op(target, revision));
    }

    /// `target`'s schema deleted.
    pub(crate) fn schema_cleared(&mut self, target: &SchemaTarget) {
        self.push(cleared_op(target));
    }
}

fn set_op(target: &SchemaTarget, r: &SchemaRevision) -> Kind {
    use pb::schema_set::Schema;
    Kind::SchemaSet(pb::SchemaSet {
        topic: target.kind == TargetKind::Topic,
        name: target.name.clone(),
        revision: r.revision,
        created_at: r.created_at,
        schema: Some(match &r.definition {
            SchemaDefinition::JsonSchema { text } => Schema::JsonSchema(text.clone()),
            SchemaDefinition::Protobuf {
                descriptor_set,
                message_type,
            } => Schema::Protobuf(pb::ProtobufSchema {
                descriptor_set: descriptor_set.clone(),
                message_type: message_type.clone(),
            }),
        }),
    })
}

fn cleared_op(target: &SchemaTarget) -> Kind {
    Kind::SchemaCleared(pb::SchemaCleared {
        topic: target.kind == TargetKind::Topic,
        name: target.name.clone(),
    })
}

fn target(topic: bool, name: String) -> SchemaTarget {
    SchemaTarget {
        kind: if topic {
            TargetKind::Topic
        } else {
            TargetKind::Queue
        },
        name,
    }
}

/// The snapshot's records of every target's schemas.
pub(crate) fn snapshot_ops(schemas: &[(SchemaTarget, SchemaHistory)]) -> Vec<Kind> {
    let mut ops = Vec::new();
    for (t, history) in schemas {
        ops.extend(history.revisions.iter().map(|r| set_op(t, r)));
        if history.current == 0 {
            ops.push(cleared_op(t));
        }
    }
    ops
}

/// A `SchemaSet` record's target and revision; `None` for a record without a schema.
pub(crate) fn revision_from_pb(set: pb::SchemaSet) -> Option<(SchemaTarget, SchemaRevision)> {
    use pb::schema_set::Schema;
    let definition = match set.schema? {
        Schema::JsonSchema(text) => SchemaDefinition::JsonSchema { text },
        Schema::Protobuf(p) => SchemaDefinition::Protobuf {
            descriptor_set: p.descriptor_set,
            message_type: p.message_type,
        },
    };
    Some((
        target(set.topic, set.name),
        SchemaRevision {
            revision: set.revision,
            created_at: set.created_at,
            definition,
        },
    ))
}

/// A `SchemaCleared` record's target.
pub(crate) fn cleared_target(cleared: pb::SchemaCleared) -> SchemaTarget {
    target(cleared.topic, cleared.name)
}
