"""The example system without an SMTP server or a webhook: the email worker writes .eml
files to OUTBOX_DIR and the notification worker only publishes notification.delivered,
which the app stores (and still has after a restart, without duplicates)."""

from __future__ import annotations

import signal
import time
from email import message_from_bytes, policy
from types import SimpleNamespace

import pytest
import requests

from conftest import binary, free_port, start_broker, wait_until


@pytest.fixture(scope="module")
def system(processes, tmp_path_factory):
    work = tmp_path_factory.mktemp("fallbacks")
    target = start_broker(processes)
    s = SimpleNamespace(
        processes=processes,
        outbox=work / "outbox",
        app_env={
            "SLUICE_URL": f"http://{target}",
            "TODO_LISTEN": f"127.0.0.1:{free_port()}",
            "TODO_DB": str(work / "todo.sqlite3"),
        },
    )
    s.app = f"http://{s.app_env['TODO_LISTEN']}"
    processes.start("todo_app", [binary("todo_app")], env=s.app_env)
    processes.start(
        "email_worker",
        [binary("email_worker")],
        env={"SLUICE_URL": f"http://{target}", "OUTBOX_DIR": str(s.outbox), "SMTP_URL": ""},
    )
    processes.start("notification_worker", [binary("notification_worker")], env={"SLUICE_URL": f"http://{target}", "WEBHOOK_URL": ""})
    wait_until(lambda: requests.get(f"{s.app}/healthz", timeout=2).ok, 20, "todo_app")
    return s


def test_emails_go_to_the_outbox_as_eml_files(system):
    r = requests.post(f"{system.app}/users", json={"name": "Olga", "email": "olga@example.com"}, timeout=10)
    assert r.status_code == 201, r.text
    user_id = r.json()["user"]["id"]
    [path] = wait_until(lambda: list(system.outbox.glob("*.eml")), 15, "an .eml file in the outbox")
    msg = message_from_bytes(path.read_bytes(), policy=policy.default)
    assert str(msg["to"]) == "olga@example.com"
    assert str(msg["from"]) == "Sluice Todo <no-reply@todo.example>"
    assert str(msg["subject"]) == "Welcome to Sluice Todo, Olga!"
    assert msg.get_content().replace("\r\n", "\n").startswith(f"Hi Olga,\n\nYour account (user #{user_id}) is ready.")
    # Named after the job, whose result says where the file went.
    job_id = path.stem
    history = requests.get(f"{system.app}/jobs/history?queue=emails", timeout=5).json()["jobs"]
    [job] = [j for j in history if j["id"] == job_id]
    assert job["result"] == f"written to {path}"
    # No temporary files are left behind.
    assert [p.name for p in system.outbox.iterdir()] == [path.name]


def test_notifications_without_a_webhook_are_stored_by_the_app_once(system):
    r = requests.post(f"{system.app}/users", json={"name": "Pia", "email": "pia@example.com"}, timeout=10)
    user_id = r.json()["user"]["id"]
    r = requests.post(f"{system.app}/todos", json={"user_id": user_id, "title": "Water plants"}, timeout=10)
    todo = r.json()["todo"]
    assert todo["reminder_job_id"] is None
    r = requests.put(f"{system.app}/todos/{todo['id']}/complete", timeout=10)
    assert r.json()["reminder"] == "none"

    def notifications():
        return requests.get(f"{system.app}/users/{user_id}/notifications", timeout=5).json()["notifications"]

    [n] = wait_until(notifications, 15, "the stored notification")
    assert n["channel"] == "app"
    assert n["todo_id"] == todo["id"]
    assert n["message"] == 'Pia completed "Water plants". Well done!'

    # A restarted app resumes its subscription after the last stored message: the
    # notification is still there, once.
    assert system.processes.kill("todo_app", signal.SIGTERM) == 0
    system.processes.start("todo_app", [binary("todo_app")], env=system.app_env)
    wait_until(lambda: requests.get(f"{system.app}/healthz", timeout=2).ok, 20, "the restarted todo_app")
    time.sleep(0.5)  # let the resumed subscription deliver anything it would repeat
    assert [x["id"] for x in notifications()] == [n["id"]]
    r = requests.get(f"{system.app}/users/999/notifications", timeout=5)
    assert (r.status_code, r.json()["error"]) == (404, "user 999 does not exist")


def test_workers_stop_gracefully_on_sigterm(system):
    for name, what in [("email_worker", "email worker stopped"), ("notification_worker", "notification worker stopped")]:
        assert system.processes.kill(name, signal.SIGTERM) == 0
        log = system.processes.log(name)
        assert what in log, log[-2000:]
        # The drain ended with nothing left to release.
        assert "released: 0" in log, log[-2000:]
