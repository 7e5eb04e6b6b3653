//! Task dispatch over the real router with real HTTP agents: push (small axum servers on
//! 127.0.0.1 that the kernel POSTs to) and pull (long polls and results through the API);
//! timeouts, retries on another agent, stragglers whose late answers are discarded, exhausted
//! attempts, tenant isolation, bad input, and agents kept to their own work. Every wait is
//! for a state, with a generous limit; nothing asserts on speed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use http::{Request, StatusCode};
use nops_core::dispatch::{AttemptRecord, DeliveryMode, StartVerdict, TaskRecord, TaskStatus};
use nops_core::routing::{CapabilityRequirement, RouteRequest};
use nops_core::store::TaskStore;
use serde_json::{Value, json};

use crate::support::{T0_MS, TestKernel, as_key};

/// The capability every test agent offers.
const CAPABILITY: &str = "demo.echo";
/// Longest any test waits for a state.
const WAIT_LIMIT: Duration = Duration::from_secs(45);

/// How a push agent answers.
#[derive(Clone, Copy)]
pub(crate) enum Behaviour {
    /// 200 with `{"echo": input, "agent": name}`.
    Echo,
    /// 500 with a message.
    Fail,
    /// The first attempt of any task fails with 500; later attempts echo.
    FailFirstAttempt,
    /// The first attempt of any task is answered after 10 s (a straggler); later ones at once.
    SlowFirstAttempt,
    /// Echoes after 300 ms (a client's long poll is waiting by then).
    Unhurried,
}

/// A push agent listening on 127.0.0.1; counts the requests it received.
pub(crate) struct PushAgent {
    pub(crate) url: String,
    received: Arc<AtomicUsize>,
    answered_late: Arc<AtomicUsize>,
}

pub(crate) async fn push_agent(name: &'static str, behaviour: Behaviour) -> PushAgent {
    let received = Arc::new(AtomicUsize::new(0));
    let answered_late = Arc::new(AtomicUsize::new(0));
    let (r, late) = (received.clone(), answered_late.clone());
    let app = axum::Router::new().route(
        "/work",
        axum::routing::post(move |headers: http::HeaderMap, axum::Json(body): axum::Json<Value>| {
            let (r, late) = (r.clone(), late.clone());
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                assert_eq!(
                    headers.get("x-nops-task-id").and_then(|v| v.to_str().ok()),
                    body["task_id"].as_str(),
                    "the task id travels in a header too"
                );
                let first = body["attempt"] == 1;
                let echo = json!({ "echo": body["input"], "agent": name, "attempt": body["attempt"] });
                match behaviour {
                    Behaviour::Echo => (StatusCode::OK, axum::Json(echo)),
                    Behaviour::Fail => (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": "agent broke"}))),
                    Behaviour::FailFirstAttempt if first => {
                        (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": "first attempts fail here"})))
                    }
                    Behaviour::SlowFirstAttempt if first => {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        late.fetch_add(1, Ordering::SeqCst);
                        (StatusCode::OK, axum::Json(json!({ "echo": "straggler", "agent": name })))
                    }
                    Behaviour::Unhurried => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        (StatusCode::OK, axum::Json(echo))
                    }
                    Behaviour::FailFirstAttempt | Behaviour::SlowFirstAttempt => (StatusCode::OK, axum::Json(echo)),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    PushAgent { url: format!("http://{addr}/work"), received, answered_late }
}

/// Registers an agent offering [`CAPABILITY`], pushed to `endpoint` or pulling; returns its id.
async fn register(k: &TestKernel, name: &str, endpoint: Option<&str>) -> String {
    let mut body = json!({ "name": name, "capabilities": [{ "name": CAPABILITY, "version": "1.2.0", "params": {} }] });
    if let Some(endpoint) = endpoint {
        body["endpoint"] = json!(endpoint);
    }
    let agent = k.create_agent(body).await;
    agent["id"].as_str().expect("id").to_string()
}

/// An agent-role key for `agent` with the pull scopes; returns the secret.
async fn agent_key(k: &TestKernel, agent: &str) -> String {
    let body = json!({ "name": format!("agent {agent}"), "role": "agent", "subject": agent,
        "scopes": ["tasks:pull", "tasks:complete"] });
    let (status, created) = k.call("POST", "/api/v1/admin/api-keys", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["secret"].as_str().expect("secret").to_string()
}

/// Submits a task (default tenant) and returns its id.
async fn submit(k: &TestKernel, extra: Value) -> String {
    let mut body = json!({ "capabilities": [{ "name": CAPABILITY, "version": "^1" }], "input": { "n": 42 } });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let (status, task) = k.call("POST", "/api/v1/tasks", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{:?}: {task}", k.backend);
    assert!(matches!(task["status"].as_str(), Some("queued" | "running")), "{task}");
    task["id"].as_str().expect("id").to_string()
}

/// Waits until the task satisfies `done`; returns it.
async fn wait_task(k: &TestKernel, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let path = format!("/api/v1/tasks/{id}");
    let start = tokio::time::Instant::now();
    loop {
        let (status, task) = k.call("GET", &path, None).await;
        assert_eq!(status, StatusCode::OK, "{task}");
        if done(&task) {
            return task;
        }
        assert!(start.elapsed() < WAIT_LIMIT, "{:?}: waited too long for {what}: {task}", k.backend);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until metric `name` reaches `at_least` (a counter bumped just after the store write
/// that a test waited for).
async fn wait_metric(k: &TestKernel, name: &str, at_least: f64) {
    let start = tokio::time::Instant::now();
    loop {
        let value = metric(k, name).await;
        if value >= at_least {
            return;
        }
        assert!(start.elapsed() < WAIT_LIMIT, "{:?}: waited too long for {name} >= {at_least}: {value}", k.backend);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn finished(task: &Value) -> bool {
    matches!(task["status"].as_str(), Some("succeeded" | "failed"))
}

async fn metric(k: &TestKernel, name: &str) -> f64 {
    let (_, text) = k.send_text(Request::get("/metrics").body(Body::empty()).expect("request")).await;
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test]
async fn a_pushed_task_runs_on_the_agent_and_its_result_is_readable() {
    for k in TestKernel::all().await {
        let agent = push_agent("pusher", Behaviour::Echo).await;
        let agent_id = register(&k, "pusher", Some(&agent.url)).await;
        let id = submit(&k, json!({ "input": { "hello": "world" } })).await;
        let task = wait_task(&k, &id, "success", finished).await;
        assert_eq!(task["status"], "succeeded", "{:?}: {task}", k.backend);
        assert_eq!(task["output"]["echo"], json!({ "hello": "world" }));
        assert_eq!(task["output"]["agent"], "pusher");
        let attempts = task["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0]["agent_id"], agent_id.as_str());
        assert_eq!(attempts[0]["mode"], "push");
        assert_eq!(attempts[0]["outcome"], "success");
        assert_eq!(attempts[0]["late"], false);
        assert_eq!(agent.received.load(Ordering::SeqCst), 1, "delivered once");
        // Listed, with a status filter.
        let (_, page) = k.call("GET", "/api/v1/tasks?status=succeeded", None).await;
        assert_eq!(page["items"].as_array().expect("items").len(), 1, "{page}");
        assert!(page["items"][0].get("output").is_none(), "listings leave the output out");
        let (_, page) = k.call("GET", "/api/v1/tasks?status=failed", None).await;
        assert!(page["items"].as_array().expect("items").is_empty());
        assert!(metric(&k, "nops_tasks_total{status=\"succeeded\"}").await >= 1.0);
    }
}

#[tokio::test]
async fn a_client_waiting_for_a_task_sees_exactly_what_a_later_read_shows() {
    for k in TestKernel::all().await {
        // Answered at the first attempt (the waiter is woken with the driver's own record)
        // and after a retry (the waiter reads the store).
        for (name, behaviours) in [
            ("first-attempt", vec![Behaviour::Unhurried]),
            ("after-retry", vec![Behaviour::FailFirstAttempt, Behaviour::FailFirstAttempt]),
        ] {
            for (i, behaviour) in behaviours.into_iter().enumerate() {
                let agent = push_agent("waited", behaviour).await;
                register(&k, &format!("{name}-{i}"), Some(&agent.url)).await;
            }
            let id = submit(&k, json!({ "input": { "case": name } })).await;
            let (status, waited) = k.call("GET", &format!("/api/v1/tasks/{id}?wait_ms=20000"), None).await;
            assert_eq!(status, StatusCode::OK, "{waited}");
            assert_eq!(waited["status"], "succeeded", "{:?} {name}: {waited}", k.backend);
            let (_, read) = k.call("GET", &format!("/api/v1/tasks/{id}"), None).await;
            assert_eq!(waited, read, "{:?} {name}: the waiter's answer is the stored task", k.backend);
            assert_eq!(read["output"]["echo"], json!({ "case": name }));
            let attempts = read["attempts"].as_array().expect("attempts").len();
            assert_eq!(attempts, if name == "first-attempt" { 1 } else { 2 }, "{read}");
            // Out of the next case's way.
            let (_, page) = k.call("GET", "/api/v1/agents?limit=100", None).await;
            for agent in page["items"].as_array().expect("items") {
                let path = format!("/api/v1/agents/{}", agent["id"].as_str().expect("id"));
                let (status, _) = k.call("DELETE", &path, None).await;
                assert_eq!(status, StatusCode::NO_CONTENT);
            }
        }
    }
}

#[tokio::test]
async fn a_submission_can_wait_for_its_result_in_one_request() {
    for k in TestKernel::all().await {
        let agent = push_agent("sync", Behaviour::Unhurried).await;
        register(&k, "sync", Some(&agent.url)).await;
        let body = json!({ "capabilities": [{ "name": CAPABILITY, "version": "^1" }], "input": { "sync": true } });
        let (status, done) = k.call("POST", "/api/v1/tasks?wait_ms=20000", Some(body.clone())).await;
        assert_eq!(status, StatusCode::OK, "{:?}: finished within the wait: {done}", k.backend);
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["output"]["echo"], json!({ "sync": true }));
        let (_, read) = k.call("GET", &format!("/api/v1/tasks/{}", done["id"].as_str().expect("id")), None).await;
        assert_eq!(done, read, "{:?}: the answer is the stored task", k.backend);

        // A wait shorter than the agent: 202 with the task still running.
        let (status, running) = k.call("POST", "/api/v1/tasks?wait_ms=1", Some(body.clone())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{running}");
        assert!(matches!(running["status"].as_str(), Some("queued" | "running")), "{running}");

        // Waiting shows the output: a key that may submit but not read is refused, and
        // nothing is stored.
        let key = json!({ "name": "submitter", "role": "operator", "scopes": ["tasks:write"] });
        let (status, created) = k.call("POST", "/api/v1/admin/api-keys", Some(key)).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let secret = created["secret"].as_str().expect("secret");
        let (_, before) = k.call("GET", "/api/v1/tasks?limit=100", None).await;
        let (status, refused) =
            as_key(&k, secret, None, "POST", "/api/v1/tasks?wait_ms=1000", Some(body.clone())).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
        assert_eq!(refused["error"]["code"], "insufficient_scope", "{refused}");
        let (_, after) = k.call("GET", "/api/v1/tasks?limit=100", None).await;
        assert_eq!(before["items"].as_array().map(Vec::len), after["items"].as_array().map(Vec::len));
        // The same key may still submit without waiting.
        let (status, queued) = as_key(&k, secret, None, "POST", "/api/v1/tasks", Some(body)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    }
}

#[tokio::test]
async fn a_pull_agent_long_polls_runs_the_task_and_reports_its_result() {
    for k in TestKernel::all().await {
        let agent_id = register(&k, "puller", None).await;
        let key = agent_key(&k, &agent_id).await;
        let next = format!("/api/v1/agents/{agent_id}/tasks/next");
        // Nothing queued: 204 at once.
        let (status, _) = as_key(&k, &key, None, "GET", &format!("{next}?wait_ms=0"), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        // A long poll started before the task exists receives it.
        let router = k.router.clone();
        let poll = {
            let request = Request::get(format!("{next}?wait_ms=15000"))
                .header("authorization", format!("Bearer {key}"))
                .body(Body::empty())
                .expect("request");
            tokio::spawn(async move {
                use http_body_util::BodyExt;
                use tower::ServiceExt;
                let response = router.oneshot(request).await.expect("infallible");
                let status = response.status();
                let bytes = response.into_body().collect().await.expect("body").to_bytes();
                (status, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null))
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let id = submit(&k, json!({ "input": { "job": 7 } })).await;
        let (status, work) = poll.await.expect("poll");
        assert_eq!(status, StatusCode::OK, "{:?}: {work}", k.backend);
        assert_eq!(work["task_id"], id.as_str());
        assert_eq!(work["attempt"], 1);
        assert_eq!(work["input"], json!({ "job": 7 }));
        assert!(work["deadline_ms"].as_i64().expect("deadline") > T0_MS);
        // The result.
        let result = format!("/api/v1/agents/{agent_id}/tasks/{id}/result");
        let answer = json!({ "attempt": 1, "ok": true, "output": { "sum": 49 } });
        let (status, ack) = as_key(&k, &key, None, "POST", &result, Some(answer.clone())).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        assert_eq!(ack["duplicate"], false);
        assert_eq!(ack["status"], "succeeded");
        // At least once: the same answer again is a duplicate, answered 200, nothing changes.
        let (status, ack) = as_key(&k, &key, None, "POST", &result, Some(answer)).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        assert_eq!(ack["duplicate"], true);
        let task = wait_task(&k, &id, "success", finished).await;
        assert_eq!(task["status"], "succeeded");
        assert_eq!(task["output"], json!({ "sum": 49 }));
        assert_eq!(task["attempts"][0]["mode"], "pull");
        assert_eq!(task["attempts"][0]["outcome"], "success");
        // Nothing left to pull.
        let (status, _) = as_key(&k, &key, None, "GET", &format!("{next}?wait_ms=0"), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
}

#[tokio::test]
async fn a_task_for_a_pull_agent_whose_queue_is_full_goes_to_another_agent() {
    for backend in crate::support::backends() {
        let db = crate::support::TestDb::new(backend).await;
        let path = db.dir.path().join("dispatch.toml");
        std::fs::write(&path, "[dispatch]\nqueue_depth_max = 1\n").expect("write config");
        let k = TestKernel::start_with(backend, db, |args| args.config = Some(path)).await;
        let full = register(&k, "full-puller", None).await;
        let first = submit(&k, json!({ "input": { "n": 1 } })).await;
        // The only agent's queue now holds one attempt, its limit.
        let other = register(&k, "free-puller", None).await;
        let second = submit(&k, json!({ "input": { "n": 2 } })).await;
        let pull = |agent: String| {
            let k = &k;
            async move {
                let key = agent_key(k, &agent).await;
                let next = format!("/api/v1/agents/{agent}/tasks/next?wait_ms=10000");
                let (status, work) = as_key(k, &key, None, "GET", &next, None).await;
                assert_eq!(status, StatusCode::OK, "{:?}: {work}", k.backend);
                work["task_id"].as_str().expect("a task").to_string()
            }
        };
        assert_eq!(pull(other).await, second, "{:?}: the second task went to the agent with room", k.backend);
        assert_eq!(pull(full).await, first, "{:?}: the first task stayed queued where it was", k.backend);
    }
}

#[tokio::test]
async fn a_failed_attempt_is_retried_on_another_agent() {
    for k in TestKernel::all().await {
        // Whichever agent gets the first attempt fails it; the retry must go to the other.
        let a = push_agent("alpha", Behaviour::FailFirstAttempt).await;
        let b = push_agent("beta", Behaviour::FailFirstAttempt).await;
        register(&k, "alpha", Some(&a.url)).await;
        register(&k, "beta", Some(&b.url)).await;
        let retries_before = metric(&k, "nops_task_retries_total").await;
        let id = submit(&k, json!({ "attempts_max": 3 })).await;
        let task = wait_task(&k, &id, "success", finished).await;
        assert_eq!(task["status"], "succeeded", "{:?}: {task}", k.backend);
        let attempts = task["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 2, "{task}");
        assert_eq!(attempts[0]["outcome"], "failure");
        assert!(attempts[0]["error"].as_str().expect("error").contains("first attempts fail here"), "{task}");
        assert_eq!(attempts[1]["outcome"], "success");
        assert_ne!(attempts[0]["agent_id"], attempts[1]["agent_id"], "the retry went to another agent");
        assert_eq!(task["output"]["attempt"], 2);
        assert_eq!(a.received.load(Ordering::SeqCst) + b.received.load(Ordering::SeqCst), 2);
        assert!(metric(&k, "nops_task_retries_total").await > retries_before);
    }
}

#[tokio::test]
async fn a_pushed_straggler_does_not_hold_the_task_and_its_late_answer_is_discarded() {
    for k in TestKernel::all().await {
        // Whichever agent gets the first attempt answers after 10 s; the timeout is 500 ms.
        let a = push_agent("slow-or-fast-a", Behaviour::SlowFirstAttempt).await;
        let b = push_agent("slow-or-fast-b", Behaviour::SlowFirstAttempt).await;
        register(&k, "a", Some(&a.url)).await;
        register(&k, "b", Some(&b.url)).await;
        let id = submit(&k, json!({ "attempt_timeout_ms": 500, "attempts_max": 2 })).await;
        let task = wait_task(&k, &id, "success", finished).await;
        assert_eq!(task["status"], "succeeded", "{:?}: {task}", k.backend);
        assert_eq!(task["attempts"][0]["outcome"], "timeout");
        assert!(task["attempts"][0]["error"].as_str().expect("error").contains("within 500 ms"), "{task}");
        assert_eq!(task["attempts"][1]["outcome"], "success");
        assert_ne!(task["attempts"][0]["agent_id"], task["attempts"][1]["agent_id"]);
        let output = task["output"].clone();
        assert_eq!(output["attempt"], 2);
        // The straggler answers after 10 s: seen, marked late, discarded.
        let task = wait_task(&k, &id, "the late answer", |t| t["attempts"][0]["late"] == true).await;
        assert_eq!(a.answered_late.load(Ordering::SeqCst) + b.answered_late.load(Ordering::SeqCst), 1);
        assert_eq!(task["status"], "succeeded");
        assert_eq!(task["output"], output, "the stored result is unchanged");
        assert_eq!(task["attempts"][0]["outcome"], "timeout");
        // Counted right after the late answer is stored (what the wait above saw).
        wait_metric(&k, "nops_task_late_results_total{mode=\"push\"}", 1.0).await;
    }
}

#[tokio::test]
async fn a_pull_straggler_is_superseded_and_its_late_result_refused() {
    for k in TestKernel::all().await {
        let x = register(&k, "pull-x", None).await;
        let y = register(&k, "pull-y", None).await;
        let keys = [(x.clone(), agent_key(&k, &x).await), (y.clone(), agent_key(&k, &y).await)];
        let key_of = |agent: &str| keys.iter().find(|(a, _)| a == agent).map(|(_, key)| key.clone()).expect("key");
        let id = submit(&k, json!({ "attempt_timeout_ms": 500, "attempts_max": 2 })).await;
        let task =
            wait_task(&k, &id, "the first attempt", |t| t["attempts"].as_array().is_some_and(|a| !a.is_empty())).await;
        let straggler = task["attempts"][0]["agent_id"].as_str().expect("agent").to_string();
        let other = if straggler == x { y.clone() } else { x.clone() };
        // The straggler takes the work and does not answer in time.
        let next = |agent: &str| format!("/api/v1/agents/{agent}/tasks/next?wait_ms=5000");
        let (status, work) = as_key(&k, &key_of(&straggler), None, "GET", &next(&straggler), None).await;
        assert_eq!(status, StatusCode::OK, "{:?}: {work}", k.backend);
        assert_eq!(work["attempt"], 1);
        // After the 500 ms timeout the second attempt goes to the other agent.
        let (status, work) = as_key(&k, &key_of(&other), None, "GET", &next(&other), None).await;
        assert_eq!(status, StatusCode::OK, "{work}");
        assert_eq!(work["task_id"], id.as_str());
        assert_eq!(work["attempt"], 2);
        // The straggler's answer now is for a superseded attempt: 409, discarded.
        let late = json!({ "attempt": 1, "ok": true, "output": "too late" });
        let straggler_result = format!("/api/v1/agents/{straggler}/tasks/{id}/result");
        let (status, body) = as_key(&k, &key_of(&straggler), None, "POST", &straggler_result, Some(late.clone())).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "attempt_superseded");
        // The other agent's answer wins.
        let result = format!("/api/v1/agents/{other}/tasks/{id}/result");
        let answer = json!({ "attempt": 2, "ok": true, "output": { "by": "other" } });
        let (status, _) = as_key(&k, &key_of(&other), None, "POST", &result, Some(answer)).await;
        assert_eq!(status, StatusCode::OK);
        // Once finished, the straggler is told so; the stored result does not change.
        let (status, body) = as_key(&k, &key_of(&straggler), None, "POST", &straggler_result, Some(late)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "task_finished");
        let task = wait_task(&k, &id, "success", finished).await;
        assert_eq!(task["status"], "succeeded");
        assert_eq!(task["output"], json!({ "by": "other" }));
        assert_eq!(task["attempts"][0]["outcome"], "timeout");
        assert_eq!(task["attempts"][0]["late"], true);
        assert_eq!(task["attempts"][1]["late"], false);
        assert!(metric(&k, "nops_task_late_results_total{mode=\"pull\"}").await >= 2.0);
    }
}

#[tokio::test]
async fn exhausted_attempts_and_missing_agents_fail_the_task_with_a_clear_error() {
    for k in TestKernel::all().await {
        // No agent at all.
        let id = submit(&k, json!({})).await;
        let task = wait_task(&k, &id, "failure", finished).await;
        assert_eq!(task["status"], "failed");
        assert!(task["error"].as_str().expect("error").contains("no agent qualifies"), "{task}");
        // Two failing agents, two attempts allowed: both are used, then the task fails.
        let a = push_agent("broken-a", Behaviour::Fail).await;
        let b = push_agent("broken-b", Behaviour::Fail).await;
        register(&k, "broken-a", Some(&a.url)).await;
        register(&k, "broken-b", Some(&b.url)).await;
        let id = submit(&k, json!({ "attempts_max": 2 })).await;
        let task = wait_task(&k, &id, "failure", finished).await;
        assert_eq!(task["status"], "failed", "{:?}: {task}", k.backend);
        let error = task["error"].as_str().expect("error");
        assert!(error.contains("all 2 attempts failed") && error.contains("500"), "{error}");
        assert_eq!(task["attempts"].as_array().expect("attempts").len(), 2);
        // More attempts allowed than agents: fails when no untried agent is left.
        let id = submit(&k, json!({ "attempts_max": 5 })).await;
        let task = wait_task(&k, &id, "failure", finished).await;
        assert_eq!(task["status"], "failed");
        assert!(task["error"].as_str().expect("error").contains("no other agent qualifies after 2 attempts"), "{task}");
        assert!(metric(&k, "nops_tasks_total{status=\"failed\"}").await >= 3.0);
    }
}

#[tokio::test]
async fn tasks_are_invisible_to_other_tenants() {
    for k in TestKernel::all().await {
        let body = json!({ "capabilities": [{ "name": CAPABILITY }], "input": null });
        let (status, task) = as_key(&k, &k.key, Some("acme"), "POST", "/api/v1/tasks", Some(body)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{task}");
        let path = format!("/api/v1/tasks/{}", task["id"].as_str().expect("id"));
        let (status, _) = as_key(&k, &k.key, Some("acme"), "GET", &path, None).await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = as_key(&k, &k.key, Some("globex"), "GET", &path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        let (_, page) = as_key(&k, &k.key, Some("globex"), "GET", "/api/v1/tasks", None).await;
        assert!(page["items"].as_array().expect("items").is_empty(), "{page}");
        // A tenant's operator sees its own tasks only.
        let (status, created) = as_key(
            &k,
            &k.key,
            Some("globex"),
            "POST",
            "/api/v1/admin/api-keys",
            Some(json!({ "name": "ops", "role": "operator", "scopes": ["tasks:*"] })),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let operator = created["secret"].as_str().expect("secret").to_string();
        let (status, _) = as_key(&k, &operator, None, "GET", &path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = as_key(&k, &operator, Some("acme"), "GET", &path, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
}

#[tokio::test]
async fn bad_task_input_is_refused_and_nothing_is_stored() {
    for k in TestKernel::all().await {
        let cap = json!([{ "name": CAPABILITY }]);
        let cases = [
            (json!({ "input": 1 }), "missing capabilities"),
            (json!({ "capabilities": [], "input": 1 }), "no capability"),
            (json!({ "capabilities": [{ "name": "" }] }), "empty capability name"),
            (json!({ "capabilities": [{ "name": CAPABILITY, "version": "not semver" }] }), "bad version"),
            (json!({ "capabilities": cap, "attempts_max": 0 }), "zero attempts"),
            (json!({ "capabilities": cap, "attempts_max": 1000 }), "too many attempts"),
            (json!({ "capabilities": cap, "attempt_timeout_ms": 0 }), "zero timeout"),
            (json!({ "capabilities": cap, "deadline_ms": 999_999_999_999u64 }), "deadline too far"),
            (json!({ "capabilities": cap, "input": "x".repeat(300 * 1024) }), "input too large"),
            (json!({ "capabilities": cap, "surprise": true }), "unknown field"),
            (json!({ "capabilities": cap, "attempts_max": -1 }), "negative"),
        ];
        for (body, what) in cases {
            let (status, error) = k.call("POST", "/api/v1/tasks", Some(body)).await;
            assert!(status.is_client_error(), "{:?} {what}: {status} {error}", k.backend);
            assert!(error["error"]["code"].is_string(), "{what}: {error}");
        }
        let (_, page) = k.call("GET", "/api/v1/tasks", None).await;
        assert!(page["items"].as_array().expect("items").is_empty(), "nothing stored: {page}");
        // Bad ids, filters and cursors are 400s.
        for path in
            ["/api/v1/tasks/not-a-uuid", "/api/v1/tasks?status=done", "/api/v1/tasks?after=x", "/api/v1/tasks?limit=0"]
        {
            let (status, body) = k.call("GET", path, None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        }
        let (status, _) = k.call("GET", &format!("/api/v1/tasks/{}", uuid::Uuid::now_v7()), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn an_agent_can_neither_pull_nor_complete_another_agents_work() {
    for k in TestKernel::all().await {
        let mine = register(&k, "mine", None).await;
        let theirs = register(&k, "theirs", None).await;
        let key = agent_key(&k, &mine).await;
        let their_key = agent_key(&k, &theirs).await;
        // Another agent's queue and results: forbidden by the policy.
        let (status, _) =
            as_key(&k, &key, None, "GET", &format!("/api/v1/agents/{theirs}/tasks/next?wait_ms=0"), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        // Only `theirs` qualifies for this task (a label only it carries).
        let (status, _) =
            k.call("PATCH", &format!("/api/v1/agents/{theirs}"), Some(json!({ "labels": { "pool": "theirs" } }))).await;
        assert_eq!(status, StatusCode::OK);
        let id = submit(&k, json!({ "labels": { "pool": "theirs" } })).await;
        let (status, work) =
            as_key(&k, &their_key, None, "GET", &format!("/api/v1/agents/{theirs}/tasks/next?wait_ms=10000"), None)
                .await;
        assert_eq!(status, StatusCode::OK, "{:?}: {work}", k.backend);
        let answer = json!({ "attempt": 1, "ok": true, "output": "stolen" });
        let (status, _) =
            as_key(&k, &key, None, "POST", &format!("/api/v1/agents/{theirs}/tasks/{id}/result"), Some(answer.clone()))
                .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        // Through its own path the attempt is simply not its own.
        let (status, body) =
            as_key(&k, &key, None, "POST", &format!("/api/v1/agents/{mine}/tasks/{id}/result"), Some(answer)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        // Malformed results are 4xx and change nothing.
        let path = format!("/api/v1/agents/{theirs}/tasks/{id}/result");
        for bad in [
            json!({ "attempt": 1, "ok": false }),
            json!({ "attempt": 1, "ok": true, "error": "x" }),
            json!({ "ok": true }),
        ] {
            let (status, body) = as_key(&k, &their_key, None, "POST", &path, Some(bad)).await;
            assert!(status.is_client_error(), "{status} {body}");
        }
        let (_, task) = k.call("GET", &format!("/api/v1/tasks/{id}"), None).await;
        assert_eq!(task["status"], "running", "{task}");
        let (status, _) = as_key(
            &k,
            &their_key,
            None,
            "POST",
            &path,
            Some(json!({ "attempt": 1, "ok": false, "error": "could not do it" })),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let task = wait_task(&k, &id, "failure", finished).await;
        assert_eq!(task["status"], "failed");
        assert!(task["error"].as_str().expect("error").contains("could not do it"), "{task}");
    }
}

#[tokio::test]
async fn a_task_whose_kernel_stopped_is_taken_over_and_its_queued_attempt_still_served() {
    for k in TestKernel::all().await {
        let agent = register(&k, "survivor", None).await;
        let key = agent_key(&k, &agent).await;
        // A task driven by a kernel that has since stopped: its lease ran out, its pull attempt
        // is still in the agent's queue.
        let id = uuid::Uuid::now_v7();
        let tenant: nops_core::tenant::TenantId = "default".parse().expect("tenant");
        let task = TaskRecord {
            id,
            tenant: tenant.clone(),
            status: TaskStatus::Queued,
            request: RouteRequest {
                capabilities: vec![CapabilityRequirement {
                    name: CAPABILITY.into(),
                    version: semver::VersionReq::STAR,
                }],
                ..RouteRequest::default()
            },
            input: json!({ "left": "behind" }),
            attempt_timeout_ms: 60_000,
            attempts_max: 3,
            deadline_at_ms: T0_MS + 600_000,
            attempt: 0,
            output: None,
            error: None,
            created_at_ms: T0_MS,
            updated_at_ms: T0_MS,
            finished_at_ms: None,
            owner: Some("kernel-gone".into()),
            lease_until_ms: T0_MS + 15_000,
        };
        k.kernel.store.insert_task(&task, 100).await.expect("insert");
        let attempt = AttemptRecord {
            task_id: id,
            attempt: 1,
            tenant,
            agent: agent.parse().expect("agent id"),
            mode: DeliveryMode::Pull,
            started_at_ms: T0_MS,
            timeout_at_ms: T0_MS + 60_000,
            delivered_at_ms: None,
            finished_at_ms: None,
            outcome: None,
            answered: false,
            error: None,
            late: false,
        };
        let started = k.kernel.store.start_attempt(&attempt, "kernel-gone", T0_MS + 15_000, 10).await.expect("start");
        assert_eq!(started, StartVerdict::Started);
        // While the lease holds, nobody takes it over.
        assert_eq!(k.kernel.dispatch.sweep().await.expect("sweep"), 0);
        k.clock.advance_ms(20_000);
        assert_eq!(k.kernel.dispatch.sweep().await.expect("sweep"), 1, "{:?}", k.backend);
        // The queued attempt is still served, and its answer finishes the task.
        let (status, work) =
            as_key(&k, &key, None, "GET", &format!("/api/v1/agents/{agent}/tasks/next?wait_ms=5000"), None).await;
        assert_eq!(status, StatusCode::OK, "{work}");
        assert_eq!(work["input"], json!({ "left": "behind" }));
        let answer = json!({ "attempt": 1, "ok": true, "output": "done" });
        let (status, _) =
            as_key(&k, &key, None, "POST", &format!("/api/v1/agents/{agent}/tasks/{id}/result"), Some(answer)).await;
        assert_eq!(status, StatusCode::OK);
        let task = wait_task(&k, &id.to_string(), "success", finished).await;
        assert_eq!(task["status"], "succeeded");
        assert_eq!(task["output"], "done");
    }
}

#[tokio::test]
async fn a_pull_attempt_queued_by_one_replica_is_served_and_completed_through_another() {
    use tower::ServiceExt;
    for a in TestKernel::all().await {
        let b = crate::support::replica(&a).await;
        let b_router = b.router();
        let agent = register(&a, "shared", None).await;
        let key = agent_key(&a, &agent).await;
        let via_b = |method: &str, path: String, body: Option<Value>| {
            let mut builder =
                Request::builder().method(method).uri(path).header("authorization", format!("Bearer {key}"));
            let body = match body {
                Some(body) => {
                    builder = builder.header("content-type", "application/json");
                    Body::from(serde_json::to_vec(&body).expect("json"))
                }
                None => Body::empty(),
            };
            let request = builder.body(body).expect("request");
            let router = b_router.clone();
            async move {
                use http_body_util::BodyExt;
                let response = router.oneshot(request).await.expect("infallible");
                let status = response.status();
                let bytes = response.into_body().collect().await.expect("body").to_bytes();
                (status, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null))
            }
        };
        // Submitted (and driven) on A; pulled and answered on B.
        let id = submit(&a, json!({ "input": "across" })).await;
        let (status, work) = via_b("GET", format!("/api/v1/agents/{agent}/tasks/next?wait_ms=10000"), None).await;
        assert_eq!(status, StatusCode::OK, "{:?}: {work}", a.backend);
        assert_eq!(work["task_id"], id.as_str());
        let answer = json!({ "attempt": 1, "ok": true, "output": "served by the replica" });
        let (status, ack) = via_b("POST", format!("/api/v1/agents/{agent}/tasks/{id}/result"), Some(answer)).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        // A's driver sees the result through the store.
        let task = wait_task(&a, &id, "success", finished).await;
        assert_eq!(task["status"], "succeeded");
        assert_eq!(task["output"], "served by the replica");
        assert_eq!(task["attempts"].as_array().expect("attempts").len(), 1);
        b.store.close().await;
    }
}
