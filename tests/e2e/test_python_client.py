"""The Python client generated from proto/ drives the broker: enqueue, lease, ack, nack to
the dead-letter queue (and delete the dead letter), publish and subscribe, pipelined
enqueues on EnqueueStream, queue limits and recurring schedules."""

import json
import time

import grpc
import pytest

from sluice_client import SluiceClient, pb


@pytest.fixture(scope="module")
def sluice(broker):
    with SluiceClient(broker) as client:
        yield client


def test_enqueue_lease_ack(sluice):
    job_id = sluice.enqueue("py.emails", json.dumps({"to": "a@example.com"}).encode(), kind="welcome", priority=3)
    jobs = sluice.lease("py.emails", max_jobs=5, wait_ms=1000, consumer="py-worker")
    assert [j.job_id for j in jobs] == [job_id]
    job = jobs[0]
    assert job.kind == "welcome"
    assert job.attempt == 1
    assert json.loads(job.payload) == {"to": "a@example.com"}
    sluice.ack(job.lease_id, result=b"sent")

    done = sluice.get_job(job_id)
    assert done.state == pb.JOB_STATE_COMPLETED
    assert done.result == b"sent"
    assert done.consumer == "py-worker"
    # A second ack of the same lease is idempotent; an ack of a made-up lease is refused.
    sluice.ack(job.lease_id)
    with pytest.raises(grpc.RpcError) as err:
        sluice.ack("not-a-lease")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lease" in err.value.details()


def test_nack_dead_letters_a_poison_job(sluice):
    job_id = sluice.enqueue("py.poison", b"{}", kind="bad")
    [job] = sluice.lease("py.poison", wait_ms=1000)
    outcome = sluice.nack(job.lease_id, "field x: not parseable", dead_letter=True)
    assert outcome.state == pb.JOB_STATE_DEAD
    dead = sluice.list_jobs("py.poison.dlq")
    assert [j.id for j in dead] == [job_id]
    assert dead[0].headers["x-sluice-original-queue"] == "py.poison"
    assert dead[0].headers["x-sluice-last-error"] == "field x: not parseable"
    # The dead letter is deleted from the dead-letter queue; the dead record stays.
    assert sluice.delete_job("py.poison.dlq", job_id).state == pb.JOB_STATE_PENDING
    assert sluice.list_jobs("py.poison.dlq") == []
    assert sluice.get_job(job_id).state == pb.JOB_STATE_DEAD
    with pytest.raises(grpc.RpcError) as err:
        sluice.delete_job("py.poison.dlq", job_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "job_id" in err.value.details()


def test_publish_and_subscribe(sluice):
    with sluice.subscribe("py.orders.*", timeout=10) as subscription:
        sequences = [
            sluice.publish("py.orders.created", json.dumps({"id": i}).encode(), headers={"n": str(i)})
            for i in range(3)
        ]
        assert sequences == [1, 2, 3]
        received = []
        for message in subscription:
            received.append(message)
            if len(received) == 3:
                break
    assert [m.topic for m in received] == ["py.orders.created"] * 3
    assert [m.sequence for m in received] == [1, 2, 3]
    assert [json.loads(m.payload)["id"] for m in received] == [0, 1, 2]
    assert [m.headers["n"] for m in received] == ["0", "1", "2"]

    # Replay from the retained log.
    with sluice.subscribe("py.orders.created", earliest=True, timeout=10) as replay:
        first = next(iter(replay))
    assert first.sequence == 1


def test_enqueue_stream_answers_in_order_and_refuses_only_the_bad_job(sluice):
    jobs = [pb.JobSpec(payload=f"job-{i}".encode(), priority=10 if i == 40 else 0) for i in range(100)]
    answers = sluice.enqueue_stream("py.streamed", jobs)
    assert len(answers) == 100
    refusal = answers[40]
    assert isinstance(refusal, pb.Refusal)
    assert refusal.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "jobs[0].priority" in refusal.message and "10" in refusal.message
    ids = [a for i, a in enumerate(answers) if i != 40]
    assert all(isinstance(a, str) for a in ids)
    leased = sluice.lease("py.streamed", max_jobs=1000, wait_ms=1000)
    assert [j.job_id for j in leased] == ids
    assert [j.payload for j in leased] == [f"job-{i}".encode() for i in range(100) if i != 40]


def test_queue_limits_set_shown_and_removed(sluice):
    sluice.create_queue("py.limited", rate_limit={"per_second": 5, "burst": 2}, max_in_flight=1)
    for i in range(3):
        sluice.enqueue("py.limited", b"x")
    # One slot: one job, however many are asked for.
    [job] = sluice.lease("py.limited", max_jobs=10, consumer="py")
    [stats] = [q for q in sluice.stats().queues if q.name == "py.limited"]
    assert (stats.leased, stats.max_in_flight, stats.rate_limit_burst) == (1, 1, 2)
    assert stats.rate_tokens in (1, 2)  # 2 less the one taken, refilling at 5 a second
    sluice.ack(job.lease_id)
    # The ack freed the slot, and the bucket has a token left.
    assert len(sluice.lease("py.limited", max_jobs=10, consumer="py")) == 1
    info = sluice.update_queue("py.limited", rate_limit={}, max_in_flight=0)
    assert not info.policy.HasField("rate_limit") and not info.policy.HasField("max_in_flight")
    with pytest.raises(grpc.RpcError) as err:
        sluice.update_queue("py.limited", rate_limit={"burst": 3})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "policy.rate_limit.per_second" in err.value.details()


def test_schedules_created_fired_upserted_and_deleted(sluice):
    created = sluice.create_schedule("py-beat", "py.beats", every_ms=1000, kind="beat", payload=b"b", skip_overlap=True)
    assert created.schedule.overlap == pb.OVERLAP_POLICY_SKIP
    nightly = sluice.create_schedule("py-nightly", "py.reports", cron="0 3 * * *", time_zone="Europe/Paris", paused=True)
    assert nightly.schedule.paused and nightly.next_fire_unix_ms == 0
    # The first tick's job, with the schedule's headers and the tick's idempotency key.
    deadline = time.monotonic() + 5
    while not (jobs := sluice.list_jobs("py.beats")):
        assert time.monotonic() < deadline, "no job from py-beat within 5 s"
        time.sleep(0.05)
    job = jobs[0]
    assert job.headers["x-sluice-schedule"] == "py-beat"
    assert job.idempotency_key.startswith("schedule:py-beat:")
    # Registering again at a program's start updates in place, keeping the progress.
    again = sluice.upsert_schedule("py-beat", "py.beats", every_ms=2000, kind="beat")
    assert again.schedule.interval_ms == 2000 and again.last_job_id == job.id
    assert [s.schedule.name for s in sluice.list_schedules()] == ["py-beat", "py-nightly"]
    assert [s.schedule.name for s in sluice.list_schedules(queue="py.reports")] == ["py-nightly"]
    with pytest.raises(grpc.RpcError) as err:
        sluice.create_schedule("py-bad", "py.beats", cron="0 3 * * *", time_zone="Mars/Olympus")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cron.time_zone" in err.value.details()
    with pytest.raises(ValueError):
        sluice.schedule_spec("x", "q")
    sluice.delete_schedule("py-beat")
    sluice.delete_schedule("py-nightly")
    assert sluice.list_schedules() == []


def test_schemas_refuse_a_bad_payload_and_keep_history(sluice):
    schema = json.dumps({"type": "object", "required": ["to"], "properties": {"to": {"format": "email"}}})
    first = sluice.set_json_schema(schema, queue="py.schema")
    assert (first.revision, first.created) == (1, True)
    assert sluice.set_json_schema(schema, queue="py.schema").created is False
    sluice.enqueue("py.schema", json.dumps({"to": "a@example.com"}).encode())
    with pytest.raises(grpc.RpcError) as err:
        sluice.enqueue("py.schema", json.dumps({"to": "nope"}).encode())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "jobs[0].payload" in err.value.details()
    assert '"/to"' in err.value.details() and 'format "email"' in err.value.details()
    got = sluice.get_schema(queue="py.schema")
    assert got.current_revision == 1
    assert [r.revision for r in got.history] == [1]
    assert json.loads(got.history[0].json_schema.text) == json.loads(schema)
    assert sluice.delete_schema(queue="py.schema") == 1
    sluice.enqueue("py.schema", b"anything")
