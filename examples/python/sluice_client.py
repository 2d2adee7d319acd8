"""A small Python client for Sluice, over stubs generated from proto/ with grpcio-tools.

The stubs are generated into ``sluice_pb/`` beside this file (gitignored) by ``gen.sh``;
importing this module runs it when they are missing or older than the proto file.

    from sluice_client import SluiceClient

    with SluiceClient("127.0.0.1:50051") as sluice:
        job_id = sluice.enqueue("emails", b'{"to": "a@example.com"}', kind="welcome")
        for job in sluice.lease("emails", max_jobs=10, wait_ms=1000, consumer="py-worker"):
            sluice.ack(job.lease_id, result=b"sent")
        sluice.publish("user.registered", b'{"id": 1}')
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import grpc

HERE = Path(__file__).resolve().parent
GENERATED = HERE / "sluice_pb"
PROTO = HERE.parent.parent / "proto" / "sluice" / "v1" / "sluice.proto"


def ensure_generated() -> None:
    """Runs gen.sh when the stubs are missing or older than the proto file."""
    stub = GENERATED / "sluice" / "v1" / "sluice_pb2_grpc.py"
    if not stub.exists() or stub.stat().st_mtime < PROTO.stat().st_mtime:
        subprocess.run(["bash", str(HERE / "gen.sh")], check=True, stdout=subprocess.DEVNULL)


ensure_generated()
sys.path.insert(0, str(GENERATED))

from sluice.v1 import sluice_pb2 as pb  # noqa: E402
from sluice.v1 import sluice_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["SluiceClient", "pb", "pb_grpc"]


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call, over TLS or plaintext
    (grpc's own call credentials refuse plaintext channels, even on loopback)."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [self.header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class SluiceClient:
    """A connection to a Sluice broker (``host:port``): plaintext, or TLS when
    ``root_certificates`` (the PEM CA that signed the broker's certificate) is given; with
    ``token``, every call carries it as a bearer token. ``options`` are gRPC channel
    options (e.g. ``("grpc.lb_policy_name", "round_robin")`` for a target naming several
    brokers, see ``several_brokers.py``)."""

    def __init__(
        self,
        target: str,
        timeout: float = 10.0,
        token: Optional[str] = None,
        root_certificates: Optional[bytes] = None,
        options: Sequence[tuple[str, object]] = (),
    ):
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        if token:
            self.channel = grpc.intercept_channel(self.channel, _BearerToken(token))
        self.stub = pb_grpc.BrokerStub(self.channel)
        # Per-call deadline for unary RPCs; long polls add their wait to it.
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SluiceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the channel is connected (raises grpc.FutureTimeoutError)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    # ---- topics --------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        headers: Optional[Mapping[str, str]] = None,
        key: str = "",
    ) -> int:
        """Publishes one message; returns its sequence number."""
        message = pb.PublishMessage(payload=payload, headers=dict(headers or {}), key=key)
        response = self.stub.Publish(
            pb.PublishRequest(topic=topic, messages=[message]), timeout=self.timeout
        )
        return response.results[0].sequence

    def subscribe(
        self, pattern: str, earliest: bool = False, timeout: Optional[float] = None
    ) -> "Subscription":
        """Subscribes to topics matching ``pattern`` (from the start of the retained log
        with ``earliest``). Returns once the broker has registered the subscription, so a
        message published after this call is delivered. Iterate the result for messages;
        ``close()`` it (or let ``timeout`` seconds pass) to end it."""
        start = pb.START_POSITION_EARLIEST if earliest else pb.START_POSITION_LATEST
        return Subscription(
            self.stub.Subscribe(pb.SubscribeRequest(pattern=pattern, start=start), timeout=timeout)
        )

    # ---- work queues ---------------------------------------------------------------

    def enqueue(
        self,
        queue: str,
        payload: bytes,
        kind: str = "",
        headers: Optional[Mapping[str, str]] = None,
        priority: int = 0,
        delay_ms: int = 0,
        max_attempts: int = 0,
        idempotency_key: str = "",
    ) -> str:
        """Enqueues one job; returns its id."""
        job = pb.JobSpec(
            payload=payload,
            kind=kind,
            headers=dict(headers or {}),
            priority=priority,
            delay_ms=delay_ms,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
        )
        response = self.stub.Enqueue(pb.EnqueueRequest(queue=queue, jobs=[job]), timeout=self.timeout)
        return response.results[0].job_id

    def enqueue_stream(self, queue: str, jobs: Iterable[pb.JobSpec]) -> list:
        """Enqueues each job as its own request over one EnqueueStream call, pipelined.
        Returns one answer per job, in order: its id, or the ``pb.Refusal`` saying why it
        was refused (a refused job changes nothing; the others are still enqueued)."""
        requests = (pb.EnqueueRequest(queue=queue, jobs=[job]) for job in jobs)
        return [
            response.refused if response.HasField("refused") else response.results[0].job_id
            for response in self.stub.EnqueueStream(requests, timeout=self.timeout)
        ]

    def lease(
        self,
        queue: str,
        max_jobs: int = 1,
        visibility_timeout_ms: int = 0,
        wait_ms: int = 0,
        consumer: str = "",
    ) -> list:
        """Leases up to ``max_jobs`` jobs, long-polling up to ``wait_ms``."""
        request = pb.LeaseRequest(
            queue=queue,
            max_jobs=max_jobs,
            visibility_timeout_ms=visibility_timeout_ms,
            wait_ms=wait_ms,
            consumer=consumer,
        )
        return list(self.stub.Lease(request, timeout=self.timeout + wait_ms / 1000).jobs)

    def ack(self, lease_id: str, result: bytes = b"") -> None:
        """Settles a delivery as done."""
        self.stub.Ack(
            pb.AckRequest(acks=[pb.LeaseAck(lease_id=lease_id, result=result)]),
            timeout=self.timeout,
        )

    def nack(
        self, lease_id: str, error: str, retry_delay_ms: int = 0, dead_letter: bool = False
    ) -> pb.NackResponse:
        """Settles a delivery as failed (retry, or dead-letter now)."""
        return self.stub.Nack(
            pb.NackRequest(
                lease_id=lease_id,
                error=error,
                retry_delay_ms=retry_delay_ms,
                dead_letter=dead_letter,
            ),
            timeout=self.timeout,
        )

    def get_job(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=self.timeout)

    def delete_job(self, queue: str, job_id: str) -> pb.Job:
        """Deletes one job of ``queue`` whatever its state; returns it as it was."""
        response = self.stub.DeleteJob(
            pb.DeleteJobRequest(queue=queue, job_id=job_id), timeout=self.timeout
        )
        return response.job

    def list_jobs(self, queue: str, state: int = pb.JOB_STATE_UNSPECIFIED) -> list:
        """Every job of ``queue`` in ``state`` (all live jobs by default), all pages."""
        jobs, token = [], ""
        while True:
            response = self.stub.ListJobs(
                pb.ListJobsRequest(queue=queue, state=state, page_token=token),
                timeout=self.timeout,
            )
            jobs.extend(response.jobs)
            token = response.next_page_token
            if not token:
                return jobs

    def create_queue(self, name: str, **policy) -> pb.QueueInfo:
        return self.stub.CreateQueue(
            pb.CreateQueueRequest(name=name, policy=pb.QueuePolicy(**policy)),
            timeout=self.timeout,
        )

    def update_queue(self, name: str, **policy) -> pb.QueueInfo:
        """Changes the policy fields given, e.g. ``rate_limit={"per_second": 10, "burst": 20}``
        or ``max_in_flight=5`` (``0`` removes a limit, as does a rate of 0 with burst 0)."""
        return self.stub.UpdateQueue(
            pb.UpdateQueueRequest(name=name, policy=pb.QueuePolicy(**policy)),
            timeout=self.timeout,
        )

    def stats(self) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest(), timeout=self.timeout)

    # ---- Recurring schedules (each needs `admin` on the schedule's queue) ---------------

    @staticmethod
    def schedule_spec(
        name: str,
        queue: str,
        *,
        cron: Optional[str] = None,
        time_zone: str = "UTC",
        every_ms: Optional[int] = None,
        kind: str = "",
        payload: bytes = b"",
        headers: Optional[Mapping[str, str]] = None,
        priority: int = 0,
        skip_missed: bool = False,
        skip_overlap: bool = False,
        paused: bool = False,
    ) -> pb.ScheduleSpec:
        """A schedule's definition: exactly one of ``cron`` (read in ``time_zone``) or
        ``every_ms``; its jobs go to ``queue`` with ``kind``, ``payload``, ``headers`` and
        ``priority``."""
        if (cron is None) == (every_ms is None):
            raise ValueError("give exactly one of cron= or every_ms=")
        spec = pb.ScheduleSpec(
            name=name,
            job=pb.ScheduleJob(
                queue=queue, kind=kind, payload=payload, headers=dict(headers or {}), priority=priority
            ),
            missed_ticks=pb.MISSED_TICK_POLICY_SKIP if skip_missed else pb.MISSED_TICK_POLICY_RUN_ONCE,
            overlap=pb.OVERLAP_POLICY_SKIP if skip_overlap else pb.OVERLAP_POLICY_ALLOW,
            paused=paused,
        )
        if cron is not None:
            spec.cron.CopyFrom(pb.CronTrigger(expression=cron, time_zone=time_zone))
        else:
            spec.interval_ms = every_ms
        return spec

    def create_schedule(self, name: str, queue: str, **spec) -> pb.ScheduleInfo:
        """Creates a schedule (arguments as ``schedule_spec``); ALREADY_EXISTS if taken."""
        return self.stub.CreateSchedule(self.schedule_spec(name, queue, **spec), timeout=self.timeout)

    def upsert_schedule(self, name: str, queue: str, **spec) -> pb.ScheduleInfo:
        """Creates the schedule, or replaces the definition of the one of that name
        (keeping its progress): what a program registering its schedules at start calls."""
        request = self.schedule_spec(name, queue, **spec)
        try:
            return self.stub.CreateSchedule(request, timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            return self.stub.UpdateSchedule(request, timeout=self.timeout)

    def delete_schedule(self, name: str) -> None:
        self.stub.DeleteSchedule(pb.DeleteScheduleRequest(name=name), timeout=self.timeout)

    def pause_schedule(self, name: str) -> pb.ScheduleInfo:
        return self.stub.PauseSchedule(pb.PauseScheduleRequest(name=name), timeout=self.timeout)

    def resume_schedule(self, name: str) -> pb.ScheduleInfo:
        return self.stub.ResumeSchedule(pb.ResumeScheduleRequest(name=name), timeout=self.timeout)

    def list_schedules(self, queue: str = "") -> list:
        """Every schedule (of ``queue``, if given), with last and next fire, last job id
        and counters."""
        return list(self.stub.ListSchedules(pb.ListSchedulesRequest(queue=queue), timeout=self.timeout).schedules)

    # ---- Message schemas (README, "Message schemas") ------------------------------------

    @staticmethod
    def _schema_target(queue: Optional[str], topic: Optional[str]) -> pb.SchemaTarget:
        if (queue is None) == (topic is None):
            raise ValueError("name exactly one of queue= or topic=")
        return pb.SchemaTarget(queue=queue) if queue is not None else pb.SchemaTarget(topic=topic)

    def set_json_schema(
        self, text: str, *, queue: Optional[str] = None, topic: Optional[str] = None
    ) -> pb.SetSchemaResponse:
        """Makes a JSON Schema (its text) the schema of a queue or topic. Returns the
        current ``revision`` and whether it is new (``created``): setting the current
        schema again changes nothing, so this is safe at every start."""
        return self.stub.SetSchema(
            pb.SetSchemaRequest(
                target=self._schema_target(queue, topic),
                json_schema=pb.JsonSchema(text=text),
            ),
            timeout=self.timeout,
        )

    def set_protobuf_schema(
        self,
        descriptor_set: bytes,
        message_type: str,
        *,
        queue: Optional[str] = None,
        topic: Optional[str] = None,
    ) -> pb.SetSchemaResponse:
        """Makes a protobuf message type (full name) of an encoded FileDescriptorSet
        (``protoc --include_imports --descriptor_set_out``) the schema of a queue or topic."""
        return self.stub.SetSchema(
            pb.SetSchemaRequest(
                target=self._schema_target(queue, topic),
                protobuf=pb.ProtobufSchema(descriptor_set=descriptor_set, message_type=message_type),
            ),
            timeout=self.timeout,
        )

    def get_schema(self, *, queue: Optional[str] = None, topic: Optional[str] = None) -> pb.GetSchemaResponse:
        """The current revision (0 after a delete) and the history, oldest first."""
        return self.stub.GetSchema(
            pb.GetSchemaRequest(target=self._schema_target(queue, topic)), timeout=self.timeout
        )

    def delete_schema(self, *, queue: Optional[str] = None, topic: Optional[str] = None) -> int:
        """Stops validation (the history stays); returns the revision that was current."""
        return self.stub.DeleteSchema(
            pb.DeleteSchemaRequest(target=self._schema_target(queue, topic)), timeout=self.timeout
        ).deleted_revision


class Subscription:
    """An open subscription: iterate it for ``pb.Message`` values."""

    def __init__(self, call):
        self._call = call
        # The broker sends the response headers once the subscription is registered.
        call.initial_metadata()

    def __iter__(self) -> Iterator[pb.Message]:
        try:
            for batch in self._call:
                yield from batch.messages
        except grpc.RpcError as e:
            # Our own close() and the deadline end the stream; anything else is an error.
            if e.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise

    def close(self) -> None:
        self._call.cancel()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
