"""The README's first run, as a reader follows it: the helpers it ships for the failure
tour (`examples/smtp_sink.py`, `examples/webhook_sink.py`) run as the commands it shows,
and what it says a reader then sees: a rejected recipient dead-letters, a worker killed
mid-send has its job back at once (not after the visibility timeout), and a worker started
before its broker backs off and says why, in a plain-text log."""

from __future__ import annotations

import json
import signal
import socket
import sys
import time

import pytest

from conftest import ROOT, binary, free_port, start_broker, wait_until
from sluice_client import SluiceClient, pb


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_helper(processes, name: str, script: str, *args) -> int:
    """Starts `python3 examples/<script> --port <free port> <args>`; returns the port."""
    port = free_port()
    processes.start(name, [sys.executable, ROOT / "examples" / script, "--port", port, *args])
    wait_until(lambda: processes.check_alive(name) or listening(port), 10, f"{script} on port {port}")
    return port


def start_email_worker(processes, name: str, target: str, smtp_port: int) -> None:
    processes.start(
        name,
        [binary("email_worker")],
        env={
            "SLUICE_URL": f"http://{target}",
            "SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
            "WORKER_NAME": name,
        },
    )


def consuming(sluice: SluiceClient, queue: str, name: str) -> bool:
    consumers = sluice.stub.ListConsumers(pb.ListConsumersRequest(queue=queue), timeout=5).consumers
    return any(c.name == name for c in consumers)


def welcome(email: str, user_id: int) -> bytes:
    """A `user.registered` job as the binding makes it from the app's event."""
    return json.dumps(
        {"user_id": user_id, "name": email.split("@")[0], "email": email, "registered_at": "2026-01-01T00:00:00Z"}
    ).encode()


@pytest.fixture
def sluice(processes, request):
    target = start_broker(processes, name=f"broker-{request.node.name}")
    with SluiceClient(target) as client:
        client.target = target
        yield client


def test_rejecting_smtp_sink_dead_letters_the_email_at_once(processes, sluice):
    port = start_helper(processes, "smtp-reject", "smtp_sink.py", "--reject", "550", "--only", "nobody")
    start_email_worker(processes, "reject-worker", sluice.target, port)
    wait_until(lambda: consuming(sluice, "emails", "reject-worker"), 20, "the email worker")

    rejected = sluice.enqueue("emails", welcome("nobody@example.com", 1), kind="user.registered")
    sent = sluice.enqueue("emails", welcome("ann@example.com", 2), kind="user.registered")

    dead = wait_until(
        lambda: (j := sluice.get_job(rejected)).state == pb.JOB_STATE_DEAD and j, 15, "the rejected job to die"
    )
    assert dead.attempts == 1, "a 550 is permanent: no retry"
    assert dead.dead_letter_queue == "emails.dlq"
    assert "550" in dead.last_error, dead.last_error
    wait_until(lambda: sluice.get_job(sent).state == pb.JOB_STATE_COMPLETED, 15, "the other email to be sent")
    log = processes.log("smtp-reject")
    assert "rejected RCPT TO:<nobody@example.com> with 550" in log, log
    assert "to ann@example.com" in log and "Subject: Welcome to Sluice Todo, ann!" in log, log


def test_stalling_smtp_sink_lets_a_killed_worker_s_job_come_back_at_once(processes, sluice):
    port = start_helper(processes, "smtp-stall", "smtp_sink.py", "--stall", "3", "--only", "slow")
    # The default visibility timeout (30 s): the job must come back long before it.
    start_email_worker(processes, "stalled-worker", sluice.target, port)
    wait_until(lambda: consuming(sluice, "emails", "stalled-worker"), 20, "the email worker")

    job_id = sluice.enqueue("emails", welcome("slow@example.com", 3), kind="user.registered")
    wait_until(lambda: "stalling RCPT TO:<slow@example.com>" in processes.log("smtp-stall"), 15, "the send to stall")
    assert processes.kill("stalled-worker", signal.SIGKILL) == -signal.SIGKILL

    released = wait_until(
        lambda: (j := sluice.get_job(job_id)).state == pb.JOB_STATE_PENDING and j, 5, "the job to be released"
    )
    assert released.attempts == 1
    assert released.last_error == "released: the consumer stream closed"

    start_email_worker(processes, "second-worker", sluice.target, port)
    done = wait_until(
        lambda: (j := sluice.get_job(job_id)).state == pb.JOB_STATE_COMPLETED and j, 20, "the job to be sent"
    )
    assert done.attempts == 2
    assert done.consumer == "second-worker"
    assert processes.log("smtp-stall").count("to slow@example.com") == 1


def test_webhook_sink_receives_the_notification(processes, sluice):
    port = start_helper(processes, "webhook-sink", "webhook_sink.py")
    processes.start(
        "notifier",
        [binary("notification_worker")],
        env={
            "SLUICE_URL": f"http://{sluice.target}",
            "WEBHOOK_URL": f"http://127.0.0.1:{port}/hook",
            "WORKER_NAME": "notifier",
        },
    )
    wait_until(lambda: consuming(sluice, "notifications", "notifier"), 20, "the notification worker")
    event = {
        "todo_id": 7,
        "user_id": 1,
        "user_name": "Ann",
        "email": "ann@example.com",
        "title": "Buy milk",
        "due_at": None,
        "completed_at": "2026-01-01T00:00:00Z",
    }
    job_id = sluice.enqueue("notifications", json.dumps(event).encode(), kind="todo.completed")
    wait_until(lambda: sluice.get_job(job_id).state == pb.JOB_STATE_COMPLETED, 15, "the notification job")
    log = processes.log("webhook-sink")
    assert f"POST /hook (Idempotency-Key {job_id}) -> 200" in log, log


def test_worker_before_its_broker_backs_off_and_says_why_in_plain_text(processes, tmp_path):
    port = free_port()
    processes.start(
        "early-worker",
        [binary("email_worker")],
        # NO_COLOR empty: colour would be on by default; the log is a file, so none.
        env={"SLUICE_URL": f"http://127.0.0.1:{port}", "NO_COLOR": "", "OUTBOX_DIR": str(tmp_path / "outbox")},
    )
    # Attempts at about 0, 0.1, 0.3, 0.7, 1.5 s and 3.1 s: one warning for one cause.
    wait_until(lambda: "broker not reachable" in processes.log("early-worker"), 10, "the first warning")
    time.sleep(3.5)
    log = processes.log("early-worker")
    assert "\x1b" not in log, f"colour codes in a log file: {log!r}"
    warnings = [line for line in log.splitlines() if "broker not reachable" in line]
    assert len(warnings) == 1, log
    assert " WARN " in warnings[0], log
    assert f"connection refused by 127.0.0.1:{port}" in warnings[0], log
