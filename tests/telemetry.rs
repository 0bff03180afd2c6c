//! Traces, checked with an in-memory exporter: the span tree and its GenAI attributes for
//! non-stream, stream, retry and cache-hit requests, and W3C trace-context propagation in and
//! out. Each test installs its own subscriber on its (single) runtime thread. And the real
//! binary's JSON access log.

mod support;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use support::*;
use tracing_subscriber::layer::SubscriberExt;

struct Traces {
    exporter: InMemorySpanExporter,
    _provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Traces {
    fn start() -> Traces {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::Registry::default()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let guard = tracing::subscriber::set_default(subscriber);
        poe_gateway::telemetry::set_traces_enabled(true);
        Traces {
            exporter,
            _provider: provider,
            _guard: guard,
        }
    }

    fn spans(&self) -> Vec<SpanData> {
        self.exporter.get_finished_spans().unwrap()
    }

    fn named(&self, name: &str) -> Vec<SpanData> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }

    /// Request spans: named `chat {model}` per the GenAI conventions.
    fn chats(&self) -> Vec<SpanData> {
        self.spans()
            .into_iter()
            .filter(|s| attr(s, "gen_ai.operation.name").as_deref() == Some("chat"))
            .collect()
    }

    /// Upstream attempts: HTTP client spans, named by method.
    fn attempts(&self) -> Vec<SpanData> {
        self.named("POST")
    }
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn det_body(model: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "q"}], "temperature": 0, "max_tokens": 50, "stream": stream})
        .to_string()
}

#[tokio::test]
async fn non_stream_span_tree_and_propagation() {
    let traces = Traces::start();
    let up = MockUpstream::start().await;
    up.push(Reply::completion("claude-sonnet-4.5", "hi"));
    let gw = TestGateway::default(&up).await;
    let incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming_parent = "00f067aa0ba902b7";
    let body = serde_json::json!({"model": "claude", "messages": [{"role": "user", "content": "q"}], "temperature": 0.5}).to_string();
    let resp = post(
        &gw,
        &body,
        &[(
            "traceparent",
            &format!("00-{incoming_trace}-{incoming_parent}-01"),
        )],
    )
    .await;
    let _ = body_bytes(resp).await;

    let chat = traces.chats().pop().expect("a chat span");
    assert_eq!(chat.name, "chat claude");
    for (k, v) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "poe"),
        ("gen_ai.system", "poe"),
        ("gen_ai.request.model", "claude"),
        ("gen_ai.response.model", "claude-sonnet-4.5"),
        ("gen_ai.request.temperature", "0.5"),
        ("gen_ai.usage.input_tokens", "7"),
        ("gen_ai.usage.output_tokens", "3"),
        ("gen_ai.response.finish_reasons", "[\"stop\"]"),
        ("poe_gateway.alias", "claude"),
        ("poe_gateway.cache", "BYPASS"),
        ("poe_gateway.attempts", "1"),
        ("poe_gateway.stream", "false"),
        ("http.response.status_code", "200"),
    ] {
        assert_eq!(
            attr(&chat, k).as_deref(),
            Some(v),
            "{k}: {:?}",
            chat.attributes
        );
    }
    assert!(attr(&chat, "poe_gateway.ttfb_ms").is_some());
    // The caller's traceparent is the parent.
    assert_eq!(
        chat.span_context.trace_id(),
        TraceId::from_hex(incoming_trace).unwrap()
    );
    assert_eq!(
        chat.parent_span_id,
        SpanId::from_hex(incoming_parent).unwrap()
    );

    let attempts = traces.attempts();
    assert_eq!(attempts.len(), 1);
    let attempt = &attempts[0];
    assert_eq!(attempt.parent_span_id, chat.span_context.span_id());
    assert_eq!(
        attr(attempt, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(attempt, "gen_ai.request.model").as_deref(),
        Some("claude-sonnet-4.5")
    );

    // Poe got the attempt's context.
    let sent = up.chats()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        sent,
        format!("00-{incoming_trace}-{}-01", attempt.span_context.span_id())
    );
    // No key anywhere in the attributes.
    for s in traces.spans() {
        for kv in &s.attributes {
            assert!(!kv.value.to_string().contains(UPSTREAM_KEY));
        }
    }
}

#[tokio::test]
async fn a_stream_span_ends_when_the_stream_ends() {
    let traces = Traces::start();
    let up = MockUpstream::start().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    up.push(
        Reply::sse()
            .send(chunk("gpt-5", "one"))
            .gate(&gate)
            .send(finish_chunk("gpt-5"))
            .send("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2,\"total_tokens\":6}}\n\n")
            .send("data: [DONE]\n\n"),
    );
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", true), &[]).await;
    let mut body = resp.into_body();
    next_data(&mut body, 10).await.unwrap();
    assert!(
        traces.chats().is_empty(),
        "the span ended while the stream was open"
    );
    // Its end time too: an exporter takes it from the span's last exit, not its drop.
    let mid_stream = std::time::SystemTime::now();
    gate.add_permits(1);
    while next_data(&mut body, 10).await.is_some() {}
    // The tap finishes the request when the body ends; give the span a moment to export.
    let mut chat = None;
    for _ in 0..100 {
        if let Some(s) = traces.chats().pop() {
            chat = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let chat = chat.expect("chat span exported after the stream ended");
    assert!(
        chat.end_time > mid_stream,
        "the span's end time is the response head's, not the stream's end"
    );
    assert_eq!(attr(&chat, "poe_gateway.stream").as_deref(), Some("true"));
    assert_eq!(
        attr(&chat, "gen_ai.usage.output_tokens").as_deref(),
        Some("2")
    );
    assert_eq!(
        attr(&chat, "gen_ai.response.finish_reasons").as_deref(),
        Some("[\"stop\"]")
    );
    assert_eq!(
        attr(&chat, "poe_gateway.outcome").as_deref(),
        Some("completed")
    );
}

#[tokio::test(start_paused = true)]
async fn retries_are_sibling_attempt_spans() {
    let traces = Traces::start();
    let up = MockUpstream::start().await;
    up.push(Reply::json(
        502,
        r#"{"error":{"code":502,"type":"upstream_error","message":"x"}}"#,
    ));
    up.push(Reply::completion("gpt-5", "ok"));
    let gw = TestGateway::default(&up).await;
    let _ = body_bytes(post(&gw, &chat_body("gpt", false), &[]).await).await;
    let chat = traces.chats().pop().unwrap();
    assert_eq!(attr(&chat, "poe_gateway.attempts").as_deref(), Some("2"));
    let mut attempts = traces.attempts();
    attempts.sort_by_key(|s| s.start_time);
    assert_eq!(attempts.len(), 2);
    assert!(
        attempts
            .iter()
            .all(|a| a.parent_span_id == chat.span_context.span_id())
    );
    assert_eq!(attr(&attempts[0], "error.type").as_deref(), Some("502"));
    assert_eq!(
        attr(&attempts[1], "http.response.status_code").as_deref(),
        Some("200")
    );
    // Each attempt sent its own span id upstream.
    let ids: Vec<String> = up
        .chats()
        .iter()
        .map(|r| {
            r.headers["traceparent"]
                .to_str()
                .unwrap()
                .split('-')
                .nth(2)
                .unwrap()
                .to_string()
        })
        .collect();
    let want: Vec<String> = attempts
        .iter()
        .map(|a| a.span_context.span_id().to_string())
        .collect();
    assert_eq!(ids, want);
}

#[tokio::test]
async fn a_cache_hit_has_a_lookup_span_and_no_attempt() {
    let traces = Traces::start();
    let up = MockUpstream::start().await;
    up.push(Reply::completion("gpt-5", "ok"));
    let gw = TestGateway::default(&up).await;
    let _ = body_bytes(post(&gw, &det_body("gpt", false), &[]).await).await;
    let _ = body_bytes(post(&gw, &det_body("gpt", false), &[]).await).await;
    let mut chats = traces.chats();
    chats.sort_by_key(|s| s.start_time);
    assert_eq!(chats.len(), 2);
    let hit = &chats[1];
    assert_eq!(attr(hit, "poe_gateway.cache").as_deref(), Some("HIT"));
    assert_eq!(attr(hit, "poe_gateway.cache_hit").as_deref(), Some("true"));
    assert_eq!(
        attr(hit, "gen_ai.request.max_tokens").as_deref(),
        Some("50")
    );
    let lookups: Vec<SpanData> = traces
        .named("cache lookup")
        .into_iter()
        .filter(|s| s.parent_span_id == hit.span_context.span_id())
        .collect();
    assert_eq!(lookups.len(), 1);
    assert_eq!(
        attr(&lookups[0], "poe_gateway.cache").as_deref(),
        Some("HIT")
    );
    let attempts_under_hit = traces
        .attempts()
        .into_iter()
        .filter(|s| s.parent_span_id == hit.span_context.span_id())
        .count();
    assert_eq!(attempts_under_hit, 0);
}

#[tokio::test]
async fn an_mcp_tool_span_parents_the_chat_span() {
    use rmcp::ServiceExt;
    let traces = Traces::start();
    let up = MockUpstream::start().await;
    up.push(Reply::stream("claude-sonnet-4.5", &["from ", "a tool"]));
    let policy = poe_gateway::config::parse(
        "test.toml",
        poe_gateway::config::DEFAULT_POLICY,
        vec![("POE_BASE_URL".to_string(), up.url())],
    )
    .unwrap();
    let gateway = poe_gateway::Gateway::new(
        policy,
        Some(poe_gateway::upstream::Secret::new(UPSTREAM_KEY)),
    )
    .unwrap();
    let server =
        poe_gateway::mcp::McpCore::new(gateway).local_server(poe_gateway::mcp::stdio_caller());
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        if let Ok(running) = server.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    let client = ().serve(client_io).await.unwrap();
    let args = serde_json::json!({"bot": "claude", "prompt": "hi"});
    let result = client
        .call_tool(
            rmcp::model::CallToolRequestParams::new("ask_poe")
                .with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    assert_ne!(result.is_error, Some(true));

    let mut tool = None;
    for _ in 0..100 {
        tool = traces
            .spans()
            .into_iter()
            .find(|s| attr(s, "gen_ai.operation.name").as_deref() == Some("execute_tool"));
        if tool.is_some() && !traces.chats().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tool = tool.expect("an execute_tool span");
    assert_eq!(tool.name, "execute_tool ask_poe");
    assert_eq!(attr(&tool, "gen_ai.tool.name").as_deref(), Some("ask_poe"));
    let chat = traces.chats().pop().expect("a chat span");
    assert_eq!(chat.parent_span_id, tool.span_context.span_id());
    assert_eq!(chat.span_context.trace_id(), tool.span_context.trace_id());
}

/// The real binary's access log, as a log pipeline reads it: one JSON line per request on
/// stderr at the default level, with the request's id, route and outcome, and no key. The
/// lines are written in batches: each arrives while the gateway runs, within the flush
/// interval, and none is lost when it stops on SIGTERM.
// Two workers: the test blocks a thread waiting for lines and for the exit, and the mock
// upstream must still answer (the ledger's last flush fetches the model catalogue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_writes_one_json_access_line_per_request() {
    use std::io::BufRead;

    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let db = databases().await.remove(0);
    // The default level and format: stderr is a pipe, so JSON.
    let mut cmd = binary_command(&up.url(), &db);
    // A trace exporter it cannot use: said at start as a log line like the others (it was
    // a plain line in the middle of the JSON).
    cmd.env_remove("RUST_LOG")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .stderr(std::process::Stdio::piped());
    let (mut child, gw) = spawn_binary(&mut cmd);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        for line in stderr.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<String> = Vec::new();
    let mut ids = Vec::new();
    for stream in [false, true, false] {
        let resp = post(&gw, &chat_body("gpt-5", stream), &[]).await;
        assert_eq!(resp.status(), 200);
        ids.push(resp.headers()["x-request-id"].to_str().unwrap().to_string());
        let _ = body_bytes(resp).await;
        if ids.len() == 3 {
            break;
        }
        // Held lines go out on the flusher's timer while the gateway runs. The interval is
        // 100 ms; the wait is long because these machines are shared.
        let id = ids.last().unwrap().clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(8);
        while !lines.iter().any(|l| l.contains(id.as_str())) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(e) => panic!("no access line for {id} ({e}): {lines:?}"),
            }
        }
    }
    // A refused request has its line too (no reply wrote it: the refusal did).
    let refused = post(&gw, "{\"model\":", &[]).await;
    assert_eq!(refused.status(), 400);
    let refused_id = refused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    // The last lines may still be held: a graceful stop writes them out.
    let pid = child.id().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    let stderr = lines.join("\n");
    assert!(!stderr.contains(UPSTREAM_KEY), "a key in the log");
    let lines: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "WARN"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("traces disabled"))),
        "{stderr}"
    );
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "poe_gateway::access")
        .collect();
    assert_eq!(access.len(), 4, "{stderr}");
    let last = access[3];
    assert_eq!(last["request_id"], refused_id.as_str());
    assert_eq!(last["status"], 400);
    assert_eq!(last["outcome"], "rejected");
    assert!(
        last["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{last}"
    );
    for (line, (id, stream)) in access.iter().zip(ids.iter().zip([false, true, false])) {
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "request finished");
        assert_eq!(line["request_id"], id.as_str());
        assert_eq!(line["bot"], "gpt-5");
        assert_eq!(line["status"], 200);
        assert_eq!(line["stream"], stream);
        assert_eq!(line["outcome"], "completed");
        assert!(line["latency_ms"].as_f64().unwrap() > 0.0);
        let ts = line["timestamp"].as_str().unwrap();
        assert!(
            ts.len() == 27 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{ts}"
        );
    }
}
