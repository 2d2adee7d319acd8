//! Request/reply on top of topics (SPEC section 4): [`Client::request`] and the responder
//! helpers [`Client::reply`] and [`Client::respond_json`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use crate::client::codec::{CONTENT_TYPE, Codec, Json};
use crate::client::error::{ClientError, Result};
use crate::client::subscribe::Delivery;
use crate::client::{Client, Message};
use crate::pb;

/// Header naming the topic a reply goes to.
pub const REPLY_TO: &str = "reply_to";
/// Header pairing a reply with its request.
pub const CORRELATION_ID: &str = "correlation_id";
/// Header of an error reply, with the responder's error text.
pub const ERROR_HEADER: &str = "reply_error";

impl Client {
    /// Publishes `payload` to `topic` as a request and waits up to `timeout` for the reply.
    /// Fails with [`ClientError::Timeout`] when no reply comes in time and
    /// [`ClientError::Remote`] when the responder answered with an error.
    ///
    /// The requester subscribes to a private inbox topic `_inbox.<uuid>`, publishes the
    /// request with headers [`REPLY_TO`] (the inbox) and [`CORRELATION_ID`], and waits for
    /// the reply carrying the same correlation id. A responder publishes its answer to the
    /// `reply_to` topic with the correlation id copied ([`Client::reply`] does that); an
    /// error answer carries the [`ERROR_HEADER`] header with the error text and an empty
    /// payload.
    ///
    /// Every request uses its own inbox, deleted once the call ends, so concurrent requests
    /// never see each other's replies and no inbox outlives its call (a reply arriving
    /// after the timeout re-creates the inbox topic, which then ages out with the default
    /// retention).
    pub async fn request(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Delivery<Bytes>> {
        self.request_message(topic, Message::new(payload), timeout)
            .await
    }

    /// Sends `value` as a JSON request and decodes the JSON reply as `Resp`.
    pub async fn request_json<Req, Resp>(
        &self,
        topic: &str,
        value: &Req,
        timeout: Duration,
    ) -> Result<Resp>
    where
        Req: serde::Serialize + serde::de::DeserializeOwned,
        Resp: serde::Serialize + serde::de::DeserializeOwned,
    {
        let message = Message::new(Codec::<Req>::encode(&Json, value)?)
            .header(CONTENT_TYPE, Codec::<Req>::content_type(&Json));
        let reply = self.request_message(topic, message, timeout).await?;
        Json.decode(
            &reply.value,
            &format!("reply {}#{}", reply.topic, reply.sequence),
        )
    }

    /// Sends a prepared message (its own headers and key are kept) as a request.
    pub async fn request_message(
        &self,
        topic: &str,
        message: Message,
        timeout: Duration,
    ) -> Result<Delivery<Bytes>> {
        let correlation = uuid::Uuid::new_v4().simple().to_string();
        let inbox = format!("_inbox.{correlation}");
        // Subscribing first (the call returns once the broker registered it) means a reply
        // published right after the request cannot be missed.
        let mut replies = self.subscribe(&inbox).reconnect(false).raw().await?;
        let message = message
            .header(REPLY_TO, inbox.clone())
            .header(CORRELATION_ID, correlation.clone());
        let outcome = match self.publish_message(topic, message).await {
            Err(e) => Err(e),
            Ok(_) => tokio::time::timeout(timeout, async {
                while let Some(item) = replies.next().await {
                    let reply = item?;
                    if reply.headers.get(CORRELATION_ID) == Some(&correlation) {
                        return Ok(reply);
                    }
                }
                Err(ClientError::Status(tonic::Status::unavailable(format!(
                    "the subscription to inbox {inbox:?} ended before a reply arrived"
                ))))
            })
            .await
            .unwrap_or(Err(ClientError::Timeout(timeout))),
        };
        drop(replies);
        // Best effort: the inbox exists only if something replied; NOT_FOUND is expected.
        let _ = self
            .rpc()
            .delete_topic(pb::DeleteTopicRequest { name: inbox })
            .await;
        let reply = outcome?;
        if let Some(message) = reply.headers.get(ERROR_HEADER) {
            return Err(ClientError::Remote {
                topic: topic.to_owned(),
                message: message.clone(),
            });
        }
        Ok(reply)
    }

    /// Replies `payload` to a request received on a subscription.
    pub async fn reply<T>(&self, request: &Delivery<T>, payload: impl Into<Bytes>) -> Result<u64> {
        self.reply_message(request, Message::new(payload)).await
    }

    /// Replies `value` as JSON to a request.
    pub async fn reply_json<T, R>(&self, request: &Delivery<T>, value: &R) -> Result<u64>
    where
        R: serde::Serialize + serde::de::DeserializeOwned,
    {
        let message = Message::new(Codec::<R>::encode(&Json, value)?)
            .header(CONTENT_TYPE, Codec::<R>::content_type(&Json));
        self.reply_message(request, message).await
    }

    /// Replies with an error; the requester's call fails with [`ClientError::Remote`].
    pub async fn reply_error<T>(
        &self,
        request: &Delivery<T>,
        error: impl Into<String>,
    ) -> Result<u64> {
        self.reply_message(
            request,
            Message::new(Bytes::new()).header(ERROR_HEADER, error),
        )
        .await
    }

    async fn reply_message<T>(&self, request: &Delivery<T>, message: Message) -> Result<u64> {
        let Some(reply_to) = request.headers.get(REPLY_TO) else {
            return Err(ClientError::NoReplyTo {
                topic: request.topic.clone(),
                sequence: request.sequence,
                header: REPLY_TO,
            });
        };
        let mut message = message;
        if let Some(id) = request.headers.get(CORRELATION_ID) {
            message = message.header(CORRELATION_ID, id.clone());
        }
        self.publish_message(reply_to, message).await
    }

    /// Answers JSON requests published to topics matching `pattern` with `handler` until
    /// `shutdown` resolves. Each request runs in its own task; `Err(text)` from the handler,
    /// and a request payload that does not decode as `Req`, are sent back as error replies.
    /// Messages without a `reply_to` header are skipped. Returns once the subscription is
    /// closed by `shutdown`, or with the error that ended it.
    pub async fn respond_json<Req, Resp, F, Fut>(
        &self,
        pattern: &str,
        handler: F,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()>
    where
        Req: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
        Resp: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
        F: Fn(Delivery<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Resp, String>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        // Raw, not `.json()`: an undecodable request still has headers to reply to.
        let mut requests = self.subscribe(pattern).raw().await?;
        tokio::pin!(shutdown);
        loop {
            let item = tokio::select! {
                item = requests.next() => item,
                () = &mut shutdown => return Ok(()),
            };
            let request = match item {
                None => return Ok(()),
                Some(Err(ClientError::Gap { .. })) => continue,
                Some(Err(e)) => return Err(e),
                Some(Ok(request)) => request,
            };
            if !request.headers.contains_key(REPLY_TO) {
                continue;
            }
            let client = self.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let context = format!("request {}#{}", request.topic, request.sequence);
                let decoded: Result<Req> = Json.decode(&request.value, &context);
                let sent = match decoded {
                    Err(e) => client.reply_error(&request, e.to_string()).await,
                    Ok(value) => {
                        let typed = Delivery {
                            value,
                            topic: request.topic.clone(),
                            sequence: request.sequence,
                            key: request.key.clone(),
                            headers: request.headers.clone(),
                            publish_time_unix_ms: request.publish_time_unix_ms,
                        };
                        match handler(typed).await {
                            Ok(resp) => client.reply_json(&request, &resp).await,
                            Err(text) => client.reply_error(&request, text).await,
                        }
                    }
                };
                if let Err(e) = sent {
                    tracing::warn!(topic = %request.topic, sequence = request.sequence, error = %e, "cannot send reply");
                }
            });
        }
    }
}
