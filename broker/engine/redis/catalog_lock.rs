//! The lock every node takes to create a queue, so `--max-queues` holds across nodes and
//! concurrent requests: counting the queues in use and creating one are two steps (the
//! catalog and the queue live in different slots, so no one script sees both), and
//! without it every creator that counted before the others created would pass.
//!
//! It is a Redis key in the catalog's slot, set with `NX` and an expiry (`SET key token NX
//! PX`), freed by its holder only (a script compares the token). A node that dies holding
//! it holds up creation for [`HELD_FOR`] at most. Within a node an async mutex queues the
//! creators first, so they do not all poll Redis for the key. Creating queues is rare (a
//! first use, CreateQueue, a new dead-letter queue); nothing on the path of a job takes it.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use tokio::time::Instant;
use uuid::Uuid;

use crate::broker::domain::error::BrokerError;

use super::RedisEngine;
use super::conn::unavailable;
use super::keys::catalog;

/// How long the key lives unless freed: far longer than counting the queues and creating
/// one take, short enough that a dead holder is soon forgotten.
const HELD_FOR: Duration = Duration::from_secs(5);

/// How long a creator waits for the key before its request is UNAVAILABLE: a holder that
/// died is forgotten by then.
const WAIT_AT_MOST: Duration = Duration::from_secs(6);

/// How often a creator asks for the key while another node holds it.
const RETRY_EVERY: Duration = Duration::from_millis(5);

/// Frees the key if this holder still holds it (an expired key may be another's by now).
static FREE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
         return redis.call('DEL', KEYS[1]) end return 0",
    )
});

impl RedisEngine {
    /// Runs `work` (which may count the queues and create some) holding the catalog lock,
    /// and frees the lock after, whatever `work` answered.
    pub(super) async fn creating_queues<T>(
        &self,
        work: impl Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        let _this_node = self.inner.creating.lock().await;
        let key = catalog("create-lock");
        let token = Uuid::new_v4().to_string();
        let give_up = Instant::now() + WAIT_AT_MOST;
        let mut conn = self.inner.conn.clone();
        loop {
            let taken: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(HELD_FOR.as_millis() as u64)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable("locking the queue catalog to create a queue", e))?;
            if taken.is_some() {
                break;
            }
            if Instant::now() >= give_up {
                return Err(BrokerError::Unavailable(format!(
                    "redis: another node has held the queue catalog's lock ({key}) for over \
                     {} s, so no queue could be created; nothing changed: retry",
                    WAIT_AT_MOST.as_secs()
                )));
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
        let result = work.await;
        let freed: Result<i64, _> = FREE.key(&key).arg(&token).invoke_async(&mut conn).await;
        if let Err(e) = freed {
            // It expires by itself; creation elsewhere waits for that meanwhile.
            tracing::warn!(error = %e, "could not free the queue catalog's lock");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::engine::redis::RedisConfig;
    use crate::broker::testing::redis::RedisServer;

    /// Holders on two nodes never overlap, and a lock whose holder died (its key left
    /// behind) is taken once it expires.
    #[tokio::test]
    async fn one_creator_at_a_time_across_nodes_and_a_dead_holder_expires() {
        let server = RedisServer::start();
        let a = RedisEngine::connect(RedisConfig::new(vec![server.url()]))
            .await
            .unwrap();
        let b = RedisEngine::connect(RedisConfig::new(vec![server.url()]))
            .await
            .unwrap();
        let inside = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..8 {
            let engine = if i % 2 == 0 { a.clone() } else { b.clone() };
            let inside = inside.clone();
            tasks.push(tokio::spawn(async move {
                engine
                    .creating_queues(async {
                        let now = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        Ok::<usize, BrokerError>(now)
                    })
                    .await
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap().unwrap(), 0, "alone inside");
        }

        // A holder that died: its key stays until it expires.
        let mut conn = a.inner.conn.clone();
        let () = redis::cmd("SET")
            .arg(catalog("create-lock"))
            .arg("dead-node")
            .arg("PX")
            .arg(300)
            .query_async(&mut conn)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let ran = b.creating_queues(async { Ok(()) }).await;
        assert!(ran.is_ok(), "{ran:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        a.shutdown();
        b.shutdown();
    }
}
