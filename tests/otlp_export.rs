//! Real OTLP/HTTP export: a small receiver runs in the test process, the gateway's exporter
//! is built exactly as `serve` builds it, and every exported byte is scanned for keys.
//! (One test in its own binary: it installs the global subscriber.)

mod support;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use poe_gateway::telemetry::OtelSettings;
use support::*;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_without_any_key() {
    let (addr, got) = otlp_receiver().await;
    let settings = OtelSettings::from_env(vec![(
        "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
        format!("http://{addr}"),
    )])
    .unwrap()
    .unwrap();
    let provider = settings.build().expect("exporter builds");
    let subscriber = tracing_subscriber::Registry::default()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("poe-gateway")));
    tracing::subscriber::set_global_default(subscriber).unwrap();
    poe_gateway::telemetry::set_traces_enabled(true);

    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("claude-sonnet-4.5", "ok"));
    let db = databases().await.remove(0);
    let policy = "[auth]\nmode = \"keys\"\n[aliases]\nclaude = \"claude-sonnet-4.5\"\n";
    let (gw, _core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
    let resp = request(
        &gw,
        "POST",
        "/admin/keys",
        &[("authorization", &format!("Bearer {ADMIN_KEY}"))],
        r#"{"name":"tracer"}"#,
    )
    .await;
    let gateway_key = body_json(resp).await["key"].as_str().unwrap().to_string();
    for stream in [false, true] {
        let resp = post(
            &gw,
            &chat_body("claude", stream),
            &[
                ("authorization", &format!("Bearer {gateway_key}")),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ],
        )
        .await;
        assert_eq!(resp.status(), 200);
        let _ = body_bytes(resp).await;
    }
    // A bad key's error path is traced too (nothing of it may leak).
    let _ = body_bytes(
        post(
            &gw,
            &chat_body("claude", false),
            &[("authorization", "Bearer pgw_wrong")],
        )
        .await,
    )
    .await;

    // Flushing blocks on the batch task: do it off the runtime's workers.
    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap()
        .unwrap();
    let mut bodies = Vec::new();
    for _ in 0..100 {
        bodies = got.lock().unwrap().clone();
        if !bodies.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!bodies.is_empty(), "nothing was exported");
    let all: Vec<u8> = bodies.iter().flat_map(|(_, b)| b.to_vec()).collect();
    for (what, _) in &bodies {
        assert_eq!(what, "/v1/traces application/x-protobuf");
    }
    let contains = |needle: &str| all.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(contains("chat claude"), "the chat span was exported");
    assert!(contains("gen_ai.request.model"));
    assert!(contains("poe-gateway"), "service name");
    // The incoming trace id, as raw bytes in the protobuf.
    let trace_id = hex::decode("0af7651916cd43dd8448eb211c80319c").unwrap();
    assert!(all.windows(16).any(|w| w == trace_id.as_slice()));
    for secret in [UPSTREAM_KEY, ADMIN_KEY, gateway_key.as_str(), "pgw_wrong"] {
        assert!(!contains(secret), "a key was exported: {secret}");
    }
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
}
