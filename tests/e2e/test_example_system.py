"""End to end: the broker, todo_app, email_worker and notification_worker run as separate
processes on free loopback ports, with a real SMTP server (aiosmtpd) and a webhook
receiver in this process. The tests drive the HTTP API and check what the outside world
receives."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import grpc
import pytest
import requests
from aiosmtpd.controller import Controller

from conftest import ROOT, binary, free_port, start_broker, wait_until
from sluice_client import SluiceClient, pb

# Bodies are compared without trailing newlines (SMTP adds a line end of its own).
SIGNATURE = "\n\nThe Sluice Todo team"


class SmtpRecorder:
    """aiosmtpd handler: records every accepted email; rejects recipients whose local part
    starts with `reject` (550, a permanent failure); answers the first RCPT of a recipient
    starting with `busy` with 451 (a transient failure) and later ones with 250; stalls the
    first RCPT of a recipient starting with `slow` (so a worker can be killed mid-job),
    answering later ones at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.messages: list[dict] = []
        self.rejected: list[str] = []
        self.slow_rcpts = 0
        self.busy_answered: set[str] = set()
        self.slow_started = threading.Event()
        self.release = threading.Event()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("reject"):
            with self.lock:
                self.rejected.append(address)
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if local.startswith("busy"):
            with self.lock:
                first = address not in self.busy_answered
                self.busy_answered.add(address)
            if first:
                return "451 4.3.0 Mailbox busy, try again later"
        if local.startswith("slow"):
            with self.lock:
                self.slow_rcpts += 1
                first = self.slow_rcpts == 1
            if first:
                self.slow_started.set()
                # Hold the worker in its SMTP transaction for up to 30 s.
                for _ in range(300):
                    if self.release.is_set():
                        break
                    await asyncio.sleep(0.1)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        msg = message_from_bytes(envelope.content, policy=policy.default)
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "from": str(msg["from"]),
            "to": str(msg["to"]),
            "subject": str(msg["subject"]),
            "message_id": str(msg["message-id"]),
            "body": msg.get_content().replace("\r\n", "\n").rstrip("\n"),
        }
        with self.lock:
            self.messages.append(record)
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[dict]:
        with self.lock:
            return [m for m in self.messages if address in m["rcpt_tos"]]


class WebhookRecorder(BaseHTTPRequestHandler):
    """Records every POST. Answers 503 to the first delivery of a notification whose message
    mentions "flaky" (transient) and 410 to any mentioning "gone" (permanent); 200 else."""

    received: list = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            earlier = [h for h in self.received if h["json"]["id"] == body["id"]]
            self.received.append(
                {
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "json": body,
                }
            )
        status = 200
        if "gone" in body["message"]:
            status = 410
        elif "flaky" in body["message"] and not earlier:
            status = 503
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def start_email_worker(system, name: str):
    system.processes.start(
        name,
        [binary("email_worker")],
        env={
            "SLUICE_URL": system.sluice_url,
            "SMTP_URL": f"smtp://127.0.0.1:{system.smtp_port}",
            "WORKER_NAME": name,
            # Short leases so a killed worker's job comes back within seconds.
            "VISIBILITY_TIMEOUT_MS": "2000",
            "SMTP_TIMEOUT_MS": "40000",
        },
    )


@pytest.fixture(scope="module")
def system(processes, tmp_path_factory):
    work = tmp_path_factory.mktemp("example-system")
    target = start_broker(processes)
    smtp = SmtpRecorder()
    smtp_port = free_port()
    controller = Controller(smtp, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    WebhookRecorder.received = []
    hook_server = ThreadingHTTPServer(("127.0.0.1", 0), WebhookRecorder)
    hook_thread = threading.Thread(target=hook_server.serve_forever, daemon=True)
    hook_thread.start()
    app_port = free_port()
    s = SimpleNamespace(
        processes=processes,
        sluice_url=f"http://{target}",
        sluice=SluiceClient(target),
        smtp=smtp,
        smtp_port=smtp_port,
        webhook=WebhookRecorder,
        app=f"http://127.0.0.1:{app_port}",
    )
    try:
        processes.start(
            "todo_app",
            [binary("todo_app")],
            env={
                "SLUICE_URL": s.sluice_url,
                "TODO_LISTEN": f"127.0.0.1:{app_port}",
                "TODO_DB": str(work / "todo.sqlite3"),
                # The overdue scan (a broker schedule the app registers) every second.
                "TODO_OVERDUE_SCAN_MS": "1000",
            },
        )
        start_email_worker(s, "email-worker-a")
        processes.start(
            "notification_worker",
            [binary("notification_worker")],
            env={
                "SLUICE_URL": s.sluice_url,
                "WEBHOOK_URL": f"http://127.0.0.1:{hook_server.server_port}/hooks/achievements",
                "WORKER_NAME": "notification-worker-a",
                "VISIBILITY_TIMEOUT_MS": "2000",
            },
        )

        def up():
            for name in ("todo_app", "email-worker-a", "notification_worker"):
                processes.check_alive(name)
            workers = requests.get(f"{s.app}/workers", timeout=2).json()["workers"]
            return workers["emails"] and workers["notifications"]

        wait_until(up, 20, "the app and both workers")
        yield s
    finally:
        smtp.release.set()
        s.sluice.close()
        processes.kill_all()
        hook_server.shutdown()
        controller.stop()


def sluice_schedules(system) -> dict:
    """The broker's schedules by name, as ListSchedules shows them."""
    return {
        s.schedule.name: {"fired": s.fired, "last_job_id": s.last_job_id}
        for s in system.sluice.list_schedules()
    }


def post(system, path: str, body) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(f"{system.app}{path}", data=data, timeout=10)


def create_user(system, name: str, email: str) -> dict:
    r = post(system, "/users", {"name": name, "email": email})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["success"] is True
    assert body["message"] == "User created, welcome email queued"
    assert body["user"]["name"] == name
    assert body["user"]["email"] == email
    return body["user"]


def utc(seconds_from_now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds_from_now))


def welcome_body(name: str, user_id: int) -> str:
    return (
        f"Hi {name},\n\nYour account (user #{user_id}) is ready. "
        f"Add your first todo with POST /todos.{SIGNATURE}"
    )


def test_welcome_email_arrives_exactly_as_expected(system):
    user = create_user(system, "Alice", "alice@example.com")
    [email] = wait_until(lambda: system.smtp.to("alice@example.com"), 15, "Alice's welcome email")
    assert email["mail_from"] == "no-reply@todo.example"
    assert email["rcpt_tos"] == ["alice@example.com"]
    assert email["from"] == "Sluice Todo <no-reply@todo.example>"
    assert email["to"] == "alice@example.com"
    assert email["subject"] == "Welcome to Sluice Todo, Alice!"
    assert email["body"] == welcome_body("Alice", user["id"])
    # Sent once: nothing more arrives.
    time.sleep(0.5)
    assert len(system.smtp.to("alice@example.com")) == 1

    history = requests.get(f"{system.app}/jobs/history?queue=emails", timeout=5).json()
    [job] = [j for j in history["jobs"] if email["message_id"].startswith(f"<{j['id']}@")]
    assert job["kind"] == "user.registered"
    assert job["state"] == "completed"
    assert job["consumer"] == "email-worker-a"
    assert job["result"].startswith("sent to alice@example.com via SMTP")


@pytest.mark.parametrize(
    "path,body,status,error",
    [
        ("/users", {"name": "X"}, 400, "field email: required (a string of 1 to 254 characters)"),
        ("/users", {"name": "X", "email": "nope"}, 400, 'field email: "nope" is not an email address like name@example.com'),
        ("/users", {"name": "X" * 101, "email": "x@example.com"}, 400, "field name: 101 characters exceeds the limit of 100"),
        ("/users", "{not json", 400, "body: invalid JSON"),
        ("/users", "[1]", 400, "body: expected a JSON object, got an array"),
        ("/todos", {"user_id": 999999, "title": "t"}, 404, "field user_id: user 999999 does not exist"),
        ("/todos", {"user_id": "1", "title": "t"}, 400, 'field user_id: "1" is not a positive integer'),
        ("/todos", {"user_id": 1, "title": "t", "due_at": "tomorrow"}, 400, 'field due_at: "tomorrow" is not an RFC 3339 UTC time'),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(system, path, body, status, error):
    r = post(system, path, body)
    assert r.status_code == status, r.text
    assert r.json()["success"] is False
    assert r.json()["error"].startswith(error), r.json()["error"]


def test_other_4xx_errors(system):
    r = requests.put(f"{system.app}/todos/abc/complete", timeout=5)
    assert (r.status_code, r.json()["error"]) == (400, 'path id: "abc" is not a positive integer')
    r = requests.put(f"{system.app}/todos/424242/complete", timeout=5)
    assert (r.status_code, r.json()["error"]) == (404, "todo 424242 does not exist")
    create_user(system, "Dup", "dup@example.com")
    r = post(system, "/users", {"name": "Dup again", "email": "dup@example.com"})
    assert (r.status_code, r.json()["error"]) == (409, 'field email: "dup@example.com" is already registered')
    r = requests.get(f"{system.app}/jobs/history?limit=0", timeout=5)
    assert (r.status_code, r.json()["error"]) == (400, 'query limit: "0" is not an integer in 1..=1000')


def test_completing_a_todo_delivers_the_achievement_and_cancels_the_reminder(system):
    user = create_user(system, "Bob", "bob@example.com")
    r = post(system, "/todos", {"user_id": user["id"], "title": "Ship the release", "due_at": utc(3600)})
    assert r.status_code == 201, r.text
    todo = r.json()["todo"]
    assert r.json()["message"].startswith("Todo created, reminder scheduled for ")
    reminder_id = todo["reminder_job_id"]
    reminder = system.sluice.get_job(reminder_id)
    assert (reminder.state, reminder.kind, reminder.queue) == (pb.JOB_STATE_SCHEDULED, "todo.reminder", "emails")

    r = requests.put(f"{system.app}/todos/{todo['id']}/complete", timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    assert body["reminder"] == "cancelled"
    assert body["message"] == "Todo completed, achievement notification queued"
    assert body["todo"]["completed"] is True
    assert system.sluice.get_job(reminder_id).state == pb.JOB_STATE_CANCELLED

    def hooks():
        with system.webhook.lock:
            return [h for h in system.webhook.received if h["json"]["todo_id"] == todo["id"]]

    [hook] = wait_until(hooks, 15, "the achievement webhook")
    assert hook["path"] == "/hooks/achievements"
    n = hook["json"]
    assert n["user_id"] == user["id"]
    assert n["title"] == "Achievement unlocked"
    assert n["message"] == 'Bob completed "Ship the release". Well done!'
    assert n["channel"] == "webhook"
    assert hook["headers"]["idempotency-key"] == n["id"]

    def stored():
        r = requests.get(f"{system.app}/users/{user['id']}/notifications", timeout=5).json()
        return r["notifications"]

    [shown] = wait_until(stored, 15, "the notification in the app")
    assert shown["id"] == n["id"]
    assert shown["message"] == n["message"]
    assert shown["todo_id"] == todo["id"]
    # Completing again is a conflict and sends nothing more.
    r = requests.put(f"{system.app}/todos/{todo['id']}/complete", timeout=10)
    assert r.status_code == 409
    time.sleep(0.5)
    assert len(hooks()) == 1
    # Bob got his welcome email and no reminder.
    wait_until(lambda: system.smtp.to("bob@example.com"), 15, "Bob's welcome email")
    assert [m["subject"] for m in system.smtp.to("bob@example.com")] == ["Welcome to Sluice Todo, Bob!"]


def complete_new_todo(system, user_id: int, title: str) -> int:
    r = post(system, "/todos", {"user_id": user_id, "title": title})
    assert r.status_code == 201, r.text
    todo_id = r.json()["todo"]["id"]
    r = requests.put(f"{system.app}/todos/{todo_id}/complete", timeout=10)
    assert r.status_code == 200, r.text
    return todo_id


def hooks_for(system, todo_id: int) -> list:
    with system.webhook.lock:
        return [h for h in system.webhook.received if h["json"]["todo_id"] == todo_id]


def test_webhook_failures_retry_when_transient_and_dead_letter_when_permanent(system):
    user = create_user(system, "Hal", "hal@example.com")
    flaky = complete_new_todo(system, user["id"], "flaky chore")
    gone = complete_new_todo(system, user["id"], "gone chore")

    first, second = wait_until(lambda: len(hooks_for(system, flaky)) == 2 and hooks_for(system, flaky), 15, "the retried webhook")
    # The same notification, retried after the queue's 1 s backoff step.
    assert first["json"]["id"] == second["json"]["id"] == first["headers"]["idempotency-key"]
    # The worker acks after the webhook answered, so the ack may still be on its way.
    job = wait_until(
        lambda: (j := system.sluice.get_job(first["json"]["id"])).state == pb.JOB_STATE_COMPLETED and j,
        10,
        "the retried notification job to complete",
    )
    assert job.attempts == 2
    assert "503" in job.last_error, job.last_error

    def dead():
        return [j for j in system.sluice.list_jobs("notifications.dlq") if json.loads(j.payload)["todo_id"] == gone]

    [job] = wait_until(dead, 15, "the notification job in notifications.dlq")
    assert job.headers["x-sluice-attempts"] == "1"
    assert "410 Gone" in job.headers["x-sluice-last-error"], job.headers["x-sluice-last-error"]
    assert len(hooks_for(system, gone)) == 1
    # Only the delivered one reaches the app.
    def shown():
        r = requests.get(f"{system.app}/users/{user['id']}/notifications", timeout=5)
        return [n["todo_id"] for n in r.json()["notifications"]]

    assert wait_until(shown, 15, "the delivered notification in the app") == [flaky]


def test_due_reminder_then_one_overdue_email(system):
    user = create_user(system, "Carol", "carol@example.com")
    due = utc(2)
    r = post(system, "/todos", {"user_id": user["id"], "title": "Pay rent", "due_at": due})
    assert r.status_code == 201, r.text
    todo = r.json()["todo"]
    assert todo["due_at"] == due

    def reminders():
        return [m for m in system.smtp.to("carol@example.com") if m["subject"].startswith("Reminder")]

    [email] = wait_until(reminders, 15, "Carol's reminder email")
    assert email["subject"] == 'Reminder: "Pay rent" is due'
    assert email["body"] == (
        f'Hi Carol,\n\nYour todo #{todo["id"]} "Pay rent" is due at {due}.\n'
        f"Mark it done with PUT /todos/{todo['id']}/complete.{SIGNATURE}"
    )

    def overdue_emails():
        return [m for m in system.smtp.to("carol@example.com") if m["subject"].startswith("Overdue")]

    # Nobody calls GET /todos/overdue: the app's scheduled overdue scan (a broker schedule,
    # every second here) publishes todo.overdue once the due second is over.
    [email] = wait_until(overdue_emails, 15, "Carol's overdue email")
    assert email["subject"] == 'Overdue: "Pay rent"'
    assert email["body"] == (
        f'Hi Carol,\n\nYour todo #{todo["id"]} "Pay rent" was due at {due} and is not done yet.{SIGNATURE}'
    )
    # GET /todos/overdue is a read: it lists the todo as overdue and already notified.
    r = requests.get(f"{system.app}/todos/overdue", timeout=10)
    assert r.status_code == 200, r.text
    overdue = r.json()
    assert todo["id"] in [t["id"] for t in overdue["todos"]]
    assert overdue["message"] == f'{overdue["count"]} overdue todo(s), {overdue["count"]} already notified'
    # Later scans (and reads) send no second overdue email.
    schedules = sluice_schedules(system)
    fired = schedules["todo-overdue-scan"]["fired"]
    wait_until(lambda: sluice_schedules(system)["todo-overdue-scan"]["fired"] >= fired + 2, 10, "two more scans")
    assert len(overdue_emails()) == 1
    # The reminder already ran, so completing cannot cancel it.
    r = requests.put(f"{system.app}/todos/{todo['id']}/complete", timeout=10)
    assert r.json()["reminder"] == "already_sent"


def test_poisoned_job_ends_in_the_dead_letter_queue(system):
    create_user(system, "Mallory", "reject-mallory@example.com")

    def dead():
        return [
            j
            for j in system.sluice.list_jobs("emails.dlq")
            if json.loads(j.payload).get("email") == "reject-mallory@example.com"
        ]

    [job] = wait_until(dead, 15, "the rejected welcome job in emails.dlq")
    assert job.kind == "user.registered"
    assert job.headers["x-sluice-original-queue"] == "emails"
    assert job.headers["x-sluice-attempts"] == "1"
    assert "550" in job.headers["x-sluice-last-error"]
    assert "reject-mallory@example.com" in job.headers["x-sluice-last-error"]
    original = system.sluice.get_job(job.id)
    assert original.state == pb.JOB_STATE_DEAD
    assert original.attempts == 1, "a permanent failure is not retried"
    assert original.dead_letter_queue == "emails.dlq"
    assert system.smtp.to("reject-mallory@example.com") == []
    assert system.smtp.rejected == ["reject-mallory@example.com"]


def test_transient_smtp_failure_retries_with_backoff_then_sends_once(system):
    user = create_user(system, "Bea", "busy-bea@example.com")
    [email] = wait_until(lambda: system.smtp.to("busy-bea@example.com"), 15, "Bea's email after a retry")
    assert email["subject"] == "Welcome to Sluice Todo, Bea!"
    assert email["body"] == welcome_body("Bea", user["id"])
    job_id = email["message_id"].strip("<>").split("@")[0]
    job = wait_until(
        lambda: (j := system.sluice.get_job(job_id)).state == pb.JOB_STATE_COMPLETED and j,
        10,
        "the job to complete",
    )
    assert job.attempts == 2
    assert "451" in job.last_error, job.last_error
    # The queue's first backoff step is 1 s.
    assert job.finished_at_unix_ms - job.enqueued_at_unix_ms >= 1000
    time.sleep(0.5)
    assert len(system.smtp.to("busy-bea@example.com")) == 1


def test_worker_killed_mid_job_has_its_job_redelivered_and_done_once_more(system):
    create_user(system, "Sam", "slow-sam@example.com")
    assert system.smtp.slow_started.wait(15), "the worker never reached the SMTP server"

    def leased():
        return [
            j
            for j in system.sluice.list_jobs("emails", pb.JOB_STATE_LEASED)
            if json.loads(j.payload).get("email") == "slow-sam@example.com"
        ]

    [job] = wait_until(leased, 5, "Sam's welcome job to be leased")
    assert job.consumer == "email-worker-a"
    assert job.attempts == 1

    assert system.processes.kill("email-worker-a", signal.SIGKILL) == -signal.SIGKILL
    start_email_worker(system, "email-worker-b")

    [email] = wait_until(lambda: system.smtp.to("slow-sam@example.com"), 20, "Sam's email after redelivery")
    assert email["subject"] == "Welcome to Sluice Todo, Sam!"
    done = wait_until(
        lambda: (j := system.sluice.get_job(job.id)).state == pb.JOB_STATE_COMPLETED and j,
        10,
        "the job to complete",
    )
    assert done.attempts == 2
    assert done.consumer == "email-worker-b"
    time.sleep(0.5)
    assert len(system.smtp.to("slow-sam@example.com")) == 1, "done once more, not twice"
    # The other test users' emails were not sent again by the new worker.
    assert len(system.smtp.to("alice@example.com")) == 1


def test_monitoring_endpoints(system):
    status = requests.get(f"{system.app}/queue/status", timeout=5).json()
    assert status["success"] is True
    emails, notifications = status["queues"]["emails"], status["queues"]["notifications"]
    for q in (emails, notifications):
        assert {"pending", "scheduled", "processing", "retrying", "completed", "failed", "dead"} <= set(q)
    assert emails["completed"] >= 5
    assert emails["dead"] >= 1
    assert emails["cancelled"] >= 1
    assert notifications["completed"] >= 1
    assert status["topics"]["user.registered"]["published"] >= 5
    # Workers seen in the last minute: the killed and the new email worker, one notifier.
    assert status["workers"] == {"emails": 2, "notifications": 1}

    history = requests.get(f"{system.app}/jobs/history", timeout=5).json()["jobs"]
    kinds = {(j["kind"], j["state"]) for j in history}
    assert {
        ("user.registered", "completed"),
        ("user.registered", "dead"),
        ("todo.reminder", "completed"),
        ("todo.reminder", "cancelled"),
        ("todo.overdue", "completed"),
        ("todo.completed", "completed"),
    } <= kinds
    finished = [j["finished_at"] for j in history]
    assert finished == sorted(finished, reverse=True), "newest first"

    workers = requests.get(f"{system.app}/workers", timeout=5).json()["workers"]
    email_names = {w["name"] for w in workers["emails"]}
    assert {"email-worker-a", "email-worker-b"} <= email_names
    assert [w["name"] for w in workers["notifications"]] == ["notification-worker-a"]
    assert next(w for w in workers["notifications"])["done"] >= 1


def test_a_rate_limited_email_queue_sends_30_emails_in_3_s_each_once(system):
    """`EMAIL_RATE_LIMIT=10` on a second email worker limits the queue, so both workers
    together send 10 emails a second, evenly (burst 1): 30 take at least 2.9 s."""
    system.processes.start(
        "email-worker-limited",
        [binary("email_worker")],
        env={
            "SLUICE_URL": system.sluice_url,
            "SMTP_URL": f"smtp://127.0.0.1:{system.smtp_port}",
            "WORKER_NAME": "email-worker-limited",
            "EMAIL_RATE_LIMIT": "10",
        },
    )

    def limited():
        system.processes.check_alive("email-worker-limited")
        [emails] = [q for q in system.sluice.stats().queues if q.name == "emails"]
        return emails.rate_limit_per_second == 10 and emails

    wait_until(limited, 20, "the emails queue's rate limit")
    try:
        started = time.monotonic()
        addresses = [f"paced-{i}@example.com" for i in range(30)]
        for i, address in enumerate(addresses):
            create_user(system, f"Paced {i}", address)
        wait_until(lambda: all(system.smtp.to(a) for a in addresses), 30, "30 paced emails")
        elapsed = time.monotonic() - started
        # One now, then 29 at 10 a second; the bound leaves room for a coarse clock.
        assert elapsed >= 2.5, elapsed
        time.sleep(0.5)
        assert [len(system.smtp.to(a)) for a in addresses] == [1] * 30, "each sent once"
        [emails] = [q for q in system.sluice.stats().queues if q.name == "emails"]
        assert emails.rate_limited_ms > 0
    finally:
        system.sluice.update_queue("emails", rate_limit={})
        system.processes.kill("email-worker-limited")


def test_a_malformed_user_registered_is_refused_with_the_bad_fields_path(system):
    """The todo app set JSON Schemas on its event topics at startup (examples/schemas/):
    a malformed `user.registered` is refused with the path of the bad field and the rule,
    and nothing of it is published (nor copied into the emails queue by the binding)."""
    schema = system.sluice.get_schema(topic="user.registered")
    assert schema.current_revision >= 1
    with open(ROOT / "examples" / "schemas" / "user.registered.json") as f:
        assert schema.history[-1].json_schema.text == f.read()

    def counts():
        stats = system.sluice.stats()
        topic = next((t for t in stats.topics if t.name == "user.registered"), None)
        emails = next(q for q in stats.queues if q.name == "emails")
        return (topic.last_sequence if topic else 0, emails.enqueued)

    create_user(system, "Schema", "schema-check@example.com")
    before = counts()
    good = {"user_id": 7, "name": "Eve", "email": "eve@example.com", "registered_at": "2026-12-06T20:00:00Z"}
    bad = dict(good, email="not-an-address")
    with pytest.raises(grpc.RpcError) as err:
        system.sluice.publish("user.registered", json.dumps(bad).encode())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert "messages[0].payload" in details, details
    assert 'at "/email"' in details, details
    assert 'rule: format "email"' in details, details
    missing = {k: v for k, v in good.items() if k != "user_id"}
    with pytest.raises(grpc.RpcError) as err:
        system.sluice.publish("user.registered", json.dumps(missing).encode())
    assert "rule: required" in err.value.details() and "user_id" in err.value.details()
    assert counts() == before, "nothing was published or enqueued"
    # The schema is enforced on what the app publishes too: its events pass.
    create_user(system, "Schema Two", "schema-check-2@example.com")
    assert counts()[0] == before[0] + 1
