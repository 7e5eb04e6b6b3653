//! Identity and access over the real router: API keys (create, rotate with grace, revoke),
//! scopes, tenant isolation by the ABAC policy, governing policy plugins hot-loaded, and the
//! attacks each of these must stop — every one answered 401/403 with nothing changed.

use axum::body::Body;
use http::{Request, StatusCode};
use serde_json::{Value, json};

use crate::support::{TestKernel, agent_json, as_key};

/// Creates a key with the bootstrap admin key, acting in `tenant`; returns (secret, id).
async fn create_key(k: &TestKernel, tenant: &str, body: Value) -> (String, String) {
    let (status, created) = as_key(k, &k.key, Some(tenant), "POST", "/api/v1/admin/api-keys", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    (created["secret"].as_str().expect("secret").to_string(), created["key"]["id"].as_str().expect("id").to_string())
}

/// Agents of `tenant`, as the bootstrap admin sees them.
async fn agent_names(k: &TestKernel, tenant: &str) -> Vec<String> {
    let (status, page) = as_key(k, &k.key, Some(tenant), "GET", "/api/v1/agents", None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["items"].as_array().expect("items").iter().map(|a| a["name"].as_str().unwrap_or("").to_string()).collect()
}

#[tokio::test]
async fn keys_are_created_shown_once_rotated_with_grace_and_revoked() {
    for k in TestKernel::all().await {
        let (secret, id) =
            create_key(&k, "acme", json!({ "name": "ci deployer", "role": "operator", "scopes": ["agents:*"] })).await;
        assert!(nops_core::auth::is_well_formed_api_key(&secret));
        // The key works, within its scopes and tenant.
        let (status, _) = as_key(&k, &secret, None, "GET", "/api/v1/agents", None).await;
        assert_eq!(status, StatusCode::OK, "{:?}", k.backend);
        // Listing and showing never return the secret or the hash.
        let (status, listed) = as_key(&k, &k.key, Some("acme"), "GET", "/api/v1/admin/api-keys", None).await;
        assert_eq!(status, StatusCode::OK);
        let text = listed.to_string();
        assert!(!text.contains(&secret) && !text.contains("hash"), "{text}");
        assert_eq!(listed["keys"].as_array().expect("keys").len(), 1);
        let (_, shown) = as_key(&k, &k.key, Some("acme"), "GET", &format!("/api/v1/admin/api-keys/{id}"), None).await;
        assert_eq!(shown["status"], "active");
        assert_eq!(shown["scopes"], json!(["agents:*"]));
        assert_eq!(shown["tenant"], "acme");

        // Rotate with a 60 s grace: both keys work until it ends, then only the next.
        let path = format!("/api/v1/admin/api-keys/{id}/rotate");
        let (status, rotated) = as_key(&k, &k.key, Some("acme"), "POST", &path, Some(json!({ "grace_s": 60 }))).await;
        assert_eq!(status, StatusCode::OK, "{rotated}");
        let next = rotated["secret"].as_str().expect("secret").to_string();
        assert_eq!(rotated["previous"]["status"], "grace");
        assert_eq!(rotated["key"]["replaces"], id.as_str());
        for credential in [&secret, &next] {
            assert_eq!(as_key(&k, credential, None, "GET", "/api/v1/agents", None).await.0, StatusCode::OK);
        }
        // A second rotation of the same key is a conflict, not a second successor.
        let (status, _) = as_key(&k, &k.key, Some("acme"), "POST", &path, None).await;
        assert_eq!(status, StatusCode::CONFLICT);
        k.clock.advance_ms(60_001);
        assert_eq!(as_key(&k, &secret, None, "GET", "/api/v1/agents", None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(as_key(&k, &next, None, "GET", "/api/v1/agents", None).await.0, StatusCode::OK);

        // Revoke: the next key stops at once on this kernel.
        let next_id = rotated["key"]["id"].as_str().expect("id");
        let (status, revoked) =
            as_key(&k, &k.key, Some("acme"), "POST", &format!("/api/v1/admin/api-keys/{next_id}/revoke"), None).await;
        assert_eq!(status, StatusCode::OK, "{revoked}");
        assert_eq!(revoked["status"], "revoked");
        assert_eq!(as_key(&k, &next, None, "GET", "/api/v1/agents", None).await.0, StatusCode::UNAUTHORIZED);

        // Metrics count the events, and never carry a secret.
        let (_, metrics) = k.send_text(k.request("GET", "/metrics", None)).await;
        for line in [
            "nops_api_key_rotations_total 1",
            r#"nops_api_key_events_total{event="created"} 1"#,
            r#"nops_api_key_events_total{event="revoked"} 1"#,
            r#"nops_auth_total{method="api_key",outcome="failure",reason="expired"} 1"#,
            r#"nops_auth_total{method="api_key",outcome="failure",reason="revoked"} 1"#,
            "nops_api_keys_active 1",
        ] {
            assert!(metrics.contains(line), "{:?}: missing {line}", k.backend);
        }
        assert!(!metrics.contains(&secret) && !metrics.contains(&next));
    }
}

#[tokio::test]
async fn scopes_are_enforced_per_endpoint_and_cannot_be_escalated() {
    for k in TestKernel::all().await {
        let (reader, _) = create_key(
            &k,
            "acme",
            json!({ "name": "reader", "role": "admin", "scopes": ["agents:read", "agents:list"] }),
        )
        .await;
        assert_eq!(as_key(&k, &reader, None, "GET", "/api/v1/agents", None).await.0, StatusCode::OK);
        // Writing needs agents:write: refused before any policy runs, and nothing created.
        let (status, body) =
            as_key(&k, &reader, None, "POST", "/api/v1/agents", Some(agent_json("scoped", "gpu", "1.0.0"))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["error"]["code"], "insufficient_scope");
        assert!(agent_names(&k, "acme").await.is_empty());
        // Creating keys needs keys:create.
        let (status, _) = as_key(
            &k,
            &reader,
            None,
            "POST",
            "/api/v1/admin/api-keys",
            Some(json!({ "name": "escalate", "role": "admin", "scopes": ["*"] })),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        // A key manager cannot hand out more than it holds.
        let (manager, _) =
            create_key(&k, "acme", json!({ "name": "manager", "role": "admin", "scopes": ["keys:*", "agents:read"] }))
                .await;
        for scopes in [json!(["*"]), json!(["agents:*"]), json!(["plugins:write"])] {
            let (status, body) = as_key(
                &k,
                &manager,
                None,
                "POST",
                "/api/v1/admin/api-keys",
                Some(json!({ "name": "wider", "role": "viewer", "scopes": scopes })),
            )
            .await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert_eq!(body["error"]["code"], "scope_escalation");
        }
        let (status, body) = as_key(
            &k,
            &manager,
            None,
            "POST",
            "/api/v1/admin/api-keys",
            Some(json!({ "name": "narrower", "role": "viewer", "scopes": ["agents:read"] })),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        // A tenant-bound key cannot make a kernel-wide one.
        let (status, _) = as_key(
            &k,
            &manager,
            None,
            "POST",
            "/api/v1/admin/api-keys",
            Some(json!({ "name": "global", "role": "viewer", "scopes": ["agents:read"], "kernel_wide": true })),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        // Bad scope strings are a 422 too.
        let (status, _) = as_key(
            &k,
            &k.key,
            Some("acme"),
            "POST",
            "/api/v1/admin/api-keys",
            Some(json!({ "name": "bad", "role": "viewer", "scopes": ["Agents:Read"] })),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    }
}

#[tokio::test]
async fn one_tenant_never_reads_or_changes_another_tenants_agents_keys_or_plugins() {
    for k in TestKernel::all().await {
        let (status, victim) =
            as_key(&k, &k.key, Some("beta"), "POST", "/api/v1/agents", Some(agent_json("victim", "gpu", "1.0.0")))
                .await;
        assert_eq!(status, StatusCode::CREATED, "{victim}");
        let victim_id = victim["id"].as_str().expect("id").to_string();
        let (_, beta_key_id) = create_key(&k, "beta", json!({ "name": "beta-ops", "role": "operator" })).await;
        let (alpha, _) = create_key(&k, "alpha", json!({ "name": "alpha-admin", "role": "admin" })).await;

        let attempts: Vec<(&str, String, Option<Value>)> = vec![
            ("GET", "/api/v1/agents".into(), None),
            ("GET", format!("/api/v1/agents/{victim_id}"), None),
            ("PATCH", format!("/api/v1/agents/{victim_id}"), Some(json!({ "labels": { "owned": "yes" } }))),
            ("DELETE", format!("/api/v1/agents/{victim_id}"), None),
            ("POST", format!("/api/v1/agents/{victim_id}/heartbeat"), Some(json!({}))),
            ("POST", "/api/v1/agents".into(), Some(agent_json("planted", "gpu", "1.0.0"))),
            ("GET", "/api/v1/admin/api-keys".into(), None),
            ("GET", format!("/api/v1/admin/api-keys/{beta_key_id}"), None),
            ("POST", format!("/api/v1/admin/api-keys/{beta_key_id}/revoke"), None),
            ("POST", format!("/api/v1/admin/api-keys/{beta_key_id}/rotate"), None),
            ("POST", "/api/v1/admin/api-keys".into(), Some(json!({ "name": "mole", "role": "admin" }))),
            ("GET", "/api/v1/plugins".into(), None),
            ("POST", "/api/v1/plugins/abac/deactivate".into(), None),
        ];
        for (method, path, body) in &attempts {
            let (status, answer) = as_key(&k, &alpha, Some("beta"), method, path, body.clone()).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{:?} {method} {path} in beta: {answer}", k.backend);
            assert_eq!(answer["error"]["code"], "forbidden");
        }
        // Acting in its own tenant, alpha does not see beta's key either.
        let (status, _) = as_key(&k, &alpha, None, "GET", &format!("/api/v1/admin/api-keys/{beta_key_id}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) =
            as_key(&k, &alpha, None, "POST", &format!("/api/v1/admin/api-keys/{beta_key_id}/revoke"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = as_key(&k, &alpha, None, "GET", &format!("/api/v1/agents/{victim_id}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // Nothing changed in beta.
        assert_eq!(agent_names(&k, "beta").await, vec!["victim".to_string()]);
        let (_, victim_now) =
            as_key(&k, &k.key, Some("beta"), "GET", &format!("/api/v1/agents/{victim_id}"), None).await;
        assert_eq!(victim_now["labels"], victim["labels"]);
        let (_, key_now) =
            as_key(&k, &k.key, Some("beta"), "GET", &format!("/api/v1/admin/api-keys/{beta_key_id}"), None).await;
        assert_eq!(key_now["status"], "active");
        let (_, metrics) = k.send_text(k.request("GET", "/metrics", None)).await;
        assert!(metrics.contains(r#"nops_authz_decisions_total{decision="deny",source="builtin"}"#), "{metrics}");
    }
}

#[tokio::test]
async fn roles_are_what_the_policy_says() {
    let k = TestKernel::start(crate::support::Backend::Sqlite).await;
    let (status, agent) =
        as_key(&k, &k.key, Some("acme"), "POST", "/api/v1/agents", Some(agent_json("edge-1", "gpu", "1.0.0"))).await;
    assert_eq!(status, StatusCode::CREATED);
    let agent_id = agent["id"].as_str().expect("id").to_string();
    let (other, _) =
        as_key(&k, &k.key, Some("acme"), "POST", "/api/v1/agents", Some(agent_json("edge-2", "gpu", "1.0.0"))).await;
    assert_eq!(other, StatusCode::CREATED);
    let (viewer, _) = create_key(&k, "acme", json!({ "name": "viewer", "role": "viewer" })).await;
    let (agent_key, _) =
        create_key(&k, "acme", json!({ "name": "edge-1", "role": "agent", "subject": agent_id.clone() })).await;

    assert_eq!(as_key(&k, &viewer, None, "GET", "/api/v1/agents", None).await.0, StatusCode::OK);
    let (status, _) =
        as_key(&k, &viewer, None, "PATCH", &format!("/api/v1/agents/{agent_id}"), Some(json!({ "labels": {} }))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "viewers read only");
    let (status, _) = as_key(&k, &viewer, None, "GET", "/api/v1/admin/api-keys", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "viewers see no keys");

    // An agent heartbeats as itself, never as another agent, and lists nothing.
    let beat = Some(json!({}));
    let (status, body) =
        as_key(&k, &agent_key, None, "POST", &format!("/api/v1/agents/{agent_id}/heartbeat"), beat.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let list = as_key(&k, &k.key, Some("acme"), "GET", "/api/v1/agents", None).await.1;
    let other_id = list["items"]
        .as_array()
        .expect("agents")
        .iter()
        .find(|a| a["name"] == "edge-2")
        .and_then(|a| a["id"].as_str())
        .expect("edge-2")
        .to_string();
    let (status, _) = as_key(&k, &agent_key, None, "POST", &format!("/api/v1/agents/{other_id}/heartbeat"), beat).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(as_key(&k, &agent_key, None, "GET", "/api/v1/agents", None).await.0, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn bad_credentials_get_401_with_a_challenge_and_change_nothing() {
    let k = TestKernel::start(crate::support::Backend::Sqlite).await;
    let forged = {
        // The right shape and checksum, but never issued.
        let key = nops_core::auth::generate_api_key();
        key.secret.clone()
    };
    let mut look_alike = k.key.clone().into_bytes();
    let i = nops_core::auth::API_KEY_PREFIX.len() + 2;
    look_alike[i] = if look_alike[i] == b'a' { b'b' } else { b'a' };
    let look_alike = String::from_utf8(look_alike).expect("ascii");
    let unsigned_jwt = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.";
    for credential in [forged.as_str(), look_alike.as_str(), unsigned_jwt, "garbage", &"x".repeat(9000)] {
        let request = Request::builder()
            .method("POST")
            .uri("/api/v1/agents")
            .header("authorization", format!("Bearer {credential}"))
            .header("content-type", "application/json")
            .body(Body::from(agent_json("intruder", "gpu", "1.0.0").to_string()))
            .expect("request");
        let (status, headers, body) = k.send(request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(headers.get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));
        assert!(!body.to_string().contains(credential.get(..20).unwrap_or(credential)));
    }
    assert!(agent_names(&k, "default").await.is_empty());
}

/// A rule document: admins may do everything except list agents.
const NO_LISTING: &[u8] = br#"{"version": 1, "rules": [
  {"id": "no-listing", "effect": "forbid", "actions": ["agents:list"]},
  {"id": "admins", "effect": "permit", "actions": ["*"], "when": [{"attr": "principal.role", "op": "eq", "value": "admin"}]}
]}"#;

#[tokio::test]
async fn a_hot_loaded_governing_policy_decides_the_next_request_and_a_failing_one_denies() {
    use crate::plugin_api::{manifest, policy_document, upload, wasm};
    use nops_core::plugin::PluginKind;

    for k in TestKernel::all().await {
        assert_eq!(k.call("GET", "/api/v1/agents", None).await.0, StatusCode::OK);
        // Version 1: the shipped tenant-isolation document, as a plugin.
        let abac = wasm("policy_abac");
        let isolation = policy_document("tenant-isolation.json");
        let m = manifest("api-access", "1.0.0", PluginKind::Policy, &abac, Some(&isolation));
        let (status, body) = upload(&k, &m, &abac, Some(&isolation), true).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(k.call("GET", "/api/v1/agents", None).await.0, StatusCode::OK);
        // Version 2 forbids listing: it decides the very next request, no restart.
        let m = manifest("api-access", "2.0.0", PluginKind::Policy, &abac, Some(NO_LISTING));
        let (status, body) = upload(&k, &m, &abac, Some(NO_LISTING), true).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = k.call("GET", "/api/v1/agents", None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{:?}: {body}", k.backend);
        assert_eq!(k.call("GET", "/api/v1/plugins", None).await.0, StatusCode::OK);
        // Roll back: listing is allowed again.
        let (status, body) = k.call("POST", "/api/v1/plugins/api-access/rollback", Some(json!({}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(k.call("GET", "/api/v1/agents", None).await.0, StatusCode::OK);

        // A governing policy that traps denies everything (fail closed) and says so in metrics.
        let trap = wasm("policy_trap");
        let m = manifest("api-access", "3.0.0", PluginKind::Policy, &trap, None);
        let (status, body) = upload(&k, &m, &trap, None, true).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = k.call("POST", "/api/v1/agents", Some(agent_json("after-trap", "gpu", "1.0.0"))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        let (_, metrics) = k.send_text(k.request("GET", "/metrics", None)).await;
        assert!(metrics.contains(r#"nops_plugin_fallbacks_total{kind="policy",plugin="default/api-access"}"#));
        assert!(metrics.contains(r#"nops_authz_decisions_total{decision="deny",source="plugins"}"#));
        // The operator repairs it out of band (here: through the service); access returns.
        k.kernel.plugins.rollback(&"default".parse().expect("tenant"), "api-access", "test").await.expect("rollback");
        assert_eq!(k.call("GET", "/api/v1/agents", None).await.0, StatusCode::OK);
        assert!(agent_names(&k, "default").await.is_empty(), "the denied create left no agent");
    }
}

#[tokio::test]
async fn agents_labelled_protected_are_changed_by_admins_only() {
    for k in TestKernel::all().await {
        let (status, agent) = as_key(
            &k,
            &k.key,
            Some("acme"),
            "POST",
            "/api/v1/agents",
            Some(json!({ "name": "core-router", "labels": { "protected": "true" } })),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{agent}");
        let path = format!("/api/v1/agents/{}", agent["id"].as_str().expect("id"));
        let (operator, _) = create_key(&k, "acme", json!({ "name": "ops", "role": "operator" })).await;
        // Operators manage agents, but not protected ones: no change, no removal.
        let (status, body) =
            as_key(&k, &operator, None, "PATCH", &path, Some(json!({ "labels": { "protected": "false" } }))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{:?}: {body}", k.backend);
        assert_eq!(as_key(&k, &operator, None, "DELETE", &path, None).await.0, StatusCode::FORBIDDEN);
        let (_, now) = as_key(&k, &k.key, Some("acme"), "GET", &path, None).await;
        assert_eq!(now["labels"]["protected"], "true");
        // Reading it is fine; an unprotected agent is theirs to change.
        assert_eq!(as_key(&k, &operator, None, "GET", &path, None).await.0, StatusCode::OK);
        let (_, plain) =
            as_key(&k, &k.key, Some("acme"), "POST", "/api/v1/agents", Some(json!({ "name": "edge-9" }))).await;
        let plain_path = format!("/api/v1/agents/{}", plain["id"].as_str().expect("id"));
        let (status, body) =
            as_key(&k, &operator, None, "PATCH", &plain_path, Some(json!({ "labels": { "zone": "b" } }))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // The admin may.
        assert_eq!(as_key(&k, &k.key, Some("acme"), "DELETE", &path, None).await.0, StatusCode::NO_CONTENT);
    }
}

#[tokio::test]
async fn viewers_see_secret_labels_masked_as_the_policy_obliges() {
    for k in TestKernel::all().await {
        let body = json!({ "name": "vault-edge", "labels": { "secret": "hunter2", "zone": "a" } });
        let (status, agent) = as_key(&k, &k.key, Some("acme"), "POST", "/api/v1/agents", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{agent}");
        let path = format!("/api/v1/agents/{}", agent["id"].as_str().expect("id"));
        let (viewer, _) = create_key(&k, "acme", json!({ "name": "viewer", "role": "viewer" })).await;
        let (status, seen) = as_key(&k, &viewer, None, "GET", &path, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(seen["labels"], json!({ "secret": "***", "zone": "a" }), "{:?}", k.backend);
        let (_, page) = as_key(&k, &viewer, None, "GET", "/api/v1/agents", None).await;
        assert_eq!(page["items"][0]["labels"]["secret"], "***");
        assert!(!page.to_string().contains("hunter2"));
        // Admins are under no such obligation.
        let (_, full) = as_key(&k, &k.key, Some("acme"), "GET", &path, None).await;
        assert_eq!(full["labels"]["secret"], "hunter2");
    }
}
