//! The dashboard page in real headless Chromium, driven over the Chrome DevTools protocol:
//! the page must show the broker's queues, topics and workers and update itself (no
//! reload) as jobs are enqueued and acked. A screenshot at laptop size (1366x768) is saved
//! as `test-artifacts/dashboard.png`.
//!
//! Needs Debian's `chromium` (or `SLUICE_CHROMIUM=/path/to/chrome`); without one the test
//! fails and says how to install it (`scripts/install-test-deps.sh` does), so a machine
//! without a browser cannot report the dashboard as checked.

#[path = "ops_common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::Harness;
use common::test_broker::{eventually, eventually_within, rpc};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use sluice::client::Rpc;
use sluice::pb;
use tokio_tungstenite::tungstenite::Message;

fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| {
            ["chromium", "chromium-browser", "google-chrome"].map(|name| dir.join(name))
        })
        .find(|p| p.is_file())
}

/// A Chrome DevTools protocol connection to the browser.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Cdp {
    /// Sends a command (to a page session, if given) and returns its result.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("send a CDP command");
        let reply = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                let frame = self
                    .ws
                    .next()
                    .await
                    .expect("CDP connection open")
                    .expect("CDP frame");
                let Message::Text(text) = frame else { continue };
                let v: Value = serde_json::from_str(&text).expect("CDP JSON");
                // Events (no id) and other replies are skipped.
                if v["id"] == id {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no reply to {method}"));
        assert!(reply.get("error").is_none(), "{method} failed: {reply}");
        reply["result"].clone()
    }

    /// Evaluates a JS expression in the page and returns its value.
    async fn eval(&mut self, session: &str, expression: &str) -> Value {
        let r = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expression} threw: {r}"
        );
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until `ok` accepts its value (up to 10 s); returns it.
    async fn wait_for(
        &mut self,
        session: &str,
        expression: &str,
        what: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.eval(session, expression).await;
            if ok(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page never showed {what}; last value: {v}"
            );
            // A poll interval: each poll is a round trip to the browser. (Not `eventually`:
            // every poll needs `self` mutably.)
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The text of every `data-field` cell of the row matching `selector`, as a JSON object
/// (null when there is no such row).
fn row_js(selector: &str) -> String {
    format!(
        r#"(() => {{
            const tr = document.querySelector({selector:?});
            if (!tr) return null;
            return Object.fromEntries([...tr.querySelectorAll("td[data-field]")]
                .map(td => [td.dataset.field, td.textContent]));
        }})()"#
    )
}

/// Leases `lease` jobs of `queue` as `consumer` and acks the first `ack` of them; returns
/// the ones still held.
async fn lease_and_ack(
    c: &mut Rpc,
    queue: &str,
    consumer: &str,
    lease: u32,
    ack: usize,
) -> Vec<pb::LeasedJob> {
    let jobs = rpc::lease(c, queue, consumer, lease).await;
    assert_eq!(jobs.len(), lease as usize);
    rpc::ack(c, &jobs[..ack]).await;
    jobs[ack..].to_vec()
}

async fn enqueue(c: &mut Rpc, queue: &str, n: usize, delay_ms: u64) {
    c.enqueue(pb::EnqueueRequest {
        queue: queue.into(),
        jobs: (0..n)
            .map(|i| pb::JobSpec {
                payload: Bytes::from(format!("{queue} {i}")),
                priority: (i % 3) as u32,
                delay_ms,
                ..Default::default()
            })
            .collect(),
    })
    .await
    .unwrap();
}

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("test-artifacts")
}

/// Waits until the dashboard's sampler has taken `n` more samples (each a new
/// `/api/stats` frame), so activity before and after falls into different chart points
/// however late a loaded machine runs the sampler.
async fn after_samples(http: std::net::SocketAddr, n: usize) {
    let taken_at = || async {
        let frame = common::http_get(http, "/api/stats").await;
        let frame: Value = serde_json::from_str(&frame.body).expect("a JSON frame");
        frame["taken_at_unix_ms"]
            .as_u64()
            .expect("taken_at_unix_ms")
    };
    let mut last = taken_at().await;
    for _ in 0..n {
        last = eventually(|| async {
            let now = taken_at().await;
            (now > last)
                .then_some(now)
                .ok_or("the dashboard took no new sample")
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_updates_live_in_chromium() {
    let chromium = find_chromium().unwrap_or_else(|| {
        panic!(
            "no chromium found on PATH (looked for chromium, chromium-browser, google-chrome): \
             run scripts/install-test-deps.sh (apt-get install -y chromium), or set \
             SLUICE_CHROMIUM=/path/to/chrome"
        )
    });
    let h = Harness::start(200).await;
    let mut c = h.rpc().await;

    let profile = std::env::temp_dir().join(format!(
        "sluice-dashboard-{}-{}",
        std::process::id(),
        sluice::broker::now_ms()
    ));
    let mut browser = tokio::process::Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-breakpad",
            "--remote-debugging-port=0",
            "--window-size=1366,768",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");

    // Chromium writes its DevTools port and browser path once it listens.
    let port_file = profile.join("DevToolsActivePort");
    let ws_url = eventually_within(Duration::from_secs(20), || async {
        let text = std::fs::read_to_string(&port_file).unwrap_or_default();
        let mut lines = text.lines();
        match (lines.next(), lines.next()) {
            (Some(port), Some(path)) => Ok(format!("ws://127.0.0.1:{port}{path}")),
            _ => Err("chromium did not open DevTools"),
        }
    })
    .await;
    let (ws, _) = tokio_tungstenite::connect_async(&ws_url)
        .await
        .expect("connect to DevTools");
    let mut cdp = Cdp { ws, next_id: 1 };

    let url = format!("http://{}/?window=1m", h.http);
    let target = cdp
        .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
        .await;
    let attached = cdp
        .call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        )
        .await;
    let session = attached["sessionId"].as_str().unwrap().to_owned();
    let s = session.as_str();
    cdp.call(
        Some(s),
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 1366, "height": 768, "deviceScaleFactor": 1, "mobile": false }),
    )
    .await;
    cdp.call(Some(s), "Page.navigate", json!({ "url": url }))
        .await;

    // Connected, and empty.
    cdp.wait_for(
        s,
        "document.getElementById('status-text')?.textContent",
        "a live connection",
        |v| v == "live",
    )
    .await;
    assert_eq!(
        cdp.eval(s, "document.getElementById('t-completed').textContent")
            .await,
        "0"
    );
    assert_eq!(
        cdp.eval(
            s,
            "document.querySelector('#queues tbody').textContent.trim()"
        )
        .await,
        "No queues yet"
    );
    // Marks this page load: a reload would lose it.
    cdp.eval(s, "window.sluiceTestMarker = 42").await;

    // Activity in steps, so the charts get a shape.
    let mut sub = c
        .subscribe(pb::SubscribeRequest {
            pattern: "user.>".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    enqueue(&mut c, "orders.process", 25, 0).await;
    enqueue(&mut c, "email.send", 12, 0).await;
    enqueue(&mut c, "email.send", 3, 600_000).await;
    after_samples(h.http, 3).await;
    c.publish(pb::PublishRequest {
        topic: "user.registered".into(),
        messages: (0..5)
            .map(|i| pb::PublishMessage {
                payload: Bytes::from(format!("{{\"id\":{i}}}")),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .unwrap();
    let mut received = 0;
    while received < 5 {
        received += tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .messages
            .len();
    }
    let held = lease_and_ack(&mut c, "orders.process", "order-worker-1", 10, 8).await;
    lease_and_ack(&mut c, "email.send", "email-worker-1", 4, 4).await;

    let orders = cdp
        .wait_for(
            s,
            &row_js("tr[data-queue=\"orders.process\"]"),
            "orders.process with 8 completed",
            |v| v["completed"] == "8",
        )
        .await;
    assert_eq!(orders["pending"], "15");
    assert_eq!(orders["leased"], "2");
    // No queue has a limit yet: the limits' columns are hidden.
    let no_limits = "document.getElementById('queues').classList.contains('no-limits')";
    assert_eq!(cdp.eval(s, no_limits).await, true);
    assert_eq!(orders["enqueued"], "25");
    assert_eq!(orders["consumers"], "1");
    let email = cdp
        .wait_for(
            s,
            &row_js("tr[data-queue=\"email.send\"]"),
            "email.send with 4 completed",
            |v| v["completed"] == "4",
        )
        .await;
    assert_eq!(email["scheduled"], "3");
    assert_eq!(email["pending"], "8");
    let topic = cdp
        .wait_for(
            s,
            &row_js("tr[data-topic=\"user.registered\"]"),
            "the user.registered topic",
            |v| !v.is_null(),
        )
        .await;
    assert_eq!(topic["published"], "5");
    assert_eq!(topic["subscribers"], "1");
    assert_eq!(topic["range"], "1 .. 5");
    assert_eq!(topic["schema_revision"], "-");
    // A schema set on the topic shows as its revision.
    c.set_schema(pb::SetSchemaRequest {
        target: Some(pb::SchemaTarget {
            target: Some(pb::schema_target::Target::Topic("user.registered".into())),
        }),
        schema: Some(pb::set_schema_request::Schema::JsonSchema(pb::JsonSchema {
            text: r#"{"type": "object"}"#.into(),
        })),
    })
    .await
    .unwrap();
    cdp.wait_for(
        s,
        &row_js("tr[data-topic=\"user.registered\"]"),
        "the user.registered topic's schema revision",
        |v| v["schema_revision"] == "rev 1",
    )
    .await;
    let worker = cdp
        .wait_for(
            s,
            &row_js("tr[data-worker=\"orders.process/order-worker-1\"]"),
            "order-worker-1",
            |v| !v.is_null(),
        )
        .await;
    assert_eq!(worker["done"], "8");
    assert_eq!(worker["leases_held"], "2");
    assert_eq!(
        cdp.eval(s, "document.getElementById('t-completed').textContent")
            .await,
        "12"
    );

    // More work: the same page follows.
    after_samples(h.http, 3).await;
    c.ack(pb::AckRequest {
        acks: held
            .iter()
            .map(|j| pb::LeaseAck {
                lease_id: j.lease_id.clone(),
                result: Bytes::new(),
            })
            .collect(),
    })
    .await
    .unwrap();
    enqueue(&mut c, "orders.process", 10, 0).await;
    after_samples(h.http, 3).await;
    lease_and_ack(&mut c, "orders.process", "order-worker-2", 12, 12).await;
    let orders = cdp
        .wait_for(
            s,
            &row_js("tr[data-queue=\"orders.process\"]"),
            "orders.process with 22 completed",
            |v| v["completed"] == "22",
        )
        .await;
    assert_eq!(orders["pending"], "13");
    assert_eq!(orders["leased"], "0");
    assert_eq!(orders["consumers"], "2");
    assert_eq!(
        cdp.eval(s, "window.sluiceTestMarker").await,
        42,
        "the page reloaded"
    );
    cdp.wait_for(
        s,
        "document.getElementById('t-completed').textContent",
        "26 completed in the tiles",
        |v| v == "26",
    )
    .await;

    // The charts drew their series: pixels in the pending and acked colours.
    let coloured = |id: &str, rgb: (i32, i32, i32)| {
        format!(
            r#"(() => {{
                const c = document.getElementById("{id}");
                const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) {{
                    if (Math.abs(d[i] - {}) < 40 && Math.abs(d[i + 1] - {}) < 40
                        && Math.abs(d[i + 2] - {}) < 40 && d[i + 3] > 200) n++;
                }}
                return n;
            }})()"#,
            rgb.0, rgb.1, rgb.2
        )
    };
    cdp.wait_for(
        s,
        &coloured("depth-chart", (0x4e, 0xa1, 0xff)),
        "the depth chart's pending series (over 20 pixels)",
        |v| v.as_u64().is_some_and(|n| n > 20),
    )
    .await;
    cdp.wait_for(
        s,
        &coloured("rate-chart", (0x34, 0xd3, 0x99)),
        "the throughput chart's acked series (over 20 pixels)",
        |v| v.as_u64().is_some_and(|n| n > 20),
    )
    .await;

    // Everything the page loaded came from the broker itself.
    let foreign = cdp
        .eval(
            s,
            "performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith(location.origin))",
        )
        .await;
    assert_eq!(foreign, json!([]), "resources from elsewhere");
    cdp.wait_for(
        s,
        r#"document.querySelector('tr[data-queue="orders.process"] td.trend polyline').getAttribute('points').split(' ').length"#,
        "a trend sparkline of 3 points or more",
        |v| v.as_u64().is_some_and(|n| n >= 3),
    )
    .await;

    // A queue's limits, and a queue only a worker (with a typo) names.
    common::create_limited_queue(&mut c, "mail.limited").await;
    enqueue(&mut c, "mail.limited", 5, 0).await;
    // max_in_flight cuts the lease short at 2, and holds the rest back from then on.
    assert_eq!(
        rpc::lease(&mut c, "mail.limited", "mailer", 10).await.len(),
        2
    );
    assert!(
        rpc::lease(&mut c, "orders.proces", "typo-worker", 1)
            .await
            .is_empty()
    );
    let limited = cdp
        .wait_for(
            s,
            &row_js("tr[data-queue=\"mail.limited\"]"),
            "mail.limited holding jobs back",
            // The rate limit's time, then max_in_flight's: only the latter grows.
            |v| {
                v["held_back"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("0 ms + ") && t != "0 ms + 0 ms")
            },
        )
        .await;
    assert_eq!(limited["in_flight"], "2 / 2");
    assert_eq!(cdp.eval(s, no_limits).await, false);
    // Two of three tokens taken; the bucket refills one a second.
    let rate = limited["rate_limit"].as_str().unwrap();
    assert!(
        ["1/s, 1 / 3", "1/s, 2 / 3", "1/s, 3 / 3"].contains(&rate),
        "rate limit cell {rate:?}"
    );
    let orders = cdp
        .eval(s, &row_js("tr[data-queue=\"orders.process\"]"))
        .await;
    assert_eq!(
        (
            &orders["in_flight"],
            &orders["rate_limit"],
            &orders["held_back"]
        ),
        (&json!("-"), &json!("-"), &json!("-"))
    );
    let typo_row = r#"document.querySelector('tr[data-queue="orders.proces"]')"#;
    cdp.wait_for(
        s,
        &format!("{typo_row}?.classList.contains('consumer-created')"),
        "the typo's queue marked created by a consumer",
        |v| v == true,
    )
    .await;
    let note = cdp
        .eval(
            s,
            &format!("getComputedStyle({typo_row}.querySelector('td.name'), '::after').content"),
        )
        .await;
    assert_eq!(note, "\" no producer\"");
    assert_eq!(
        cdp.eval(
            s,
            r#"document.querySelector('tr[data-queue="orders.process"]').classList.contains('consumer-created')"#
        )
        .await,
        false
    );

    // A recurring schedule shows with its fires and last job.
    c.create_schedule(pb::ScheduleSpec {
        name: "heartbeat".into(),
        trigger: Some(pb::schedule_spec::Trigger::IntervalMs(1_000)),
        job: Some(pb::ScheduleJob {
            queue: "beats".into(),
            kind: "beat".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let heartbeat = cdp
        .wait_for(
            s,
            &row_js("tr[data-schedule=\"heartbeat\"]"),
            "the heartbeat schedule having fired",
            |v| v["fired"].as_str().is_some_and(|n| n != "0"),
        )
        .await;
    assert_eq!(heartbeat["trigger"], "every 1000 ms");
    assert_eq!(heartbeat["queue"], "beats");
    assert_eq!(heartbeat["paused"], "active");
    assert!(heartbeat["last_fire"].as_str().unwrap().ends_with(" ago"));
    assert!(heartbeat["next_fire"].as_str().unwrap().starts_with("in "));
    assert_ne!(heartbeat["last_job_id"], "-");

    // Laptop size: nothing sticks out sideways.
    let width = cdp.eval(s, "document.documentElement.scrollWidth").await;
    assert!(width.as_u64().unwrap() <= 1366, "page is {width} px wide");

    let shot = cdp
        .call(
            Some(s),
            "Page.captureScreenshot",
            json!({ "format": "png" }),
        )
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    std::fs::create_dir_all(artifacts()).unwrap();
    let path = artifacts().join("dashboard.png");
    std::fs::write(&path, &png).unwrap();
    println!("screenshot saved to {}", path.display());

    // The browser may drop the connection before it replies to Browser.close.
    let close = json!({ "id": cdp.next_id, "method": "Browser.close", "params": {} });
    let _ = cdp.ws.send(Message::Text(close.to_string().into())).await;
    if tokio::time::timeout(Duration::from_secs(5), browser.wait())
        .await
        .is_err()
    {
        let _ = browser.kill().await;
    }
    let _ = std::fs::remove_dir_all(&profile);
}
