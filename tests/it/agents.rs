//! Agent CRUD, filters, capability version queries, pagination and tenant isolation.

use http::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestKernel, agent_json};

fn names(page: &Value) -> Vec<String> {
    page["items"].as_array().expect("items").iter().map(|a| a["name"].as_str().expect("name").to_string()).collect()
}

#[tokio::test]
async fn create_get_update_delete() {
    for k in TestKernel::all().await {
        let created = k
            .create_agent(json!({
                "name": "gpu-1",
                "endpoint": "http://10.0.0.5:8080/tasks",
                "labels": {"zone": "eu-1"},
                "capabilities": [{"name": "inference.llm", "version": "1.4.0", "params": {"model": "llama-3-8b"}}],
            }))
            .await;
        let id = created["id"].as_str().expect("id").to_string();
        assert_eq!(created["tenant"], "default");
        assert_eq!(created["status"], "healthy");
        assert_eq!(created["revision"], 1);
        assert_eq!(created["capabilities"][0]["params"]["model"], "llama-3-8b");

        let (status, got) = k.call("GET", &format!("/api/v1/agents/{id}"), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(got, created, "{:?}: a read returns what was written", k.backend);

        let (status, updated) = k
            .call(
                "PATCH",
                &format!("/api/v1/agents/{id}"),
                Some(json!({"labels": {"zone": "us-2"}, "endpoint": null, "revision": 1})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{updated}");
        assert_eq!(updated["labels"], json!({"zone": "us-2"}));
        assert_eq!(updated["endpoint"], Value::Null);
        assert_eq!(updated["name"], "gpu-1", "absent fields are kept");
        assert_eq!(updated["revision"], 2);

        let (status, stale) =
            k.call("PATCH", &format!("/api/v1/agents/{id}"), Some(json!({"name": "x", "revision": 1}))).await;
        assert_eq!(status, StatusCode::CONFLICT, "{:?}: a stale revision is refused", k.backend);
        assert_eq!(stale["error"]["code"], "revision_mismatch");

        let (status, _) = k.call("DELETE", &format!("/api/v1/agents/{id}"), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body) = k.call("GET", &format!("/api/v1/agents/{id}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "not_found");
        let (status, _) = k.call("DELETE", &format!("/api/v1/agents/{id}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "deleting twice is a 404");

        let (_, events) = k.call("GET", &format!("/api/v1/agents/{id}/events"), None).await;
        let kinds: Vec<&str> =
            events["items"].as_array().expect("items").iter().map(|e| e["kind"].as_str().expect("kind")).collect();
        assert_eq!(kinds, ["registered", "updated", "deleted"], "{:?}", k.backend);
    }
}

#[tokio::test]
async fn names_are_unique_within_a_tenant_only() {
    for k in TestKernel::all().await {
        k.create_agent(agent_json("same", "a.b", "1.0.0")).await;
        let (status, body) = k.call("POST", "/api/v1/agents", Some(agent_json("same", "a.b", "1.0.0"))).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "name_taken");
        let mut other = k.request("POST", "/api/v1/agents", Some(agent_json("same", "a.b", "1.0.0")));
        other.headers_mut().insert("x-nops-tenant", "acme".parse().expect("header"));
        let (status, _, body) = k.send(other).await;
        assert_eq!(status, StatusCode::CREATED, "{:?}: another tenant may use the name: {body}", k.backend);
        assert_eq!(body["tenant"], "acme");
        assert_eq!(k.agent_count().await, 1, "the default tenant still has one");
    }
}

#[tokio::test]
async fn tenants_cannot_see_each_others_agents() {
    for k in TestKernel::all().await {
        let mine = k.create_agent(agent_json("mine", "a.b", "1.0.0")).await;
        let id = mine["id"].as_str().expect("id");
        for (method, path, body) in [
            ("GET", format!("/api/v1/agents/{id}"), None),
            ("PATCH", format!("/api/v1/agents/{id}"), Some(json!({"name": "stolen"}))),
            ("POST", format!("/api/v1/agents/{id}/heartbeat"), Some(json!({}))),
            ("DELETE", format!("/api/v1/agents/{id}"), None),
        ] {
            let mut req = k.request(method, &path, body);
            req.headers_mut().insert("x-nops-tenant", "intruder".parse().expect("header"));
            let (status, _, _) = k.send(req).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{:?} {method} {path} from another tenant", k.backend);
        }
        let mut list = k.request("GET", "/api/v1/agents", None);
        list.headers_mut().insert("x-nops-tenant", "intruder".parse().expect("header"));
        let (_, _, page) = k.send(list).await;
        assert_eq!(page["items"], json!([]));
        let (status, got) = k.call("GET", &format!("/api/v1/agents/{id}"), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(got["name"], "mine", "nothing changed");
    }
}

#[tokio::test]
async fn capability_version_requirements_select_agents() {
    for k in TestKernel::all().await {
        for (name, version) in [("old", "1.1.9"), ("mid", "1.2.0"), ("new", "1.4.0"), ("next", "2.0.0")] {
            k.create_agent(agent_json(name, "inference.llm", version)).await;
        }
        k.create_agent(agent_json("other", "vision.ocr", "1.4.0")).await;
        for (query, expect) in [
            ("capability=inference.llm", vec!["old", "mid", "new", "next"]),
            ("capability=inference.llm&version=%5E1.2", vec!["mid", "new"]),
            ("capability=inference.llm&version=%3E%3D1.4", vec!["new", "next"]),
            ("capability=inference.llm&version=~1.1", vec!["old"]),
            ("capability=inference.llm&version=%5E3", vec![]),
            ("capability=vision.ocr", vec!["other"]),
            ("capability=none.here", vec![]),
        ] {
            let (status, page) = k.call("GET", &format!("/api/v1/agents?{query}"), None).await;
            assert_eq!(status, StatusCode::OK, "{query}: {page}");
            assert_eq!(names(&page), expect, "{:?}: {query}", k.backend);
        }
    }
}

#[tokio::test]
async fn labels_and_status_filter() {
    for k in TestKernel::all().await {
        for (name, zone, tier) in [("a", "eu", "gold"), ("b", "eu", "silver"), ("c", "us", "gold")] {
            k.create_agent(json!({"name": name, "labels": {"zone": zone, "tier": tier}})).await;
        }
        for (query, expect) in [
            ("label=zone%3Deu", vec!["a", "b"]),
            ("label=zone%3Deu,tier%3Dgold", vec!["a"]),
            ("label=tier%3Dgold", vec!["a", "c"]),
            ("label=zone%3Dmars", vec![]),
            ("status=healthy", vec!["a", "b", "c"]),
            ("status=stale", vec![]),
        ] {
            let (status, page) = k.call("GET", &format!("/api/v1/agents?{query}"), None).await;
            assert_eq!(status, StatusCode::OK, "{query}: {page}");
            assert_eq!(names(&page), expect, "{:?}: {query}", k.backend);
        }
    }
}

#[tokio::test]
async fn cursor_pagination_visits_every_agent_once() {
    for k in TestKernel::all().await {
        for i in 0..23 {
            k.create_agent(agent_json(&format!("agent-{i:02}"), "a.b", &format!("1.{i}.0"))).await;
        }
        for base in ["/api/v1/agents?limit=5", "/api/v1/agents?limit=5&capability=a.b&version=%3E%3D1.3"] {
            let mut seen = Vec::new();
            let mut path = base.to_string();
            for _ in 0..10 {
                let (status, page) = k.call("GET", &path, None).await;
                assert_eq!(status, StatusCode::OK, "{page}");
                seen.extend(names(&page));
                match page["next_after"].as_str() {
                    Some(after) => path = format!("{base}&after={after}"),
                    None => break,
                }
            }
            let expected: Vec<String> = if base.contains("version") {
                (3..23).map(|i| format!("agent-{i:02}")).collect()
            } else {
                (0..23).map(|i| format!("agent-{i:02}")).collect()
            };
            assert_eq!(seen, expected, "{:?}: {base}", k.backend);
        }
    }
}

#[tokio::test]
async fn a_store_reopened_serves_the_same_agents() {
    for backend in crate::support::backends() {
        let first = TestKernel::start(backend).await;
        let agent = first.create_agent(agent_json("durable", "a.b", "1.0.0")).await;
        let db = first.db;
        first.kernel.store.close().await;
        let config = nops::config::Config::resolve(&crate::support::test_args(&db.url)).expect("config");
        let again = nops::kernel::Kernel::open(&config, std::sync::Arc::new(nops_core::clock::ManualClock::new(0)))
            .await
            .expect("reopen");
        assert!(again.bootstrap_key.is_none(), "{backend:?}: the bootstrap key is created only once");
        assert_eq!(again.agents_loaded, 1);
        let tenant = "default".parse().expect("tenant");
        let id = agent["id"].as_str().expect("id").parse().expect("agent id");
        let got = again.registry.get(&tenant, id).await.expect("agent survives a restart");
        assert_eq!(got.name, "durable");
        again.store.close().await;
    }
}

#[tokio::test]
async fn two_kernels_starting_together_create_one_bootstrap_key() {
    for backend in crate::support::backends() {
        let db = crate::support::TestDb::new(backend).await;
        let config = nops::config::Config::resolve(&crate::support::test_args(&db.url)).expect("config");
        let clock = || std::sync::Arc::new(nops_core::clock::ManualClock::new(0));
        let (a, b) =
            tokio::join!(nops::kernel::Kernel::open(&config, clock()), nops::kernel::Kernel::open(&config, clock()));
        let (a, b) = (a.expect("first kernel"), b.expect("second kernel"));
        let printed = [a.bootstrap_key.is_some(), b.bootstrap_key.is_some()];
        assert_eq!(printed.iter().filter(|p| **p).count(), 1, "{backend:?}: exactly one kernel prints a key");
        a.store.close().await;
        b.store.close().await;
    }
}
