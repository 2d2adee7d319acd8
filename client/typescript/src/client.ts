import {
  credentials,
  Metadata,
  status,
  type CallOptions,
  type ChannelOptions,
  type ClientDuplexStream,
  type ClientReadableStream,
  type ClientUnaryCall,
  type ServiceError,
} from "@grpc/grpc-js";

import { SluiceError } from "./error.js";
import {
  AckRequest,
  BrokerClient,
  ConsumeRequest,
  EnqueueRequest,
  ExtendLeaseRequest,
  GetJobRequest,
  LeaseRequest,
  NackRequest,
  PublishRequest,
  StartPosition,
  SubscribeRequest,
  type ConsumeResponse,
  type Gap,
  type Job,
  type LeasedJob,
  type Message,
  type NackResponse,
  type SubscribeResponse,
} from "./gen/sluice/v1/sluice.js";

/** A payload: bytes as they are, or a string sent as UTF-8. */
export type Payload = Uint8Array | string;

/** How a {@link SluiceClient} reaches its broker. */
export interface SluiceClientOptions {
  /**
   * Bearer token sent as `authorization: Bearer <token>` on every call, for a broker
   * started with `--tokens-file`. Works over TLS and over plaintext (on loopback).
   */
  token?: string;
  /** PEM of the CA that signed the broker's certificate; the channel is TLS when set. */
  rootCertificates?: Buffer;
  /** Deadline of each unary call in ms (default 10,000); a long poll adds its wait to it. */
  timeoutMs?: number;
  /** gRPC channel options, e.g. `{ "grpc.lb_policy_name": "round_robin" }`. */
  channelOptions?: ChannelOptions;
}

/** Options of one job; every field may be left out. */
export interface JobOptions {
  /** Job type, which workers use to pick a handler. */
  kind?: string;
  /** Application headers (keys starting with `x-sluice-` are the broker's). */
  headers?: Record<string, string>;
  /** 0 (lowest, default) to 9 (highest). */
  priority?: number;
  /** Invisible for this long after enqueue (exclusive with `runAtUnixMs`). */
  delayMs?: number;
  /** Invisible until this time (exclusive with `delayMs`). */
  runAtUnixMs?: number;
  /** Deliveries before the job is dead-lettered (default: the queue's policy). */
  maxAttempts?: number;
  /** A repeat within the queue's dedup window returns the first job's id. */
  idempotencyKey?: string;
  /** Jobs with one ordering key run one at a time, in enqueue order. */
  orderingKey?: string;
}

/** Options of {@link SluiceClient.lease}. */
export interface LeaseOptions {
  /** At most this many jobs (default 1, maximum 1,000). */
  maxJobs?: number;
  /** Lease duration in ms (default: the queue's policy). */
  visibilityTimeoutMs?: number;
  /** Long poll: wait up to this many ms for a job when none is visible (default 0). */
  waitMs?: number;
  /** The worker's name, shown by ListConsumers and in `Job.consumer`. */
  consumer?: string;
}

/** Options of {@link SluiceClient.nack}. */
export interface NackOptions {
  /** Retry after this many ms instead of the queue's backoff. */
  retryDelayMs?: number;
  /** Dead-letter now, whatever attempts remain (a poison job). */
  deadLetter?: boolean;
}

/** Options of {@link SluiceClient.publish}. */
export interface PublishOptions {
  /** Application headers. */
  headers?: Record<string, string>;
  /** Application key (e.g. an entity id), delivered as is. */
  key?: string;
  /** A repeat within the topic's dedup window is not appended again. */
  idempotencyKey?: string;
}

/**
 * Where a subscription starts: `"latest"` (only what is published from now on, the
 * default), `"earliest"` (every retained message), `{ sequence }` (that sequence of every
 * matching topic, or its oldest retained message if later) or `{ timeUnixMs }`.
 */
export type StartFrom = "latest" | "earliest" | { sequence: bigint } | { timeUnixMs: number };

/** Options of {@link SluiceClient.subscribe}. */
export interface SubscribeOptions {
  /** Where to start (default `"latest"`). */
  from?: StartFrom;
  /**
   * Per-topic resume points (topic -> next sequence to deliver), overriding `from` for
   * those topics: a reconnecting subscriber passes its last sequence + 1.
   */
  resumeFrom?: Record<string, bigint>;
  /**
   * Called when messages were lost to retention before this subscriber read them; by
   * default a process warning names the topic and the sequences lost.
   */
  onGap?: (gap: Gap) => void;
}

/** Options of {@link SluiceClient.consume}. */
export interface ConsumeOptions {
  /** How many unsettled jobs the worker holds at most (default 10). */
  prefetch?: number;
  /** The worker's name, shown by ListConsumers and in `Job.consumer`. */
  consumer?: string;
  /** Lease duration in ms (default: the queue's policy). */
  visibilityTimeoutMs?: number;
  /**
   * Called when the broker refused an ack, nack or extension sent on the stream (a
   * stale lease: it expired, or the job was leased again); by default a process warning
   * says which lease and why. The refusal changed nothing.
   */
  onSettleError?: (leaseId: string, error: SluiceError) => void;
}

/** A grpc-js unary method with its (request, metadata, options, callback) overload. */
type Unary<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

/**
 * A connection to one Sluice broker (`host:port`), over the stubs generated from
 * `proto/`. Every method returns a promise; a refused call rejects with a
 * {@link SluiceError} carrying the gRPC status code and the broker's message.
 *
 * @example
 * ```ts
 * const sluice = new SluiceClient("127.0.0.1:50051");
 * const jobId = await sluice.enqueue("emails", '{"to":"a@example.com"}', { kind: "welcome" });
 * for (const job of await sluice.lease("emails", { maxJobs: 10, waitMs: 1000 })) {
 *   await sluice.ack(job.leaseId, "sent");
 * }
 * sluice.close();
 * ```
 */
export class SluiceClient {
  private readonly stub: BrokerClient;
  private readonly token: string | undefined;
  private readonly timeoutMs: number;

  /**
   * Opens a channel (lazily: the first call connects).
   *
   * @param target - the broker's `host:port`
   * @param options - token, TLS, deadline and channel options
   */
  constructor(target: string, options: SluiceClientOptions = {}) {
    const channel =
      options.rootCertificates === undefined
        ? credentials.createInsecure()
        : credentials.createSsl(options.rootCertificates);
    this.stub = new BrokerClient(target, channel, options.channelOptions);
    this.token = options.token;
    this.timeoutMs = options.timeoutMs ?? 10_000;
  }

  /** Closes the channel; calls still open on it end with `CANCELLED`. */
  close(): void {
    this.stub.close();
  }

  /**
   * Resolves once the channel is connected.
   *
   * @param timeoutMs - how long to wait (default: the client's deadline)
   * @throws Error when it is not connected in time
   */
  waitForReady(timeoutMs: number = this.timeoutMs): Promise<void> {
    return new Promise((resolve, reject) => {
      this.stub.waitForReady(Date.now() + timeoutMs, (error) => (error ? reject(error) : resolve()));
    });
  }

  // ---- work queues ----------------------------------------------------------------

  /**
   * Enqueues one job.
   *
   * @param queue - the queue's name (created with the default policy on first use)
   * @param payload - the job's body
   * @param options - kind, headers, priority, delay, attempts, idempotency and ordering keys
   * @returns the job's id (the first job's id when the idempotency key was seen)
   */
  async enqueue(queue: string, payload: Payload, options: JobOptions = {}): Promise<string> {
    const request = EnqueueRequest.fromPartial({
      queue,
      jobs: [
        {
          payload: bytes(payload),
          kind: options.kind,
          headers: options.headers,
          priority: options.priority,
          delayMs: optionalBigInt(options.delayMs),
          runAtUnixMs: optionalBigInt(options.runAtUnixMs),
          maxAttempts: options.maxAttempts,
          idempotencyKey: options.idempotencyKey,
          orderingKey: options.orderingKey,
        },
      ],
    });
    const response = await this.unary(this.stub.enqueue, request);
    return response.results[0].jobId;
  }

  /**
   * Leases up to `maxJobs` visible jobs, waiting up to `waitMs` when none is visible.
   *
   * @param queue - the queue's name
   * @param options - batch size, lease duration, long poll and worker name
   * @returns 0 to `maxJobs` jobs, each with the `leaseId` to settle it with
   */
  async lease(queue: string, options: LeaseOptions = {}): Promise<LeasedJob[]> {
    const request = LeaseRequest.fromPartial({
      queue,
      maxJobs: options.maxJobs,
      visibilityTimeoutMs: optionalBigInt(options.visibilityTimeoutMs),
      waitMs: optionalBigInt(options.waitMs),
      consumer: options.consumer,
    });
    const response = await this.unary(this.stub.lease, request, options.waitMs ?? 0);
    return response.jobs;
  }

  /**
   * Settles a delivery as done. Acking the same lease again is accepted and changes
   * nothing; a stale lease is `FAILED_PRECONDITION`, a malformed one `INVALID_ARGUMENT`.
   *
   * @param leaseId - the `leaseId` of the leased job
   * @param result - optional result, kept with the job in its history
   */
  async ack(leaseId: string, result?: Payload): Promise<void> {
    const request = AckRequest.fromPartial({ acks: [{ leaseId, result: optionalBytes(result) }] });
    await this.unary(this.stub.ack, request);
  }

  /**
   * Settles a delivery as failed: the job retries after its backoff, or is dead-lettered
   * when this was its last attempt or `deadLetter` is set.
   *
   * @param leaseId - the `leaseId` of the leased job
   * @param error - why it failed (kept as the job's last error)
   * @param options - a retry delay of its own, or dead-letter now
   * @returns what became of the job (`state`) and when it is visible again
   */
  nack(leaseId: string, error: string, options: NackOptions = {}): Promise<NackResponse> {
    const request = NackRequest.fromPartial({
      leaseId,
      error,
      retryDelayMs: optionalBigInt(options.retryDelayMs),
      deadLetter: options.deadLetter,
    });
    return this.unary(this.stub.nack, request);
  }

  /**
   * Moves a live lease's deadline to now + `visibilityTimeoutMs`.
   *
   * @returns the new deadline, unix ms
   */
  async extendLease(leaseId: string, visibilityTimeoutMs: number): Promise<bigint> {
    const request = ExtendLeaseRequest.fromPartial({
      leaseId,
      visibilityTimeoutMs: BigInt(visibilityTimeoutMs),
    });
    const response = await this.unary(this.stub.extendLease, request);
    return response.leaseDeadlineUnixMs;
  }

  /**
   * A job's state, attempts, times, last error and result (`NOT_FOUND` once it left the
   * queue's history).
   */
  getJob(jobId: string): Promise<Job> {
    return this.unary(this.stub.getJob, GetJobRequest.fromPartial({ id: jobId }));
  }

  /**
   * Opens a Consume stream: the broker pushes leased jobs while the worker holds fewer
   * than `prefetch` unsettled ones, and acks and nacks go back on the same stream. Iterate
   * the result; breaking out of the loop (or awaiting {@link Consumer.close}) ends the
   * stream once the settlements sent are applied, and the broker releases the jobs still
   * held at once, each as a failed attempt.
   *
   * @param queue - the queue's name
   * @param options - prefetch, worker name, lease duration, what to do with refused settlements
   */
  consume(queue: string, options: ConsumeOptions = {}): Consumer {
    const call = this.stub.consume(this.metadata(), {});
    return new Consumer(call, queue, options, this.timeoutMs);
  }

  // ---- topics ---------------------------------------------------------------------

  /**
   * Publishes one message.
   *
   * @param topic - the topic's name (created with default retention on first use)
   * @param payload - the message's body
   * @param options - headers, key, idempotency key
   * @returns the message's sequence number in its topic (the first is 1)
   */
  async publish(topic: string, payload: Payload, options: PublishOptions = {}): Promise<bigint> {
    const request = PublishRequest.fromPartial({
      topic,
      messages: [
        {
          payload: bytes(payload),
          headers: options.headers,
          key: options.key,
          idempotencyKey: options.idempotencyKey,
        },
      ],
    });
    const response = await this.unary(this.stub.publish, request);
    return response.results[0].sequence;
  }

  /**
   * Subscribes to every topic matching `pattern` (`*` one token, `>` the rest). Resolves
   * once the broker has registered the subscription, so a message published after that
   * is delivered; rejects with the broker's status when it refuses (e.g. a bad pattern,
   * or a token without `subscribe`).
   *
   * @param pattern - a topic name or a pattern
   * @param options - where to start (replay), per-topic resume points, gap handler
   */
  subscribe(pattern: string, options: SubscribeOptions = {}): Promise<Subscription> {
    const request = SubscribeRequest.fromPartial({
      pattern,
      resumeFrom: options.resumeFrom,
      ...start(options.from),
    });
    const call = this.stub.subscribe(request, this.metadata(), {});
    return new Promise((resolve, reject) => {
      // The broker sends its response headers once the subscription is registered; a
      // refusal comes instead as a status without headers.
      const onError = (error: unknown) => reject(SluiceError.from(error));
      call.once("error", onError);
      call.once("metadata", () => {
        call.off("error", onError);
        resolve(new Subscription(call, options.onGap ?? warnGap));
      });
    });
  }

  // ---- plumbing ---------------------------------------------------------------------

  /** Metadata of one call: the bearer token, when there is one. */
  private metadata(): Metadata {
    const metadata = new Metadata();
    if (this.token !== undefined) {
      metadata.set("authorization", `Bearer ${this.token}`);
    }
    return metadata;
  }

  /** Runs one unary call under the client's deadline (plus `extraMs`), as a promise. */
  private unary<Req, Res>(method: Unary<Req, Res>, request: Req, extraMs = 0): Promise<Res> {
    const deadline = Date.now() + this.timeoutMs + extraMs;
    return new Promise((resolve, reject) => {
      method.call(this.stub, request, this.metadata(), { deadline }, (error, response) =>
        error ? reject(SluiceError.from(error)) : resolve(response),
      );
    });
  }
}

/**
 * An open subscription: `for await` it for messages, in sequence order per topic. It ends
 * when the broker shuts down, or when the loop breaks or {@link Subscription.close} is
 * called; any other end rejects with a {@link SluiceError}.
 */
export class Subscription implements AsyncIterable<Message> {
  private closed = false;

  /** @internal made by {@link SluiceClient.subscribe} */
  constructor(
    private readonly call: ClientReadableStream<SubscribeResponse>,
    private readonly onGap: (gap: Gap) => void,
  ) {
    // The iterator sees the stream's errors; this keeps the CANCELLED that close()
    // brings about from being an unhandled 'error' event when nobody iterates.
    call.on("error", () => {});
  }

  /** Ends the subscription (idempotent). */
  close(): void {
    this.closed = true;
    this.call.cancel();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Message> {
    try {
      for await (const batch of this.call as AsyncIterable<SubscribeResponse>) {
        // Gaps happened before the messages of their batch.
        batch.gaps.forEach(this.onGap);
        yield* batch.messages;
      }
    } catch (error) {
      if (!(this.closed && isCancelled(error))) {
        throw SluiceError.from(error);
      }
    } finally {
      this.close();
    }
  }
}

/**
 * An open Consume stream (see {@link SluiceClient.consume}): `for await` it for jobs and
 * settle each with {@link Consumer.ack} or {@link Consumer.nack}; each settlement lets
 * the broker push one more job.
 */
export class Consumer implements AsyncIterable<LeasedJob> {
  private closing: Promise<void> | undefined;
  /** Settles when the broker's status arrives, whichever way the stream ended. */
  private readonly ended: Promise<void>;
  private readonly onSettleError: (leaseId: string, error: SluiceError) => void;

  /** @internal made by {@link SluiceClient.consume} */
  constructor(
    private readonly call: ClientDuplexStream<ConsumeRequest, ConsumeResponse>,
    queue: string,
    options: ConsumeOptions,
    private readonly closeTimeoutMs: number,
  ) {
    this.onSettleError = options.onSettleError ?? warnSettleError;
    this.ended = new Promise((resolve) => call.once("status", () => resolve()));
    // The iterator sees the stream's errors; this keeps one that comes while nobody
    // iterates (after close) from being an unhandled 'error' event.
    call.on("error", () => {});
    call.write(
      ConsumeRequest.fromPartial({
        queue,
        consumer: options.consumer,
        visibilityTimeoutMs: optionalBigInt(options.visibilityTimeoutMs),
        credits: options.prefetch ?? 10,
      }),
    );
  }

  /**
   * Acks a job received on this stream (a refusal goes to `onSettleError`).
   *
   * @param leaseId - the job's `leaseId`
   * @param result - optional result, kept with the job in its history
   * @throws SluiceError (`CANCELLED`) once the consumer is closing
   */
  ack(leaseId: string, result?: Payload): void {
    this.settle({ acks: [{ leaseId, result: optionalBytes(result) }], credits: 1 });
  }

  /**
   * Nacks a job received on this stream: it retries after its backoff (or `retryDelayMs`),
   * or is dead-lettered when out of attempts or with `deadLetter`.
   *
   * @throws SluiceError (`CANCELLED`) once the consumer is closing
   */
  nack(leaseId: string, error: string, options: NackOptions = {}): void {
    const nack = {
      leaseId,
      error,
      retryDelayMs: optionalBigInt(options.retryDelayMs),
      deadLetter: options.deadLetter,
    };
    this.settle({ nacks: [nack], credits: 1 });
  }

  /** Moves a held job's lease deadline to now + `visibilityTimeoutMs`. */
  extendLease(leaseId: string, visibilityTimeoutMs: number): void {
    this.settle({ extends: [{ leaseId, visibilityTimeoutMs: BigInt(visibilityTimeoutMs) }] });
  }

  /**
   * Asks the broker to push no more jobs while the stream stays open for the
   * settlements of the jobs still held (a worker draining before it exits).
   */
  stop(): void {
    this.settle({ stop: true });
  }

  /**
   * Ends the stream (idempotent; breaking out of a `for await` loop calls it). The
   * settlements sent before are applied first: the client stops the pushes, closes its
   * side and waits for the broker to end the stream (cancelling it after the client's
   * deadline). Jobs received and not settled, and any pushed meanwhile, are released by
   * the broker at once, each counted as a failed attempt.
   */
  close(): Promise<void> {
    this.closing ??= this.finish();
    return this.closing;
  }

  async *[Symbol.asyncIterator](): AsyncIterator<LeasedJob> {
    // Not destroyed when the loop breaks: close() still needs the stream to end it.
    const responses = this.call.iterator({ destroyOnReturn: false }) as AsyncIterable<ConsumeResponse>;
    try {
      for await (const response of responses) {
        for (const refused of response.errors) {
          this.onSettleError(refused.leaseId, new SluiceError(refused.code, refused.message));
        }
        yield* response.jobs;
      }
    } catch (error) {
      if (!(this.closing !== undefined && isCancelled(error))) {
        throw SluiceError.from(error);
      }
    } finally {
      await this.close();
    }
  }

  private async finish(): Promise<void> {
    if (this.call.writable) {
      this.call.write(ConsumeRequest.fromPartial({ stop: true }));
      this.call.end();
    }
    // Reads (and drops) what is still coming, so the broker's status can arrive.
    this.call.resume();
    const timer = setTimeout(() => this.call.cancel(), this.closeTimeoutMs);
    try {
      await this.ended;
    } finally {
      clearTimeout(timer);
    }
  }

  private settle(request: Parameters<typeof ConsumeRequest.fromPartial>[0]): void {
    if (this.closing !== undefined) {
      throw new SluiceError(status.CANCELLED, "the consume stream is closed: settle with SluiceClient.ack or nack");
    }
    this.call.write(ConsumeRequest.fromPartial(request));
  }
}

/** The request fields that say where a subscription starts. */
function start(from: StartFrom = "latest"): Partial<SubscribeRequest> {
  if (from === "latest") return { start: StartPosition.START_POSITION_LATEST };
  if (from === "earliest") return { start: StartPosition.START_POSITION_EARLIEST };
  if ("sequence" in from) return { start: StartPosition.START_POSITION_SEQUENCE, startSequence: from.sequence };
  return { start: StartPosition.START_POSITION_TIME, startTimeUnixMs: BigInt(from.timeUnixMs) };
}

function bytes(payload: Payload): Buffer {
  return typeof payload === "string" ? Buffer.from(payload, "utf8") : Buffer.from(payload);
}

function optionalBytes(payload: Payload | undefined): Buffer | undefined {
  return payload === undefined ? undefined : bytes(payload);
}

function optionalBigInt(ms: number | undefined): bigint | undefined {
  return ms === undefined ? undefined : BigInt(ms);
}

function isCancelled(error: unknown): boolean {
  return (error as Partial<ServiceError>).code === status.CANCELLED;
}

function warnGap(gap: Gap): void {
  process.emitWarning(
    `sluice: topic ${gap.topic}: messages ${gap.firstMissing} to ${gap.nextAvailable - 1n} were lost to retention before this subscriber read them`,
  );
}

function warnSettleError(leaseId: string, error: SluiceError): void {
  process.emitWarning(`sluice: the broker refused a settlement of lease ${leaseId}: ${error.message}`);
}
