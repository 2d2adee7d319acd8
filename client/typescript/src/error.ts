import { Metadata, status, type ServiceError } from "@grpc/grpc-js";

/**
 * A call the broker refused, or one that failed on the way: the gRPC status code (e.g.
 * `status.INVALID_ARGUMENT`, `status.PERMISSION_DENIED`) and the broker's own message,
 * which names the field, the limit and the value.
 *
 * @example
 * ```ts
 * try {
 *   await sluice.ack("not-a-lease");
 * } catch (e) {
 *   if (e instanceof SluiceError && e.code === status.INVALID_ARGUMENT) console.log(e.details);
 * }
 * ```
 */
export class SluiceError extends Error {
  /** The gRPC status code. */
  readonly code: status;
  /** The broker's message, without the code's name in front of it. */
  readonly details: string;
  /** Trailing metadata of the failed call (empty for a refusal read from a stream). */
  readonly metadata: Metadata;

  /**
   * @param code - the gRPC status code
   * @param details - the broker's message
   * @param metadata - trailing metadata of the call, when there was one
   */
  constructor(code: status, details: string, metadata: Metadata = new Metadata()) {
    super(`${status[code] ?? `status ${code}`}: ${details}`);
    this.name = "SluiceError";
    this.code = code;
    this.details = details;
    this.metadata = metadata;
  }

  /** The code's name, e.g. `"PERMISSION_DENIED"`. */
  get codeName(): string {
    return status[this.code] ?? String(this.code);
  }

  /**
   * Turns what grpc-js rejects or emits (a `ServiceError`) into a `SluiceError`; anything
   * else (a bug in the caller's own code, say) is returned as it is.
   */
  static from(error: unknown): unknown {
    if (error instanceof SluiceError || !isServiceError(error)) {
      return error;
    }
    return new SluiceError(error.code, error.details, error.metadata);
  }
}

function isServiceError(error: unknown): error is ServiceError {
  return (
    error instanceof Error &&
    typeof (error as Partial<ServiceError>).code === "number" &&
    typeof (error as Partial<ServiceError>).details === "string"
  );
}
