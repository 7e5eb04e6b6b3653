//! An outside NATS client (`tests/clients/nats_consumer.py`, nats-py) reads what the NATS bus
//! published: the layout in `docs/events-nats.md` is enough to consume the events without any
//! kernel code.

use std::path::PathBuf;
use std::process::Command;

use nops_core::bus::{Bus, BusConfig, EventIn, Published};
use nops_core::tenant::TenantId;
use serde_json::Value;

use crate::attacks::venv_python;
use crate::support::nats_url;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients/nats_consumer.py")
}

fn event(tenant: &TenantId, id: &str, subject: &str, n: u32) -> EventIn {
    EventIn {
        id: id.to_string(),
        tenant: tenant.clone(),
        subject: subject.to_string(),
        payload: format!("{{\"n\":{n},\"id\":\"{id}\"}}").into_bytes(),
        source: "api/tester".into(),
        time_ms: 1_767_225_600_000 + i64::from(n),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_py_consumer_reads_exactly_the_accepted_events_in_order() {
    let Some(url) = nats_url() else { return };
    let Some(python) = venv_python() else { return };
    let prefix = format!("X{:016X}", rand::random::<u64>());
    let bus =
        nops_bus::NatsBus::connect(nops_bus::NatsBusConfig { url: url.clone(), prefix, bus: BusConfig::default() })
            .await
            .expect("connect to the test NATS server");
    let acme: TenantId = "acme".parse().expect("tenant");
    let other: TenantId = "other".parse().expect("tenant");

    let mut batch: Vec<EventIn> = (0..5).map(|n| event(&acme, &format!("order-{n}"), "orders.created", n)).collect();
    batch.push(event(&acme, "order-1", "orders.created", 99)); // a duplicate id: not stored again
    batch.push(event(&other, "order-1", "orders.created", 7)); // another tenant's, not in acme's filter
    batch.push(event(&acme, "pay:1/a", "billing.invoice.paid", 5));
    let published = bus.publish(&batch).await.expect("publish");
    assert!(matches!(published[5], Published::Duplicate { .. }), "{published:?}");
    let accepted: Vec<(&EventIn, u64)> = batch
        .iter()
        .zip(&published)
        .filter(|(e, _)| e.tenant == acme)
        .filter_map(|(e, p)| match p {
            Published::Accepted { seq } => Some((e, *seq)),
            Published::Duplicate { .. } => None,
        })
        .collect();
    assert_eq!(accepted.len(), 6);

    let filter = bus.tenant_events_filter(&acme);
    let output = Command::new(&python)
        .arg(script())
        .args([url.as_str(), bus.events_stream(), filter.as_str(), &accepted.len().to_string(), "10"])
        .output()
        .expect("run the nats-py consumer");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    bus.destroy().await.expect("destroy the test streams");
    assert!(output.status.success(), "the consumer failed:\n{stdout}\n{stderr}");

    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), accepted.len(), "exactly the accepted events:\n{stdout}");
    for (line, (event, seq)) in lines.iter().zip(&accepted) {
        assert_eq!(line["seq"], *seq, "{line}");
        assert_eq!(
            line["subject"],
            format!("{filter_base}{}", event.subject, filter_base = &filter[..filter.len() - 1])
        );
        assert_eq!(line["msg_id"], format!("acme/{}", event.id), "{line}");
        assert_eq!(line["event_id"], event.id.as_str(), "{line}");
        assert_eq!(line["source"], "api/tester", "{line}");
        assert_eq!(line["time_ms"], event.time_ms, "{line}");
        assert_eq!(line["payload"].as_str().map(str::as_bytes), Some(event.payload.as_slice()), "{line}");
    }
    let order_1: Vec<&Value> = lines.iter().filter(|l| l["event_id"] == "order-1").collect();
    assert_eq!(order_1.len(), 1, "the duplicate is stored once");
    assert_eq!(order_1[0]["payload"], "{\"n\":1,\"id\":\"order-1\"}", "the first copy wins");
}

/// What a kernel publishes through its HTTP API and its outbox is readable by nats-py with
/// nothing but the documented layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_py_consumer_reads_what_the_kernel_published_over_http_and_its_outbox() {
    use http::StatusCode;
    use serde_json::json;

    use crate::support::{Backend, TestDb, TestKernel, agent_json};

    let Some(url) = nats_url() else { return };
    let Some(python) = venv_python() else { return };
    let prefix = format!("H{:015X}", rand::random::<u64>() >> 4);
    let db = TestDb::new(Backend::Sqlite).await;
    let (nats, nats_prefix) = (url.clone(), prefix.clone());
    let k = TestKernel::start_with(Backend::Sqlite, db, move |args| {
        args.nats_url = Some(nats);
        args.nats_prefix = Some(nats_prefix);
    })
    .await;
    let events = json!({"events": [
        {"id": "a-1", "subject": "orders.created", "payload": {"order": 1}},
        {"id": "a-2", "subject": "orders.paid", "payload": {"order": 1, "amount": 12.5}},
        {"id": "a-1", "subject": "orders.created", "payload": {"order": 1}},
    ]});
    let (status, body) = k.call("POST", "/api/v1/events", Some(events)).await;
    assert_eq!((status, body["accepted"].as_u64()), (StatusCode::OK, Some(2)), "{body}");
    k.create_agent(agent_json("py-reader", "gpu", "1.0.0")).await;
    assert_eq!(k.kernel.relay.pass().await.expect("relay"), 1, "the registration's event");

    let stream = format!("{prefix}_EVENTS");
    let filter = format!("{}.ev.default.>", prefix.to_lowercase());
    let output = Command::new(&python)
        .arg(script())
        .args([url.as_str(), stream.as_str(), filter.as_str(), "3", "10"])
        .output()
        .expect("run the nats-py consumer");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let cleanup = nops_bus::NatsBus::connect(nops_bus::NatsBusConfig { url, prefix, bus: BusConfig::default() })
        .await
        .expect("connect to the test NATS server");
    cleanup.destroy().await.expect("destroy the test streams");
    assert!(output.status.success(), "the consumer failed:\n{stdout}\n{stderr}");
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let ids: Vec<&str> = lines.iter().map(|l| l["event_id"].as_str().expect("event id")).collect();
    assert_eq!(&ids[..2], ["a-1", "a-2"], "{stdout}");
    assert!(ids[2].starts_with("outbox/"), "{stdout}");
    let payload: Value = serde_json::from_str(lines[1]["payload"].as_str().expect("payload text")).expect("JSON");
    assert_eq!(payload, json!({"order": 1, "amount": 12.5}), "the payload as sent: {stdout}");
    assert!(lines[2]["subject"].as_str().is_some_and(|s| s.ends_with(".nops.agents.registered")), "{stdout}");
}
