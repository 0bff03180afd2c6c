//! No key ever leaks (issue 10): every path, with logs at `trace` captured as JSON and spans
//! exported over real OTLP/HTTP to a receiver in this process. Afterwards the captured log
//! output, the exported span bytes, `/metrics`, the ledger file, every response header, every
//! error body, every SSE error event and every MCP tool answer are scanned for the upstream
//! key, the gateway keys, a passthrough caller's Poe key, the admin key, and a wrong key a
//! client presented. The upstream here is hostile: its errors echo the key it was called with,
//! in the body and in a header.
//! (One test in its own binary: it installs the global subscriber.)

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use poe_gateway::telemetry::OtelSettings;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::json;
use support::*;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;

/// A passthrough caller's own Poe key.
const CALLER_POE_KEY: &str = "poe-caller-own-key-5555555555";
/// A gateway key that does not exist, presented by a client.
const WRONG_KEY: &str = "pgw_0000000000000000000000000000000000000000000000000000000000000000";

/// Everything the fmt layer writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// What clients saw, to be scanned: (what, bytes).
#[derive(Default)]
struct Seen(Vec<(String, Vec<u8>)>);

impl Seen {
    /// Reads a response, keeps its headers (always) and its body (unless `body_may_hold_a_key`:
    /// the one answer that shows a new gateway key), and returns status and body.
    async fn take(
        &mut self,
        what: &str,
        resp: http::Response<hyper::body::Incoming>,
        body_may_hold_a_key: bool,
    ) -> (u16, Bytes) {
        let status = resp.status().as_u16();
        let mut head = Vec::new();
        for (k, v) in resp.headers() {
            head.extend_from_slice(k.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(v.as_bytes());
            head.push(b'\n');
        }
        self.0.push((format!("{what}: headers"), head));
        let body = body_bytes(resp).await;
        if !body_may_hold_a_key {
            self.0
                .push((format!("{what}: body ({status})"), body.to_vec()));
        }
        (status, body)
    }
}

fn echoing_error(status: u16, key: &str) -> Reply {
    Reply::json(
        status,
        format!(
            r#"{{"error":{{"code":{status},"type":"authentication_error","message":"Invalid API key provided: Bearer {key} (key `{key}`)","metadata":{{"authorization":"Bearer {key}"}}}}}}"#
        ),
    )
    .header("x-echo-authorization", &format!("Bearer {key}"))
}

/// The body a one-frame reply sends.
fn body_bytes_of(reply: &Reply) -> Bytes {
    let mut out = Vec::new();
    for step in &reply.steps {
        if let Step::Send(b) = step {
            out.extend_from_slice(b);
        }
    }
    Bytes::from(out)
}

/// A stream Poe fails part way with an error event quoting the key, then ends with `[DONE]`.
fn echoing_stream_error(key: &str) -> Reply {
    Reply::sse()
        .send(chunk("claude-sonnet-4.5", "half"))
        .send(format!(
            "data: {{\"error\":{{\"code\":401,\"type\":\"authentication_error\",\"message\":\"key revoked: Bearer {key}\"}}}}\n\n"
        ))
        .send("data: [DONE]\n\n")
}

fn det_body(model: &str, stream: bool) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "q"}], "temperature": 0, "stream": stream})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_leaks_on_any_path() {
    // Logs at trace, as JSON, into memory; spans to a real OTLP receiver.
    let logs = Captured::default();
    let (otlp_addr, exported) = otlp_receiver().await;
    let settings = OtelSettings::from_env(vec![(
        "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
        format!("http://{otlp_addr}"),
    )])
    .unwrap()
    .unwrap();
    let provider = settings.build().expect("exporter builds");
    let subscriber = tracing_subscriber::Registry::default()
        .with(EnvFilter::new("trace"))
        // The gateway's own JSON lines (`json_log`), spans and all.
        .with(poe_gateway::json_log::layer(logs.clone()))
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("poe-gateway")));
    tracing::subscriber::set_global_default(subscriber).unwrap();
    poe_gateway::telemetry::set_traces_enabled(true);

    let up = MockUpstream::start().await;
    let db = databases().await.remove(0);
    let db_path = db.trim_start_matches("sqlite://").to_string();
    let policy = "[auth]\nmode = \"keys\"\n[server]\nmetrics_require_admin = true\n\
                  [retry]\nbase_backoff = \"1ms\"\nmax_backoff = \"2ms\"\n\
                  [aliases]\nclaude = \"claude-sonnet-4.5\"\n";
    let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
    let mut seen = Seen::default();
    let admin = format!("Bearer {ADMIN_KEY}");

    // Two gateway keys (their creation answers are the only bodies allowed to hold them).
    let mut keys = Vec::new();
    for name in ["alice", "bob"] {
        let resp = request(
            &gw,
            "POST",
            "/admin/keys",
            &[("authorization", &admin)],
            &json!({ "name": name }).to_string(),
        )
        .await;
        let (status, body) = seen.take("create key", resp, true).await;
        assert_eq!(status, 201);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        keys.push((
            v["id"].as_str().unwrap().to_string(),
            v["key"].as_str().unwrap().to_string(),
        ));
    }
    let alice = format!("Bearer {}", keys[0].1);
    let bob = format!("Bearer {}", keys[1].1);
    let chat = |body: String, auth: String| {
        let gw = &gw;
        async move { post(gw, &body, &[("authorization", auth.as_str())]).await }
    };

    // JSON and stream.
    up.push(Reply::completion("claude-sonnet-4.5", "hi"));
    let (s, _) = seen
        .take(
            "json chat",
            chat(chat_body("claude", false), alice.clone()).await,
            false,
        )
        .await;
    assert_eq!(s, 200);
    up.push(Reply::stream("claude-sonnet-4.5", &["a", "b"]));
    let (s, _) = seen
        .take(
            "stream chat",
            chat(chat_body("claude", true), alice.clone()).await,
            false,
        )
        .await;
    assert_eq!(s, 200);

    // Poe's 401 echoing the key (not retried), and its 500 echoing it on every attempt.
    up.push(echoing_error(401, UPSTREAM_KEY));
    let (s, _) = seen
        .take(
            "upstream 401",
            chat(chat_body("claude", false), alice.clone()).await,
            false,
        )
        .await;
    assert_eq!(s, 401);
    for _ in 0..3 {
        up.push(echoing_error(500, UPSTREAM_KEY));
    }
    let (s, _) = seen
        .take(
            "upstream 500 after retries",
            chat(chat_body("claude", false), alice.clone()).await,
            false,
        )
        .await;
    assert_eq!(s, 500);
    // A retry that then succeeds; a stream that then breaks.
    up.push(echoing_error(503, UPSTREAM_KEY));
    up.push(Reply::completion("claude-sonnet-4.5", "second time"));
    let (s, _) = seen
        .take(
            "retried",
            chat(chat_body("claude", false), alice.clone()).await,
            false,
        )
        .await;
    assert_eq!(s, 200);
    up.push(
        Reply::sse()
            .send(chunk("claude-sonnet-4.5", "x"))
            .drop_connection(),
    );
    let (s, body) = seen
        .take(
            "broken stream",
            chat(chat_body("claude", true), alice.clone()).await,
            false,
        )
        .await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&body).contains("data: {\"error\""));
    // A stream Poe failed with an error event quoting the key.
    up.push(echoing_stream_error(UPSTREAM_KEY));
    let (s, body) = seen
        .take(
            "stream error event",
            chat(chat_body("claude", true), alice.clone()).await,
            false,
        )
        .await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&body).contains("key revoked: Bearer [redacted]"));
    // A 200 whose body is an error object quoting the key: its length went out in the
    // head, so the key is masked in place, and the body still parses.
    up.push(echoing_error(200, UPSTREAM_KEY));
    let (s, body) = seen
        .take(
            "200 error object",
            chat(chat_body("claude", false), alice.clone()).await,
            false,
        )
        .await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("still JSON");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Invalid API key provided: Bearer [redacted] "),
        "{v}"
    );
    // The same body in two frames cut inside the key (it went out whole: each frame was
    // searched on its own), with a length and chunked.
    let whole = body_bytes_of(&echoing_error(200, UPSTREAM_KEY));
    let cut = whole
        .windows(UPSTREAM_KEY.len())
        .position(|w| w == UPSTREAM_KEY.as_bytes())
        .unwrap()
        + 5;
    for with_length in [true, false] {
        let mut reply = Reply::new(200).header("content-type", "application/json");
        if with_length {
            reply = reply.header("content-length", &whole.len().to_string());
        }
        up.push(
            reply
                .send(whole.slice(..cut))
                .sleep(Duration::from_millis(20))
                .send(whole.slice(cut..)),
        );
        let (s, body) = seen
            .take(
                "200 error object in two frames",
                chat(chat_body("claude", false), alice.clone()).await,
                false,
            )
            .await;
        assert_eq!(s, 200);
        assert_eq!(body.len(), whole.len());
        let v: serde_json::Value = serde_json::from_slice(&body).expect("still JSON");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Invalid API key provided: Bearer [redacted] "),
            "{v}"
        );
    }

    // The cache: a miss, then a hit.
    up.push(Reply::completion("claude-sonnet-4.5", "cached"));
    for what in ["cache miss", "cache hit"] {
        let (s, _) = seen
            .take(
                what,
                chat(det_body("claude", false), alice.clone()).await,
                false,
            )
            .await;
        assert_eq!(s, 200, "{what}");
    }

    // Keys in the wrong places.
    for (what, auth) in [
        ("unknown gateway key", format!("Bearer {WRONG_KEY}")),
        ("admin key on /v1", admin.clone()),
        ("upstream key on /v1", format!("Bearer {UPSTREAM_KEY}")),
    ] {
        let (s, _) = seen
            .take(what, chat(chat_body("claude", false), auth).await, false)
            .await;
        assert_eq!(s, 401, "{what}");
    }
    for (what, auth) in [
        ("gateway key on /admin", alice.clone()),
        ("wrong key on /admin", format!("Bearer {WRONG_KEY}")),
    ] {
        let resp = request(&gw, "GET", "/admin/keys", &[("authorization", &auth)], "").await;
        let (s, _) = seen.take(what, resp, false).await;
        assert_eq!(s, 401, "{what}");
    }

    // Usage reports, admin routes, metrics.
    for (what, path, auth) in [
        ("own usage", "/v1/usage?group_by=model", alice.clone()),
        ("admin usage", "/admin/usage?group_by=key", admin.clone()),
        ("admin keys", "/admin/keys", admin.clone()),
        ("metrics", "/metrics", admin.clone()),
        ("metrics without key", "/metrics", String::new()),
        ("metrics with a gateway key", "/metrics", alice.clone()),
    ] {
        let headers: Vec<(&str, &str)> = if auth.is_empty() {
            vec![]
        } else {
            vec![("authorization", auth.as_str())]
        };
        let resp = request(&gw, "GET", path, &headers, "").await;
        let (s, _) = seen.take(what, resp, false).await;
        assert!(s == 200 || s == 401, "{what}: {s}");
    }
    let resp = request(
        &gw,
        "DELETE",
        &format!("/admin/keys/{}", keys[1].0),
        &[("authorization", &admin)],
        "",
    )
    .await;
    assert_eq!(seen.take("revoke", resp, false).await.0, 200);
    let (s, _) = seen
        .take(
            "revoked key",
            chat(chat_body("claude", false), bob.clone()).await,
            false,
        )
        .await;
    assert_eq!(s, 401);
    let resp = request(
        &gw,
        "DELETE",
        "/admin/cache",
        &[("authorization", &admin)],
        "",
    )
    .await;
    assert_eq!(seen.take("purge cache", resp, false).await.0, 200);

    // MCP over HTTP: an answer, and an upstream error that echoes the key.
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(gw.url("/mcp")).auth_header(&keys[0].1),
    );
    let client = ().serve(transport).await.expect("MCP client connects");
    up.push(Reply::completion("claude-sonnet-4.5", "from mcp"));
    up.push(echoing_error(401, UPSTREAM_KEY));
    up.push(echoing_stream_error(UPSTREAM_KEY));
    for what in ["mcp answer", "mcp upstream error", "mcp stream error event"] {
        let args = json!({"bot": "claude", "prompt": "hello"});
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            client.call_tool(
                CallToolRequestParams::new("ask_poe")
                    .with_arguments(args.as_object().unwrap().clone()),
            ),
        )
        .await
        .expect("tool call finished")
        .expect("tool call answered");
        seen.0.push((
            what.to_string(),
            serde_json::to_vec(&result).unwrap_or_default(),
        ));
    }
    let _ = client.cancel().await;

    // Passthrough: a caller's own Poe key, echoed back by Poe.
    let pt = TestGateway::start(&up, "[auth]\nmode = \"passthrough\"\n", &[]).await;
    up.push(Reply::completion("gpt-5", "ok"));
    up.push(echoing_error(401, CALLER_POE_KEY));
    for what in ["passthrough ok", "passthrough upstream 401"] {
        let resp = post(
            &pt,
            &chat_body("gpt-5", false),
            &[("authorization", &format!("Bearer {CALLER_POE_KEY}"))],
        )
        .await;
        seen.take(what, resp, false).await;
    }
    // A key pasted into `model` is refused before anything records it (it was logged, traced
    // and stored as the model name): a gateway key, the server's Poe key, the caller's own.
    let pasted = [
        (&gw, keys[0].1.as_str(), alice.clone()),
        (&gw, UPSTREAM_KEY, alice.clone()),
        (&pt, CALLER_POE_KEY, format!("Bearer {CALLER_POE_KEY}")),
    ];
    for (gw, model, auth) in pasted {
        let resp = post(gw, &chat_body(model, false), &[("authorization", &auth)]).await;
        let (status, body) = seen.take("a key as model", resp, false).await;
        assert_eq!(status, 400, "{body:?}");
    }

    // Everything written and exported.
    core.flush().await;
    let p = provider.clone();
    tokio::task::spawn_blocking(move || p.force_flush())
        .await
        .unwrap()
        .unwrap();
    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = exported.lock().unwrap().clone();
        if !spans.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spans: Vec<u8> = spans.iter().flat_map(|(_, b)| b.to_vec()).collect();
    let log_text = logs.0.lock().unwrap().clone();
    let ledger = std::fs::read(&db_path).unwrap_or_default();
    let metrics = {
        let resp = request(&gw, "GET", "/metrics", &[("authorization", &admin)], "").await;
        body_bytes(resp).await.to_vec()
    };

    // The capture really captured: logs at trace from the gateway, spans, metrics, the
    // upstream's echo (so the scan below would have found it).
    assert!(
        log_text.len() > 10_000,
        "little was logged: {} bytes",
        log_text.len()
    );
    let logged = String::from_utf8_lossy(&log_text);
    assert!(
        logged.contains("upstream attempt failed"),
        "debug logs captured"
    );
    assert!(
        logged.contains("\"level\":\"TRACE\""),
        "trace logs captured"
    );
    assert!(!spans.is_empty(), "spans exported");
    assert!(String::from_utf8_lossy(&metrics).contains("poe_gateway_requests_total"));
    assert!(!ledger.is_empty(), "ledger file read");
    assert_eq!(up.chat_calls(), 19, "every scripted upstream call was made");

    let secrets: Vec<(&str, &str)> = vec![
        ("upstream key", UPSTREAM_KEY),
        ("admin key", ADMIN_KEY),
        ("gateway key alice", &keys[0].1),
        ("gateway key bob", &keys[1].1),
        ("passthrough caller's Poe key", CALLER_POE_KEY),
        ("wrong key", WRONG_KEY),
    ];
    let contains =
        |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    let mut leaks = Vec::new();
    let mut places: Vec<(String, &[u8])> = vec![
        ("logs (trace, JSON)".into(), &log_text),
        ("exported spans (OTLP)".into(), &spans),
        ("metrics".into(), &metrics),
        ("ledger file".into(), &ledger),
    ];
    for (what, bytes) in &seen.0 {
        places.push((format!("response {what}"), bytes));
    }
    for (place, bytes) in &places {
        for (name, secret) in &secrets {
            if contains(bytes, secret) {
                // Show where, without printing the secret.
                let at = bytes
                    .windows(secret.len())
                    .position(|w| w == secret.as_bytes())
                    .unwrap();
                let from = at.saturating_sub(120);
                let context = String::from_utf8_lossy(&bytes[from..at]);
                leaks.push(format!("{name} in {place}, after …{context}"));
            }
        }
    }
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    assert!(leaks.is_empty(), "keys leaked:\n{}", leaks.join("\n"));
}
