"""The operations console, clicked through in headless Chromium (Selenium with Debian's
chromium and chromedriver) against the real `sluice serve` binary started with a tokens
file: an operator logs in with a token, finds a dead job, redrives it, and sees it
complete once a worker acks it; a token without `admin` on the dead-letter queue sees
the same click refused, and the job stays where it was; a leased job deleted from its page
is gone, and its worker's ack is refused as stale."""

import json
import shutil
import tempfile

import grpc
import pytest

from conftest import ROOT, binary, free_port, wait_until
from sluice_client import SluiceClient, pb
from test_security import new_token

try:
    from selenium import webdriver
except ImportError as e:  # a machine without the browser driver fails, it does not skip
    raise ImportError("selenium is missing: run scripts/install-test-deps.sh") from e
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def console(processes, tmp_path_factory):
    d = tmp_path_factory.mktemp("console")
    ops, ops_table = new_token("ops")
    viewer, viewer_table = new_token("viewer")
    # The viewer administers `emails` (so it finds its dead jobs) and reads the
    # dead-letter queue's jobs, but has no admin on `emails.dlq`, which a redrive needs.
    (d / "tokens.toml").write_text(
        ops_table + 'admin = [">"]\nenqueue = [">"]\nconsume = [">"]\n'
        + viewer_table + 'admin = ["emails"]\nconsume = ["emails", "emails.dlq"]\n'
    )
    grpc_port, http_port = free_port(), free_port()
    processes.start(
        "console-broker",
        [
            binary("sluice"), "serve", "--storage", "memory",
            "--listen", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}",
            "--tokens-file", d / "tokens.toml",
        ],
    )
    client = SluiceClient(f"127.0.0.1:{grpc_port}", token=ops)

    def ready():
        processes.check_alive("console-broker")
        client.stats()
        return True

    wait_until(ready, 15, "the broker with a tokens file")
    try:
        yield {"client": client, "url": f"http://127.0.0.1:{http_port}/console", "ops": ops,
               "viewer": viewer}
    finally:
        client.close()


@pytest.fixture
def browser():
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, (
        "chromium and chromedriver are needed: run scripts/install-test-deps.sh "
        "(apt-get install -y chromium chromium-driver)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1366,900"):
        options.add_argument(arg)
    profile = tempfile.mkdtemp(prefix="sluice-console-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def dead_job(client: SluiceClient, payload: dict) -> str:
    """Enqueues a job into `emails` and dead-letters it; returns its id."""
    job_id = client.enqueue("emails", json.dumps(payload).encode(), kind="email.send")
    leased = client.lease("emails", consumer="e2e-worker")
    assert [j.job_id for j in leased] == [job_id]
    client.nack(leased[0].lease_id, "550 mailbox unavailable", dead_letter=True)
    return job_id


def wait(driver, css: str, timeout: float = 15):
    return WebDriverWait(driver, timeout).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def click(driver, css: str, timeout: float = 15) -> None:
    WebDriverWait(driver, timeout).until(ec.element_to_be_clickable((By.CSS_SELECTOR, css))).click()


def log_in(driver, url: str, token: str) -> None:
    driver.get(url)
    # A broker with a tokens file: the page asks for one before it shows anything.
    wait(driver, "#login:not([hidden])")
    driver.find_element(By.ID, "token").send_keys(token)
    click(driver, "#login-button")
    wait(driver, "#queues")


def screenshot(driver, name: str) -> None:
    """Saves the page as test-artifacts/<name>.png, for a person to look at."""
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    driver.save_screenshot(str(out / f"{name}.png"))


def notice(driver, kind: str) -> str:
    return wait(driver, f"#notice.{kind}").text


def test_a_dead_job_is_found_redriven_and_completes(console, browser):
    client = console["client"]
    job_id = dead_job(client, {"to": "ann@example.com"})

    log_in(browser, console["url"], console["ops"])
    assert "token: ops" in browser.find_element(By.ID, "who").text
    screenshot(browser, "console-queues")
    # From the queue list to the dead-letter queue, to the dead letter's page.
    click(browser, 'tr[data-queue="emails"] a[data-dlq="emails.dlq"]')
    wait(browser, '#queue[data-queue="emails.dlq"]')
    click(browser, f'tr[data-job="{job_id}"] a')
    page = wait(browser, f'#job[data-job="{job_id}"]')
    assert browser.find_element(By.ID, "last-error").text == "550 mailbox unavailable"
    assert '"to": "ann@example.com"' in browser.find_element(By.ID, "payload-body").text
    # The same payload as hex.
    click(browser, '#payload button[data-mode="hex"]')
    assert "7b 22 74 6f" in browser.find_element(By.ID, "payload-body").text
    assert page.get_attribute("data-state") == "pending"
    screenshot(browser, "console-dead-letter")

    click(browser, '#job button[data-action="redrive"]')
    assert "redriven 1 job(s)" in notice(browser, "ok")
    # The page follows the job back to `emails`.
    wait(browser, f'#job[data-job="{job_id}"]')
    assert "/job/emails/" in browser.current_url

    # A worker takes it and acks it; the job's page shows it completed with its result.
    leased = client.lease("emails", consumer="e2e-worker", wait_ms=5000)
    assert [j.job_id for j in leased] == [job_id]
    client.ack(leased[0].lease_id, result=b"sent")

    def completed():
        browser.refresh()
        return wait(browser, "#job").get_attribute("data-state") == "completed"

    wait_until(completed, 15, "the job's page to show it completed")
    assert "sent" in browser.find_element(By.ID, "result-body").text
    assert client.get_job(job_id).state == pb.JOB_STATE_COMPLETED


def test_a_token_without_admin_on_the_queue_sees_the_action_refused(console, browser):
    client = console["client"]
    job_id = dead_job(client, {"to": "bob@example.com"})

    log_in(browser, console["url"], console["viewer"])
    # The viewer administers only `emails`: the dead-letter queue is not listed for it.
    names = [r.get_attribute("data-queue") for r in browser.find_elements(By.CSS_SELECTOR, "tr[data-queue]")]
    assert names == ["emails"], names
    click(browser, 'tr[data-queue="emails"] td a')
    click(browser, 'a[data-tab="finished"]')
    click(browser, f'tr[data-job="{job_id}"] a')
    page = wait(browser, f'#job[data-job="{job_id}"]')
    assert page.get_attribute("data-state") == "dead"

    click(browser, '#job button[data-action="redrive"]')
    refused = notice(browser, "error")
    assert refused.startswith("403:"), refused
    assert 'token "viewer" may not admin "emails.dlq"' in refused, refused
    screenshot(browser, "console-refused")

    # Nothing moved: the dead letter still waits in the dead-letter queue.
    waiting = client.list_jobs("emails.dlq")
    assert job_id in [j.id for j in waiting]


def test_a_leased_job_is_deleted_from_its_page_and_its_ack_is_refused(console, browser):
    client = console["client"]
    job_id = client.enqueue("reports", b'{"month":"2026-11"}', kind="report.build")
    leased = client.lease("reports", consumer="e2e-worker")
    assert [j.job_id for j in leased] == [job_id]

    log_in(browser, console["url"], console["ops"])
    browser.get(f'{console["url"]}#/job/reports/{job_id}')
    page = wait(browser, f'#job[data-job="{job_id}"]')
    assert page.get_attribute("data-state") == "leased"
    click(browser, '#job button[data-action="delete-job"]')
    # The page asks first; the operator confirms.
    alert = WebDriverWait(browser, 15).until(ec.alert_is_present())
    assert job_id in alert.text and "lease becomes stale" in alert.text, alert.text
    alert.accept()
    assert f"job {job_id} deleted (it was leased)" in notice(browser, "ok")
    # The page moves on to the job's queue, where the job is no longer listed.
    wait(browser, '#queue[data-queue="reports"]')
    assert not browser.find_elements(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]')
    screenshot(browser, "console-deleted")

    with pytest.raises(grpc.RpcError) as refused:
        client.ack(leased[0].lease_id)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    with pytest.raises(grpc.RpcError) as gone:
        client.get_job(job_id)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND, gone.value
