/**
 * TypeScript client for the Sluice broker: {@link SluiceClient} over @grpc/grpc-js, with
 * message types generated from the repository's `proto/` by ts-proto.
 *
 * @packageDocumentation
 */
export {
  SluiceClient,
  Subscription,
  Consumer,
  type Payload,
  type SluiceClientOptions,
  type JobOptions,
  type LeaseOptions,
  type NackOptions,
  type PublishOptions,
  type StartFrom,
  type SubscribeOptions,
  type ConsumeOptions,
} from "./client.js";
export { SluiceError } from "./error.js";
export { status } from "@grpc/grpc-js";
/** The generated wire types, for fields the wrapper does not name. */
export {
  JobState,
  jobStateToJSON,
  type Gap,
  type Job,
  type LeasedJob,
  type Message,
  type NackResponse,
} from "./gen/sluice/v1/sluice.js";
