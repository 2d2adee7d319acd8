//! A test clock for [`QueueStore`](super::QueueStore): tests drive the scripts' time
//! themselves instead of waiting for Redis's `TIME`.
//!
//! A store built with [`QueueStore::with_clock`](super::QueueStore::with_clock) sends its
//! function calls through [`ClockConn`], which appends `"\0now=<ms>"` to every `FCALL`'s
//! arguments. `common.lua` takes that last argument off `ARGV` before the script reads it
//! and answers it from `now_ms()`. No other argument starts with a NUL byte (the last one
//! of a call is a number, a hex nonce, a queue name, a job id, or `''`/`=`-prefixed text),
//! and production builds never append one.

use redis::aio::ConnectionLike;
use redis::{Arg, Cmd, Pipeline, RedisFuture, Value};

use super::super::conn::RedisConn;

/// The marker `common.lua` looks for at the start of the last argument.
const MARKER: &str = "\0now=";

/// A connection that gives every script call the time `now` (ms).
pub(super) struct ClockConn {
    /// The store's connection.
    pub(super) inner: RedisConn,
    /// The time the scripts see.
    pub(super) now: u64,
}

impl ConnectionLike for ClockConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let is_script = matches!(cmd.args_iter().next(), Some(Arg::Simple(b"FCALL")));
        if !is_script {
            return self.inner.req_packed_command(cmd);
        }
        let mut timed = cmd.clone();
        timed.arg(format!("{MARKER}{}", self.now));
        Box::pin(async move { self.inner.req_packed_command(&timed).await })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}
