"""SPEC §7 from other languages: a broker started with a tokens file and a TLS certificate
(made here with the openssl command line), driven by real grpcurl and by the Python client
generated from proto/. Tokens come from `sluice token`."""

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

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
    (d / "tokens.toml").write_text(
        producer_table + 'enqueue = ["emails"]\n' + ops_table + 'admin = [">"]\nconsume = [">"]\n'
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
    return {"target": target, "ca": ca, "ca_path": d / "ca.pem", "producer": producer, "ops": ops}


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
