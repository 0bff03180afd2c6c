//! `/mcp` on the serve port: rmcp's streamable HTTP service behind the gateway's own auth.
//!
//! The HTTP layer authenticates the request exactly as for `/v1/...` and hands us the
//! [`Caller`]; it travels in the request's extensions, which rmcp passes to each tool call as
//! `http::request::Parts`. The body is read here with the server's size and time limits
//! before rmcp sees it. Host and Origin are checked by rmcp: loopback names, the listen
//! address, and `mcp.allowed_hosts`; origins only from `mcp.allowed_origins`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::service::TowerToHyperService;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::Value;

use super::sessions::Scope;
use super::{McpCore, PoeTools};
use crate::config::Policy;
use crate::error::GatewayError;
use crate::gateway::Caller;
use crate::http::read_body_of;

/// The body of an `/mcp` response (rmcp's SSE or JSON).
pub type McpBody = BoxBody<Bytes, Infallible>;

type Service = TowerToHyperService<StreamableHttpService<PoeTools, LocalSessionManager>>;

/// The `/mcp` endpoint of one gateway.
#[derive(Clone)]
pub struct McpHttp {
    core: McpCore,
    service: Service,
    /// Holds the service's cancellation token, for [`McpHttp::shutdown`].
    config: StreamableHttpServerConfig,
    /// rmcp's live sessions (it drops one when its client ends it or it idles out): counted
    /// against `mcp.max_clients` before a new one is opened.
    sessions: Arc<LocalSessionManager>,
    /// Who opened each MCP session (`Mcp-Session-Id`). rmcp knows only the id, and replays a
    /// session's answers to whoever presents it, so a request for a session another caller
    /// opened is answered as if the session did not exist.
    owners: moka::sync::Cache<Arc<str>, Scope>,
    /// The requests (tool calls) whose answers are still streaming back.
    calls: Arc<Calls>,
    /// Poe keys (digests) Poe took when a passthrough caller opened a session with one.
    poe_keys: moka::future::Cache<crate::gateway::keys::KeyDigest, ()>,
}

/// The JSON-RPC requests in progress over HTTP, each until its answer's stream ends or is
/// dropped. rmcp runs a request to its end even when its session is ended (`DELETE /mcp`)
/// or the server stops, so the gateway tells it to cancel them in the first case and waits
/// for them in the second.
#[derive(Default)]
struct Calls {
    open: std::sync::Mutex<HashMap<u64, (Arc<str>, Value)>>,
    next: AtomicU64,
    /// How many are open; a shutdown ends the sessions when it reaches 0.
    count: tokio::sync::watch::Sender<usize>,
    /// A shutdown began: new requests are refused.
    stopping: AtomicBool,
}

impl Calls {
    fn open(self: &Arc<Self>, session: &Arc<str>, ids: Vec<Value>) -> Vec<OpenCall> {
        let mut open = self.open.lock().expect("calls lock");
        let calls = ids
            .into_iter()
            .map(|id| {
                let token = self.next.fetch_add(1, Ordering::Relaxed);
                open.insert(token, (session.clone(), id));
                OpenCall {
                    calls: self.clone(),
                    token,
                }
            })
            .collect();
        self.count.send_replace(open.len());
        calls
    }

    /// Resolves once no request is in progress.
    async fn idle(&self) {
        let mut count = self.count.subscribe();
        let _ = count.wait_for(|n| *n == 0).await;
    }

    /// The ids of `session`'s requests in progress.
    fn of(&self, session: &str) -> Vec<Value> {
        let open = self.open.lock().expect("calls lock");
        open.values()
            .filter(|(s, _)| &**s == session)
            .map(|(_, id)| id.clone())
            .collect()
    }
}

/// One request in progress; dropped with its answer's body.
struct OpenCall {
    calls: Arc<Calls>,
    token: u64,
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        let mut open = self.calls.open.lock().expect("calls lock");
        open.remove(&self.token);
        self.calls.count.send_replace(open.len());
    }
}

/// An answer's body that keeps its requests open until it ends or is dropped.
struct Tracked {
    inner: McpBody,
    _calls: Vec<OpenCall>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The ids of the JSON-RPC requests in a message (or a batch of them; notifications and
/// answers have none), and whether one is `initialize`, which opens a session.
fn request_ids(body: &[u8]) -> (Vec<Value>, bool) {
    let id_of = |m: &Value| {
        m.get("method")
            .and(m.get("id"))
            .filter(|id| !id.is_null())
            .cloned()
    };
    let opens = |m: &Value| m.get("method").and_then(Value::as_str) == Some("initialize");
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(batch)) => (
            batch.iter().filter_map(id_of).collect(),
            batch.iter().any(opens),
        ),
        Ok(m) => (id_of(&m).into_iter().collect(), opens(&m)),
        Err(_) => (Vec::new(), false),
    }
}

/// What the calls of requests with no session (the stateless protocol's) are filed under:
/// no `DELETE /mcp` names it, and a shutdown waits for them as for any other.
const NO_SESSION: &str = "";

/// rmcp's session header.
const SESSION_ID: &str = "mcp-session-id";

/// A session id as the owners map keys it, the same whether read from a request or from
/// rmcp's answer.
fn session_id(v: &HeaderValue) -> Arc<str> {
    Arc::from(String::from_utf8_lossy(v.as_bytes()))
}

/// Sessions remembered at most, and for how long after their last request. rmcp ends an idle
/// session after 5 minutes; a client's open `GET /mcp` stream can keep one longer.
const MAX_SESSIONS: u64 = 100_000;
const SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl McpHttp {
    pub fn new(core: McpCore) -> McpHttp {
        let policy = core.gateway().policy();
        let factory_core = core.clone();
        let config = http_config(policy);
        let sessions = Arc::new(LocalSessionManager::default());
        let service = StreamableHttpService::new(
            move || Ok(factory_core.http_server()),
            sessions.clone(),
            config.clone(),
        );
        McpHttp {
            core,
            service: TowerToHyperService::new(service),
            config,
            sessions,
            owners: moka::sync::Cache::builder()
                .max_capacity(MAX_SESSIONS)
                .time_to_idle(SESSION_IDLE)
                .build(),
            calls: Arc::default(),
            poe_keys: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(std::time::Duration::from_secs(600))
                .build(),
        }
    }

    /// In passthrough mode nothing checks a caller's key before a tool calls Poe, and the
    /// client caps count each bearer as a key: made-up bearers opened sessions until the
    /// caps locked everyone out. So a session is opened only with a key Poe takes (asked
    /// once in 10 minutes per key, with a call that spends nothing). Should Poe not answer,
    /// the session opens: its tools' calls will tell.
    async fn poe_takes(&self, key: &crate::upstream::Secret) -> Result<(), GatewayError> {
        let digest = crate::gateway::keys::key_digest(key.expose());
        if self.poe_keys.contains_key(&digest) {
            return Ok(());
        }
        let upstream = self.core.gateway().upstream();
        let asked = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            upstream.accepts_key(key),
        )
        .await;
        match asked {
            Ok(Ok(false)) => Err(GatewayError::Unauthorized(
                "Poe does not take this key (passthrough mode sends the caller's key to Poe)"
                    .into(),
            )),
            Ok(Ok(true)) => {
                self.poe_keys.insert(digest, ()).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Refuses new requests, lets those in progress finish (a tool call's answer ends
    /// within the server's grace, or is cut with its connection when the grace does), then
    /// ends every MCP session, so long-lived SSE streams (a client's `GET /mcp`) do not hold
    /// the drain open until its grace runs out.
    pub fn shutdown(&self) {
        self.calls.stopping.store(true, Ordering::Release);
        let calls = self.calls.clone();
        let token = self.config.cancellation_token.clone();
        tokio::spawn(async move {
            calls.idle().await;
            token.cancel();
        });
    }

    /// Resolves once no request is in progress. A serving thread runs its runtime until
    /// then after its own connections have drained: an MCP session's worker, and its tool
    /// calls, run on the runtime of the thread that opened the session, while a call's
    /// answer may stream out on another thread's connection. Dropped with its runtime, the
    /// call was cut at the drain's start.
    pub async fn calls_done(&self) {
        self.calls.idle().await;
    }

    /// Tells rmcp to cancel `session`'s requests in progress, as their client would with
    /// `notifications/cancelled`: ended with its session, a tool call would otherwise run
    /// on, and call Poe, for an answer nobody can receive.
    async fn cancel_calls(
        &self,
        session: &Arc<str>,
        ending: &http::request::Parts,
        caller: &Caller,
    ) {
        for id in self.calls.of(session) {
            let note = serde_json::json!({
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": id, "reason": "the client ended its MCP session"},
            });
            let mut req = Request::post(ending.uri.clone())
                .body(Full::new(Bytes::from(note.to_string())))
                .expect("a valid request");
            // Host, Origin, the session and its protocol version, as the client sent them.
            *req.headers_mut() = ending.headers.clone();
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            req.headers_mut().insert(
                header::ACCEPT,
                HeaderValue::from_static("application/json, text/event-stream"),
            );
            req.extensions_mut().insert(caller.clone());
            let resp = match self.service.clone().call(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            if !resp.status().is_success() {
                tracing::debug!(status = %resp.status(), "an ended session's request was not cancelled");
            }
        }
    }

    pub fn core(&self) -> &McpCore {
        &self.core
    }

    /// Whether a new client (a request without `Mcp-Session-Id`, which opens a session) fits
    /// under `mcp.max_clients`, and under `mcp.max_clients_per_key` for its caller. Checked
    /// before rmcp opens the session, so clients opened at the same moment may pass it
    /// together: the caps hold to within those.
    async fn room_for_a_client(&self, scope: Scope) -> Result<(), GatewayError> {
        let policy = &self.core.gateway().policy().mcp;
        let live = self.sessions.sessions.read().await;
        if live.len() >= policy.max_clients {
            return Err(GatewayError::RateLimited {
                message: format!(
                    "the gateway has {} MCP clients connected, its limit (mcp.max_clients); \
                     retry when one has ended",
                    live.len()
                ),
                retry_after: Some(std::time::Duration::from_secs(30)),
            });
        }
        let mine = live
            .keys()
            .filter(|id| self.owners.get(*id) == Some(scope))
            .count();
        if mine >= policy.max_clients_per_key {
            return Err(GatewayError::RateLimited {
                message: format!(
                    "this key has {mine} MCP clients connected, its limit \
                     (mcp.max_clients_per_key); end one (DELETE /mcp with its Mcp-Session-Id) \
                     or wait for an idle one to expire"
                ),
                retry_after: Some(std::time::Duration::from_secs(30)),
            });
        }
        Ok(())
    }

    /// Serves one `/mcp` request from an authenticated `caller`.
    pub async fn handle(&self, caller: Caller, req: Request<Incoming>) -> Response<McpBody> {
        let policy = self.core.gateway().policy();
        let (mut parts, body) = req.into_parts();
        // The body's share of `server.max_bodies_bytes` is held until rmcp has answered.
        let (body, _held) = match read_body_of(
            body,
            &parts.headers,
            policy.server.max_body_bytes.0,
            policy.server.body_read_timeout,
            self.core.gateway().body_budget(),
        )
        .await
        {
            Ok(b) => b,
            Err(e) => return error(&e),
        };
        let scope = Scope::of(&caller);
        let session = parts.headers.get(SESSION_ID).map(session_id);
        if let Some(id) = &session
            && self.owners.get(id) != Some(scope)
        {
            return error(&GatewayError::NotFound(
                "no such MCP session (Mcp-Session-Id); start one with initialize".into(),
            ));
        }
        let (ids, opens) = match parts.method == http::Method::POST {
            true => request_ids(&body),
            false => (Vec::new(), false),
        };
        // Only a request that opens a session counts against the client caps: a stateless
        // one (no `initialize`, no `Mcp-Session-Id`) adds no client.
        if session.is_none() && opens {
            if let crate::gateway::Credential::Poe(key) = &caller.credential
                && let Err(e) = self.poe_takes(key).await
            {
                return error(&e);
            }
            if let Err(e) = self.room_for_a_client(scope).await {
                return error(&e);
            }
        }
        let ending = parts.method == http::Method::DELETE;
        if let Some(id) = &session
            && ending
        {
            self.cancel_calls(id, &parts, &caller).await;
        }
        if !ids.is_empty() && self.calls.stopping.load(Ordering::Acquire) {
            return error(&GatewayError::ShuttingDown(
                "the gateway is shutting down; retry on another replica".into(),
            ));
        }
        let sent_json = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        // Open before rmcp has the request: a stateless request's answer (JSON, its head
        // included) comes only once its call has ended, and a shutdown must wait for it.
        // The session an `initialize` opens has none yet: its own request is filed with the
        // stateless ones.
        let calls = match ids.is_empty() {
            true => Vec::new(),
            false => {
                let filed = session.clone().unwrap_or_else(|| Arc::from(NO_SESSION));
                self.calls.open(&filed, ids)
            }
        };
        parts.extensions.insert(caller);
        let req = Request::from_parts(parts, Full::new(body));
        let mut resp = match self.service.call(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
        match &session {
            None => {
                if let Some(id) = resp.headers().get(SESSION_ID) {
                    self.owners.insert(session_id(id), scope);
                }
            }
            Some(id) if ending && resp.status().is_success() => {
                self.owners.invalidate(id);
                // rmcp answers 202; the MCP clients (Python's) take 200 or 204 as the
                // session's end and warn at anything else.
                *resp.status_mut() = StatusCode::OK;
            }
            Some(_) => {}
        }
        // rmcp says 415 for a body that is no JSON-RPC message, whatever its type: with the
        // right type, the body is at fault.
        if sent_json && resp.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            *resp.status_mut() = StatusCode::BAD_REQUEST;
        }
        let resp = as_openai_error(resp).await;
        if calls.is_empty() || !resp.status().is_success() {
            return resp;
        }
        resp.map(|inner| {
            Tracked {
                inner,
                _calls: calls,
            }
            .boxed()
        })
    }
}

/// rmcp refuses some requests itself (a Host or Origin not allowed, an `Accept` without
/// both types, a session it does not know) with a plain-text body. Clients of the gateway get
/// every error in the OpenAI shape, so those are rewritten; JSON (JSON-RPC errors) and
/// successful answers pass as they are.
async fn as_openai_error(resp: Response<McpBody>) -> Response<McpBody> {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if resp.status().as_u16() < 400 || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match body.collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
        Err(never) => match never {},
    };
    let message = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("refused")
            .to_string()
    } else {
        text
    };
    let e = match parts.status.as_u16() {
        // rmcp refuses with 403 only for a Host or an Origin it does not allow.
        403 => GatewayError::ForeignOrigin(message),
        404 => GatewayError::NotFound(message),
        405 => GatewayError::MethodNotAllowed(message),
        500.. => GatewayError::Internal(message),
        _ => GatewayError::bad_request(message),
    };
    let mut out = error(&e);
    *out.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

/// rmcp's settings from the policy: hosts, origins, body size.
pub fn http_config(policy: &Policy) -> StreamableHttpServerConfig {
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    let ip = policy.server.listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        hosts.push(match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        });
    }
    hosts.extend(
        policy
            .mcp
            .allowed_hosts
            .iter()
            .map(|h| h.trim().to_string()),
    );
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_max_request_body_bytes(
            usize::try_from(policy.server.max_body_bytes.0).unwrap_or(usize::MAX),
        );
    if policy.mcp.allowed_origins.is_empty() {
        // No browser origin is trusted: a request carrying an Origin is refused.
        config.enforce_origin_validation()
    } else {
        config
            .with_allowed_origins(
                policy
                    .mcp
                    .allowed_origins
                    .iter()
                    .map(|o| crate::http::browser_origin_with_port(o)),
            )
            .enforce_origin_validation()
    }
}

fn error(e: &GatewayError) -> Response<McpBody> {
    let mut resp = Response::new(Full::new(e.to_json()).boxed());
    *resp.status_mut() = e.status();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(after) = e.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, crate::error::retry_after_value(after));
    }
    resp
}
