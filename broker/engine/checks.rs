//! The checks of a request that do not depend on where state lives: batch sizes, names,
//! entry limits, lease and job ids, durations. Both engines run them first, so a request
//! either engine refuses is refused with the same words and changes nothing.

use bytes::Bytes;
use uuid::Uuid;

use crate::broker::auth::{Access, Action};
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::{Limits, MAX_RETRY_DELAY_MS, check_duration_ms, checked};
use crate::broker::domain::names::{closest_name, validate_name};
use crate::broker::domain::queue::{LeaseId, LeaseIdError, MAX_VISIBILITY_MS, NewJob};
use crate::broker::domain::topic::NewMessage;

/// Refuses a request for more than `--max-batch` items: `n` of them, in `field`.
pub(crate) fn batch(limits: &Limits, field: &str, n: usize, unit: &str) -> Result<(), BrokerError> {
    let max = limits.max_batch;
    if n > max {
        return Err(BrokerError::over_limit(field, n as u64, max as u64, unit));
    }
    Ok(())
}

/// Checks a lease duration: 1 ms to 12 h.
pub(crate) fn visibility(field: &str, ms: u64) -> Result<(), BrokerError> {
    if ms == 0 {
        return Err(BrokerError::invalid(field, "must be at least 1 ms"));
    }
    check_duration_ms(field, ms, MAX_VISIBILITY_MS)
}

/// Checks a nack's error text and explicit retry delay; `prefix` starts the field paths
/// (`"nacks."` on a consume stream).
pub(crate) fn nack(
    limits: &Limits,
    prefix: &str,
    error: &str,
    retry_delay_ms: Option<u64>,
) -> Result<(), BrokerError> {
    // Field paths are formatted only for a refusal: a stream nacks per job.
    let field = |name: &str| format!("{prefix}{name}");
    checked(field, "error", |f| limits.check_error_text(f, error))?;
    if let Some(d) = retry_delay_ms {
        checked(field, "retry_delay_ms", |f| {
            check_duration_ms(f, d, MAX_RETRY_DELAY_MS)
        })?;
    }
    Ok(())
}

/// The error for a malformed lease id in `field`.
pub(crate) fn bad_lease_id(field: &str, lease_id: &str, why: LeaseIdError) -> BrokerError {
    BrokerError::invalid(
        field,
        format!(
            "{lease_id:?} is not a lease id: {why} (expected <queue>/<seq>/<nonce> as returned by Lease)"
        ),
    )
}

/// Parses the lease id in `field` and refuses it unless `access` may consume from its
/// queue. A malformed id is refused as such, whatever the access.
pub(crate) fn authorized_lease(
    access: &Access,
    field: &str,
    lease_id: &str,
) -> Result<LeaseId, BrokerError> {
    let lease = lease_id
        .parse::<LeaseId>()
        .map_err(|why| bad_lease_id(field, lease_id, why))?;
    access.check(Action::Consume, field, &lease.queue)?;
    Ok(lease)
}

/// Parses a job id.
pub(crate) fn job_id(field: &str, id: &str) -> Result<Uuid, BrokerError> {
    Uuid::parse_str(id)
        .map_err(|e| BrokerError::invalid(field, format!("{id:?} is not a job id: {e}")))
}

/// Parses a Redrive's job ids (`job_ids[i]`); their count is checked first, with
/// [`batch`].
pub(crate) fn job_ids(ids: &[String]) -> Result<Vec<Uuid>, BrokerError> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| job_id(&format!("job_ids[{i}]"), id))
        .collect()
}

/// Parses a ListJobs page token (empty: the first page).
pub(crate) fn page_token(page_token: &str) -> Result<u64, BrokerError> {
    if page_token.is_empty() {
        return Ok(0);
    }
    page_token.parse().map_err(|_| {
        BrokerError::invalid(
            "page_token",
            format!("{page_token:?} is not a page token from ListJobs"),
        )
    })
}

/// Checks an Enqueue: the batch size, then each job's conversion (the first that failed
/// refuses the request), then the queue name and each job's limits.
pub(crate) fn enqueue(
    limits: &Limits,
    queue: &str,
    jobs: impl ExactSizeIterator<Item = Result<NewJob, BrokerError>>,
) -> Result<Vec<NewJob>, BrokerError> {
    limits.check_batch("jobs", jobs.len())?;
    // A fresh vector, not `collect`: collecting in place would reuse the request's
    // allocation and then shrink it to fit the smaller `NewJob`s, copying them all.
    let mut converted = Vec::with_capacity(jobs.len());
    for job in jobs {
        converted.push(job?);
    }
    validate_name("queue", queue)?;
    for (i, job) in converted.iter().enumerate() {
        limits.check_entry(
            |name| format!("jobs[{i}].{name}"),
            job.payload.len(),
            &job.headers,
            &[
                ("kind", Some(job.kind.as_str())),
                ("idempotency_key", job.idempotency_key.as_deref()),
                ("ordering_key", job.ordering_key.as_deref()),
            ],
        )?;
    }
    Ok(converted)
}

/// Checks a Publish: the batch size, the topic name and each message's limits.
pub(crate) fn publish(
    limits: &Limits,
    topic: &str,
    messages: &[NewMessage],
) -> Result<(), BrokerError> {
    limits.check_batch("messages", messages.len())?;
    validate_name("topic", topic)?;
    for (i, m) in messages.iter().enumerate() {
        limits.check_entry(
            |name| format!("messages[{i}].{name}"),
            m.payload.len(),
            &m.headers,
            &[
                ("key", Some(m.key.as_str())),
                ("idempotency_key", m.idempotency_key.as_deref()),
            ],
        )?;
    }
    Ok(())
}

/// Checks an Ack and parses its lease ids, each once. Refusals come in this order: the
/// batch size; a lease of a queue `access` may not consume from; the first malformed
/// lease id or oversized result.
pub(crate) fn acks(
    limits: &Limits,
    access: &Access,
    acks: Vec<(String, Option<Bytes>)>,
) -> Result<Vec<(LeaseId, Option<Bytes>)>, BrokerError> {
    limits.check_batch("acks", acks.len())?;
    let mut parsed = Vec::with_capacity(acks.len());
    // The first malformed id or oversized result, refused once every permission is
    // known to hold.
    let mut invalid = None;
    for (i, (lease_id, result)) in acks.into_iter().enumerate() {
        // Field paths are formatted only for a refusal: this loop runs per ack.
        let field = |name: &str| format!("acks[{i}].{name}");
        let lease = match lease_id.parse::<LeaseId>() {
            Ok(lease) => lease,
            Err(why) => {
                invalid.get_or_insert_with(|| bad_lease_id(&field("lease_id"), &lease_id, why));
                continue;
            }
        };
        access.check(Action::Consume, "acks.lease_id", &lease.queue)?;
        if let Some(r) = &result
            && invalid.is_none()
            && let Err(e) = checked(field, "result", |f| limits.check_payload(f, r.len()))
        {
            invalid = Some(e);
        }
        parsed.push((lease, result));
    }
    match invalid {
        Some(e) => Err(e),
        None => Ok(parsed),
    }
}

/// The refusal of an all-or-nothing ack batch with stale leases (their reasons, at most
/// ten shown).
pub(crate) fn stale_acks(stale: &[String], total: usize) -> BrokerError {
    let shown: Vec<&str> = stale.iter().take(10).map(String::as_str).collect();
    BrokerError::FailedPrecondition(format!(
        "{} of {} leases are stale, nothing was acked: {}",
        stale.len(),
        total,
        shown.join("; ")
    ))
}

/// The refusal of a queue past `--max-queues`: creating `what` (for `field`) would pass
/// `max` with `in_use` queues counted.
pub(crate) fn too_many_queues(max: usize, field: &str, what: String, in_use: usize) -> BrokerError {
    BrokerError::ResourceExhausted(format!(
        "{field}: cannot create {what}: the broker holds the maximum of {max} queues ({in_use} in use, dead-letter queues named by policies included)"
    ))
}

/// Refuses a queue whose policy dead-letters into a name that is not a valid queue name
/// (a default `<name>.dlq` past the name limit).
pub(crate) fn dead_letter_name(field: &str, name: &str, dlq: &str) -> Result<(), BrokerError> {
    if dlq.is_empty() {
        return Ok(());
    }
    validate_name("dead_letter_queue", dlq).map_err(|e| {
        BrokerError::invalid(
            field,
            format!(
                "queue {name:?} would dead-letter into {dlq:?}, which is not a valid queue name ({e}); use a shorter name or set policy.dead_letter_queue"
            ),
        )
    })
}

/// What a Lease or Consume gets for queue `name` that neither exists nor is named by a
/// policy as its dead-letter queue (see the README, "Queues"): with `--strict-queues`,
/// NOT_FOUND; otherwise the engine creates it, flagged `created_by_consumer`, and logs
/// [`created_by_consumer`]. Returns the existing name `name` is most likely a typo of.
pub(crate) fn consumer_names_unknown_queue<'a>(
    limits: &Limits,
    field: &str,
    name: &str,
    existing: impl IntoIterator<Item = &'a str>,
) -> Result<Option<String>, BrokerError> {
    let closest = closest_name(name, existing).map(str::to_owned);
    if limits.strict_queues {
        let hint = did_you_mean(closest.as_deref());
        return Err(BrokerError::NotFound(format!(
            "{field}: queue {name:?} does not exist{hint}; the broker runs with --strict-queues, so Lease and Consume do not create queues: create it with CreateQueue, or enqueue to it, first"
        )));
    }
    Ok(closest)
}

/// Logs, once, by the node that created it, that a Lease or Consume created queue `name`
/// (`closest`: the existing name it is most likely a typo of).
pub(crate) fn created_by_consumer(name: &str, closest: Option<&str>) {
    let hint = did_you_mean(closest);
    tracing::warn!(
        queue = name,
        did_you_mean = closest,
        "a Lease or Consume created queue {name:?}, which nothing enqueues to and no policy or binding names{hint}. A worker with a typo in its queue name waits here forever; Stats shows the queue as created_by_consumer until something enqueues to it or sets its policy"
    );
}

/// ` (did you mean "<closest>"?)`, or nothing.
fn did_you_mean(closest: Option<&str>) -> String {
    closest
        .map(|c| format!(" (did you mean {c:?}?)"))
        .unwrap_or_default()
}
