// End-to-end test of the TypeScript client against real brokers, the flows of the Python
// client's test (tests/e2e/test_python_client.py). tests/e2e/test_typescript_client.py
// starts the brokers and runs this file with node's test runner:
//   SLUICE_TARGET          a broker without authentication
//   SLUICE_SECURED_TARGET  a broker with a tokens file and a TLS certificate, where
//   SLUICE_TOKEN           may enqueue on "ts.jobs" and do nothing else;
//   SLUICE_CA_FILE         the PEM of the CA that signed the broker's certificate.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, describe, test } from "node:test";

import { JobState, SluiceClient, SluiceError, status, type LeasedJob, type Message } from "sluice-client";

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run this file through tests/e2e/test_typescript_client.py`);
  return value;
}

/** Runs `call`, which must be refused with `code`; returns the error for more checks. */
async function refused(call: () => Promise<unknown>, code: status): Promise<SluiceError> {
  try {
    await call();
  } catch (error) {
    assert.ok(error instanceof SluiceError, `expected a SluiceError, got ${String(error)}`);
    assert.equal(error.codeName, status[code], error.message);
    return error;
  }
  assert.fail(`expected ${status[code]}, the call succeeded`);
}

/** Takes the first `n` items of an async iterable (breaking out of it closes it). */
async function take<T>(items: AsyncIterable<T>, n: number): Promise<T[]> {
  const taken: T[] = [];
  for await (const item of items) {
    taken.push(item);
    if (taken.length === n) break;
  }
  return taken;
}

describe("a broker without authentication", () => {
  const sluice = new SluiceClient(env("SLUICE_TARGET"));
  // Names of this run's queues and topics, so a run against a used broker starts afresh.
  const run = `ts${Date.now().toString(36)}`;
  after(() => sluice.close());

  test("enqueue, lease, ack, and a refused ack's status", async () => {
    const jobId = await sluice.enqueue(`${run}.emails`, JSON.stringify({ to: "a@example.com" }), {
      kind: "welcome",
      priority: 3,
      headers: { lang: "ts" },
    });
    const jobs = await sluice.lease(`${run}.emails`, { maxJobs: 5, waitMs: 1000, consumer: "ts-worker" });
    assert.deepEqual(
      jobs.map((j) => j.jobId),
      [jobId],
    );
    const [job] = jobs;
    assert.equal(job.kind, "welcome");
    assert.equal(job.priority, 3);
    assert.equal(job.attempt, 1);
    assert.deepEqual(job.headers, { lang: "ts" });
    assert.deepEqual(JSON.parse(job.payload.toString("utf8")), { to: "a@example.com" });
    await sluice.ack(job.leaseId, "sent");

    const done = await sluice.getJob(jobId);
    assert.equal(done.state, JobState.JOB_STATE_COMPLETED);
    assert.equal(done.result.toString(), "sent");
    assert.equal(done.consumer, "ts-worker");
    // A second ack of the same lease is accepted; an ack of a made-up lease is refused.
    await sluice.ack(job.leaseId);
    const error = await refused(() => sluice.ack("not-a-lease"), status.INVALID_ARGUMENT);
    assert.match(error.details, /acks\[0\]\.lease_id: "not-a-lease"/);
    assert.equal(error.code, status.INVALID_ARGUMENT);
    // A refused enqueue names the field, the limit and the value, and stores nothing.
    const priority = await refused(() => sluice.enqueue(`${run}.emails`, "x", { priority: 10 }), status.INVALID_ARGUMENT);
    assert.match(priority.details, /jobs\[0\]\.priority/);
    assert.match(priority.details, /10/);
    assert.deepEqual(await sluice.lease(`${run}.emails`, { maxJobs: 10 }), []);
  });

  test("nack with deadLetter moves a poison job to the dead-letter queue", async () => {
    const jobId = await sluice.enqueue(`${run}.poison`, "{}", { kind: "bad" });
    const [job] = await sluice.lease(`${run}.poison`, { waitMs: 1000 });
    const outcome = await sluice.nack(job.leaseId, "field x: not parseable", { deadLetter: true });
    assert.equal(outcome.state, JobState.JOB_STATE_DEAD);
    const dead = await sluice.getJob(jobId);
    assert.equal(dead.state, JobState.JOB_STATE_DEAD);
    assert.equal(dead.deadLetterQueue, `${run}.poison.dlq`);
    assert.equal(dead.lastError, "field x: not parseable");
  });

  test("Consume pushes jobs while credits last and takes acks on the stream", async () => {
    const ids = [];
    for (let i = 0; i < 6; i++) {
      ids.push(await sluice.enqueue(`${run}.stream`, `job-${i}`));
    }
    const consumer = sluice.consume(`${run}.stream`, { prefetch: 2, consumer: "ts-consumer" });
    const received: LeasedJob[] = [];
    let held = 0;
    let mostHeld = 0;
    for await (const job of consumer) {
      received.push(job);
      held += 1;
      mostHeld = Math.max(mostHeld, held);
      // Settle every second job, so the stream has to respect the credit of 2.
      if (received.length % 2 === 0) {
        for (const j of received.slice(-2)) consumer.ack(j.leaseId, `done ${j.payload.toString()}`);
        held = 0;
      }
      if (received.length === ids.length) break;
    }
    assert.equal(mostHeld, 2);
    assert.deepEqual(
      received.map((j) => j.payload.toString()),
      ids.map((_, i) => `job-${i}`),
    );
    // The acks went over the stream before it closed.
    for (const [i, id] of ids.entries()) {
      const job = await sluice.getJob(id);
      assert.equal(job.state, JobState.JOB_STATE_COMPLETED, `job ${i}`);
      assert.equal(job.result.toString(), `done job-${i}`);
      assert.equal(job.consumer, "ts-consumer");
    }
  });

  test("Consume: a stale settlement is reported, a job held at close comes back", async () => {
    const jobId = await sluice.enqueue(`${run}.stale`, "once");
    const refusals: [string, SluiceError][] = [];
    const consumer = sluice.consume(`${run}.stale`, {
      prefetch: 1,
      onSettleError: (leaseId, error) => {
        refusals.push([leaseId, error]);
        // Ends the loop below once the broker has ended the stream.
        void consumer.close();
      },
    });
    const deliveries: LeasedJob[] = [];
    for await (const job of consumer) {
      deliveries.push(job);
      if (deliveries.length === 1) {
        // Retry at once: the broker pushes the job again under a new lease...
        consumer.nack(job.leaseId, "try again", { retryDelayMs: 1 });
      } else if (deliveries.length === 2) {
        // ...so the first lease is stale: the broker refuses its ack on the stream.
        consumer.ack(deliveries[0].leaseId);
      }
    }
    assert.equal(deliveries[1].jobId, jobId);
    assert.equal(deliveries[1].attempt, 2);
    assert.equal(refusals.length, 1);
    const [leaseId, error] = refusals[0];
    assert.equal(leaseId, deliveries[0].leaseId);
    assert.equal(error.code, status.FAILED_PRECONDITION);
    // The second delivery was never settled: closing the stream released it at once.
    const [again] = await sluice.lease(`${run}.stale`, { waitMs: 5000 });
    assert.equal(again.jobId, jobId);
    assert.equal(again.attempt, 3);
    await sluice.ack(again.leaseId);
  });

  test("publish and subscribe, then replay from the start and from a sequence", async () => {
    const subscription = await sluice.subscribe(`${run}.orders.*`);
    const sequences = [];
    for (let i = 0; i < 3; i++) {
      sequences.push(
        await sluice.publish(`${run}.orders.created`, JSON.stringify({ id: i }), { headers: { n: String(i) }, key: `o${i}` }),
      );
    }
    assert.deepEqual(sequences, [1n, 2n, 3n]);
    const received = await take(subscription, 3);
    assert.deepEqual(
      received.map((m) => [m.topic, m.sequence, m.key, m.headers.n]),
      [
        [`${run}.orders.created`, 1n, "o0", "0"],
        [`${run}.orders.created`, 2n, "o1", "1"],
        [`${run}.orders.created`, 3n, "o2", "2"],
      ],
    );
    assert.deepEqual(
      received.map((m) => JSON.parse(m.payload.toString()).id),
      [0, 1, 2],
    );

    // Replay from the retained log: everything, then from sequence 2 on.
    const earliest = await take(await sluice.subscribe(`${run}.orders.created`, { from: "earliest" }), 3);
    assert.deepEqual(
      earliest.map((m: Message) => m.sequence),
      [1n, 2n, 3n],
    );
    const fromTwo = await take(await sluice.subscribe(`${run}.orders.>`, { from: { sequence: 2n } }), 2);
    assert.deepEqual(
      fromTwo.map((m) => m.sequence),
      [2n, 3n],
    );
    // resumeFrom overrides the start per topic.
    const resumed = await sluice.subscribe(`${run}.orders.created`, { resumeFrom: { [`${run}.orders.created`]: 3n } });
    assert.deepEqual(
      (await take(resumed, 1)).map((m) => m.sequence),
      [3n],
    );
  });

  test("a refused subscription rejects with the broker's status", async () => {
    const error = await refused(() => sluice.subscribe(`${run}..orders`), status.INVALID_ARGUMENT);
    assert.match(error.details, new RegExp(`pattern: "${run}\\.\\.orders"`));
  });
});

describe("a broker with bearer tokens, over TLS", () => {
  const target = env("SLUICE_SECURED_TARGET");
  const rootCertificates = readFileSync(env("SLUICE_CA_FILE"));
  const anonymous = new SluiceClient(target, { rootCertificates });
  const producer = new SluiceClient(target, { rootCertificates, token: env("SLUICE_TOKEN") });
  after(() => {
    anonymous.close();
    producer.close();
  });

  test("no token is UNAUTHENTICATED", async () => {
    await refused(() => anonymous.enqueue("ts.jobs", "x"), status.UNAUTHENTICATED);
  });

  test("a token is served within its grant and refused outside it", async () => {
    const jobId = await producer.enqueue("ts.jobs", "x");
    assert.match(jobId, /^[0-9a-f-]{36}$/);
    const publish = await refused(() => producer.publish("ts.events", "x"), status.PERMISSION_DENIED);
    assert.match(publish.details, /ts-producer/);
    assert.match(publish.details, /publish/);
    const subscribe = await refused(() => producer.subscribe("ts.>"), status.PERMISSION_DENIED);
    assert.match(subscribe.details, /subscribe/);
    const consume = await refused(() => producer.lease("ts.jobs"), status.PERMISSION_DENIED);
    assert.match(consume.details, /consume/);
    // A stream the broker refuses ends its loop with the status.
    const stream = await refused(() => take(producer.consume("ts.jobs"), 1), status.PERMISSION_DENIED);
    assert.match(stream.details, /consume/);
  });
});
