"""The TypeScript client (client/typescript) against real brokers: its node test runner file
(test/e2e.test.ts: enqueue, lease and ack, Consume with acks, publish and subscribe with
replay, refused calls' statuses, bearer tokens over TLS) and the README's example, run as pasted."""

import os
import re
import subprocess

import pytest

from conftest import ROOT, binary, free_port, wait_until
from sluice_client import SluiceClient
from test_security import make_pki, new_token

PACKAGE = ROOT / "client" / "typescript"


@pytest.fixture(scope="module")
def built_typescript():
    """Builds the client (types generated from proto/, then tsc; incremental), so the
    tests never run a stale build. npm ci is scripts/install-test-deps.sh's job."""
    assert (PACKAGE / "node_modules").is_dir(), (
        f"{PACKAGE / 'node_modules'} missing: run scripts/install-test-deps.sh"
    )
    subprocess.run(["npm", "run", "--silent", "build"], cwd=PACKAGE, check=True, timeout=300)


@pytest.fixture(scope="module")
def token_broker(processes, tmp_path_factory):
    """A broker with a tokens file and a TLS certificate; returns (target, token, path of
    the CA's PEM): the token may enqueue on ts.jobs and nothing else."""
    d = tmp_path_factory.mktemp("ts-tokens")
    make_pki(d)
    token, table = new_token("ts-producer")
    (d / "tokens.toml").write_text(table + 'enqueue = ["ts.jobs"]\n')
    port = free_port()
    processes.start(
        "ts-token-broker",
        [
            binary("sluice"), "serve", "--storage", "memory",
            "--listen", f"127.0.0.1:{port}", "--tokens-file", d / "tokens.toml",
            "--tls-cert", d / "server.pem", "--tls-key", d / "server.key",
        ],
    )
    target = f"localhost:{port}"
    ca = d / "ca.pem"

    def ready():
        processes.check_alive("ts-token-broker")
        with SluiceClient(target, token=token, root_certificates=ca.read_bytes()) as c:
            c.stats()
        return True

    wait_until(ready, 15, f"broker with tokens and TLS on {target}")
    return target, token, ca


def node(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["node", *args], cwd=PACKAGE, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_typescript_client_e2e(built_typescript, broker, token_broker):
    secured, token, ca = token_broker
    run = node(
        "--test", "--test-reporter=tap", "dist/test/e2e.test.js",
        env={
            "SLUICE_TARGET": broker,
            "SLUICE_SECURED_TARGET": secured,
            "SLUICE_TOKEN": token,
            "SLUICE_CA_FILE": str(ca),
        },
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    # Every test of the file ran and passed (none skipped or filtered out).
    source = (PACKAGE / "test" / "e2e.test.ts").read_text()
    expected = len(re.findall(r"^\s*test\(", source, re.MULTILINE))
    assert expected >= 8
    assert f"# pass {expected}\n" in output, output
    assert "# fail 0\n" in output, output


def readme_typescript_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### TypeScript client", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```ts\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_example_is_the_checked_example_and_runs(built_typescript, broker):
    example = (PACKAGE / "examples" / "quickstart.ts").read_text()
    assert readme_typescript_example() == example, (
        "the README's TypeScript example differs from client/typescript/examples/quickstart.ts"
    )
    run = node("dist/examples/quickstart.js", broker)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert re.fullmatch(r'leased \S+ kind=welcome attempt=1 payload=\{"to": "ann@example.com"\}', lines[0]), lines
    assert re.fullmatch(r"job \S+ is JOB_STATE_COMPLETED with result sent", lines[1]), lines
    assert lines[2] == "received ts.events.hello#1 hi from TypeScript (published as #1)", lines
    assert lines[3] == "replayed ts.events.hello#1", lines
    assert lines[4] == "refused: INVALID_ARGUMENT: jobs[0].priority: 10 exceeds the limit of 9", lines
