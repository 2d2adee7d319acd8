// BullMQ side of scenario S6 of the Sluice compare bench (benches/compare/s6.rs starts it).
//
//   node bench.js <throughput|cost|latency> --redis redis://127.0.0.1:6390
//                 [--cluster] [--batch 100] [--wait 0] [--warmup-ms 200] [--window-ms 700]
//                 [--jobs 5000] [--rate 5000]
//
// Same shape as S2: 2 producers (each its own connection, 4 add loops in flight), 4
// workers (each its own connection), 256 B payloads, every job completed ("acked") and
// removed. "Batch" is `addBulk` of that many jobs for producers and the worker's
// `concurrency` (jobs it holds at once, like Sluice's Lease max_jobs); BullMQ (open
// source) has no batched fetch or batched completion, so each job still moves on its own.
// `--wait N` sends `WAIT N 1000` on the producer's connection after each add (BullMQ has no
// such option): the adds are then confirmed on N replicas, worker completions are not.
//
// Protocol with the harness: prints {"ready":true} once connected, waits for a line on
// stdin, runs, prints one JSON result line, then closes everything and exits. The harness
// reads INFO commandstats between "ready" and the result.

'use strict';

const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');
const readline = require('readline');

function parseArgs(argv) {
  const out = { mode: argv[0] };
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) continue;
    const k = a.slice(2);
    const next = argv[i + 1];
    if (next === undefined || next.startsWith('--')) {
      out[k] = true;
    } else {
      out[k] = next;
      i++;
    }
  }
  return out;
}

const args = parseArgs(process.argv.slice(2));
const batch = Number(args.batch || 1);
const wait = Number(args.wait || 0);
const warmupMs = Number(args['warmup-ms'] || 200);
const windowMs = Number(args['window-ms'] || 700);
const urls = String(args.redis || 'redis://127.0.0.1:6379').split(',');
const QUEUE = `s6-${process.pid}-${Date.now() % 1000000}`;
// One hash tag for every key of the queue, so a Redis Cluster keeps them in one slot.
const PREFIX = '{s6}';

function nowUs() {
  return Number(process.hrtime.bigint() / 1000n);
}

/// A new connection (BullMQ requires maxRetriesPerRequest null for workers).
function connection() {
  const opts = { maxRetriesPerRequest: null, enableReadyCheck: true };
  if (args.cluster) {
    const nodes = urls.map((u) => {
      const x = new URL(u);
      return { host: x.hostname, port: Number(x.port) };
    });
    return new IORedis.Cluster(nodes, { redisOptions: opts });
  }
  return new IORedis(urls[0], opts);
}

/// `WAIT n 1000` on the connection `queue` adds with: the ioredis instance given to the
/// Queue, which BullMQ uses as it is (cluster: the primary of the queue's slot, the
/// connection its adds travelled on).
async function waitReplicas(queue) {
  if (wait <= 0) return;
  const client = queue.s6Connection;
  if (client.isCluster) {
    const slot = require('cluster-key-slot')(PREFIX);
    const owner = client.slots[slot] && client.slots[slot][0];
    const node = client.nodes('master').find((n) => `${n.options.host}:${n.options.port}` === owner);
    if (!node) throw new Error(`no connection to the primary of slot ${slot}`);
    await node.call('WAIT', wait, 1000);
  } else {
    await client.call('WAIT', wait, 1000);
  }
}

function body(stampUs) {
  // 256 B of payload: the stamp plus filler (JSON-encoded by BullMQ).
  return { t: stampUs, p: 'x'.repeat(256 - 24) };
}

const state = { acked: 0, enqueued: 0, errors: 0, stop: false, samples: [], measureFromUs: Infinity };
// Closed-loop producers pause while this many jobs wait unacked (the harness applies the
// same bound to Sluice): without it they saturate Redis and starve the workers, and the
// figure would measure the backlog's growth instead of the acked rate.
const MAX_BACKLOG = Number(args['max-backlog'] || 20000);
const conns = [];

async function startWorkers(concurrency, onJob) {
  const workers = [];
  for (let w = 0; w < 4; w++) {
    const c = connection();
    conns.push(c);
    const worker = new Worker(QUEUE, async (job) => onJob(job), {
      connection: c,
      prefix: PREFIX,
      concurrency,
      removeOnComplete: { count: 0 },
      removeOnFail: { count: 0 },
      // Workers poll for stalled jobs as in production; its cost is part of BullMQ's.
    });
    worker.on('completed', () => {
      state.acked++;
    });
    worker.on('failed', () => {
      state.errors++;
    });
    worker.on('error', () => {
      state.errors++;
    });
    workers.push(worker);
  }
  await Promise.all(workers.map((w) => w.waitUntilReady()));
  return workers;
}

async function producers() {
  const qs = [];
  for (let p = 0; p < 2; p++) {
    const c = connection();
    conns.push(c);
    const q = new Queue(QUEUE, { connection: c, prefix: PREFIX });
    await q.waitUntilReady();
    q.s6Connection = c;
    qs.push(q);
  }
  return qs;
}

async function add(q, n, stampUs) {
  if (n === 1) {
    await q.add('j', body(stampUs), { removeOnComplete: true, removeOnFail: true });
  } else {
    const jobs = [];
    for (let i = 0; i < n; i++) {
      jobs.push({ name: 'j', data: body(stampUs), opts: { removeOnComplete: true, removeOnFail: true } });
    }
    await q.addBulk(jobs);
  }
  await waitReplicas(q);
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

async function ready() {
  process.stdout.write(JSON.stringify({ ready: true }) + '\n');
  const rl = readline.createInterface({ input: process.stdin });
  await new Promise((resolve) => rl.once('line', resolve));
  rl.close();
}

async function throughput() {
  const qs = await producers();
  const workers = await startWorkers(batch, async () => {});
  await ready();
  const loops = [];
  for (const q of qs) {
    for (let i = 0; i < 4; i++) {
      loops.push(
        (async () => {
          while (!state.stop) {
            if (state.enqueued - state.acked > MAX_BACKLOG) {
              await sleep(1);
              continue;
            }
            try {
              await add(q, batch, 0);
              state.enqueued += batch;
            } catch (e) {
              state.errors++;
              await sleep(1);
            }
          }
        })()
      );
    }
  }
  await sleep(warmupMs);
  const a0 = state.acked;
  const t0 = nowUs();
  await sleep(windowMs);
  const a1 = state.acked;
  const elapsedUs = nowUs() - t0;
  state.stop = true;
  await Promise.all(loops);
  return { qs, workers, result: { acked: a1 - a0, elapsed_ms: elapsedUs / 1000, per_s: Math.round(((a1 - a0) * 1e6) / elapsedUs), errors: state.errors } };
}

async function cost() {
  const jobs = Number(args.jobs || 5000);
  const qs = await producers();
  const workers = await startWorkers(batch, async () => {});
  await ready();
  let next = 0;
  const t0 = nowUs();
  const loops = [];
  for (const q of qs) {
    for (let i = 0; i < 4; i++) {
      loops.push(
        (async () => {
          for (;;) {
            const start = next;
            next += batch;
            if (start >= jobs) return;
            await add(q, Math.min(batch, jobs - start), 0);
          }
        })()
      );
    }
  }
  await Promise.all(loops);
  const deadline = Date.now() + 60000;
  while (state.acked < jobs && Date.now() < deadline) await sleep(2);
  const elapsedUs = nowUs() - t0;
  return { qs, workers, result: { acked: state.acked, jobs, elapsed_ms: elapsedUs / 1000, errors: state.errors } };
}

function quantile(sorted, q) {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
}

async function latency() {
  const rate = Number(args.rate || 5000);
  const qs = await producers();
  const workers = await startWorkers(batch, async (job) => {
    const t = job.data.t;
    if (t >= state.measureFromUs) state.samples.push(Math.max(1, nowUs() - t));
  });
  await ready();
  const intervalUs = 1e6 / rate;
  const total = Math.floor((rate * (warmupMs + windowMs)) / 1000);
  const warm = Math.floor((rate * warmupMs) / 1000);
  const start = nowUs() + 1000;
  state.measureFromUs = start + warm * intervalUs;
  let seq = 0;
  let failed = 0;
  const pending = [];
  const lags = [];
  // Open loop: every job is stamped with the time it was due, not the time it was sent,
  // so a stalled broker is charged for the whole delay (coordinated omission).
  while (seq < total) {
    const now = nowUs();
    while (seq < total && start + seq * intervalUs <= now) {
      const intended = Math.round(start + seq * intervalUs);
      if (seq >= warm) lags.push(now - intended);
      const q = qs[seq % qs.length];
      pending.push(add(q, 1, intended).catch(() => failed++));
      seq++;
    }
    await new Promise((r) => setImmediate(r));
  }
  await Promise.race([Promise.all(pending), sleep(2000)]);
  await sleep(300);
  const s = state.samples.slice().sort((a, b) => a - b);
  lags.sort((a, b) => a - b);
  return {
    qs,
    workers,
    result: {
      sent: total - warm,
      failed,
      samples: s.length,
      p50_us: quantile(s, 0.5),
      p99_us: quantile(s, 0.99),
      p999_us: quantile(s, 0.999),
      max_us: s.length ? s[s.length - 1] : 0,
      lag_p99_us: quantile(lags, 0.99),
      errors: state.errors,
    },
  };
}

async function main() {
  const run = { throughput, cost, latency }[args.mode];
  if (!run) throw new Error(`unknown mode ${args.mode}`);
  const { qs, workers, result } = await run();
  process.stdout.write(JSON.stringify(result) + '\n');
  // Remove the queue's keys, then close.
  try {
    await Promise.all(workers.map((w) => w.close(true)));
    await qs[0].obliterate({ force: true });
  } catch (e) {
    // Best effort: the harness's Redis is private and dropped after the run.
  }
  await Promise.all(qs.map((q) => q.close()));
  for (const c of conns) c.disconnect();
  process.exit(0);
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ error: String((e && e.message) || e) }) + '\n');
  process.exit(1);
});
