//! Raw-RPC shorthands of the tests: the refusal check, and the calls and read-backs
//! (Stats, ListJobs, GetJob, Lease, Ack) that tests make only to set up a case or to check
//! what a call did or did not change.

use std::fmt::Debug;

use bytes::Bytes;
use sluice::client::Rpc;
use sluice::pb;
use tonic::Code;

/// Asserts `status` has `code` and a message containing every one of `needles`.
pub fn assert_status(status: tonic::Status, code: Code, needles: &[&str]) {
    assert_eq!(status.code(), code, "{status:?}");
    for n in needles {
        assert!(
            status.message().contains(n),
            "{:?} lacks {n:?}",
            status.message()
        );
    }
}

/// Asserts `result` is a refusal with `code` and a message containing every one of
/// `needles`.
pub fn assert_refused<T: Debug>(result: Result<T, tonic::Status>, code: Code, needles: &[&str]) {
    assert_status(result.expect_err("expected a refusal"), code, needles);
}

/// Stats of every queue and topic the caller may see.
pub async fn stats(rpc: &mut Rpc) -> pb::StatsResponse {
    rpc.stats(pb::StatsRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// The stats of queue `name` in `stats`.
pub fn queue_stats<'a>(stats: &'a pb::StatsResponse, name: &str) -> &'a pb::QueueStats {
    stats
        .queues
        .iter()
        .find(|q| q.name == name)
        .unwrap_or_else(|| panic!("no stats for queue {name}"))
}

/// The stats of topic `name` in `stats`.
pub fn topic_stats<'a>(stats: &'a pb::StatsResponse, name: &str) -> &'a pb::TopicStats {
    stats
        .topics
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no stats for topic {name}"))
}

/// The live jobs of `queue` (the first page of ListJobs).
pub async fn list_jobs(rpc: &mut Rpc, queue: &str) -> Vec<pb::Job> {
    rpc.list_jobs(pb::ListJobsRequest {
        queue: queue.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .jobs
}

/// Job `id`, looked up in `queue` ("" for any queue).
pub async fn get_job(rpc: &mut Rpc, id: &str, queue: &str) -> pb::Job {
    rpc.get_job(pb::GetJobRequest {
        id: id.into(),
        queue: queue.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Leases up to `max_jobs` jobs of `queue` as `consumer`, without waiting.
pub async fn lease(
    rpc: &mut Rpc,
    queue: &str,
    consumer: &str,
    max_jobs: u32,
) -> Vec<pb::LeasedJob> {
    rpc.lease(pb::LeaseRequest {
        queue: queue.into(),
        max_jobs,
        consumer: consumer.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .jobs
}

/// Acks `jobs`, with no result.
pub async fn ack(rpc: &mut Rpc, jobs: &[pb::LeasedJob]) {
    let acks = jobs
        .iter()
        .map(|j| pb::LeaseAck {
            lease_id: j.lease_id.clone(),
            result: Bytes::new(),
        })
        .collect();
    rpc.ack(pb::AckRequest { acks }).await.unwrap();
}

/// Creates topic `name`, retaining its last `max_messages` messages.
pub async fn create_topic_keeping(rpc: &mut Rpc, name: &str, max_messages: u64) -> pb::TopicInfo {
    rpc.create_topic(pb::CreateTopicRequest {
        name: name.into(),
        retention: Some(pb::RetentionPolicy {
            max_messages,
            ..Default::default()
        }),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Every queue, as ListQueues answers (read through gRPC, so any engine).
pub async fn list_queues(rpc: &mut Rpc) -> Vec<pb::QueueInfo> {
    rpc.list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap()
        .into_inner()
        .queues
}

/// The client side of an open raw Consume stream (the stream half-closes when it is
/// dropped) and its server side.
pub type ConsumeStream = (
    tokio::sync::mpsc::Sender<pb::ConsumeRequest>,
    tonic::Streaming<pb::ConsumeResponse>,
);

/// Opens a raw Consume stream whose first request is `first`: the call's own outcome (a
/// refusal comes back as the call's status, before any job).
pub async fn open_consume(
    rpc: &mut Rpc,
    first: pb::ConsumeRequest,
) -> Result<ConsumeStream, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.expect("the receiver is held below");
    let response = rpc
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    Ok((tx, response.into_inner()))
}

/// [`open_consume`] of `queue` with `credits`, every other field at its default.
pub async fn consume_with_credits(rpc: &mut Rpc, queue: &str, credits: u32) -> ConsumeStream {
    let first = pb::ConsumeRequest {
        queue: queue.into(),
        credits,
        ..Default::default()
    };
    open_consume(rpc, first).await.unwrap()
}
