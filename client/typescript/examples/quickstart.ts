import { jobStateToJSON, SluiceClient, SluiceError } from "sluice-client";

async function main(target: string): Promise<void> {
  // SLUICE_TOKEN: the bearer token, for a broker started with --tokens-file.
  const sluice = new SluiceClient(target, { token: process.env.SLUICE_TOKEN });
  try {
    // Work queue: enqueue; a worker consumes over one stream and acks on it.
    const jobId = await sluice.enqueue("ts.demo", '{"to": "ann@example.com"}', { kind: "welcome" });
    const worker = sluice.consume("ts.demo", { prefetch: 10, consumer: "ts-example" });
    for await (const job of worker) {
      console.log(`leased ${job.jobId} kind=${job.kind} attempt=${job.attempt} payload=${job.payload}`);
      worker.ack(job.leaseId, "sent");
      if (job.jobId === jobId) break; // ends the stream once the acks sent are applied
    }
    const job = await sluice.getJob(jobId);
    console.log(`job ${jobId} is ${jobStateToJSON(job.state)} with result ${job.result}`);

    // Topics: subscribe (registered once the promise resolves), then publish.
    const subscription = await sluice.subscribe("ts.events.>");
    const sequence = await sluice.publish("ts.events.hello", "hi from TypeScript", { headers: { lang: "ts" } });
    for await (const message of subscription) {
      console.log(`received ${message.topic}#${message.sequence} ${message.payload} (published as #${sequence})`);
      break; // ends the subscription
    }
    // Replay what the topic retains, from sequence 1 on.
    for await (const message of await sluice.subscribe("ts.events.hello", { from: { sequence: 1n } })) {
      console.log(`replayed ${message.topic}#${message.sequence}`);
      break;
    }

    // A refused call rejects with a SluiceError: the gRPC status and the broker's message.
    try {
      await sluice.enqueue("ts.demo", "{}", { priority: 10 });
    } catch (e) {
      if (!(e instanceof SluiceError)) throw e;
      console.log(`refused: ${e.codeName}: ${e.details}`);
    }
  } finally {
    sluice.close();
  }
}

main(process.argv[2] ?? "127.0.0.1:50051").catch((e) => {
  console.error(e);
  process.exit(1);
});
