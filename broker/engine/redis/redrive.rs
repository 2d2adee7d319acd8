//! Redrive and topic bindings on the Redis engine: the glue between the request (its
//! checks, access and `--max-queues`) and the scripts of `queue::redrive` and `binding`.

use std::collections::HashMap;

use crate::broker::auth::{Access, Action};
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::{MAX_QUEUE_DEPTH, MAX_REDRIVE_RATE, check_count};
use crate::broker::domain::names::{Pattern, validate_name};
use crate::broker::domain::queue::QueuePolicy;
use crate::broker::engine::{RedriveOutcome, checks};

use super::RedisEngine;
use super::binding::pump_bindings;

impl RedisEngine {
    /// Returns dead letters to the queues they came from, as the in-process engine does:
    /// the ids are checked, then access to every queue a letter would return to and room
    /// for those queues, before anything moves.
    pub(super) async fn redrive_dead_letters(
        &self,
        dead_letter_queue: &str,
        ids: &[String],
        rate_per_second: u32,
        max_jobs: u64,
        access: &Access,
    ) -> Result<RedriveOutcome, BrokerError> {
        checks::batch(&self.inner.config.limits, "job_ids", ids.len(), "ids")?;
        let uuids = checks::job_ids(ids)?;
        let field = if uuids.is_empty() {
            "dead_letter_queue"
        } else {
            "job_ids"
        };
        let queues = &self.inner.queues;
        let targets = queues
            .redrive_targets(dead_letter_queue, &uuids, max_jobs)
            .await?;
        for target in &targets {
            access.check_any(&[Action::Enqueue, Action::Admin], field, target)?;
        }
        check_count("rate_per_second", rate_per_second.into(), MAX_REDRIVE_RATE)?;
        check_count("max_jobs", max_jobs, MAX_QUEUE_DEPTH)?;
        // Counted and made under the catalog lock, as any queue creation is, so
        // concurrent redrives cannot pass --max-queues between them. The redrive itself
        // (which may run for long at its rate) goes after; its targets exist by then.
        self.creating_queues(async {
            self.check_redrive_room(field, targets.iter()).await?;
            for target in &targets {
                queues
                    .ensure(target, &QueuePolicy::default_for(target), false)
                    .await?;
            }
            Ok(())
        })
        .await?;
        let report = queues
            .redrive(
                dead_letter_queue,
                &uuids,
                rate_per_second,
                max_jobs,
                &targets,
            )
            .await?;
        for origin in report.by_origin.keys() {
            self.queue_durable(origin).await?;
        }
        Ok(report.into_outcome())
    }

    /// Copies what was published to the topics queue `queue`'s bindings match into it
    /// (each message once, whichever node pumps), and remembers the bindings so that a
    /// publish on this node pumps them at once.
    pub(super) async fn pump(&self, queue: &str, bindings: &[String]) -> Result<u64, BrokerError> {
        let patterns = bindings
            .iter()
            .map(|b| Pattern::parse("policy.topic_bindings", b))
            .collect::<Result<Vec<_>, _>>()?;
        {
            let mut cache = crate::broker::sync::lock(&self.inner.bindings);
            if patterns.is_empty() {
                cache.remove(queue);
            } else {
                cache.insert(queue.to_owned(), patterns.clone());
            }
        }
        pump_bindings(&self.inner.queues, &self.inner.topics, queue, &patterns).await
    }

    /// Pumps, after a publish to `topic` on this node, every queue bound to it, so its
    /// jobs are there when the publish is answered. A binding this node has not seen yet
    /// is pumped by the sweep.
    pub(super) async fn pump_published(&self, topic: &str) -> Result<(), BrokerError> {
        validate_name("topic", topic)?;
        let bound: Vec<(String, Vec<Pattern>)> = crate::broker::sync::lock(&self.inner.bindings)
            .iter()
            .filter(|(_, patterns)| patterns.iter().any(|p| p.matches(topic)))
            .map(|(q, p)| (q.clone(), p.clone()))
            .collect();
        for (queue, patterns) in bound {
            match pump_bindings(&self.inner.queues, &self.inner.topics, &queue, &patterns).await {
                Ok(_) | Err(BrokerError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The bindings of every queue, read from Redis (the sweep refreshes the cache).
    pub(super) async fn refresh_bindings(&self) -> Result<(), BrokerError> {
        let mut fresh = HashMap::new();
        for name in self.inner.queues.names().await? {
            if let Some((policy, _)) = self.inner.queues.info(&name).await?
                && !policy.topic_bindings.is_empty()
            {
                fresh.insert(name, policy.topic_bindings);
            }
        }
        let mut patterns = HashMap::new();
        for (queue, bindings) in fresh {
            let parsed = bindings
                .iter()
                .filter_map(|b| Pattern::parse("policy.topic_bindings", b).ok())
                .collect::<Vec<_>>();
            patterns.insert(queue, parsed);
        }
        *crate::broker::sync::lock(&self.inner.bindings) = patterns;
        Ok(())
    }
}
