//! Test support: a scriptable Poe-shaped upstream on port 0, a gateway started in-process on
//! port 0 against it, and a small HTTP client that reads responses frame by frame.
#![allow(dead_code)]

pub mod tls;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc};

use poe_gateway::config;
use poe_gateway::http::ServerHandle;
use poe_gateway::upstream::Secret;

pub const UPSTREAM_KEY: &str = "poe-test-upstream-key-0123456789";

/// One step of a scripted response body.
#[derive(Clone)]
pub enum Step {
    /// Send these bytes as one frame.
    Send(Bytes),
    /// Wait (tokio time, so paused tests skip it).
    Sleep(Duration),
    /// Wait until the test adds a permit to this gate.
    Gate(Arc<Semaphore>),
    /// Break the connection mid-body.
    Drop,
}

/// A scripted upstream answer.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub steps: Vec<Step>,
    /// Wait this long before sending the response head.
    pub head_delay: Option<Duration>,
    /// Never send a response head.
    pub hang: bool,
    /// Close the connection without any response.
    pub refuse: bool,
}

impl Reply {
    pub fn new(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            steps: Vec::new(),
            head_delay: None,
            hang: false,
            refuse: false,
        }
    }

    pub fn json(status: u16, body: impl Into<Bytes>) -> Self {
        Reply::new(status)
            .header("content-type", "application/json")
            .send(body)
    }

    pub fn sse() -> Self {
        Reply::new(200)
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
    }

    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }

    pub fn send(mut self, b: impl Into<Bytes>) -> Self {
        self.steps.push(Step::Send(b.into()));
        self
    }

    pub fn sleep(mut self, d: Duration) -> Self {
        self.steps.push(Step::Sleep(d));
        self
    }

    pub fn gate(mut self, g: &Arc<Semaphore>) -> Self {
        self.steps.push(Step::Gate(g.clone()));
        self
    }

    pub fn drop_connection(mut self) -> Self {
        self.steps.push(Step::Drop);
        self
    }

    pub fn head_delay(mut self, d: Duration) -> Self {
        self.head_delay = Some(d);
        self
    }

    pub fn hang() -> Self {
        let mut r = Reply::new(200);
        r.hang = true;
        r
    }

    pub fn refuse() -> Self {
        let mut r = Reply::new(0);
        r.refuse = true;
        r
    }

    /// A normal non-stream completion from `model`.
    pub fn completion(model: &str, text: &str) -> Self {
        Reply::json(200, completion_json(model, text))
    }

    /// A normal stream from `model`: one chunk per piece, a finish chunk, `[DONE]`.
    pub fn stream(model: &str, pieces: &[&str]) -> Self {
        let mut r = Reply::sse();
        for p in pieces {
            r = r.send(chunk(model, p));
        }
        r.send(finish_chunk(model)).send("data: [DONE]\n\n")
    }

    /// A slow stream from `model`, then `[DONE]`: `n` chunks `part 0`, `part 1`, ..., each
    /// followed by `gap`.
    pub fn dripping(model: &str, n: usize, gap: Duration) -> Self {
        let mut r = Reply::sse();
        for i in 0..n {
            r = r.send(chunk(model, &format!("part {i}"))).sleep(gap);
        }
        r.send("data: [DONE]\n\n")
    }
}

/// What the upstream received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("upstream got JSON")
    }
}

#[derive(Default)]
struct State {
    script: Mutex<VecDeque<Reply>>,
    fallback: Mutex<Option<Reply>>,
    received: Mutex<Vec<Received>>,
    models: Mutex<Option<Bytes>>,
    /// Scripted answers for `GET /v1/models`, before the catalogue is served.
    models_script: Mutex<VecDeque<Reply>>,
    /// Response bodies whose reader went away before the script finished.
    disconnects: AtomicUsize,
    disconnected: Notify,
    /// TCP connections accepted.
    connections: AtomicUsize,
}

/// A Poe-shaped upstream. Chat requests take scripted replies in order, then the fallback;
/// `GET /v1/models` answers the catalogue.
#[derive(Clone)]
pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    tls: bool,
}

/// The test certificate (`tests/data/`), for `localhost`; the gateway trusts it through
/// `upstream.ca_file = TEST_CA_FILE`.
pub const TEST_CA_FILE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/localhost.cert.pem");

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    tls::acceptor(
        &format!("{dir}/localhost.cert.pem"),
        &format!("{dir}/localhost.key.pem"),
    )
    .unwrap()
}

impl MockUpstream {
    pub async fn start() -> MockUpstream {
        MockUpstream::listen(None).await
    }

    /// The same upstream over TLS as Poe serves it: the test certificate for `localhost`
    /// (`tests/data/`, trusted by the gateway through `upstream.ca_file`), HTTP/2 and
    /// HTTP/1.1 by ALPN, and at most `max_streams` concurrent streams per HTTP/2 connection.
    pub async fn start_tls(max_streams: u32) -> MockUpstream {
        MockUpstream::listen(Some(max_streams)).await
    }

    async fn listen(tls_max_streams: Option<u32>) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        *state.models.lock().unwrap() = Some(Bytes::from(default_models()));
        let st = state.clone();
        let acceptor = tls_max_streams.map(|_| tls_acceptor());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), req));
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(stream).await else {
                                return;
                            };
                            builder
                                .http2()
                                .max_concurrent_streams(tls_max_streams.unwrap_or(100));
                            let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                        }
                    }
                });
            }
        });
        MockUpstream {
            addr,
            state,
            tls: tls_max_streams.is_some(),
        }
    }

    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// Queues replies for the next chat requests, in order.
    pub fn push(&self, reply: Reply) -> &Self {
        self.state.script.lock().unwrap().push_back(reply);
        self
    }

    /// The reply for chat requests once the script is used up.
    pub fn set_fallback(&self, reply: Reply) {
        *self.state.fallback.lock().unwrap() = Some(reply);
    }

    /// Queues answers for the next `GET /v1/models` requests (errors, delays), in order.
    pub fn push_models(&self, reply: Reply) -> &Self {
        self.state.models_script.lock().unwrap().push_back(reply);
        self
    }

    pub fn set_models(&self, body: &str) {
        *self.state.models.lock().unwrap() = Some(Bytes::copy_from_slice(body.as_bytes()));
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The requests to `path`, in order.
    pub fn received_on(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Only the chat completion requests, in order.
    pub fn chats(&self) -> Vec<Received> {
        self.received_on("/v1/chat/completions")
    }

    pub fn chat_calls(&self) -> usize {
        self.chats().len()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn disconnects(&self) -> usize {
        self.state.disconnects.load(Ordering::SeqCst)
    }

    /// Waits until some response body was abandoned by its reader.
    pub async fn wait_disconnect(&self) {
        loop {
            let notified = self.state.disconnected.notified();
            if self.disconnects() > 0 {
                return;
            }
            notified.await;
        }
    }
}

type MockBody = http_body_util::Either<
    Full<Bytes>,
    StreamBody<tokio_stream_shim::Receiver<Result<Frame<Bytes>, std::io::Error>>>,
>;

async fn handle(
    st: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    st.received.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        version: parts.version,
        headers: parts.headers.clone(),
        body,
    });
    let scripted_models = if parts.uri.path() == "/v1/models" {
        st.models_script.lock().unwrap().pop_front()
    } else {
        None
    };
    if parts.uri.path() == "/v1/models" && scripted_models.is_none() {
        let models = st.models.lock().unwrap().clone().unwrap_or_default();
        let mut resp = Response::new(MockBody::Left(Full::new(models)));
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return Ok(resp);
    }
    // A key Poe refuses: any that starts `poe-bad`.
    let refused = parts
        .headers
        .get("authorization")
        .is_some_and(|v| v.as_bytes().starts_with(b"Bearer poe-bad"));
    if parts.uri.path() == "/usage/current_balance" && refused {
        let mut resp = Response::new(MockBody::Left(Full::new(Bytes::from_static(
            b"{\"error\":{\"code\":401,\"type\":\"authentication_error\",\"message\":\"Invalid API key\"}}",
        ))));
        *resp.status_mut() = hyper::StatusCode::UNAUTHORIZED;
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return Ok(resp);
    }
    if parts.uri.path() == "/usage/current_balance" {
        let mut resp = Response::new(MockBody::Left(Full::new(Bytes::from_static(
            b"{\"current_point_balance\":123456}",
        ))));
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return Ok(resp);
    }
    // Chat completions, the Responses API and the Messages API share the script.
    if !matches!(
        parts.uri.path(),
        "/v1/chat/completions" | "/v1/responses" | "/v1/messages"
    ) && scripted_models.is_none()
    {
        let mut resp = Response::new(MockBody::Left(Full::new(Bytes::from_static(
            b"{\"error\":{\"code\":404,\"type\":\"not_found_error\",\"message\":\"no such endpoint\"}}",
        ))));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return Ok(resp);
    }
    let reply = scripted_models.or_else(|| {
        let next = st.script.lock().unwrap().pop_front();
        next.or_else(|| st.fallback.lock().unwrap().clone())
    });
    let Some(reply) = reply else {
        let mut resp = Response::new(MockBody::Left(Full::new(Bytes::from_static(
            b"{\"error\":{\"code\":500,\"type\":\"provider_error\",\"message\":\"mock upstream has no script\"}}",
        ))));
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return Ok(resp);
    };
    if reply.refuse {
        return Err(std::io::Error::other("refused by script"));
    }
    if reply.hang {
        std::future::pending::<()>().await;
    }
    if let Some(d) = reply.head_delay {
        tokio::time::sleep(d).await;
    }
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let steps = reply.steps.clone();
    let st2 = st.clone();
    tokio::spawn(async move {
        for step in steps {
            let ok = match step {
                Step::Send(b) => tx.send(Ok(Frame::data(b))).await.is_ok(),
                Step::Sleep(d) => tokio::select! {
                    _ = tokio::time::sleep(d) => true,
                    _ = tx.closed() => false,
                },
                Step::Gate(g) => tokio::select! {
                    p = g.acquire() => { if let Ok(p) = p { p.forget(); } true }
                    _ = tx.closed() => false,
                },
                Step::Drop => {
                    let _ = tx.send(Err(std::io::Error::other("scripted drop"))).await;
                    return;
                }
            };
            if !ok {
                st2.disconnects.fetch_add(1, Ordering::SeqCst);
                st2.disconnected.notify_waiters();
                return;
            }
        }
    });
    let mut resp = Response::new(MockBody::Right(StreamBody::new(
        tokio_stream_shim::Receiver(rx),
    )));
    *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap();
    for (k, v) in &reply.headers {
        resp.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    Ok(resp)
}

/// A `Stream` over an mpsc receiver, without pulling in tokio-stream.
pub mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct Receiver<T>(pub tokio::sync::mpsc::Receiver<T>);

    impl<T> futures_core::Stream for Receiver<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

pub fn completion_json(model: &str, text: &str) -> String {
    serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        "x_unknown_field": {"kept": true}
    })
    .to_string()
}

pub fn chunk(model: &str, piece: &str) -> String {
    let c = serde_json::json!({
        "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]
    });
    format!("data: {c}\n\n")
}

pub fn finish_chunk(model: &str) -> String {
    let c = serde_json::json!({
        "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    });
    format!("data: {c}\n\n")
}

/// A Poe-shaped error body.
pub fn poe_error(status: u16, kind: &str) -> String {
    format!(r#"{{"error":{{"code":{status},"type":"{kind}","message":"scripted {status}"}}}}"#)
}

pub fn default_models() -> String {
    serde_json::json!({
        "object": "list",
        "data": [
            {"id": "claude-sonnet-4.5", "object": "model", "created": 1_700_000_000_000u64, "owned_by": "Anthropic",
             "architecture": {"input_modalities": ["text", "image"], "output_modalities": ["text"], "modality": "text,image->text"},
             "pricing": {"prompt": "0.000003", "completion": "0.000015", "image": null, "request": null}},
            {"id": "gpt-5", "object": "model", "created": 1_700_000_000_000u64, "owned_by": "OpenAI"},
            {"id": "gemini-2.5-pro", "object": "model", "created": 1_700_000_000_000u64, "owned_by": "Google"},
            {"id": "grok-4", "object": "model", "created": 1_700_000_000_000u64, "owned_by": "xAI"},
            {"id": "gpt-image-1", "object": "model", "created": 1_700_000_000_000u64, "owned_by": "OpenAI"},
            {"id": "veo-3", "object": "model", "created": 1_700_000_000_000u64, "owned_by": "Google"}
        ]
    })
    .to_string()
}

/// `policy` (TOML) with env-style overrides, pointed at `upstream`.
pub fn test_policy(upstream: &MockUpstream, policy: &str, env: &[(&str, &str)]) -> config::Policy {
    let mut vars: Vec<(String, String)> = vec![
        ("POE_BASE_URL".into(), upstream.url()),
        ("POE_GATEWAY_LISTEN".into(), "127.0.0.1:0".into()),
    ];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    config::parse("test.toml", policy, vars).expect("test policy is valid")
}

/// The real `poe-gateway serve` binary with a clean environment: the test upstream key, the
/// given upstream and ledger, any free port, `RUST_LOG=warn`. stdout is piped for
/// [`spawn_binary`]; stderr goes nowhere unless the caller changes it.
pub fn binary_command(upstream_url: &str, database_url: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("POE_API_KEY", UPSTREAM_KEY)
        .env("POE_BASE_URL", upstream_url)
        .env("POE_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("POE_GATEWAY_DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    cmd
}

/// Starts a [`binary_command`] and reads the address it prints once it listens. (A blocking
/// read: the binary prints it before it needs anything from the test's runtime.)
pub fn spawn_binary(cmd: &mut std::process::Command) -> (std::process::Child, TestGateway) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd.spawn().expect("gateway binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, TestGateway { addr, handle: None })
}

/// A gateway running in-process on port 0.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub handle: Option<ServerHandle>,
}

impl TestGateway {
    /// Starts a gateway with `policy` (TOML) and env-style overrides, against `upstream`.
    pub async fn start(upstream: &MockUpstream, policy: &str, env: &[(&str, &str)]) -> TestGateway {
        let policy = test_policy(upstream, policy, env);
        let gateway =
            poe_gateway::Gateway::new(policy, Some(Secret::new(UPSTREAM_KEY))).expect("gateway");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = poe_gateway::http::spawn(listener, gateway).unwrap();
        TestGateway {
            addr: handle.local_addr,
            handle: Some(handle),
        }
    }

    /// The shipped default policy (aliases included).
    pub async fn default(upstream: &MockUpstream) -> TestGateway {
        TestGateway::start(upstream, config::DEFAULT_POLICY, &[]).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// A plain HTTP/1.1 client on its own connection.
pub fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// A chat completion request with a JSON body.
pub async fn post(gw: &TestGateway, body: &str, headers: &[(&str, &str)]) -> Response<Incoming> {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request(gw, "POST", "/v1/chat/completions", &all, body).await
}

pub async fn get(gw: &TestGateway, path: &str) -> Response<Incoming> {
    client()
        .request(
            Request::get(gw.url(path))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .expect("gateway answered")
}

pub async fn body_bytes(resp: Response<Incoming>) -> Bytes {
    resp.into_body().collect().await.expect("body").to_bytes()
}

/// An unlabelled counter or gauge from the gateway's `/metrics`, if it is there.
pub async fn metric(gw: &TestGateway, name: &str) -> Option<f64> {
    let text = String::from_utf8(body_bytes(get(gw, "/metrics").await).await.to_vec()).unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub async fn body_json(resp: Response<Incoming>) -> serde_json::Value {
    let b = body_bytes(resp).await;
    serde_json::from_slice(&b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&b)))
}

/// Reads the next data frame, failing the test if none comes within `secs` (a hang guard,
/// not a timing assertion).
pub async fn next_data(body: &mut Incoming, secs: u64) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(secs), body.frame())
            .await
            .expect("frame did not arrive: is the gateway buffering?");
        match frame {
            None => return None,
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    return Some(d);
                }
            }
            Some(Err(e)) => panic!("body error: {e}"),
        }
    }
}

pub fn chat_body(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream
    })
    .to_string()
}

/// Asserts the OpenAI error shape and returns the error object.
pub async fn expect_error(resp: Response<Incoming>, status: u16, kind: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert!(resp.headers().contains_key("x-request-id"));
    let v = body_json(resp).await;
    let e = v
        .get("error")
        .unwrap_or_else(|| panic!("no error object: {v}"))
        .clone();
    assert_eq!(e["type"], kind, "{v}");
    assert!(e["message"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e
}

pub fn _unused(_: Infallible) {}

/// Databases to run ledger tests against: a fresh SQLite file always, and a fresh Postgres
/// database when `POE_GATEWAY_TEST_POSTGRES_URL` names a server (scripts/test.sh starts one).
/// In CI a missing server is an error, not a skip.
pub async fn databases() -> Vec<String> {
    // Under the target dir (cargo's scratch space for integration tests), not /tmp: the
    // files outlive the test, and `cargo clean` is what takes them away.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ledger-{}", uuid::Uuid::new_v4().simple()));
    let mut out = vec![format!("sqlite://{}/ledger.db", dir.display())];
    match std::env::var("POE_GATEWAY_TEST_POSTGRES_URL") {
        Ok(base) => out.push(fresh_postgres(&base).await),
        Err(_) if std::env::var("CI").is_ok() => {
            panic!("CI must run the Postgres ledger tests: set POE_GATEWAY_TEST_POSTGRES_URL")
        }
        Err(_) => {
            eprintln!("POE_GATEWAY_TEST_POSTGRES_URL not set: ledger tests run on SQLite only")
        }
    }
    out
}

/// A fresh SQLite ledger: its URL and its file's path, for tests that reach into the file.
pub async fn sqlite_database() -> (String, String) {
    let db = databases().await.remove(0);
    let path = db
        .strip_prefix("sqlite://")
        .expect("SQLite first")
        .to_string();
    (db, path)
}

async fn fresh_postgres(base: &str) -> String {
    let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls)
        .await
        .expect("test postgres reachable");
    tokio::spawn(conn);
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

impl TestGateway {
    /// A gateway with its ledger at `database_url` (as `serve` runs it), and an admin key.
    pub async fn with_ledger(
        upstream: &MockUpstream,
        policy: &str,
        env: &[(&str, &str)],
        database_url: &str,
    ) -> (TestGateway, poe_gateway::Gateway) {
        let policy = test_policy(upstream, policy, env);
        let gateway = poe_gateway::Gateway::open(
            policy,
            Some(Secret::new(UPSTREAM_KEY)),
            Some(Secret::new(ADMIN_KEY)),
            database_url,
        )
        .await
        .expect("gateway");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = poe_gateway::http::spawn(listener, gateway.clone()).unwrap();
        (
            TestGateway {
                addr: handle.local_addr,
                handle: Some(handle),
            },
            gateway,
        )
    }
}

pub const ADMIN_KEY: &str = "admin-test-key-9876543210";

/// A request with any method, path, headers and body.
pub async fn request(
    gw: &TestGateway,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response<Incoming> {
    let mut req = Request::builder().method(method).uri(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    client()
        .request(
            req.body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
                .unwrap(),
        )
        .await
        .expect("gateway answered")
}

/// A chat completion request whose body goes out chunked, one frame per piece, with no
/// Content-Length.
pub async fn post_chunked(
    gw: &TestGateway,
    pieces: Vec<Bytes>,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let frames = pieces
        .into_iter()
        .map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
    let mut req = Request::post(gw.url("/v1/chat/completions"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http()
        .request(req.body(StreamBody::new(StreamOf(frames))).unwrap())
        .await
        .expect("gateway answered")
}

/// An iterator as a `Stream`, for chunked request bodies with no Content-Length.
pub struct StreamOf<I>(pub I);
impl<I: Iterator + Unpin> futures_core::Stream for StreamOf<I> {
    type Item = I::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<I::Item>> {
        std::task::Poll::Ready(self.0.next())
    }
}

/// What an OTLP receiver got: `"<path> <content-type>"` and the body, per request.
pub type Exported = Arc<Mutex<Vec<(String, Bytes)>>>;

/// An OTLP/HTTP receiver on port 0 that answers 200 and keeps every request.
pub async fn otlp_receiver() -> (SocketAddr, Exported) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Exported = Arc::default();
    let state = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move {
                        let ct = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        state.lock().unwrap().push((format!("{path} {ct}"), body));
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, got)
}

/// A report over every row, whoever's and whenever.
pub fn everything() -> poe_gateway::ledger::ReportQuery {
    poe_gateway::ledger::ReportQuery {
        since_ms: 0,
        until_ms: i64::MAX,
        key_id: None,
        group_by: None,
    }
}

/// The `id` of each entry of a list of models (`data` of a model list, `models` of the MCP
/// tool's answer).
pub fn ids(list: &serde_json::Value) -> Vec<&str> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect()
}
