"""SPEC §7 from other languages: a broker started with a tokens file and a TLS certificate
(made here with the openssl command line), driven by real grpcurl and by the Python client
generated from proto/. Tokens come from `sluice token`."""

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import requests

from conftest import binary, free_port, wait_until
from sluice_client import SluiceClient


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    """ca.pem, and server.pem / server.key for localhost signed by it."""
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=sluice e2e CA", cwd=d,
    )
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext",
        cwd=d,
    )


def new_token(name: str) -> tuple[str, str]:
    """(token, its [[token]] table) from `sluice token`."""
    out = subprocess.run(
        [str(binary("sluice")), "token", "--name", name],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout
    token = next(line[2:] for line in out.splitlines() if line.startswith("# sk_"))
    table = "".join(f"{line}\n" for line in out.splitlines() if not line.startswith("#"))
    return token, table


@pytest.fixture(scope="module")
def secured(processes, tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    producer, producer_table = new_token("producer")
    ops, ops_table = new_token("ops")
    # Least privilege for the example system: each process runs ensure_topology (admin on
    # its queues; subscribe on the topics they bind), then does its own work.
    app, app_table = new_token("todo-app")
    worker, worker_table = new_token("workers")
    (d / "tokens.toml").write_text(
        producer_table + 'enqueue = ["emails"]\n'
        + ops_table + 'admin = [">"]\nconsume = [">"]\n'
        + app_table
        + 'publish = ["user.registered", "todo.>"]\n'
        + 'subscribe = ["user.registered", "todo.>", "notification.delivered"]\n'
        + 'enqueue = ["emails"]\n'
        # Its event schemas (topics) and its overdue scan's schedule and queue.
        + 'admin = ["emails", "notifications", "user.registered", "todo.>", "todo-maintenance"]\n'
        + 'consume = ["todo-maintenance"]\n'
        + worker_table
        + 'publish = ["notification.delivered"]\n'
        + 'subscribe = ["user.registered", "todo.>"]\n'
        + 'consume = ["emails", "notifications"]\n'
        + 'admin = ["emails", "notifications"]\n'
    )
    port = free_port()
    processes.start(
        "secured-broker",
        [
            binary("sluice"), "serve", "--storage", "memory",
            "--listen", f"127.0.0.1:{port}",
            "--tokens-file", d / "tokens.toml",
            "--tls-cert", d / "server.pem", "--tls-key", d / "server.key",
        ],
    )
    target = f"localhost:{port}"
    ca = (d / "ca.pem").read_bytes()

    def ready():
        processes.check_alive("secured-broker")
        with SluiceClient(target, token=ops, root_certificates=ca) as c:
            c.stats()
        return True

    wait_until(ready, 15, f"TLS broker on {target}")
    return {
        "target": target, "ca": ca, "ca_path": d / "ca.pem", "producer": producer, "ops": ops,
        "app": app, "worker": worker, "work": d,
    }


def grpcurl(s, *args, token=None, data=None):
    exe = shutil.which("grpcurl")
    assert exe, "grpcurl is not installed: run scripts/install-test-deps.sh"
    cmd = [exe, "-cacert", str(s["ca_path"]), "-max-time", "10"]
    if token:
        cmd += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [s["target"], *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


def test_grpcurl_over_tls_with_a_token(secured):
    # Reflection needs no token, so grpcurl can describe the API before it has one.
    listed = grpcurl(secured, "list")
    assert listed.returncode == 0, listed.stderr
    assert "sluice.v1.Broker" in listed.stdout.split()

    job = {"queue": "emails", "jobs": [{"payload": "aGk="}]}
    refused = grpcurl(secured, "sluice.v1.Broker/Enqueue", data=job)
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr and "Bearer" in refused.stderr, refused.stderr

    ok = grpcurl(secured, "sluice.v1.Broker/Enqueue", token=secured["producer"], data=job)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["results"][0]["jobId"]

    denied = grpcurl(
        secured, "sluice.v1.Broker/Enqueue", token=secured["producer"],
        data={"queue": "billing", "jobs": [{"payload": "aGk="}]},
    )
    assert denied.returncode != 0
    assert "PermissionDenied" in denied.stderr, denied.stderr
    assert 'token "producer" may not enqueue "billing"' in denied.stderr, denied.stderr


def test_python_client_over_tls_with_a_token(secured):
    target, ca = secured["target"], secured["ca"]
    with SluiceClient(target, token=secured["producer"], root_certificates=ca) as producer:
        job_id = producer.enqueue("emails", b"from python")
        with pytest.raises(grpc.RpcError) as err:
            producer.lease("emails", max_jobs=1)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert 'may not consume "emails"' in err.value.details()
    with SluiceClient(target, token=secured["ops"], root_certificates=ca) as ops:
        jobs = ops.lease("emails", max_jobs=10, wait_ms=1000, consumer="py-ops")
        # The grpcurl test may have enqueued into the same queue first.
        assert job_id in [j.job_id for j in jobs]
        for job in jobs:
            ops.ack(job.lease_id)
    with SluiceClient(target, root_certificates=ca) as anonymous:
        with pytest.raises(grpc.RpcError) as err:
            anonymous.stats()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_example_system_runs_against_a_secured_broker(secured, processes):
    """The todo app and both workers reach a TLS broker with their own tokens
    (SLUICE_URL https://, SLUICE_TOKEN, SLUICE_CA_CERT) and every flow still works."""
    work = secured["work"]
    url = f"https://{secured['target']}"
    tls = {"SLUICE_URL": url, "SLUICE_CA_CERT": str(secured["ca_path"])}
    listen = f"127.0.0.1:{free_port()}"
    processes.start(
        "secured-todo_app",
        [binary("todo_app")],
        env={**tls, "SLUICE_TOKEN": secured["app"], "TODO_LISTEN": listen,
             "TODO_DB": str(work / "todo.sqlite3")},
    )
    outbox = work / "outbox"
    processes.start(
        "secured-email_worker",
        [binary("email_worker")],
        env={**tls, "SLUICE_TOKEN": secured["worker"], "OUTBOX_DIR": str(outbox), "SMTP_URL": ""},
    )
    processes.start(
        "secured-notification_worker",
        [binary("notification_worker")],
        env={**tls, "SLUICE_TOKEN": secured["worker"], "WEBHOOK_URL": ""},
    )
    app = f"http://{listen}"

    def healthy():
        processes.check_alive("secured-todo_app")
        return requests.get(f"{app}/healthz", timeout=2).ok

    wait_until(healthy, 30, "todo_app on a secured broker")

    r = requests.post(f"{app}/users", json={"name": "Tess", "email": "tess@example.com"}, timeout=10)
    assert r.status_code == 201, r.text
    user_id = r.json()["user"]["id"]
    [eml] = wait_until(lambda: list(outbox.glob("*.eml")), 20, "the welcome email in the outbox")
    assert b"tess@example.com" in eml.read_bytes()

    r = requests.post(f"{app}/todos", json={"user_id": user_id, "title": "Rotate keys"}, timeout=10)
    assert r.status_code == 201, r.text
    todo_id = r.json()["todo"]["id"]
    r = requests.put(f"{app}/todos/{todo_id}/complete", timeout=10)
    assert r.ok, r.text

    def notifications():
        url = f"{app}/users/{user_id}/notifications"
        return requests.get(url, timeout=5).json()["notifications"]

    [n] = wait_until(notifications, 20, "the achievement notification")
    assert n["todo_id"] == todo_id
    for name in ("secured-todo_app", "secured-email_worker", "secured-notification_worker"):
        processes.check_alive(name)
