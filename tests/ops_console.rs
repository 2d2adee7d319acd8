//! The operations console's HTTP API (`/console/api/...`) on a broker served in-process:
//! jobs by state with paging, a job's page, the actions (redrive, cancel, delete a job,
//! purge, pause, resume, delete a queue), topics with their retained messages, refusals of
//! bad input that change nothing, and, with a tokens file, the same grants as gRPC. The
//! page itself is clicked through in Chromium by tests/e2e/test_console.py.

#[path = "ops_common/mod.rs"]
mod common;

use bytes::Bytes;
use common::test_broker::rpc::{get_job, lease};
use common::test_broker::{TestBroker, serve_options};
use common::{HttpResponse, http_request};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use sluice::broker::{Authenticator, HttpOptions, ServeOptions, Tokens, hash_token};
use sluice::client::{Client, ConnectOptions, Rpc};
use sluice::pb;

const ADMIN: &str = "admin-token";
const WORKER: &str = "worker-token";
const TEAM: &str = "team-token";

/// A broker of the engine under test (`SLUICE_TEST_ENGINE`) with gRPC and the operations
/// HTTP server, both checking the same tokens when there are any.
struct Harness {
    grpc: TestBroker,
    http: std::net::SocketAddr,
}

impl Harness {
    async fn start() -> Self {
        Self::serve(None).await
    }

    async fn start_with_auth(auth: Authenticator) -> Self {
        Self::serve(Some(auth)).await
    }

    async fn serve(auth: Option<Authenticator>) -> Self {
        let grpc = TestBroker::start_serving(ServeOptions {
            auth: auth.clone(),
            ..serve_options()
        })
        .await;
        let http = grpc
            .serve_http(HttpOptions {
                auth,
                ..HttpOptions::default()
            })
            .await;
        Self { grpc, http }
    }

    async fn rpc(&self) -> Rpc {
        self.grpc.rpc().await
    }
}

/// A caller of the console API: its token, if any.
struct Console<'a> {
    h: &'a Harness,
    token: Option<&'a str>,
}

impl<'a> Console<'a> {
    fn open(h: &'a Harness) -> Self {
        Self { h, token: None }
    }

    fn with(h: &'a Harness, token: &'a str) -> Self {
        Self {
            h,
            token: Some(token),
        }
    }

    fn headers(&self, extra: &[(&'static str, &'a str)]) -> Vec<(&'static str, String)> {
        let mut headers: Vec<(&'static str, String)> =
            extra.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        if let Some(t) = self.token {
            headers.push(("authorization", format!("Bearer {t}")));
        }
        headers
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        extra: &[(&'static str, &'a str)],
        body: &str,
    ) -> HttpResponse {
        let headers = self.headers(extra);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        http_request(
            self.h.http,
            method,
            &format!("/console/api{path}"),
            &headers,
            body,
        )
        .await
    }

    async fn get(&self, path: &str) -> HttpResponse {
        self.send(Method::GET, path, &[], "").await
    }

    /// A POST as the console page sends it.
    async fn post(&self, path: &str, body: &str) -> HttpResponse {
        self.send(
            Method::POST,
            path,
            &[
                ("x-sluice-console", "1"),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
    }

    /// GETs `path`, expecting 200, and parses the JSON.
    async fn json(&self, path: &str) -> Value {
        ok(self.get(path).await)
    }
}

/// The JSON of a 200 answer.
fn ok(r: HttpResponse) -> Value {
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    serde_json::from_str(&r.body).expect("JSON body")
}

/// Asserts a refusal: its status, and an error message containing every needle.
fn refused(r: HttpResponse, status: StatusCode, needles: &[&str]) {
    assert_eq!(r.status, status, "{}", r.body);
    let body: Value = serde_json::from_str(&r.body).expect("JSON error body");
    let message = body["error"].as_str().expect("an error message");
    for n in needles {
        assert!(message.contains(n), "{message:?} lacks {n:?}");
    }
}

async fn enqueue(rpc: &mut Rpc, queue: &str, payloads: &[&[u8]]) -> Vec<String> {
    rpc.enqueue(pb::EnqueueRequest {
        queue: queue.into(),
        jobs: payloads
            .iter()
            .map(|p| pb::JobSpec {
                payload: Bytes::copy_from_slice(p),
                kind: "email.send".into(),
                headers: [("trace".to_owned(), "t-1".to_owned())].into(),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .unwrap()
    .into_inner()
    .results
    .into_iter()
    .map(|r| r.job_id)
    .collect()
}

/// Enqueues one job into `queue` and dead-letters it (into `<queue>.dlq`); returns its id.
async fn dead_job(rpc: &mut Rpc, queue: &str) -> String {
    let id = enqueue(rpc, queue, &[br#"{"to":"ann@example.com"}"#]).await[0].clone();
    let leased = lease(rpc, queue, "w1", 1).await;
    rpc.nack(pb::NackRequest {
        lease_id: leased[0].lease_id.clone(),
        error: "550 mailbox unavailable".into(),
        dead_letter: true,
        ..Default::default()
    })
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn a_dead_job_is_found_shown_redriven_and_completes() {
    let h = Harness::start().await;
    let mut rpc = h.rpc().await;
    let id = dead_job(&mut rpc, "emails").await;
    let c = Console::open(&h);

    let session = c.json("/session").await;
    assert_eq!(session["auth_required"], false);
    let queues = c.json("/queues").await;
    let names: Vec<&str> = queues
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"emails") && names.contains(&"emails.dlq"),
        "{names:?}"
    );

    // The job's end in its queue's history, and its dead letter (same id) waiting in the
    // dead-letter queue.
    let history = c.json("/queues/emails/history").await;
    assert_eq!(history[0]["id"], id.as_str(), "{history}");
    assert_eq!(history[0]["state"], "dead");
    let dead = c.json("/queues/emails.dlq/jobs?state=pending").await;
    assert_eq!(dead["jobs"][0]["id"], id.as_str(), "{dead}");
    assert_eq!(dead["jobs"][0]["last_error"], "550 mailbox unavailable");
    assert_eq!(dead["next_page_token"], Value::Null);
    assert_eq!(
        c.json("/queues/emails.dlq/jobs?state=leased").await["jobs"],
        json!([])
    );

    let page = c.json(&format!("/jobs/{id}?queue=emails.dlq")).await;
    assert_eq!(page["state"], "pending");
    assert_eq!(page["origin"], "emails");
    assert_eq!(page["last_error"], "550 mailbox unavailable");
    assert_eq!(page["headers"]["x-sluice-attempts"], "1");
    assert_eq!(page["headers"]["trace"], "t-1");
    assert_eq!(page["payload"]["json"]["to"], "ann@example.com");
    assert_eq!(page["payload"]["text"], r#"{"to":"ann@example.com"}"#);
    assert!(
        page["payload"]["hex"]
            .as_str()
            .unwrap()
            .starts_with("00000000  7b 22 74 6f"),
        "{page}"
    );
    assert!(
        page["timeline"][0]["what"]
            .as_str()
            .unwrap()
            .starts_with("enqueued"),
        "{page}"
    );
    // Without a queue, the lookup finds its end in its own queue: dead, naming where its
    // dead letter is (the page's redrive button acts there).
    let end = c.json(&format!("/jobs/{id}")).await;
    assert_eq!(end["queue"], "emails", "{end}");
    assert_eq!(end["state"], "dead");
    assert_eq!(end["dead_letter_queue"], "emails.dlq");
    assert_eq!(end["attempts"], 1);

    let redriven = ok(c
        .post(
            "/queues/emails.dlq/redrive",
            &json!({ "job_ids": [id] }).to_string(),
        )
        .await);
    assert_eq!(redriven["redriven"], 1, "{redriven}");
    assert_eq!(c.json("/queues/emails.dlq/jobs").await["jobs"], json!([]));

    let leased = lease(&mut rpc, "emails", "w2", 1).await;
    assert_eq!(leased[0].job_id, id);
    rpc.ack(pb::AckRequest {
        acks: vec![pb::LeaseAck {
            lease_id: leased[0].lease_id.clone(),
            result: Bytes::from_static(b"sent"),
        }],
    })
    .await
    .unwrap();
    let done = c.json(&format!("/jobs/{id}?queue=emails")).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["result"]["text"], "sent");
    let history = c.json("/queues/emails/history").await;
    assert_eq!(history[0]["id"], id.as_str(), "{history}");
}

#[tokio::test]
async fn jobs_are_listed_a_page_at_a_time() {
    let h = Harness::start().await;
    let mut rpc = h.rpc().await;
    let ids = enqueue(&mut rpc, "orders", &[b"1", b"2", b"3", b"4", b"5"]).await;
    let c = Console::open(&h);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .json(&format!(
                "/queues/orders/jobs?state=pending&page_size=2&page_token={token}"
            ))
            .await;
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 2, "{page}");
        seen.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_owned()));
        match page["next_page_token"].as_str() {
            Some(next) => token = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, ids);
}

#[tokio::test]
async fn queue_actions_pause_resume_cancel_purge_and_delete() {
    let h = Harness::start().await;
    let mut rpc = h.rpc().await;
    let ids = enqueue(&mut rpc, "orders", &[b"1", b"2", b"3"]).await;
    let c = Console::open(&h);
    let paused = |queues: &Value| {
        queues
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == "orders")
            .map(|q| q["paused"].as_bool().unwrap())
    };

    assert_eq!(
        ok(c.post("/queues/orders/pause", "").await)["done"],
        "paused"
    );
    assert_eq!(paused(&c.json("/queues").await), Some(true));
    assert!(lease(&mut rpc, "orders", "w", 1).await.is_empty());
    assert_eq!(
        ok(c.post("/queues/orders/resume", "").await)["done"],
        "resumed"
    );
    assert_eq!(paused(&c.json("/queues").await), Some(false));

    let cancelled = ok(c.post(&format!("/jobs/{}/cancel", ids[0]), "").await);
    assert_eq!(cancelled["state"], "cancelled");
    assert_eq!(
        get_job(&mut rpc, &ids[0], "orders").await.state,
        pb::JobState::Cancelled as i32
    );

    // A finished job cannot be cancelled again.
    refused(
        c.post(&format!("/jobs/{}/cancel?queue=orders", ids[0]), "")
            .await,
        StatusCode::CONFLICT,
        &[&ids[0]],
    );

    // Delete: a leased job goes at once (its lease is stale), a cancelled one leaves
    // history.
    let leased = lease(&mut rpc, "orders", "w", 1).await.remove(0);
    assert_eq!(leased.job_id, ids[1]);
    let deleted = ok(c
        .post(&format!("/queues/orders/jobs/{}/delete", ids[1]), "")
        .await);
    assert_eq!(
        deleted["done"],
        format!("job {} deleted (it was leased)", ids[1])
    );
    let stale = rpc
        .ack(pb::AckRequest {
            acks: vec![pb::LeaseAck {
                lease_id: leased.lease_id,
                result: Bytes::new(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    let deleted = ok(c
        .post(&format!("/queues/orders/jobs/{}/delete", ids[0]), "")
        .await);
    assert_eq!(
        deleted["done"],
        format!("job {} deleted (it was cancelled)", ids[0])
    );
    refused(
        c.get(&format!("/jobs/{}?queue=orders", ids[0])).await,
        StatusCode::NOT_FOUND,
        &[&ids[0]],
    );

    let purged = ok(c.post("/queues/orders/purge", "").await);
    assert_eq!(purged["done"], "purged 1 job(s)");
    assert_eq!(
        c.json("/queues/orders/jobs").await["jobs"],
        json!([]),
        "a purge leaves no live job"
    );

    assert_eq!(
        ok(c.post("/queues/orders/delete", "").await)["done"],
        "deleted"
    );
    assert_eq!(paused(&c.json("/queues").await), None);
    refused(
        c.get("/queues/orders/jobs").await,
        StatusCode::NOT_FOUND,
        &["orders"],
    );
}

#[tokio::test]
async fn topics_show_their_retained_messages_a_page_at_a_time() {
    let h = Harness::start().await;
    let mut rpc = h.rpc().await;
    rpc.publish(pb::PublishRequest {
        topic: "user.registered".into(),
        messages: [&b"{\"id\":1}"[..], b"plain", &[0xff, 0x01]]
            .iter()
            .map(|p| pb::PublishMessage {
                payload: Bytes::copy_from_slice(p),
                key: "k".into(),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .unwrap();
    let c = Console::open(&h);
    let topics = c.json("/topics").await;
    assert_eq!(topics[0]["name"], "user.registered", "{topics}");
    assert_eq!(topics[0]["retained_messages"], 3);

    let first = c.json("/topics/user.registered/messages?limit=2").await;
    let messages = first["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{first}");
    assert_eq!(messages[0]["sequence"], 1);
    assert_eq!(messages[0]["payload"]["json"]["id"], 1);
    assert_eq!(messages[1]["payload"]["text"], "plain");
    assert_eq!(messages[1]["key"], "k");
    assert_eq!(first["next_from"], 3);

    let rest = c.json("/topics/user.registered/messages?from=3").await;
    assert_eq!(rest["messages"][0]["sequence"], 3, "{rest}");
    assert_eq!(rest["messages"][0]["payload"]["text"], Value::Null);
    assert!(
        rest["messages"][0]["payload"]["hex"]
            .as_str()
            .unwrap()
            .contains("ff 01")
    );
    assert_eq!(rest["next_from"], Value::Null);
    let past = c.json("/topics/user.registered/messages?from=9").await;
    assert_eq!(past["messages"], json!([]));

    assert_eq!(
        ok(c.post("/topics/user.registered/delete", "").await)["done"],
        "deleted"
    );
    assert_eq!(c.json("/topics").await, json!([]));
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_changes_nothing() {
    let h = Harness::start().await;
    let mut rpc = h.rpc().await;
    let id = dead_job(&mut rpc, "emails").await;
    let c = Console::open(&h);

    refused(
        c.get("/queues/nope/jobs").await,
        StatusCode::NOT_FOUND,
        &["nope"],
    );
    refused(
        c.get("/queues/emails/jobs?state=deadd").await,
        StatusCode::BAD_REQUEST,
        &["state", "\"deadd\""],
    );
    refused(
        c.get("/queues/emails/jobs?page_size=0").await,
        StatusCode::BAD_REQUEST,
        &["page_size", "\"0\""],
    );
    refused(
        c.get("/queues/emails/jobs?page_token=xyz").await,
        StatusCode::BAD_REQUEST,
        &["page_token", "\"xyz\""],
    );
    refused(
        c.get("/jobs/not-a-job").await,
        StatusCode::BAD_REQUEST,
        &["not-a-job"],
    );
    refused(
        c.get("/jobs/01a24c6f-4955-719c-a34a-240000000099?queue=emails")
            .await,
        StatusCode::NOT_FOUND,
        &["01a24c6f-4955-719c-a34a-240000000099"],
    );
    refused(
        c.post("/jobs/01a24c6f-4955-719c-a34a-240000000099/cancel", "")
            .await,
        StatusCode::NOT_FOUND,
        &["01a24c6f-4955-719c-a34a-240000000099"],
    );
    refused(
        c.post(
            "/queues/emails/jobs/01a24c6f-4955-719c-a34a-240000000099/delete",
            "",
        )
        .await,
        StatusCode::NOT_FOUND,
        &[
            "job_id",
            "01a24c6f-4955-719c-a34a-240000000099",
            "\"emails\"",
        ],
    );
    refused(
        c.post(&format!("/queues/nope/jobs/{id}/delete"), "").await,
        StatusCode::NOT_FOUND,
        &["queue", "\"nope\""],
    );
    refused(
        c.post("/queues/emails/jobs/not-a-job/delete", "").await,
        StatusCode::BAD_REQUEST,
        &["job_id", "not-a-job"],
    );
    refused(
        c.get("/topics/nope/messages").await,
        StatusCode::NOT_FOUND,
        &["topic", "nope"],
    );
    refused(
        c.get("/topics/nope/messages?from=x").await,
        StatusCode::BAD_REQUEST,
        &["from", "\"x\""],
    );
    refused(
        c.post("/queues/emails.dlq/redrive", r#"{"job_ids":["bad"]}"#)
            .await,
        StatusCode::BAD_REQUEST,
        &["job_ids[0]", "\"bad\""],
    );
    refused(
        c.post("/queues/emails.dlq/redrive", r#"{"ids":[]}"#).await,
        StatusCode::BAD_REQUEST,
        &["body", "ids"],
    );
    refused(
        c.post("/queues/nope/pause", "").await,
        StatusCode::NOT_FOUND,
        &["nope"],
    );

    // An action without the console's header, or from another origin, is refused even
    // without tokens: a page of another site cannot act through the operator's browser.
    let no_header = c
        .send(Method::POST, "/queues/emails.dlq/redrive", &[], "")
        .await;
    refused(no_header, StatusCode::FORBIDDEN, &["x-sluice-console"]);
    let foreign = c
        .send(
            Method::POST,
            "/queues/emails.dlq/redrive",
            &[("x-sluice-console", "1"), ("origin", "http://evil.example")],
            "",
        )
        .await;
    refused(foreign, StatusCode::FORBIDDEN, &["origin", "evil.example"]);

    let job = get_job(&mut rpc, &id, "emails.dlq").await;
    assert_eq!(
        job.state,
        pb::JobState::Pending as i32,
        "nothing was redriven"
    );
    let queues = c.json("/queues").await;
    assert!(
        queues
            .as_array()
            .unwrap()
            .iter()
            .all(|q| q["paused"] == false),
        "{queues}"
    );
}

fn tokens() -> Tokens {
    let table = |name: &str, secret: &str, grants: &str| {
        format!(
            "[[token]]\nname = {name:?}\nsha256 = \"{}\"\n{grants}\n",
            hash_token(secret)
        )
    };
    Tokens::parse(
        &[
            table(
                "admin",
                ADMIN,
                "admin = [\">\"]\nenqueue = [\">\"]\nconsume = [\">\"]\npublish = [\">\"]",
            ),
            table(
                "worker",
                WORKER,
                "consume = [\"emails\", \"emails.dlq\"]\nsubscribe = [\"user.>\"]",
            ),
            table("team", TEAM, r#"admin = ["team.>"]"#),
        ]
        .join("\n"),
    )
    .unwrap()
}

#[tokio::test]
async fn with_tokens_every_page_and_action_is_checked_like_grpc() {
    let h = Harness::start_with_auth(Authenticator::from_tokens(tokens())).await;
    let mut admin_rpc = Client::connect_with(h.grpc.url(), ConnectOptions::new().token(ADMIN))
        .await
        .unwrap()
        .rpc();
    let id = dead_job(&mut admin_rpc, "emails").await;
    enqueue(&mut admin_rpc, "team.jobs", &[b"x"]).await;

    // No token, a malformed header, an unknown token: 401 on pages and actions alike.
    let anonymous = Console::open(&h);
    refused(
        anonymous.get("/session").await,
        StatusCode::UNAUTHORIZED,
        &["authorization", "missing"],
    );
    refused(
        anonymous.post("/queues/emails.dlq/redrive", "").await,
        StatusCode::UNAUTHORIZED,
        &["authorization"],
    );
    let malformed = anonymous
        .send(Method::GET, "/queues", &[("authorization", "Basic x")], "")
        .await;
    refused(malformed, StatusCode::UNAUTHORIZED, &["Bearer"]);
    refused(
        Console::with(&h, "not-a-token").get("/queues").await,
        StatusCode::UNAUTHORIZED,
        &["not known"],
    );

    // The worker reads its jobs (GetJob's readers include consume), but listing jobs,
    // redriving and pausing need admin, as over gRPC.
    let worker = Console::with(&h, WORKER);
    assert_eq!(worker.json("/session").await["token_name"], "worker");
    assert_eq!(worker.json("/queues").await, json!([]));
    assert_eq!(
        worker.json(&format!("/jobs/{id}?queue=emails.dlq")).await["state"],
        "pending"
    );
    refused(
        worker.get("/queues/emails.dlq/jobs").await,
        StatusCode::FORBIDDEN,
        &["queue", "\"worker\"", "admin", "\"emails.dlq\""],
    );
    refused(
        worker
            .post(
                "/queues/emails.dlq/redrive",
                &json!({ "job_ids": [id] }).to_string(),
            )
            .await,
        StatusCode::FORBIDDEN,
        &["dead_letter_queue", "admin", "\"emails.dlq\""],
    );
    refused(
        worker.post("/queues/emails/pause", "").await,
        StatusCode::FORBIDDEN,
        &["admin", "\"emails\""],
    );
    refused(
        worker.post(&format!("/jobs/{id}/cancel"), "").await,
        StatusCode::FORBIDDEN,
        &["\"worker\"", "\"emails\"", "enqueue, admin"],
    );
    refused(
        worker
            .post(&format!("/queues/emails.dlq/jobs/{id}/delete"), "")
            .await,
        StatusCode::FORBIDDEN,
        &["queue", "\"worker\"", "admin", "\"emails.dlq\""],
    );
    assert_eq!(
        worker.json(&format!("/jobs/{id}?queue=emails.dlq")).await["state"],
        "pending",
        "a refused delete changes nothing"
    );
    // Retained messages need subscribe, as a replaying Subscribe would.
    admin_rpc
        .publish(pb::PublishRequest {
            topic: "user.registered".into(),
            messages: vec![pb::PublishMessage {
                payload: Bytes::from_static(b"hi"),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    let read = worker.json("/topics/user.registered/messages").await;
    assert_eq!(read["messages"][0]["payload"]["text"], "hi");
    refused(
        Console::with(&h, TEAM)
            .get("/topics/user.registered/messages")
            .await,
        StatusCode::FORBIDDEN,
        &["subscribe", "\"user.registered\""],
    );

    // The team sees only its own queues.
    let team = Console::with(&h, TEAM);
    let names: Vec<Value> = team
        .json("/queues")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("team.jobs")]);

    // Nothing the refused calls asked for happened.
    let job = get_job(&mut admin_rpc, &id, "emails.dlq").await;
    assert_eq!(job.state, pb::JobState::Pending as i32);

    // The admin token may do it all.
    let admin = Console::with(&h, ADMIN);
    assert_eq!(
        admin.json("/queues/emails.dlq/jobs").await["jobs"][0]["id"],
        id.as_str()
    );
    let redriven = ok(admin
        .post(
            "/queues/emails.dlq/redrive",
            &json!({ "job_ids": [id] }).to_string(),
        )
        .await);
    assert_eq!(redriven["redriven"], 1);
}
