//! The queue scripts as one Redis Functions library, loaded once per primary, called with
//! `FCALL`.
//!
//! Every queue operation shares the steps of `common.lua` (key names, the meta table, the
//! lease and history steps, about fifty functions). Sent as `EVAL` scripts, each call ran
//! that prelude again, making its closures before doing any work: about 10 µs per call,
//! a tenth of what Redis spends on a job at batch 1 (see BENCHMARKS.md, "The queue as a
//! Redis Functions library"). As a library the prelude runs once, when Redis loads it; a call
//! only sets the call's state (`begin` in common.lua) and runs the operation's own body.
//!
//! Each body file becomes `local function q_<name>(KEYS, ARGV)` (parameters with the
//! names the scripts were written against), registered as `<prefix><name>`. The prefix
//! carries a hash of the whole library, so nodes of different builds sharing a Redis each
//! call their own code instead of replacing each other's. A primary that does not have the
//! library (a new server, a `FUNCTION FLUSH`, a primary added to the cluster) answers
//! "Function not found"; the call then loads it (`FUNCTION LOAD REPLACE`, sent to every
//! primary of a cluster) and is sent once more. Replicas get the library through
//! replication, so a promoted replica has it.

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{Cmd, FromRedisValue, RedisResult, Script, ToRedisArgs};

use super::COMMON;
use crate::broker::engine::redis::keys::slot_guard;

/// A body and whether it only reads (registered `no-writes`, so it still runs when Redis is
/// out of memory, as a read-only `EVAL` did).
struct Body {
    name: &'static str,
    source: &'static str,
    read_only: bool,
}

macro_rules! body {
    ($name:literal) => {
        body!($name, false)
    };
    ($name:literal, read_only) => {
        body!($name, true)
    };
    ($name:literal, $read_only:literal) => {
        Body {
            name: $name,
            source: include_str!(concat!($name, ".lua")),
            read_only: $read_only,
        }
    };
}

/// Every queue operation. A body that calls another (ack-and-lease, the schedule fire)
/// comes after it: Lua sees only the locals declared above.
const BODIES: &[Body] = &[
    body!("define"),
    body!("set_paused"),
    body!("delete"),
    body!("purge"),
    body!("enqueue"),
    body!("lease"),
    body!("ack"),
    body!("nack"),
    body!("release"),
    body!("unlease"),
    body!("extend"),
    body!("get", read_only),
    body!("cancel"),
    body!("delete_job"),
    body!("list", read_only),
    body!("history", read_only),
    body!("sweep"),
    body!("dead_letters", read_only),
    body!("dead_letters_done"),
    body!("insert_dead_letter"),
    body!("counts", read_only),
    body!("next_due", read_only),
    body!("waiting"),
    body!("bind_sync"),
    body!("bind_pump"),
    body!("redrive_targets", read_only),
    body!("redrive_claim"),
    body!("redrive_take"),
    body!("redrive_done"),
    body!("redrive_forget"),
    body!("redrive_put"),
    body!("schedule_put"),
    body!("schedule_fire"),
    body!("ack_lease"),
];

/// What bodies that run other bodies call them by (after `q_ack`, `q_lease` and
/// `q_enqueue` are declared, before the bodies using them).
const GLUE: &str = "\
-- ack-and-lease: ack.lua, then lease.lua, on the call's key with their own arguments.
local function ack_part(argv)
  return q_ack(CALL_KEYS, argv)
end
local function lease_part(argv)
  return q_lease(CALL_KEYS, argv)
end
-- The schedule fire: enqueue.lua on the fire's own arguments, one request.
local function enqueue_job()
  return q_enqueue(CALL_KEYS, CALL_ARGV)
end
";

/// Stands for the prefix while the code is hashed.
const PLACEHOLDER: &str = "@PREFIX@";

/// The library: its code (ready for `FUNCTION LOAD`) and its functions' name prefix.
struct Library {
    code: String,
    prefix: String,
}

static LIBRARY: LazyLock<Library> = LazyLock::new(build);

fn build() -> Library {
    let mut code = String::with_capacity(64 * 1024);
    code.push_str(COMMON);
    code.push('\n');
    let mut glued = false;
    for body in BODIES {
        // Both come after `q_ack`, `q_lease` and `q_enqueue`: the glue goes before the
        // first of them.
        if matches!(body.name, "schedule_fire" | "ack_lease") && !glued {
            code.push_str(GLUE);
            glued = true;
        }
        code.push_str(&format!(
            "local function q_{}(KEYS, ARGV)\n{}\nend\n",
            body.name, body.source
        ));
    }
    for body in BODIES {
        let flags = if body.read_only {
            ", flags = { 'no-writes' }"
        } else {
            ""
        };
        // enqueue.lua, called for itself, takes each merged request's job count after the
        // revision; run by the schedule fire, it does not (`MERGED_COUNTS`).
        let merged = if body.name == "enqueue" {
            " MERGED_COUNTS = true"
        } else {
            ""
        };
        code.push_str(&format!(
            "redis.register_function{{ function_name = '{PLACEHOLDER}{name}', \
             callback = function(keys, args) begin(keys, args){merged} \
             return q_{name}(keys, args) end{flags} }}\n",
            name = body.name
        ));
    }
    // Named after its code: a changed library is a new one.
    let hash = Script::new(&code).get_hash().to_owned();
    let prefix = format!("sluice_q_{}_", &hash[..12]);
    let code = format!(
        "#!lua name=sluice_q_{}\n{}",
        &hash[..12],
        code.replace(PLACEHOLDER, &prefix)
    );
    Library { code, prefix }
}

/// One `FCALL` of a queue function on one queue's key prefix, arguments added with
/// [`Call::arg`].
pub(crate) struct Call {
    cmd: Cmd,
}

impl Call {
    /// A call of the body `name` (a file of this folder, without `.lua`) on the queue
    /// whose keys start with `key` (with its [`slot_guard`], so it never runs while the
    /// queue's slot migrates).
    pub(crate) fn new(name: &str, key: &str) -> Call {
        debug_assert!(
            BODIES.iter().any(|b| b.name == name),
            "no queue function {name}"
        );
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(format!("{}{name}", LIBRARY.prefix))
            .arg(2)
            .arg(key)
            .arg(slot_guard(key));
        Call { cmd }
    }

    /// Adds an argument (`ARGV[n]` of the body).
    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Call {
        self.cmd.arg(arg);
        self
    }

    /// Sends the call; a primary without the library gets it, and the call again.
    pub(crate) async fn invoke<T: FromRedisValue, C: ConnectionLike>(
        &self,
        conn: &mut C,
    ) -> RedisResult<T> {
        match self.cmd.query_async(conn).await {
            Err(e) if missing(&e) => {
                load(conn).await?;
                self.cmd.query_async(conn).await
            }
            reply => reply,
        }
    }
}

/// Whether Redis refused a call because it does not have the function.
fn missing(e: &redis::RedisError) -> bool {
    e.code() == Some("ERR") && e.detail().is_some_and(|d| d.contains("Function not found"))
}

/// Loads the library (every primary of a cluster: the client routes `FUNCTION LOAD` to
/// all of them).
async fn load<C: ConnectionLike>(conn: &mut C) -> RedisResult<()> {
    let _: redis::Value = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&LIBRARY.code)
        .query_async(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_body_is_registered_under_the_versioned_prefix() {
        let lib = &*LIBRARY;
        assert!(lib.code.starts_with("#!lua name=sluice_q_"));
        assert!(!lib.code.contains(PLACEHOLDER));
        for body in BODIES {
            assert!(
                lib.code
                    .contains(&format!("function_name = '{}{}'", lib.prefix, body.name)),
                "{} not registered",
                body.name
            );
        }
    }
}
