//! Routing, authentication, body reading and response writing: a thin layer over the core.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::App;
use super::browser::Cors;
use crate::config::AuthMode;
use crate::error::GatewayError;
use crate::gateway::cache::CacheDirectives;
use crate::gateway::{
    ATTEMPTS_HEADER, BOT_HEADER, Caller, ChatRequest, Credential, Endpoint, REQUEST_ID_HEADER,
    ReplyBody, SHOULD_RETRY_HEADER,
};
use crate::upstream::Secret;

/// A response body: the core's reply, or rmcp's for `/mcp`.
pub type HttpBody = http_body_util::Either<ReplyBody, crate::mcp::http::McpBody>;
pub type HttpResponse = Response<HttpBody>;

// A `HeaderName` constant: inserting a custom name given as `&str` copies it into a new
// allocation on every response.
const CACHE_STATUS: HeaderName = HeaderName::from_static("x-cache");

pub(crate) async fn handle(app: Arc<App>, req: Request<Incoming>) -> HttpResponse {
    let request_id = request_id(req.headers());
    let cors = app.cors.allowed(req.headers());
    // A refusal before the route's own handling (a foreign Origin or Host, a preflight) is
    // in the shape of the API the path belongs to, as the route's own errors are.
    let path = req.uri().path();
    let api = if path.starts_with("/v1/models")
        && super::anthropic::wants_anthropic_shape(req.headers())
    {
        Endpoint::Messages
    } else {
        path_api(path)
    };
    let head = req.method() == Method::HEAD;
    let answer = if Cors::is_preflight(req.method(), req.headers()) {
        preflight(&app, &req, cors.is_some())
    } else {
        route(&app, req, &request_id).await
    };
    let mut resp = answer.unwrap_or_else(|e| error_response_for(api, &e));
    if head {
        resp = without_body(resp);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    if let Some(origin) = cors {
        Cors::expose(origin, resp.headers_mut());
    }
    resp
}

/// A HEAD answer: the GET's head, its length included, and no body. hyper leaves the body
/// out over HTTP/1.1 itself, but sends it over HTTP/2, where a HEAD answer with content is a
/// protocol error (`curl -I --http2-prior-knowledge` failed on every route).
fn without_body(resp: HttpResponse) -> HttpResponse {
    use http_body::Body as _;
    let (mut parts, body) = resp.into_parts();
    if !parts.headers.contains_key(header::CONTENT_LENGTH)
        && let Some(n) = body.size_hint().exact()
    {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Response::from_parts(
        parts,
        http_body_util::Either::Left(ReplyBody::Full { data: None }),
    )
}

/// A browser's preflight, on any path: 204 for a listed origin (the page's request then
/// gets the route's own answer), 403 for any other.
fn preflight(
    app: &App,
    req: &Request<Incoming>,
    listed: bool,
) -> Result<HttpResponse, GatewayError> {
    if let Some(guard) = &app.browser {
        // A listed origin through a rebound name is still refused.
        guard.check(req.uri(), req.headers())?;
    }
    if !listed {
        return Err(GatewayError::ForeignOrigin(format!(
            "web pages at this origin may not call the gateway (Origin: {}); list it in \
             mcp.allowed_origins to allow them",
            super::browser::shown(&String::from_utf8_lossy(
                req.headers()
                    .get(header::ORIGIN)
                    .map_or(&b""[..], |v| v.as_bytes())
            ))
        )));
    }
    let mut resp = Response::new(HttpBody::Left(ReplyBody::Full { data: None }));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Cors::preflight_headers(req.headers(), resp.headers_mut());
    Ok(resp)
}

async fn route(
    app: &App,
    req: Request<Incoming>,
    request_id: &Arc<str>,
) -> Result<HttpResponse, GatewayError> {
    let path = req.uri().path();
    // `/mcp` too, though rmcp checks its Host and Origin headers: not the target's own
    // authority (an absolute-form target), which this does.
    if let Some(guard) = &app.browser {
        guard.check(req.uri(), req.headers())?;
    }
    // HEAD is GET without the body (hyper sends none for it): uptime monitors and `curl -I`
    // use it on the health and catalogue routes.
    let method = if req.method() == Method::HEAD {
        &Method::GET
    } else {
        req.method()
    };
    match (method, path) {
        // Every chat completion answer says what the cache did: one refused before the
        // cache was consulted (auth, limits, a bad body) did not use it.
        (&Method::POST, "/v1/chat/completions" | "/v1/responses" | "/v1/messages") => {
            let endpoint = Endpoint::of_path(path).unwrap_or_default();
            Ok(chat(app, req, request_id, endpoint)
                .await
                .unwrap_or_else(|e| {
                    let mut resp = error_response_for(endpoint, &e);
                    resp.headers_mut()
                        .insert(CACHE_STATUS, HeaderValue::from_static("BYPASS"));
                    resp
                }))
        }
        // The other routes' futures are boxed for the same reason as the chat call (see
        // `chat`): the request's future is boxed and copied whole on every request, sized
        // for the largest route, so one big route would cost every request.
        (&Method::POST, "/v1/messages/count_tokens") => Ok(Box::pin(
            super::anthropic::count_tokens(app, req, request_id),
        )
        .await
        .unwrap_or_else(|e| error_response_for(Endpoint::Messages, &e))),
        (_, "/mcp") => {
            let caller = authenticate(app, req.headers(), request_id).await?;
            let resp = Box::pin(app.mcp.handle(caller, req)).await;
            Ok(resp.map(HttpBody::Right))
        }
        (&Method::GET, "/v1/usage") => {
            let caller = authenticate(app, req.headers(), request_id).await?;
            Box::pin(super::admin::own_usage(app, &req, &caller)).await
        }
        (_, p) if p == "/admin" || p.starts_with("/admin/") => {
            Box::pin(super::admin::handle(app, req)).await
        }
        (&Method::GET, "/metrics") => {
            if app.gateway.policy().server.metrics_require_admin {
                super::admin::check_admin(
                    app,
                    req.headers(),
                    "GET /metrics (server.metrics_require_admin = true)",
                )?;
            }
            let mut resp = json(StatusCode::OK, Bytes::from(app.gateway.render_metrics()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(resp)
        }
        (&Method::GET, "/openapi.json") => {
            Ok(json(StatusCode::OK, Bytes::from_static(OPENAPI.as_bytes())))
        }
        // An Anthropic client gets the models of the Messages API, in its API's shape.
        (&Method::GET, "/v1/models") if super::anthropic::wants_anthropic_shape(req.headers()) => {
            let query = req.uri().query();
            let listed = async {
                let cat = Box::pin(app.gateway.models()).await?;
                super::anthropic::model_list(&cat, query)
            };
            Ok(match listed.await {
                Ok(body) => json(StatusCode::OK, body),
                Err(e) => error_response_for(Endpoint::Messages, &e),
            })
        }
        (&Method::GET, p)
            if p.starts_with("/v1/models/")
                && super::anthropic::wants_anthropic_shape(req.headers()) =>
        {
            let id = percent_decode(&p["/v1/models/".len()..]);
            let found = async {
                let cat = Box::pin(app.gateway.models()).await?;
                super::anthropic::model(&cat, &id)
            };
            Ok(match found.await {
                Ok(body) => json(StatusCode::OK, body),
                Err(e) => error_response_for(Endpoint::Messages, &e),
            })
        }
        (&Method::GET, "/v1/models") => {
            let cat = Box::pin(app.gateway.models()).await?;
            Ok(json(StatusCode::OK, cat.body.clone()))
        }
        (&Method::GET, p) if p.starts_with("/v1/models/") => {
            let id = percent_decode(&p["/v1/models/".len()..]);
            let cat = Box::pin(app.gateway.models()).await?;
            match cat.entry(&id) {
                Some(entry) => Ok(json(StatusCode::OK, Bytes::from(entry.to_string()))),
                None => Err(GatewayError::NotFound(format!(
                    "The model `{id}` does not exist"
                ))),
            }
        }
        (&Method::GET, "/healthz") => Ok(json(
            StatusCode::OK,
            Bytes::from_static(b"{\"status\":\"ok\"}"),
        )),
        (&Method::GET, "/readyz") => {
            if app.draining.load(Ordering::SeqCst) {
                Err(GatewayError::ShuttingDown(
                    "the gateway is shutting down".into(),
                ))
            } else {
                Ok(json(
                    StatusCode::OK,
                    Bytes::from_static(b"{\"status\":\"ready\"}"),
                ))
            }
        }
        (_, p) => match allowed_methods(p) {
            Some(allow) => Ok(method_not_allowed(req.method(), p, allow)),
            // Under the Messages API's path (its `batches`, which Poe does not serve), in
            // its error shape, as `handle` answers every error by its path.
            None => Err(GatewayError::NotFound(format!(
                "Unknown request URL: {} {p}",
                req.method()
            ))),
        },
    }
}

/// The OpenAPI 3.1 description of these routes, served at `GET /openapi.json`.
pub(crate) const OPENAPI: &str = include_str!("openapi.json");

/// The methods a known path answers (outside `/admin` and `/mcp`), for 405 and `Allow`.
fn allowed_methods(path: &str) -> Option<&'static str> {
    match path {
        "/v1/chat/completions" | "/v1/responses" | "/v1/messages" | "/v1/messages/count_tokens" => {
            Some("POST")
        }
        "/v1/models" | "/v1/usage" | "/healthz" | "/readyz" | "/metrics" | "/openapi.json" => {
            Some("GET, HEAD")
        }
        p if p.starts_with("/v1/models/") => Some("GET, HEAD"),
        _ => None,
    }
}

/// The API whose error shape answers a request on `path`: the Messages API's for its route
/// and everything under it (`count_tokens`, `batches`), else the route's own.
fn path_api(path: &str) -> Endpoint {
    if path.starts_with("/v1/messages/") {
        Endpoint::Messages
    } else {
        Endpoint::of_path(path).unwrap_or_default()
    }
}

/// 405 with the `Allow` header listing what the path does answer.
pub(crate) fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> HttpResponse {
    let mut resp = error_response_for(
        path_api(path),
        &GatewayError::MethodNotAllowed(format!("{method} is not allowed on {path}; use {allow}")),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

async fn chat(
    app: &App,
    req: Request<Incoming>,
    request_id: &Arc<str>,
    endpoint: Endpoint,
) -> Result<HttpResponse, GatewayError> {
    let caller = authenticate(app, req.headers(), request_id).await?;
    let started = tokio::time::Instant::now();
    let directives = CacheDirectives::from_headers(req.headers())?;
    let forwarded = crate::gateway::request::forwarded_headers(endpoint, req.headers());
    let policy = app.gateway.policy();
    // The body's share of `server.max_bodies_bytes` is held until the request is done with it.
    let mut _held = None;
    let parsed = match read_body(
        req,
        policy.server.max_body_bytes.0,
        policy.server.body_read_timeout,
        app.gateway.body_budget(),
    )
    .await
    {
        Ok((body, held)) => {
            _held = Some(held);
            ChatRequest::parse_for(endpoint, body)
        }
        Err(e) => Err(e),
    };
    let mut chat = match parsed {
        Ok(chat) => chat,
        Err(e) => {
            // The API is the route's: the body that would have said more was not read.
            app.gateway.record_rejection(
                &caller,
                endpoint,
                "(invalid request)",
                false,
                &e,
                started,
            );
            return Err(e);
        }
    };
    chat.set_cache_directives(directives);
    chat.set_forwarded_headers(forwarded);
    // Boxed: the request's future (`http::accept_loop`) is allocated and copied whole on
    // every request, sized for its largest state; the chat call's state is the big one.
    let reply = Box::pin(app.gateway.chat(&caller, chat)).await?;

    let mut resp = Response::new(HttpBody::Left(reply.body));
    *resp.status_mut() = reply.status;
    *resp.headers_mut() = reply.headers;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&reply.bot) {
        h.insert(BOT_HEADER, v);
    }
    h.insert(ATTEMPTS_HEADER, HeaderValue::from(reply.attempts));
    h.insert(CACHE_STATUS, HeaderValue::from_static(reply.cache.as_str()));
    if (reply.status.is_client_error() || reply.status.is_server_error())
        && !sdk_should_retry(
            reply.status,
            h,
            reply.attempts,
            app.gateway.policy().retry.max_retry_after,
        )
    {
        h.insert(SHOULD_RETRY_HEADER, HeaderValue::from_static("false"));
    }
    Ok(resp)
}

/// The longest `Retry-After` the OpenAI SDKs wait for; past it they retry after their own
/// short backoff, within a second or two.
const SDK_RETRY_AFTER_CAP: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a client's SDK may try an error answer again by itself, or should be told not to
/// (`x-should-retry: false`). After the gateway's own retries (attempts above 1) it should not:
/// its tries would each be the gateway's several. The exception is a wait the gateway would
/// not hold the client for (over `retry.max_retry_after`) and the SDK honours (under a
/// minute): the SDK may schedule that. A longer wait, which the SDKs would not honour, is
/// never retried by them, whoever made the attempts.
fn sdk_should_retry(
    status: StatusCode,
    headers: &HeaderMap,
    attempts: u32,
    max_retry_after: std::time::Duration,
) -> bool {
    match crate::gateway::retry::requested_wait(status, headers) {
        Some(w) if w >= SDK_RETRY_AFTER_CAP => false,
        Some(w) if w > max_retry_after && status == StatusCode::TOO_MANY_REQUESTS => true,
        _ => attempts <= 1,
    }
}

/// Establishes who is calling and who pays for the upstream call.
/// A refusal is counted by status (`auth_failures_total`): it has no caller to account it to,
/// and an outage of the key store showed up nowhere else.
pub(crate) async fn authenticate(
    app: &App,
    headers: &HeaderMap,
    request_id: &Arc<str>,
) -> Result<Caller, GatewayError> {
    let who = identify(app, headers, request_id).await;
    if let Err(e) = &who {
        app.gateway
            .metrics()
            .auth_failures
            .with_label_values(&[e.status().as_str()])
            .inc();
    }
    who
}

async fn identify(
    app: &App,
    headers: &HeaderMap,
    request_id: &Arc<str>,
) -> Result<Caller, GatewayError> {
    let mut caller = Caller::server(request_id.clone());
    caller.trace_context = crate::telemetry::extract_context(headers);
    match app.gateway.policy().auth_mode() {
        // The SDKs always send some key; in open mode it is not looked at.
        AuthMode::Open => {}
        AuthMode::Passthrough => {
            let key = bearer(headers).ok_or_else(|| {
                GatewayError::Unauthorized(
                    "this gateway forwards your own Poe API key: send `Authorization: Bearer <your Poe key>` (or `x-api-key: <your Poe key>`)"
                        .into(),
                )
            })?;
            // A stable id for the caller's own usage report; the key itself is never stored.
            let id = crate::gateway::keys::hash_key(key.expose());
            let prefix = crate::gateway::keys::PASSTHROUGH_ID_PREFIX;
            caller.key_id = Some(Arc::from(format!("{prefix}{}", &id[..16])));
            caller.credential = Credential::Poe(key);
        }
        AuthMode::Keys => {
            let key = bearer_token(headers).ok_or_else(|| {
                GatewayError::Unauthorized(
                    "send your gateway key as `Authorization: Bearer pgw_...` (or `x-api-key: pgw_...`)".into(),
                )
            })?;
            // Boxed: a key lookup may reach the database and Redis, and its state would
            // otherwise size every request's future (see `chat`).
            let rec = Box::pin(app.gateway.keys().authenticate(key)).await?;
            caller.key_id = Some(Arc::from(rec.id.as_str()));
            caller.key = Some(rec);
        }
    }
    Ok(caller)
}

/// The caller's key, ready to send upstream (passthrough mode).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<Secret> {
    bearer_token(headers).map(Secret::new)
}

/// The token of `Authorization: Bearer <token>` alone (the admin key comes only there).
pub(crate) fn authorization_bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The token of `Authorization: Bearer <token>`, or else of `x-api-key: <token>`, the header
/// Anthropic's SDKs and Claude Code send their key in. Where the key is only compared or
/// looked up (gateway keys, the admin key), this skips building a [`Secret`]'s header value
/// and searcher, which only a key sent upstream needs.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    authorization_bearer(headers).or_else(|| {
        let token = headers
            .get(crate::upstream::X_API_KEY)?
            .to_str()
            .ok()?
            .trim();
        (!token.is_empty()).then_some(token)
    })
}

/// Reads the whole request body (it is small next to responses, and a retry must resend it),
/// refusing more than `limit` bytes and clients slower than `timeout`.
pub(crate) async fn read_body(
    req: Request<Incoming>,
    limit: u64,
    timeout: std::time::Duration,
    budget: &Arc<Semaphore>,
) -> Result<(Bytes, OwnedSemaphorePermit), GatewayError> {
    let (parts, body) = req.into_parts();
    read_body_of(body, &parts.headers, limit, timeout, budget).await
}

/// [`read_body`] for a request already split into its parts (MCP keeps the head). The body
/// is held against `budget` (KiB, `server.max_bodies_bytes`), taken as it arrives (all of a
/// declared length at once): the permit returned gives it back when dropped, so keep it as
/// long as the body. With the budget spent the request is refused with 503, not queued.
pub(crate) async fn read_body_of(
    mut body: Incoming,
    headers: &HeaderMap,
    limit: u64,
    timeout: std::time::Duration,
    budget: &Arc<Semaphore>,
) -> Result<(Bytes, OwnedSemaphorePermit), GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > limit) {
        if n - limit <= DRAIN_MAX {
            let _ = tokio::time::timeout(DRAIN_TIME, drain(&mut body, n)).await;
        }
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    // A compressed body would otherwise fail as "invalid JSON", which sends the client
    // looking in the wrong place.
    if let Some(enc) = headers.get(header::CONTENT_ENCODING)
        && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(GatewayError::UnsupportedMediaType(format!(
            "request bodies are read uncompressed; this one has Content-Encoding: {}",
            super::browser::shown(&String::from_utf8_lossy(enc.as_bytes()))
        )));
    }
    let mut held = take_budget(budget, None, declared.unwrap_or(0))?;
    let read = async move {
        // The usual body comes in one frame: kept as it is. A second frame starts a copy.
        let mut first: Option<Bytes> = None;
        let mut buf = bytes::BytesMut::new();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                GatewayError::bad_request(format!("could not read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            if data.is_empty() {
                continue;
            }
            total += data.len() as u64;
            if total > limit {
                let _ = tokio::time::timeout(DRAIN_TIME, drain(&mut body, limit + DRAIN_MAX)).await;
                return Err(GatewayError::PayloadTooLarge { limit });
            }
            held = take_budget(budget, Some(held), total)?;
            match first.take() {
                None if buf.is_empty() => first = Some(data),
                None => buf.extend_from_slice(&data),
                Some(f) => {
                    buf.reserve(declared.unwrap_or(0).max(total) as usize);
                    buf.extend_from_slice(&f);
                    buf.extend_from_slice(&data);
                }
            }
        }
        Ok((first.unwrap_or_else(|| buf.freeze()), held))
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(GatewayError::RequestTimeout(format!(
            "request body not received within {}s (server.body_read_timeout)",
            timeout.as_secs()
        ))),
        Ok(read) => read,
    }
}

/// How much of a body over the limit is read (and dropped) before the 413, and for how
/// long. A client still sending when the answer comes and the connection closes gets a
/// reset, and many never read the 413 (Python's async HTTP client raised `ReadError`, and the
/// MCP SDK's whole session died with it). A body far over the limit is not waited for.
const DRAIN_MAX: u64 = 64 * 1024 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and drops the rest of a body, until `up_to` bytes in all have come.
async fn drain(body: &mut Incoming, up_to: u64) {
    let mut seen = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            seen += data.len() as u64;
            if seen >= up_to {
                return;
            }
        }
    }
}

/// Grows `held` to cover `bytes` of body from `budget` (in KiB), without waiting.
fn take_budget(
    budget: &Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    bytes: u64,
) -> Result<OwnedSemaphorePermit, GatewayError> {
    let want = bytes.div_ceil(1024).max(1) as usize;
    let have = held.as_ref().map_or(0, |p| p.num_permits());
    let busy = || {
        GatewayError::Overloaded(
            "the gateway holds as many request bodies as server.max_bodies_bytes allows; \
             retry shortly"
                .into(),
        )
    };
    if want <= have {
        return held.ok_or_else(busy);
    }
    let more = u32::try_from(want - have).map_err(|_| busy())?;
    let more = budget
        .clone()
        .try_acquire_many_owned(more)
        .map_err(|_| busy())?;
    Ok(match held {
        Some(mut p) => {
            p.merge(more);
            p
        }
        None => more,
    })
}

/// The client's request id when it is a sane token, else a new UUID. Only visible ASCII
/// without spaces is echoed, so nothing a client sends can split or forge a header.
fn request_id(headers: &HeaderMap) -> Arc<str> {
    if let Some(v) = headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 128
        && v.bytes().all(|b| b.is_ascii_graphic())
    {
        return Arc::from(v);
    }
    // A request id needs to be unique, not secret: a fast thread-local generator, where
    // `new_v4` would make a getrandom system call per request.
    let random = fastrand::u128(..).to_le_bytes();
    let id = uuid::Builder::from_random_bytes(random).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    Arc::from(&*id.hyphenated().encode_lower(&mut buf))
}

pub(crate) fn json(status: StatusCode, body: Bytes) -> HttpResponse {
    let mut resp = Response::new(HttpBody::Left(ReplyBody::Full { data: Some(body) }));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// An error answer for a client of `api`, in that API's error shape.
pub(crate) fn error_response_for(api: Endpoint, e: &GatewayError) -> HttpResponse {
    let mut resp = json(e.status(), e.to_json_for(api));
    if e.status() == StatusCode::UNAUTHORIZED {
        // RFC 9110: a 401 names the scheme the client should use.
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if matches!(e, GatewayError::QuotaExceeded(_)) {
        resp.headers_mut()
            .insert(SHOULD_RETRY_HEADER, HeaderValue::from_static("false"));
    }
    if let Some(after) = e.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, crate::error::retry_after_value(after));
    }
    resp
}

/// Model ids may arrive percent-encoded.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without running it.
    fn future_size<A, B, F: std::future::Future>(_f: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// hyper allocates each connection's service future once, at the size of its largest
    /// state, and keeps that allocation while the connection lives. The service boxes this
    /// future per request (`http::accept_loop`), so hyper's slot holds a pointer; the box is
    /// still allocated and copied on every request. Large states (the chat call, a key
    /// lookup, MCP, admin) are boxed where they start; this catches an unboxed one.
    /// (Measured at 2.7 KB in a debug build and 8.6 KB before the key lookup was boxed.)
    #[test]
    fn the_per_connection_service_future_stays_small() {
        let size = future_size(|app: Arc<App>, req: Request<Incoming>| handle(app, req));
        assert!(size <= 4096, "routes::handle's future is {size} bytes");
    }

    /// The chat call's future is boxed (moved to the heap) once per request, so its size is
    /// copied every time: a connect or handshake future kept inline once made it about 20 KB
    /// and cost 20,000 instructions per request in `memcpy`. Rare, large states (opening an
    /// upstream connection, the error path's catalogue fetch for a suggestion: 7.1 KB before
    /// it was boxed) are boxed where they start.
    #[test]
    fn the_chat_future_stays_small() {
        fn size_of_output<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let chat: fn(&'static crate::gateway::Gateway, &'static Caller, ChatRequest) -> _ =
            |gateway, caller, req| gateway.chat(caller, req);
        let size = size_of_output(chat);
        assert!(size <= 4096, "Gateway::chat's future is {size} bytes");
    }
}
