//! The MCP adapter, driven by rmcp's own client: in-process over a duplex pipe (as stdio), and
//! over real streamable HTTP against a gateway on port 0. The upstream is the scriptable mock.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientRequest, ProgressNotificationParam, Request,
    ServerResult,
};
use rmcp::service::{NotificationContext, PeerRequestOptions, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};
use support::{MockUpstream, Reply, TestGateway, UPSTREAM_KEY};
use tokio::sync::{Semaphore, mpsc};

use poe_gateway::Gateway;
use poe_gateway::config;
use poe_gateway::mcp::{McpCore, stdio_caller};
use poe_gateway::upstream::Secret;

const PNG: &[u8] =
    b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";
const IMAGE_URL: &str = "https://pfst.cf2.poecdn.net/base/image/abc?w=1024&h=1024";

/// A client that records progress notifications.
struct TestClient {
    progress: mpsc::UnboundedSender<ProgressNotificationParam>,
}

impl ClientHandler for TestClient {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _ctx: NotificationContext<RoleClient>,
    ) {
        let _ = self.progress.send(params);
    }
}

type Client = RunningService<RoleClient, TestClient>;

fn client_handler() -> (
    TestClient,
    mpsc::UnboundedReceiver<ProgressNotificationParam>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (TestClient { progress: tx }, rx)
}

/// A gateway core (no HTTP server) on the shipped policy plus env-style overrides.
fn gateway(upstream: &MockUpstream, env: &[(&str, &str)]) -> Gateway {
    let mut vars = vec![("POE_BASE_URL".to_string(), upstream.url())];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let policy = config::parse("test.toml", config::DEFAULT_POLICY, vars).expect("test policy");
    Gateway::new(policy, Some(Secret::new(UPSTREAM_KEY))).expect("gateway")
}

/// An MCP client talking to a local (stdio-like) server over an in-process pipe.
async fn local(gateway: Gateway) -> (Client, mpsc::UnboundedReceiver<ProgressNotificationParam>) {
    let server = McpCore::new(gateway).local_server(stdio_caller());
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        if let Ok(running) = server.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    let (handler, rx) = client_handler();
    (handler.serve(client_io).await.expect("client connects"), rx)
}

/// An MCP client over streamable HTTP to `/mcp`, sending `key` as its bearer token.
async fn remote(gw: &TestGateway, key: Option<&str>) -> Client {
    let mut config = StreamableHttpClientTransportConfig::with_uri(gw.url("/mcp"));
    if let Some(k) = key {
        config = config.auth_header(k);
    }
    let transport = StreamableHttpClientTransport::from_config(config);
    let (handler, _rx) = client_handler();
    handler
        .serve(transport)
        .await
        .expect("HTTP client connects")
}

async fn call(client: &Client, tool: &str, args: Value) -> CallToolResult {
    let args = args.as_object().expect("arguments are an object").clone();
    tokio::time::timeout(
        Duration::from_secs(30),
        client.call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(args)),
    )
    .await
    .expect("tool call finished")
    .expect("tool call answered")
}

fn text_of(r: &CallToolResult) -> String {
    r.content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ok(r: &CallToolResult) -> Value {
    assert_ne!(r.is_error, Some(true), "tool failed: {}", text_of(r));
    r.structured_content.clone().expect("structured content")
}

fn err(r: &CallToolResult) -> String {
    assert_eq!(r.is_error, Some(true), "expected a tool error, got {r:?}");
    text_of(r)
}

fn chat_requests(upstream: &MockUpstream) -> Vec<Value> {
    upstream.chats().iter().map(|r| r.json()).collect()
}

fn poe_error(status: u16, kind: &str, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"error": {"code": status, "type": kind, "message": message, "metadata": {}}})
            .to_string(),
    )
}

#[tokio::test]
async fn lists_every_tool_with_schemas() {
    let upstream = MockUpstream::start().await;
    let (client, _) = local(gateway(&upstream, &[])).await;
    let tools = client.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "ask_poe",
            "ask_poe_with_tools",
            "ask_with_attachment",
            "clear_session",
            "generate_image",
            "generate_video",
            "get_usage",
            "list_available_models",
            "list_models"
        ]
    );
    for t in &tools {
        assert!(
            t.description.as_deref().is_some_and(|d| d.len() > 20),
            "{}",
            t.name
        );
        assert!(t.output_schema.is_some(), "{}", t.name);
        assert_eq!(
            t.input_schema.get("type"),
            Some(&json!("object")),
            "{}",
            t.name
        );
    }
    let ask = tools.iter().find(|t| t.name == "ask_poe").unwrap();
    let props = ask.input_schema["properties"].as_object().unwrap();
    for arg in [
        "bot",
        "prompt",
        "session_id",
        "system",
        "temperature",
        "max_tokens",
        "thinking_budget",
        "reasoning_effort",
        "params",
    ] {
        assert!(props.contains_key(arg), "ask_poe lacks {arg}");
    }
    assert_eq!(ask.input_schema["required"], json!(["bot", "prompt"]));
}

#[tokio::test]
async fn ask_poe_two_turn_session() {
    let upstream = MockUpstream::start().await;
    upstream.push(Reply::stream("claude-sonnet-4.5", &["Hello", ", ", "Ada"]));
    upstream.push(Reply::stream("claude-sonnet-4.5", &["You said ", "hi"]));
    let (client, _) = local(gateway(&upstream, &[])).await;

    let first = ok(&call(
        &client,
        "ask_poe",
        json!({"bot": "claude", "prompt": "Hi, I am Ada", "system": "Be brief.", "thinking_budget": 1024,
               "params": {"web_search": true}}),
    )
    .await);
    assert_eq!(first["text"], "Hello, Ada");
    assert_eq!(first["bot"], "claude-sonnet-4.5");
    assert_eq!(first["finish_reason"], "stop");
    let session = first["session_id"].as_str().unwrap().to_string();
    assert_eq!(
        uuid::Uuid::parse_str(&session).unwrap().get_version_num(),
        4
    );

    let second = ok(&call(
        &client,
        "ask_poe",
        json!({"bot": "claude", "prompt": "What did I say?", "session_id": session}),
    )
    .await);
    assert_eq!(second["text"], "You said hi");
    assert_eq!(second["session_id"], session.as_str());

    let reqs = chat_requests(&upstream);
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0]["model"], "claude-sonnet-4.5");
    assert_eq!(reqs[0]["stream"], true);
    assert_eq!(reqs[0]["thinking_budget"], 1024);
    assert_eq!(reqs[0]["web_search"], true);
    assert_eq!(
        reqs[1]["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi, I am Ada"},
            {"role": "assistant", "content": "Hello, Ada"},
            {"role": "user", "content": "What did I say?"}
        ])
    );
    // The server's key paid, through the core.
    let auth = upstream.received()[0].headers["authorization"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(auth, format!("Bearer {UPSTREAM_KEY}"));
}

#[tokio::test]
async fn long_answers_send_progress() {
    let upstream = MockUpstream::start().await;
    let mut reply = Reply::sse();
    for piece in ["one ", "two ", "three"] {
        reply = reply
            .send(support::chunk("gpt-5", piece))
            .sleep(Duration::from_millis(250));
    }
    upstream.push(
        reply
            .send(support::finish_chunk("gpt-5"))
            .send("data: [DONE]\n\n"),
    );
    let (client, mut progress) = local(gateway(&upstream, &[])).await;

    let handle = client
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(
                CallToolRequestParams::new("ask_poe").with_arguments(
                    json!({"bot": "gpt-5", "prompt": "count"})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
            )),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    let token = handle.progress_token.clone();
    let resp = handle.await_response().await.unwrap();
    let ServerResult::CallToolResult(result) = resp else {
        panic!("unexpected response {resp:?}");
    };
    assert_eq!(ok(&result)["text"], "one two three");

    let mut seen = Vec::new();
    while let Ok(p) = progress.try_recv() {
        assert_eq!(p.progress_token, token);
        seen.push(p);
    }
    assert!(seen.len() >= 2, "progress notifications: {seen:?}");
    let streamed: String = seen.iter().filter_map(|p| p.message.clone()).collect();
    assert_eq!(streamed, "one two three");
    assert!(seen.windows(2).all(|w| w[0].progress < w[1].progress));
}

#[tokio::test]
async fn long_media_calls_say_they_are_still_waiting() {
    let upstream = MockUpstream::start().await;
    let video = "https://pfst.cf2.poecdn.net/base/video/slow";
    upstream.push(Reply::completion("veo-3", video).head_delay(Duration::from_millis(700)));
    let gw = gateway(
        &upstream,
        &[("POE_GATEWAY_MCP__PROGRESS_INTERVAL", "100ms")],
    );
    let (client, mut progress) = local(gw).await;

    let handle = client
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(
                CallToolRequestParams::new("generate_video")
                    .with_arguments(json!({"prompt": "slow waves"}).as_object().unwrap().clone()),
            )),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    let resp = handle.await_response().await.unwrap();
    let ServerResult::CallToolResult(result) = resp else {
        panic!("unexpected response {resp:?}");
    };
    assert_eq!(ok(&result)["urls"], json!([video]));
    let mut waiting = Vec::new();
    while let Ok(p) = progress.try_recv() {
        waiting.push(p);
    }
    assert!(waiting.len() >= 2, "{waiting:?}");
    assert!(
        waiting
            .iter()
            .all(|p| p.message.as_deref().is_some_and(|m| m.contains("waiting")))
    );
}

#[tokio::test]
async fn cancelling_a_call_stops_the_upstream_call() {
    let upstream = MockUpstream::start().await;
    let gate = Arc::new(Semaphore::new(0));
    upstream.push(
        Reply::sse()
            .send(support::chunk("gpt-5", "thinking..."))
            .gate(&gate)
            .send("data: [DONE]\n\n"),
    );
    let (client, _) = local(gateway(&upstream, &[])).await;

    let handle = client
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(
                CallToolRequestParams::new("ask_poe").with_arguments(
                    json!({"bot": "gpt-5", "prompt": "go"})
                        .as_object()
                        .unwrap()
                        .clone(),
                ),
            )),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    poe_has_the_call(&upstream).await;
    handle.cancel(Some("user gave up".into())).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), upstream.wait_disconnect())
        .await
        .expect("the upstream response was abandoned after the cancel");
}

#[tokio::test]
async fn upstream_errors_are_tool_errors_with_poes_message() {
    let upstream = MockUpstream::start().await;
    upstream.push(poe_error(
        402,
        "insufficient_credits",
        "You have run out of points",
    ));
    upstream.push(poe_error(
        404,
        "not_found_error",
        "Model missing-bot not found",
    ));
    let (client, _) = local(gateway(&upstream, &[])).await;

    let e = err(&call(&client, "ask_poe", json!({"bot": "gpt-5", "prompt": "hi"})).await);
    assert!(
        e.contains("HTTP 402") && e.contains("You have run out of points"),
        "{e}"
    );
    let e = err(&call(
        &client,
        "ask_poe",
        json!({"bot": "missing-bot", "prompt": "hi"}),
    )
    .await);
    assert!(
        e.contains("HTTP 404") && e.contains("Model missing-bot not found"),
        "{e}"
    );
    assert!(!e.contains(UPSTREAM_KEY));

    // A stream that breaks mid-answer is an error too, not a short answer.
    upstream.push(
        Reply::sse()
            .send(support::chunk("gpt-5", "half an ans"))
            .drop_connection(),
    );
    let e = err(&call(&client, "ask_poe", json!({"bot": "gpt-5", "prompt": "hi"})).await);
    assert!(e.contains("upstream"), "{e}");
}

#[tokio::test]
async fn bad_arguments_are_tool_errors() {
    let upstream = MockUpstream::start().await;
    let (client, _) = local(gateway(&upstream, &[])).await;
    for (tool, args, want) in [
        ("ask_poe", json!({"bot": "gpt-5"}), "missing field `prompt`"),
        (
            "ask_poe",
            json!({"bot": "gpt-5", "prompt": "hi", "bogus": 1}),
            "unknown field `bogus`",
        ),
        (
            "ask_poe",
            json!({"bot": " ", "prompt": "hi"}),
            "`bot` must not be empty",
        ),
        (
            "ask_poe",
            json!({"bot": "gpt-5", "prompt": "hi", "temperature": 7}),
            "between 0 and 2",
        ),
        (
            "ask_poe",
            json!({"bot": "gpt-5", "prompt": "hi", "params": {"model": "x"}}),
            "may not set `model`",
        ),
        (
            "ask_poe",
            json!({"bot": "gpt-5", "prompt": ""}),
            "`prompt` must not be empty",
        ),
        (
            "ask_poe_with_tools",
            json!({"bot": "gpt-5", "prompt": "hi", "tools": []}),
            "at least one",
        ),
        (
            "ask_poe_with_tools",
            json!({"bot": "gpt-5", "prompt": "hi", "tools": [{"x": 1}]}),
            "tools[0]",
        ),
        (
            "ask_with_attachment",
            json!({"bot": "gpt-5", "prompt": "hi"}),
            "exactly one of",
        ),
        (
            "list_models",
            json!({"capability": "telepathy"}),
            "unknown variant",
        ),
        ("clear_session", json!({}), "missing field `session_id`"),
        (
            "generate_image",
            json!({"prompt": "  "}),
            "`prompt` must not be empty",
        ),
    ] {
        let e = err(&call(&client, tool, args.clone()).await);
        assert!(e.contains(want), "{tool} {args}: {e}");
    }
    assert_eq!(upstream.chat_calls(), 0, "no bad call reached upstream");
}

#[tokio::test]
async fn unknown_sessions_are_tool_errors() {
    let upstream = MockUpstream::start().await;
    let (client, _) = local(gateway(&upstream, &[])).await;
    let id = uuid::Uuid::new_v4().to_string();
    let e = err(&call(
        &client,
        "ask_poe",
        json!({"bot": "gpt-5", "prompt": "hi", "session_id": id}),
    )
    .await);
    assert!(e.contains("unknown session_id"), "{e}");
    let e = err(&call(
        &client,
        "ask_poe",
        json!({"bot": "gpt-5", "prompt": "hi", "session_id": "my-chat"}),
    )
    .await);
    assert!(e.contains("is not a session id"), "{e}");
    let e = err(&call(&client, "clear_session", json!({"session_id": id})).await);
    assert!(e.contains("unknown session_id"), "{e}");
    assert_eq!(upstream.chat_calls(), 0);
}

#[tokio::test]
async fn clear_session_forgets_the_history() {
    let upstream = MockUpstream::start().await;
    upstream.set_fallback(Reply::stream("gpt-5", &["ok"]));
    let (client, _) = local(gateway(&upstream, &[])).await;
    let first = ok(&call(
        &client,
        "ask_poe",
        json!({"bot": "gpt", "prompt": "remember 42"}),
    )
    .await);
    let id = first["session_id"].as_str().unwrap();
    let cleared = ok(&call(&client, "clear_session", json!({"session_id": id})).await);
    assert_eq!(cleared, json!({"session_id": id, "cleared": true}));
    let e = err(&call(
        &client,
        "ask_poe",
        json!({"bot": "gpt", "prompt": "what number?", "session_id": id}),
    )
    .await);
    assert!(e.contains("unknown session_id"), "{e}");
    // A fresh session starts clean.
    let fresh = ok(&call(&client, "ask_poe", json!({"bot": "gpt", "prompt": "hello"})).await);
    assert_ne!(fresh["session_id"], first["session_id"]);
    assert_eq!(
        chat_requests(&upstream)[1]["messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn attachments_from_a_path_base64_and_url() {
    let upstream = MockUpstream::start().await;
    upstream.set_fallback(Reply::stream("claude-sonnet-4.5", &["A tiny image."]));
    let dir = std::env::temp_dir().join(format!("poe-gw-mcp-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("pixel.png");
    std::fs::write(&png, PNG).unwrap();
    let (client, _) = local(gateway(
        &upstream,
        &[("POE_GATEWAY_MCP__MAX_ATTACHMENT_BYTES", "1KiB")],
    ))
    .await;

    // A local file over stdio: an image_url part with a data URL.
    let r = ok(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "What is this?", "attachment_path": png.to_str().unwrap()}),
    )
    .await);
    assert_eq!(r["text"], "A tiny image.");
    let content = &chat_requests(&upstream)[0]["messages"][0]["content"];
    assert_eq!(content[0], json!({"type": "text", "text": "What is this?"}));
    assert_eq!(content[1]["type"], "image_url");
    let b64 = base64_encode(PNG);
    assert_eq!(
        content[1]["image_url"]["url"],
        format!("data:image/png;base64,{b64}")
    );

    // Base64 PDF, continuing the session: a file part, and the image turn is still in history.
    let pdf = base64_encode(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n");
    let r2 = ok(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "And this?", "attachment_base64": pdf, "mime_type": "application/pdf",
               "filename": "doc.pdf", "session_id": r["session_id"]}),
    )
    .await);
    assert_eq!(r2["session_id"], r["session_id"]);
    let msgs = chat_requests(&upstream)[1]["messages"].clone();
    assert_eq!(msgs.as_array().unwrap().len(), 3);
    assert_eq!(msgs[0]["content"][1]["type"], "image_url");
    assert_eq!(
        msgs[2]["content"][1],
        json!({"type": "file", "file": {"filename": "doc.pdf", "file_data": format!("data:application/pdf;base64,{pdf}")}})
    );

    // A URL goes to Poe as is; the gateway never fetches it (it points at the mock, which
    // would have recorded a GET).
    let url = format!("{}/files/photo.jpg", upstream.url());
    ok(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "Describe", "attachment_url": url}),
    )
    .await);
    let last = chat_requests(&upstream).pop().unwrap();
    assert_eq!(
        last["messages"][0]["content"][1],
        json!({"type": "image_url", "image_url": {"url": url}})
    );
    assert!(
        upstream
            .received()
            .iter()
            .all(|r| r.path != "/files/photo.jpg")
    );

    // Missing and oversized files are tool errors.
    let missing = dir.join("nope.png");
    let e = err(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "?", "attachment_path": missing.to_str().unwrap()}),
    )
    .await);
    assert!(
        e.contains("cannot read attachment_path") && e.contains("no such file"),
        "{e}"
    );
    // A FIFO with no writer is refused at once (opening it used to wait for a writer, for
    // good), and so are the kernel's files, the process's own environment among them.
    let fifo = dir.join("pipe");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let e = err(&tokio::time::timeout(
        Duration::from_secs(30),
        call(
            &client,
            "ask_with_attachment",
            json!({"bot": "claude", "prompt": "?", "attachment_path": fifo.to_str().unwrap()}),
        ),
    )
    .await
    .expect("a FIFO must not hang the tool"));
    assert!(e.contains("not a regular file"), "{e}");
    for system in ["/proc/self/environ", "/proc/self/status", "/dev/null"] {
        let e = err(&call(
            &client,
            "ask_with_attachment",
            json!({"bot": "claude", "prompt": "?", "attachment_path": system}),
        )
        .await);
        assert!(e.contains("system file"), "{system}: {e}");
    }
    let big = dir.join("big.bin");
    std::fs::write(&big, vec![7u8; 4096]).unwrap();
    let e = err(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "?", "attachment_path": big.to_str().unwrap()}),
    )
    .await);
    assert!(
        e.contains("4096 bytes") && e.contains("max_attachment_bytes"),
        "{e}"
    );
    let e = err(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "?", "attachment_base64": base64_encode(&[1u8; 4096])}),
    )
    .await);
    assert!(e.contains("max_attachment_bytes"), "{e}");
    assert_eq!(upstream.chat_calls(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn ask_poe_with_tools_returns_the_calls() {
    let upstream = MockUpstream::start().await;
    let calls = json!([{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]);
    let completion = json!({
        "id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": "gpt-5",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": calls},
                     "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}
    });
    upstream.push(Reply::json(200, completion.to_string()));
    upstream.push(Reply::completion("gpt-5", "It is sunny in Paris."));
    let (client, _) = local(gateway(&upstream, &[])).await;

    let tools = json!([{"name": "get_weather", "description": "Weather for a city",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let r = ok(&call(
        &client,
        "ask_poe_with_tools",
        json!({"bot": "gpt", "prompt": "Weather in Paris?", "tools": tools, "tool_choice": "auto", "parallel_tool_calls": false}),
    )
    .await);
    assert_eq!(r["tool_calls"], calls);
    assert_eq!(r["finish_reason"], "tool_calls");
    assert_eq!(r["usage"]["total_tokens"], 29);
    let req = &chat_requests(&upstream)[0];
    assert_eq!(req["stream"], false);
    assert_eq!(req["tool_choice"], "auto");
    assert_eq!(req["parallel_tool_calls"], false);
    assert_eq!(req["tools"][0]["type"], "function");
    assert_eq!(req["tools"][0]["function"]["name"], "get_weather");

    // The agent runs the call itself and reports back in the same session.
    let r2 = ok(&call(
        &client,
        "ask_poe_with_tools",
        json!({"bot": "gpt", "prompt": "get_weather returned: sunny", "tools": tools, "session_id": r["session_id"]}),
    )
    .await);
    assert_eq!(r2["text"], "It is sunny in Paris.");
    assert_eq!(r2["tool_calls"], json!([]));

    // A blank tool_choice is not given (Poe, like OpenAI, refuses "").
    upstream.push(Reply::completion("gpt-5", "Sunny."));
    ok(&call(
        &client,
        "ask_poe_with_tools",
        json!({"bot": "gpt", "prompt": "And tomorrow?", "tools": tools, "tool_choice": ""}),
    )
    .await);
    let req = chat_requests(&upstream).pop().unwrap();
    assert!(req.get("tool_choice").is_none(), "{req}");
    let msgs = &chat_requests(&upstream)[1]["messages"];
    assert_eq!(msgs[1]["role"], "assistant");
    assert!(
        msgs[1]["content"]
            .as_str()
            .unwrap()
            .contains("get_weather({\"city\":\"Paris\"})"),
        "{msgs}"
    );
}

#[tokio::test]
async fn generate_image_and_video_return_media_urls() {
    let upstream = MockUpstream::start().await;
    upstream.push(Reply::completion(
        "gpt-image-1",
        &format!("![image.png]({IMAGE_URL})\n\n{IMAGE_URL}"),
    ));
    let video = "https://pfst.cf2.poecdn.net/base/video/xyz";
    upstream.push(Reply::completion(
        "veo-3",
        &format!("![video.mp4]({video})\n{video}"),
    ));
    upstream.push(Reply::completion(
        "gpt-image-1",
        "Sorry, I can't draw that.",
    ));
    let (client, _) = local(gateway(&upstream, &[])).await;

    let r = call(
        &client,
        "generate_image",
        json!({"prompt": "a red fox", "aspect": "3:2", "quality": "high"}),
    )
    .await;
    let s = ok(&r);
    assert_eq!(s["urls"], json!([IMAGE_URL]));
    assert_eq!(s["bot"], "gpt-image-1");
    let link = r
        .content
        .iter()
        .find_map(|c| c.as_resource_link())
        .expect("a resource link");
    assert_eq!(link.uri, IMAGE_URL);
    assert_eq!(link.name, "image.png");
    assert_eq!(link.mime_type.as_deref(), Some("image/png"));
    assert!(text_of(&r).contains(IMAGE_URL));
    let req = &chat_requests(&upstream)[0];
    assert_eq!(req["model"], "gpt-image-1");
    assert_eq!(req["stream"], false);
    assert_eq!(req["aspect"], "3:2");
    assert_eq!(req["quality"], "high");

    let r = call(
        &client,
        "generate_video",
        json!({"prompt": "waves", "aspect_ratio": "16:9", "duration": 8}),
    )
    .await;
    assert_eq!(ok(&r)["urls"], json!([video]));
    let req = &chat_requests(&upstream)[1];
    assert_eq!(req["model"], "veo-3");
    assert_eq!(req["duration"], 8);
    assert_eq!(req["aspect_ratio"], "16:9");

    let e = err(&call(
        &client,
        "generate_image",
        json!({"prompt": "something forbidden"}),
    )
    .await);
    assert!(
        e.contains("without a media URL") && e.contains("can't draw"),
        "{e}"
    );

    // Optional arguments an agent fills with "" count as not given.
    upstream.push(Reply::completion(
        "veo-3",
        &format!("![video.mp4]({video})\n{video}"),
    ));
    ok(&call(
        &client,
        "generate_video",
        json!({"prompt": "waves", "duration": "", "aspect_ratio": ""}),
    )
    .await);
    let req = chat_requests(&upstream).pop().unwrap();
    assert!(
        req.get("duration").is_none() && req.get("aspect_ratio").is_none(),
        "{req}"
    );

    // The image URL generate_image returned has no extension in its name; attached, it
    // still goes to the bot as an image, not as a file.
    upstream.push(Reply::stream("claude-sonnet-4.5", &["A red fox."]));
    ok(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "Describe", "attachment_url": IMAGE_URL}),
    )
    .await);
    let req = chat_requests(&upstream).pop().unwrap();
    assert_eq!(
        req["messages"][0]["content"][1],
        json!({"type": "image_url", "image_url": {"url": IMAGE_URL}})
    );
}

#[tokio::test]
async fn list_models_filters_the_catalogue() {
    let upstream = MockUpstream::start().await;
    let (client, _) = local(gateway(&upstream, &[])).await;

    let all = ok(&call(&client, "list_models", json!({})).await);
    assert_eq!(all["aliases"]["image"], json!(["gpt-image-1"]));
    assert!(all["count"].as_u64().unwrap() >= 6);

    let claude = ok(&call(&client, "list_models", json!({"filter": "CLAUDE"})).await);
    let ids = support::ids(&claude["models"]);
    assert!(
        ids.contains(&"claude-sonnet-4.5") && ids.contains(&"claude"),
        "{ids:?}"
    );
    assert!(!ids.contains(&"gpt-5"));
    let m = claude["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "claude-sonnet-4.5")
        .unwrap();
    assert_eq!(m["input_modalities"], json!(["text", "image"]));
    assert_eq!(m["pricing"]["prompt"], "0.000003");

    let vision = ok(&call(
        &client,
        "list_available_models",
        json!({"capability": "vision"}),
    )
    .await);
    let ids = support::ids(&vision["models"]);
    assert!(
        ids.contains(&"claude-sonnet-4.5") && !ids.contains(&"gpt-5"),
        "{ids:?}"
    );
    // A blank capability is none given, as every blank text argument is.
    let all = ok(&call(&client, "list_available_models", json!({"capability": " "})).await);
    assert!(support::ids(&all["models"]).contains(&"gpt-5"), "{all}");
}

// ----- over HTTP -----

fn passthrough() -> [(&'static str, &'static str); 1] {
    [("POE_GATEWAY_AUTH__MODE", "passthrough")]
}

#[tokio::test]
async fn http_sessions_use_and_are_scoped_to_the_callers_key() {
    let upstream = MockUpstream::start().await;
    upstream.set_fallback(Reply::stream("gpt-5", &["fine"]));
    let gw = TestGateway::start(&upstream, config::DEFAULT_POLICY, &passthrough()).await;

    let alice = remote(&gw, Some("poe-key-alice")).await;
    let first = ok(&call(&alice, "ask_poe", json!({"bot": "gpt", "prompt": "hello"})).await);
    let id = first["session_id"].as_str().unwrap().to_string();
    // Unguessable: a version-4 UUID (122 bits from the OS generator), not a counter.
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
    let second = ok(&call(
        &alice,
        "ask_poe",
        json!({"bot": "gpt", "prompt": "again", "session_id": id}),
    )
    .await);
    assert_eq!(second["session_id"], id.as_str());
    assert!(
        upstream
            .chats()
            .iter()
            .all(|r| r.headers["authorization"] == "Bearer poe-key-alice")
    );
    assert_eq!(
        chat_requests(&upstream)[1]["messages"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Another key cannot read, continue or clear Alice's session.
    let bob = remote(&gw, Some("poe-key-bob")).await;
    let e = err(&call(
        &bob,
        "ask_poe",
        json!({"bot": "gpt", "prompt": "what did alice say?", "session_id": id}),
    )
    .await);
    assert!(e.contains("unknown session_id"), "{e}");
    assert!(!e.contains("alice"));
    err(&call(&bob, "clear_session", json!({"session_id": id})).await);
    ok(&call(&alice, "clear_session", json!({"session_id": id})).await);
    let _ = alice.cancel().await;
    let _ = bob.cancel().await;
}

#[tokio::test]
async fn one_key_cannot_crowd_out_the_others_sessions() {
    async fn ask(client: &Client, session: Option<String>) -> CallToolResult {
        let mut args = json!({"bot": "gpt", "prompt": "hi"});
        if let Some(id) = session {
            args["session_id"] = json!(id);
        }
        call(client, "ask_poe", args).await
    }
    let upstream = MockUpstream::start().await;
    upstream.set_fallback(Reply::stream("gpt-5", &["fine"]));
    let mut env = passthrough().to_vec();
    env.push(("POE_GATEWAY_MCP__MAX_SESSIONS_PER_KEY", "2"));
    let gw = TestGateway::start(&upstream, config::DEFAULT_POLICY, &env).await;
    let (alice, bob) = (
        remote(&gw, Some("poe-key-alice")).await,
        remote(&gw, Some("poe-key-bob")).await,
    );
    let id = |r: &CallToolResult| ok(r)["session_id"].as_str().unwrap().to_string();
    let bobs = id(&ask(&bob, None).await);
    let first = id(&ask(&alice, None).await);
    let second = id(&ask(&alice, None).await);
    // Using the first makes the second the least recently used: the third pushes it out.
    id(&ask(&alice, Some(first.clone())).await);
    let _third = id(&ask(&alice, None).await);
    let e = err(&ask(&alice, Some(second)).await);
    assert!(e.contains("unknown session_id"), "{e}");
    assert_eq!(id(&ask(&alice, Some(first.clone())).await), first);
    // Alice's churn never touched Bob's session.
    for _ in 0..3 {
        id(&ask(&alice, None).await);
    }
    assert_eq!(id(&ask(&bob, Some(bobs.clone())).await), bobs);
    let _ = alice.cancel().await;
    let _ = bob.cancel().await;
}

#[tokio::test]
async fn http_attachment_paths_need_configured_roots() {
    let upstream = MockUpstream::start().await;
    upstream.set_fallback(Reply::stream("claude-sonnet-4.5", &["seen"]));
    let dir = std::env::temp_dir().join(format!("poe-gw-mcp-roots-{}", uuid::Uuid::new_v4()));
    let root = dir.join("shared");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("pixel.png"), PNG).unwrap();
    std::fs::write(dir.join("private.png"), PNG).unwrap();

    // No roots: refused over HTTP (stdio would allow it).
    let gw = TestGateway::default(&upstream).await;
    let client = remote(&gw, None).await;
    let path = root.join("pixel.png");
    let e = err(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "?", "attachment_path": path.to_str().unwrap()}),
    )
    .await);
    assert!(e.contains("not available over HTTP"), "{e}");
    // Base64 is fine over HTTP.
    ok(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "?", "attachment_base64": base64_encode(PNG)}),
    )
    .await);
    let _ = client.cancel().await;

    // With a root: inside is read, outside (directly or through `..`) is refused.
    let roots = format!("[{:?}]", root.to_str().unwrap());
    let gw = TestGateway::start(
        &upstream,
        config::DEFAULT_POLICY,
        &[("POE_GATEWAY_MCP__ATTACHMENT_ROOTS", &roots)],
    )
    .await;
    let client = remote(&gw, None).await;
    ok(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "?", "attachment_path": path.to_str().unwrap()}),
    )
    .await);
    ok(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "?", "attachment_path": "pixel.png"}),
    )
    .await);
    // A symlink inside the root that points out of it, to a file and to a directory.
    std::os::unix::fs::symlink(dir.join("private.png"), root.join("link.png")).unwrap();
    std::os::unix::fs::symlink(&dir, root.join("up")).unwrap();
    // Links out to nothing: "no such file" would tell that nothing is there.
    std::os::unix::fs::symlink(dir.join("missing.png"), root.join("dangling.png")).unwrap();
    std::os::unix::fs::symlink(dir.join("missing"), root.join("gone")).unwrap();
    for outside in [
        "dangling.png".to_string(),
        "gone/nope.png".to_string(),
        dir.join("private.png").to_str().unwrap().to_string(),
        format!("{}/../private.png", root.display()),
        "../private.png".to_string(),
        "link.png".to_string(),
        root.join("link.png").to_str().unwrap().to_string(),
        "up/private.png".to_string(),
        "up/shared/../private.png".to_string(),
        // Missing, beyond a link out: the same answer as for a file that is there.
        "up/nope.png".to_string(),
        "up/nowhere/nope.png".to_string(),
    ] {
        let e = err(&call(
            &client,
            "ask_with_attachment",
            json!({"bot": "claude", "prompt": "?", "attachment_path": outside}),
        )
        .await);
        assert!(e.contains("outside the directories"), "{outside}: {e}");
    }
    // Missing inside a root is still reported as missing.
    let e = err(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "?", "attachment_path": "nope.png"}),
    )
    .await);
    assert!(e.contains("no such file"), "{e}");
    assert_eq!(upstream.chat_calls(), 3);
    let _ = client.cancel().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits (a bounded while) until Poe has the one chat call a test made.
async fn poe_has_the_call(upstream: &MockUpstream) {
    for _ in 0..500 {
        if upstream.chat_calls() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.chat_calls(), 1);
}

/// One raw `/mcp` request: its status, headers and body.
async fn raw_mcp(
    gw: &TestGateway,
    method: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, http::HeaderMap, String) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(gw.url("/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let resp = support::client()
        .request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// An OpenAI-shaped error body, and its `type`.
fn error_type(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert!(v["error"]["message"].is_string(), "{body}");
    v["error"]["type"].as_str().unwrap().to_string()
}

fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn an_mcp_session_answers_only_the_caller_who_opened_it() {
    let upstream = MockUpstream::start().await;
    let gw = TestGateway::start(&upstream, config::DEFAULT_POLICY, &passthrough()).await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    let alice = ("authorization", "Bearer poe-key-alice");
    let bob = ("authorization", "Bearer poe-key-bob");
    let (status, headers, body) = raw_mcp(&gw, "POST", &[alice], Some(init)).await;
    assert_eq!(status, 200, "{body}");
    let sid = headers["mcp-session-id"].to_str().unwrap().to_string();
    let with = |who| [who, ("mcp-session-id", sid.as_str())];
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _, body) = raw_mcp(&gw, "POST", &with(alice), Some(initialized)).await;
    assert_eq!(status, 202, "{body}");
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});

    // Another key holding the id: no such session, for reading, replaying and ending it.
    for (method, body) in [
        ("POST", Some(list.clone())),
        ("GET", None),
        ("DELETE", None),
    ] {
        let (status, _, text) = raw_mcp(&gw, method, &with(bob), body).await;
        assert_eq!(status, 404, "{method}: {text}");
        assert_eq!(error_type(&text), "invalid_request_error", "{method}");
        assert!(!text.contains("ask_poe"), "{method}: {text}");
    }
    // Its owner still has it, and can end it.
    let (status, _, text) = raw_mcp(&gw, "POST", &with(alice), Some(list.clone())).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("ask_poe"), "{text}");
    // A body that is no JSON-RPC message, sent as JSON: a 400 (rmcp said 415, Unsupported
    // Media Type, which sends a client looking at its headers).
    for bad in ["{oops", "[]"] {
        let mut req = http::Request::post(gw.url("/mcp"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18");
        for (k, v) in with(alice) {
            req = req.header(k, v);
        }
        let resp = support::client()
            .request(req.body(Full::new(Bytes::from(bad))).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
    }
    // Ended with a 200, which the MCP clients take for the end (Python's warned at 202).
    let (status, _, text) = raw_mcp(&gw, "DELETE", &with(alice), None).await;
    assert_eq!(status, 200, "{text}");
    let (status, _, text) = raw_mcp(&gw, "POST", &with(alice), Some(list)).await;
    assert_eq!(status, 404, "{text}");
}

async fn raw_mcp_post(gw: &TestGateway, headers: &[(&str, &str)]) -> (u16, String) {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    let mut req = http::Request::post(gw.url("/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = support::client()
        .request(req.body(Full::new(Bytes::from(init.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn http_checks_auth_host_and_origin() {
    let upstream = MockUpstream::start().await;
    let gw = TestGateway::start(&upstream, config::DEFAULT_POLICY, &passthrough()).await;
    let (status, body) = raw_mcp_post(&gw, &[]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    let (status, body) = raw_mcp_post(&gw, &[("authorization", "Bearer k")]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("poe-gateway"), "{body}");
    // rmcp's own refusals reach the client in the OpenAI shape too.
    let (status, body) = raw_mcp_post(
        &gw,
        &[("authorization", "Bearer k"), ("host", "evil.example")],
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(error_type(&body), "permission_error");
    assert_eq!(error_code(&body), "origin_not_allowed", "{body}");
    let (status, body) = raw_mcp_post(
        &gw,
        &[
            ("authorization", "Bearer k"),
            ("origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(error_type(&body), "permission_error");
    assert_eq!(error_code(&body), "origin_not_allowed", "{body}");
    let (status, _, body) = raw_mcp(
        &gw,
        "POST",
        &[("authorization", "Bearer k"), ("accept", "text/plain")],
        Some(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})),
    )
    .await;
    assert!((400..500).contains(&status), "{status}: {body}");
    assert_eq!(error_type(&body), "invalid_request_error");

    // The public name and a browser origin, when the policy allows them.
    let gw = TestGateway::start(
        &upstream,
        config::DEFAULT_POLICY,
        &[
            ("POE_GATEWAY_MCP__ALLOWED_HOSTS", "[\"gw.example.com\"]"),
            (
                "POE_GATEWAY_MCP__ALLOWED_ORIGINS",
                "[\"https://app.example.com:443\"]",
            ),
        ],
    )
    .await;
    let (status, body) = raw_mcp_post(
        &gw,
        &[
            ("host", "gw.example.com"),
            ("origin", "https://app.example.com"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = raw_mcp_post(&gw, &[("host", "other.example.com")]).await;
    assert_eq!(status, 403);

    // A browser MCP client at that origin: the preflight of its POST (and of the DELETE that
    // ends its session) is answered, and it may read the session id it must send back.
    for method in ["POST", "DELETE"] {
        let (status, headers, body) = raw_mcp(
            &gw,
            "OPTIONS",
            &[
                ("host", "gw.example.com"),
                ("origin", "https://app.example.com"),
                ("access-control-request-method", method),
                (
                    "access-control-request-headers",
                    "authorization,content-type,mcp-protocol-version,mcp-session-id",
                ),
            ],
            None,
        )
        .await;
        assert_eq!(status, 204, "{body}");
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        let allowed = headers["access-control-allow-methods"].to_str().unwrap();
        assert!(allowed.contains(method), "{allowed}");
        assert!(
            headers["access-control-allow-headers"]
                .to_str()
                .unwrap()
                .contains("mcp-session-id")
        );
    }
    let (status, headers, body) = raw_mcp(
        &gw,
        "POST",
        &[
            ("host", "gw.example.com"),
            ("origin", "https://app.example.com"),
        ],
        Some(json!({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "page", "version": "1"}}
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.contains_key("mcp-session-id"));
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(
        headers["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("mcp-session-id")
    );
    // An origin listed without a port is its scheme's default port for rmcp too (rmcp alone
    // would take any port).
    let portless = TestGateway::start(
        &upstream,
        config::DEFAULT_POLICY,
        &[(
            "POE_GATEWAY_MCP__ALLOWED_ORIGINS",
            "[\"https://app.example.com\"]",
        )],
    )
    .await;
    let (status, _) = raw_mcp_post(&portless, &[("origin", "https://app.example.com")]).await;
    assert_eq!(status, 200);
    let (status, _) = raw_mcp_post(&portless, &[("origin", "https://app.example.com:8443")]).await;
    assert_eq!(status, 403);
    // rmcp refuses the other origins itself; the refusal carries no CORS headers.
    let (status, headers, _) = raw_mcp(
        &gw,
        "OPTIONS",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 403);
    assert!(!headers.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn mcp_shutdown_ends_open_sessions() {
    // With a client connected (its GET stream open), ending the MCP sessions lets the
    // server's graceful shutdown finish instead of waiting out the grace period.
    let upstream = MockUpstream::start().await;
    let gw = gateway(&upstream, &[("POE_GATEWAY_SERVER__SHUTDOWN_GRACE", "60s")]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = poe_gateway::http::spawn(listener, gw.clone()).unwrap();
    let served = TestGateway {
        addr: server.local_addr,
        handle: None,
    };
    let client = remote(&served, None).await;
    ok(&call(&client, "list_models", json!({})).await);

    // The server ends the MCP sessions itself when it starts draining.
    tokio::time::timeout(Duration::from_secs(20), server.shutdown())
        .await
        .expect("shutdown finished well within its 60s grace");
    drop(client);
}

/// A client that ends its MCP session (`DELETE /mcp`) with a tool call still running has
/// that call cancelled, its Poe call dropped: rmcp ran it to its end, calling Poe for an
/// answer nobody could receive.
#[tokio::test]
async fn ending_a_session_cancels_its_calls_in_progress() {
    let upstream = MockUpstream::start().await;
    let gate = Arc::new(Semaphore::new(0));
    upstream.push(
        Reply::sse()
            .send(support::chunk("gpt-5", "thinking..."))
            .gate(&gate)
            .send("data: [DONE]\n\n"),
    );
    let gw = TestGateway::start(&upstream, config::DEFAULT_POLICY, &[]).await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    let (status, headers, body) = raw_mcp(&gw, "POST", &[], Some(init)).await;
    assert_eq!(status, 200, "{body}");
    let sid = headers["mcp-session-id"].to_str().unwrap().to_string();
    let session = [("mcp-session-id", sid.as_str())];
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(
        raw_mcp(&gw, "POST", &session, Some(initialized)).await.0,
        202
    );

    // The call's answer streams back on its POST; it is held open here.
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "ask_poe", "arguments": {"bot": "gpt-5", "prompt": "go"}}});
    let req = http::Request::post(gw.url("/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-06-18")
        .header("mcp-session-id", sid.as_str())
        .body(Full::new(Bytes::from(call.to_string())))
        .unwrap();
    let answer = support::client().request(req).await.unwrap();
    assert_eq!(answer.status(), 200);
    poe_has_the_call(&upstream).await;

    let (status, _, text) = raw_mcp(&gw, "DELETE", &session, None).await;
    assert_eq!(status, 200, "{text}");
    tokio::time::timeout(Duration::from_secs(10), upstream.wait_disconnect())
        .await
        .expect("the call's Poe request was dropped with its session");
    drop(answer);
}

/// A tool call running over HTTP when the server begins its graceful shutdown finishes
/// within the grace, as a `/v1` request does: the MCP sessions are ended only once no call
/// is left (they were ended at once, and the call cut with no answer).
#[tokio::test]
async fn a_shutdown_lets_tool_calls_in_progress_finish() {
    let upstream = MockUpstream::start().await;
    let gate = Arc::new(Semaphore::new(0));
    upstream.push(
        Reply::sse()
            .send(support::chunk("gpt-5", "first half, "))
            .gate(&gate)
            .send(support::chunk("gpt-5", "second half"))
            .send("data: [DONE]\n\n"),
    );
    let gw = gateway(&upstream, &[("POE_GATEWAY_SERVER__SHUTDOWN_GRACE", "60s")]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = poe_gateway::http::spawn(listener, gw.clone()).unwrap();
    let addr = server.local_addr;
    let client = Arc::new(remote(&TestGateway { addr, handle: None }, None).await);
    let calling = {
        let client = client.clone();
        tokio::spawn(async move {
            call(&client, "ask_poe", json!({"bot": "gpt-5", "prompt": "go"})).await
        })
    };
    poe_has_the_call(&upstream).await;

    let stopping = tokio::spawn(server.shutdown());
    // The drain has begun (no new connection is served) before Poe's answer goes on.
    let readyz: http::Uri = format!("http://{addr}/readyz").parse().unwrap();
    let mut draining = false;
    for _ in 0..500 {
        match support::client().get(readyz.clone()).await {
            Ok(r) if r.status() == 200 => {}
            _ => {
                draining = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "the server never began its drain");
    gate.add_permits(1);
    let answer = tokio::time::timeout(Duration::from_secs(20), calling)
        .await
        .expect("the call ended")
        .unwrap();
    assert!(
        text_of(&answer).contains("first half, second half"),
        "{answer:?}"
    );
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the shutdown ended once the call had")
        .unwrap();
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[tokio::test]
async fn get_usage_reports_the_callers_own_usage() {
    // What Poe streams when asked for usage.
    let streamed = || {
        Reply::sse()
            .send(support::chunk("claude-sonnet-4.5", "ok"))
            .send(support::finish_chunk("claude-sonnet-4.5"))
            .send("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":1,\"total_tokens\":8,\"prompt_tokens_details\":{\"cached_tokens\":5}}}\n\n")
            .send("data: [DONE]\n\n")
    };
    // Over stdio the caller is the server key's user: all usage.
    let upstream = MockUpstream::start().await;
    upstream.set_fallback(streamed());
    let (client, _) = local(gateway(&upstream, &[])).await;
    ok(&call(&client, "ask_poe", json!({"bot": "claude", "prompt": "hi"})).await);
    let usage = ok(&call(&client, "get_usage", json!({"group_by": "model"})).await);
    assert_eq!(usage["report"]["totals"]["requests"], 1, "{usage}");
    // The tool stops reading at `[DONE]`: the answer was whole, so it is no error.
    assert_eq!(usage["report"]["totals"]["errors"], 0, "{usage}");
    assert_eq!(usage["report"]["totals"]["prompt_tokens"], 7);
    assert_eq!(usage["report"]["totals"]["cache_read_tokens"], 5, "{usage}");
    assert_eq!(usage["report"]["groups"][0]["cache_write_tokens"], 0);
    assert_eq!(usage["report"]["groups"][0]["group"], "claude-sonnet-4.5");
    let e = err(&call(&client, "get_usage", json!({"since": "last tuesday"})).await);
    assert!(e.contains("since"), "{e}");
    let e = err(&call(&client, "get_usage", json!({"group_by": "colour"})).await);
    assert!(e.contains("group_by"), "{e}");

    // Over HTTP with passthrough keys, each key sees only its own rows and no server balance.
    let upstream = MockUpstream::start().await;
    upstream.set_fallback(streamed());
    let gw = TestGateway::start(&upstream, config::DEFAULT_POLICY, &passthrough()).await;
    let a = remote(&gw, Some("poe-key-a")).await;
    let b = remote(&gw, Some("poe-key-b")).await;
    ok(&call(&a, "ask_poe", json!({"bot": "claude", "prompt": "hi"})).await);
    ok(&call(&a, "ask_poe", json!({"bot": "claude", "prompt": "again"})).await);
    ok(&call(&b, "ask_poe", json!({"bot": "claude", "prompt": "hi"})).await);
    let ua = ok(&call(&a, "get_usage", json!({})).await);
    let ub = ok(&call(&b, "get_usage", json!({})).await);
    assert_eq!(ua["report"]["totals"]["requests"], 2, "{ua}");
    assert_eq!(ub["report"]["totals"]["requests"], 1, "{ub}");
    assert!(ua["point_balance"].is_null());
}

/// A deterministic question asked twice through the tools is answered once by Poe: the
/// streamed answer the tool read up to `[DONE]` was stored like any other.
#[tokio::test]
async fn a_deterministic_ask_is_answered_from_the_cache_the_second_time() {
    let upstream = MockUpstream::start().await;
    upstream.set_fallback(Reply::stream("claude-sonnet-4.5", &["the ", "answer"]));
    let (client, _) = local(gateway(&upstream, &[])).await;
    let ask = json!({"bot": "claude", "prompt": "the same question", "temperature": 0});
    for _ in 0..2 {
        let answer = ok(&call(&client, "ask_poe", ask.clone()).await);
        assert_eq!(answer["text"], "the answer", "{answer}");
    }
    assert_eq!(
        chat_requests(&upstream).len(),
        1,
        "the second ask went to Poe"
    );
}

/// Agents fill optional text fields with `""` as often as they leave them out: a blank one
/// counts as not given, rather than as a session id, a system prompt, a second attachment
/// or a model name.
#[tokio::test]
async fn blank_optional_arguments_count_as_not_given() {
    let upstream = MockUpstream::start().await;
    upstream.set_fallback(Reply::stream("claude-sonnet-4.5", &["ok"]));
    let (client, _) = local(gateway(&upstream, &[])).await;
    let answer = ok(&call(
        &client,
        "ask_poe",
        json!({"bot": "claude", "prompt": "hi", "session_id": "", "system": " ",
               "reasoning_effort": ""}),
    )
    .await);
    assert_eq!(answer["text"], "ok");
    ok(&call(
        &client,
        "ask_with_attachment",
        json!({"bot": "claude", "prompt": "what is it?", "attachment_path": "",
               "attachment_url": "https://example.com/a.png", "attachment_base64": "",
               "mime_type": "", "filename": "", "session_id": ""}),
    )
    .await);
    ok(&call(&client, "get_usage", json!({"since": "", "group_by": ""})).await);
    ok(&call(&client, "list_models", json!({"filter": ""})).await);
    let reqs = chat_requests(&upstream);
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[0]["messages"],
        json!([{"role": "user", "content": "hi"}]),
        "a blank system prompt was sent"
    );
    assert!(reqs[0].get("reasoning_effort").is_none(), "{}", reqs[0]);
    assert_eq!(
        reqs[1]["messages"][0]["content"][1]["image_url"]["url"], "https://example.com/a.png",
        "{}",
        reqs[1]
    );
}

/// Each MCP client over HTTP holds a session (a task and its buffers) until it ends it or
/// idles out, so their number is capped: per caller, and in all. Past a cap a new client gets
/// 429 with Retry-After; ending a session makes room.
#[tokio::test]
async fn mcp_clients_over_http_are_capped_per_key_and_in_all() {
    let upstream = MockUpstream::start().await;
    let mut env = passthrough().to_vec();
    env.push(("POE_GATEWAY_MCP__MAX_CLIENTS_PER_KEY", "2"));
    env.push(("POE_GATEWAY_MCP__MAX_CLIENTS", "3"));
    let gw = TestGateway::start(&upstream, config::DEFAULT_POLICY, &env).await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    let open = |key: &'static str| {
        let (gw, init) = (&gw, init.clone());
        async move {
            let auth = format!("Bearer {key}");
            raw_mcp(gw, "POST", &[("authorization", &auth)], Some(init)).await
        }
    };
    // In passthrough mode a session opens only with a key Poe takes: made-up bearers
    // opened sessions until the caps locked everyone out.
    for _ in 0..4 {
        let (status, _, body) = open("poe-bad-made-up").await;
        assert_eq!(status, 401, "{body}");
        assert!(!body.contains("poe-bad"), "{body}");
    }
    let (s1, h1, _) = open("poe-key-a").await;
    let (s2, _, _) = open("poe-key-a").await;
    assert_eq!((s1, s2), (200, 200));
    let (status, headers, body) = open("poe-key-a").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("mcp.max_clients_per_key"), "{body}");
    assert!(headers.contains_key("retry-after"));
    // Another key has its own room, up to the cap for all.
    assert_eq!(open("poe-key-b").await.0, 200);
    let (status, _, body) = open("poe-key-c").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("mcp.max_clients"), "{body}");
    // A stateless request (2026-07-28) opens no session, so no cap refuses it: not a's, who
    // holds its two, nor c's, with the gateway's three taken (both were 429).
    for key in ["poe-key-a", "poe-key-c"] {
        let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "list_models", "arguments": {},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
                "io.modelcontextprotocol/clientCapabilities": {}}}});
        let req = http::Request::post(gw.url("/mcp"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "list_models")
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from(call.to_string())))
            .unwrap();
        let resp = support::client().request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "{key}: {body}");
        assert!(body.contains("\"id\":7"), "{key}: {body}");
    }
    // Ending one of a's sessions makes room again.
    let id = h1["mcp-session-id"].to_str().unwrap().to_string();
    let (status, _, _) = raw_mcp(
        &gw,
        "DELETE",
        &[
            ("authorization", "Bearer poe-key-a"),
            ("mcp-session-id", &id),
        ],
        None,
    )
    .await;
    assert!((200..300).contains(&status), "{status}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = open("poe-key-c").await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no room after a DELETE: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `poe-gateway mcp` with no ledger named keeps it in the user's data directory, not the
/// working directory an MCP client chose (Claude Desktop starts servers in `/`, where it
/// could not start; Claude Code in the user's project, which it littered with `data/`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdio_server_keeps_its_ledger_in_the_users_data_directory() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let up = MockUpstream::start().await;
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("mcp-home-{}", uuid::Uuid::new_v4().simple()));
    let (home, project) = (root.join("home"), root.join("project"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&project).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
        .arg("mcp")
        .current_dir(&project)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("POE_API_KEY", "test-key-not-real")
        .env("POE_BASE_URL", up.url())
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"}}});
    stdin
        .write_all(format!("{init}\n").as_bytes())
        .await
        .unwrap();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("an answer")
        .unwrap()
        .expect("initialized");
    assert!(line.contains("\"id\":1"), "{line}");
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        home.join(".local/share/poe-gateway/poe-gateway.db")
            .is_file()
    );
    assert!(!project.join("data").exists(), "the project was written to");
}

/// Over stdio (`poe-gateway mcp`), a message over `server.max_body_bytes` gets an error answer
/// under its own id (it was dropped unanswered, and the client waited out its own timeout),
/// wherever the id sits in it, and the session goes on; a notification gets none. At `RUST_LOG=debug` no prompt or
/// answer is logged (rmcp's debug lines carried both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_stdio_message_is_answered_and_the_session_goes_on() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::stream("gpt-5", &["ANSWER-MARK-2718"]));
    let db = support::databases().await.remove(0);
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("mcp-stdio-{}.log", uuid::Uuid::new_v4().simple()));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
        .arg("mcp")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("POE_API_KEY", "test-key-not-real")
        .env("POE_BASE_URL", up.url())
        .env("POE_GATEWAY_DATABASE_URL", &db)
        .env("POE_GATEWAY_SERVER__MAX_BODY_BYTES", "16KiB")
        .env("RUST_LOG", "debug")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("an answer")
            .unwrap()
            .expect("a line");
        serde_json::from_str(&line).unwrap()
    };
    // A JSON string is sent as its text, raw: a line that is no JSON.
    let mut send = async |v: Value| {
        let line = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    };
    send(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"}}}),
    )
    .await;
    assert_eq!(next().await["id"], 1);
    send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;

    let big = "x".repeat(40_000);
    send(json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "ask_poe", "arguments": {"prompt": big}}}))
    .await;
    let answer = next().await;
    assert_eq!(answer["id"], 7, "{answer}");
    assert_eq!(answer["error"]["code"], -32600, "{answer}");
    let msg = answer["error"]["message"].as_str().unwrap();
    assert!(msg.contains("max_body_bytes"), "{msg}");
    // As the TypeScript SDK writes a request: `id` last, and here an `id` inside `params`.
    let ts_order = format!(
        r#"{{"method":"tools/call","params":{{"name":"ask_poe","arguments":{{"prompt":"{big}","params":{{"id":0}}}}}},"jsonrpc":"2.0","id":71}}"#
    );
    send(json!(ts_order)).await;
    let answer = next().await;
    assert_eq!(answer["id"], 71, "{answer}");
    assert_eq!(answer["error"]["code"], -32600, "{answer}");
    // An oversized notification has no id to answer under: it gets no answer (it got one
    // under `id: null`), and the next line read is tools/list's.
    send(json!({"jsonrpc": "2.0", "method": "notifications/message",
        "params": {"level": "info", "data": big}}))
    .await;

    send(json!({"jsonrpc": "2.0", "id": 8, "method": "tools/list"})).await;
    let answer = next().await;
    assert_eq!(answer["id"], 8, "{answer}");
    assert!(
        answer["result"]["tools"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
    );

    // A tools/call with params of the wrong shape is -32602 saying what is wrong (it was
    // -32601, "method not found"); an unknown method is not found, by name.
    send(json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "ask_poe", "arguments": "x"}}))
    .await;
    let answer = next().await;
    assert_eq!(answer["id"], 9, "{answer}");
    assert_eq!(answer["error"]["code"], -32602, "{answer}");
    let msg = answer["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("tools/call") && msg.contains("invalid type"),
        "{msg}"
    );
    send(json!({"jsonrpc": "2.0", "id": 10, "method": "no/such"})).await;
    let answer = next().await;
    assert_eq!(answer["error"]["code"], -32601, "{answer}");
    assert_eq!(answer["error"]["message"], "method not found: no/such");
    // A line that is not JSON is a parse error, answered with `"id": null`.
    send(json!("{nope")).await;
    let answer = next().await;
    assert_eq!(answer["error"]["code"], -32700, "{answer}");
    assert!(answer.get("id").is_some_and(Value::is_null), "{answer}");
    assert_eq!(up.chat_calls(), 0);

    send(json!({"jsonrpc": "2.0", "id": 12, "method": "tools/call",
        "params": {"name": "ask_poe", "arguments": {"bot": "gpt-5", "prompt": "PROMPT-MARK-3141"}}}))
    .await;
    let answer = next().await;
    assert_eq!(answer["id"], 12, "{answer}");
    assert!(answer.to_string().contains("ANSWER-MARK-2718"), "{answer}");
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("DEBUG") || logged.contains("\"level\":\"DEBUG\""),
        "{logged}"
    );
    for mark in ["PROMPT-MARK-3141", "ANSWER-MARK-2718"] {
        assert!(!logged.contains(mark), "{mark} logged:\n{logged}");
    }
}
