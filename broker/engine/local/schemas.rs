//! The in-process engine's message schemas: every target's history and its compiled
//! current revision, behind one `RwLock` (read on every Publish and Enqueue, written only
//! by SetSchema and DeleteSchema). A change is logged under the write lock, like a queue's
//! change under the queue's lock, so the log's order is the registry's.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::Headers;
use crate::broker::domain::schema::{
    ActiveSchema, SchemaDefinition, SchemaHistory, SchemaTarget, TargetKind,
};
use crate::broker::domain::time::now_ms;
use crate::broker::engine::local::Broker;

/// Every target's schema state.
#[derive(Default)]
pub(crate) struct SchemaRegistry {
    targets: RwLock<HashMap<SchemaTarget, Entry>>,
}

struct Entry {
    history: SchemaHistory,
    /// The current revision, compiled; `None` after a delete.
    active: Option<ActiveSchema>,
}

impl Entry {
    fn new(history: SchemaHistory) -> Self {
        let active = history.current().and_then(|r| match ActiveSchema::compile(r) {
            Ok(active) => Some(active),
            Err(e) => {
                // It compiled when it was set; only another validator version could
                // refuse it now. Payloads go unchecked rather than the broker not starting.
                tracing::error!(revision = r.revision, error = %e, "a recovered schema does not compile");
                None
            }
        });
        Self { history, active }
    }
}

impl SchemaRegistry {
    /// The compiled current schema of `target`, if it has one.
    fn active(&self, target: &SchemaTarget) -> Option<ActiveSchema> {
        self.read().get(target).and_then(|e| e.active.clone())
    }

    /// Whether no target has ever had a schema: the hot paths' one check then.
    fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<SchemaTarget, Entry>> {
        self.targets.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<SchemaTarget, Entry>> {
        self.targets.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Broker {
    /// Puts recovered schemas in place.
    pub(in crate::broker) fn install_schemas(&self, schemas: Vec<(SchemaTarget, SchemaHistory)>) {
        let mut targets = self.inner.schemas.write();
        *targets = schemas
            .into_iter()
            .map(|(t, h)| (t, Entry::new(h)))
            .collect();
    }

    /// Every target's history, for a snapshot (call under the log's exclusive gate).
    pub(in crate::broker) fn capture_schemas(&self) -> Vec<(SchemaTarget, SchemaHistory)> {
        let targets = self.inner.schemas.read();
        targets
            .iter()
            .map(|(t, e)| (t.clone(), e.history.clone()))
            .collect()
    }

    /// Refuses a batch of which a payload fails `target`'s schema (see
    /// [`ActiveSchema::check_batch`]). `entries` names the request's list.
    pub(in crate::broker) fn check_schema<'a>(
        &self,
        kind: TargetKind,
        name: &str,
        entries: &str,
        batch: impl Iterator<Item = (&'a [u8], &'a Headers)>,
    ) -> Result<(), BrokerError> {
        if self.inner.schemas.is_empty() {
            return Ok(());
        }
        let target = SchemaTarget {
            kind,
            name: name.to_owned(),
        };
        match self.inner.schemas.active(&target) {
            Some(schema) => schema.check_batch(&target, entries, batch),
            None => Ok(()),
        }
    }

    /// SetSchema: compiles, records and installs a new revision (or finds it current).
    pub(crate) async fn set_schema(
        &self,
        target: &SchemaTarget,
        definition: SchemaDefinition,
    ) -> Result<(u32, bool), BrokerError> {
        let validator = definition.compile()?;
        self.wait_for_log_space().await?;
        let (outcome, commit) = {
            let _change = self.begin()?;
            let mut targets = self.inner.schemas.write();
            let entry = targets
                .entry(target.clone())
                .or_insert_with(|| Entry::new(SchemaHistory::default()));
            let now = now_ms();
            let (revision, created) = entry.history.set(definition, now);
            if !created {
                return Ok((revision, false));
            }
            let current = entry.history.current().expect("just set").clone();
            entry.active = Some(ActiveSchema {
                revision,
                definition: Arc::new(current.definition.clone()),
                validator,
            });
            let mut batch = self.batch();
            batch.schema_set(target, &current);
            ((revision, true), self.commit(batch, now))
        };
        self.durable(commit?).await?;
        Ok(outcome)
    }

    /// GetSchema.
    pub(crate) fn get_schema(&self, target: &SchemaTarget) -> Result<SchemaHistory, BrokerError> {
        let targets = self.inner.schemas.read();
        targets
            .get(target)
            .map(|e| e.history.clone())
            .ok_or_else(|| BrokerError::NotFound(format!("{target} has no schema")))
    }

    /// DeleteSchema: stops validation, keeps the history.
    pub(crate) async fn delete_schema(&self, target: &SchemaTarget) -> Result<u32, BrokerError> {
        self.wait_for_log_space().await?;
        let (deleted, commit) = {
            let _change = self.begin()?;
            let mut targets = self.inner.schemas.write();
            let entry = targets
                .get_mut(target)
                .filter(|e| e.history.current > 0)
                .ok_or_else(|| BrokerError::NotFound(format!("{target} has no schema")))?;
            let deleted = entry.history.clear();
            entry.active = None;
            let mut batch = self.batch();
            batch.schema_cleared(target);
            (deleted, self.commit(batch, now_ms()))
        };
        self.durable(commit?).await?;
        Ok(deleted)
    }

    /// The current revision of every target that has one.
    pub(crate) fn schema_revisions(&self) -> HashMap<SchemaTarget, u32> {
        let targets = self.inner.schemas.read();
        targets
            .iter()
            .filter(|(_, e)| e.history.current > 0)
            .map(|(t, e)| (t.clone(), e.history.current))
            .collect()
    }
}
