//! The upstream client for Poe (or a test upstream): pooled connections ([`pool`]).
//!
//! rustls on ring, HTTP/2 when ALPN offers it, `TCP_NODELAY`, and a connect timeout. It knows
//! nothing about retries or aliases; it sends one request and reports how that went.

mod pool;

pub use pool::Body;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Uri};

use crate::gateway::Endpoint;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::CertificateDer;

use crate::config::UpstreamPolicy;
use pool::Pool;

/// The longest wait for Poe's model catalogue, head and body.
pub const CATALOGUE_WAIT: Duration = Duration::from_secs(30);

/// Anthropic's key header, which the Messages API takes instead of `Authorization`.
pub const X_API_KEY: header::HeaderName = header::HeaderName::from_static("x-api-key");

/// A key that must never be printed: `Debug` shows only that it is there.
#[derive(Clone)]
pub struct Secret {
    key: Arc<str>,
    /// `Authorization: Bearer <key>`, built once (the server key's is sent on every request).
    bearer: Option<HeaderValue>,
    /// The searcher for the key in upstream headers, built once for the same reason.
    finder: Arc<memchr::memmem::Finder<'static>>,
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Secret {}

impl Secret {
    pub fn new(s: impl Into<Arc<str>>) -> Self {
        let key: Arc<str> = s.into();
        let bearer = HeaderValue::from_str(&format!("Bearer {key}"))
            .ok()
            .map(|mut v| {
                // Marked sensitive, so hyper's h2 HPACK never indexes it.
                v.set_sensitive(true);
                v
            });
        let finder = Arc::new(memchr::memmem::Finder::new(key.as_bytes()).into_owned());
        Secret {
            key,
            bearer,
            finder,
        }
    }

    /// Replaces the key wherever an upstream echoed it in `headers` (an error quoting the
    /// `Authorization` value, a debug header): it must reach neither the client, nor the
    /// logs and spans, nor an MCP answer.
    pub fn redact_headers(&self, headers: &mut http::HeaderMap) {
        crate::error::redact_headers_with(headers, &self.key, &self.finder);
    }

    pub fn expose(&self) -> &str {
        &self.key
    }

    /// The key as an `x-api-key` value (the Messages API's header), marked sensitive; `None`
    /// if the key cannot be a header value. Built per call: only Messages requests send it.
    pub fn api_key_header(&self) -> Option<HeaderValue> {
        let mut v = HeaderValue::from_str(&self.key).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// The `Authorization: Bearer` value; `None` if the key cannot be a header value.
    pub fn bearer(&self) -> Option<HeaderValue> {
        self.bearer.clone()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// No connection could be made (refused, DNS, TLS, connect timeout).
    Connect(String),
    /// Connected, but no response head within the first-byte timeout.
    Timeout(Duration),
    /// The connection failed after the request was sent.
    Broken(String),
    /// The gateway is shutting down and has closed its upstream connections: a request
    /// still waiting on one is not sent again. `sent`: it was out, and Poe may have begun
    /// on it (and charges it); otherwise it never left.
    Closed { sent: bool },
}

impl UpstreamError {
    /// A short name for metrics and spans: `connect`, `timeout` or `broken`.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Broken(_) => "broken",
            UpstreamError::Closed { .. } => "closed",
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "cannot connect to upstream: {e}"),
            UpstreamError::Timeout(d) => write!(
                f,
                "upstream sent no response within {}s (timeouts.first_byte)",
                d.as_secs_f64()
            ),
            UpstreamError::Broken(e) => write!(f, "upstream connection failed: {e}"),
            UpstreamError::Closed { .. } => write!(
                f,
                "the gateway is shutting down: its shutdown grace ran out before Poe answered"
            ),
        }
    }
}

thread_local! {
    /// Which of an [`Upstream`]'s pools this thread uses: 1 + the serving thread's index
    /// ([`use_pool`]); 0 for every other thread (background work, MCP over stdio).
    static POOL: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// This thread's upstream connections were closed by a shutdown whose grace ran out
    /// ([`Upstream::close_connections`]): an answer that breaks now was cut by the gateway,
    /// not by Poe.
    static CUT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread's upstream connections were closed by a shutdown (see `CUT`):
/// what a broken answer is blamed on.
pub fn cut_by_shutdown() -> bool {
    CUT.with(|c| c.get())
}

/// Makes this serving thread use its own pool of every [`Upstream`] (see [`Upstream::new`]).
///
/// A pooled connection is driven by a task on the runtime that opened it. With one pool per
/// serving thread, each on its own single-threaded runtime, a request and the upstream
/// connection it borrows stay on one thread: no wake-up crosses to another CPU. Pool 0 is
/// kept for threads that do not serve, so a connection the background runtime opened (a
/// model catalogue refresh) never carries a serving thread's requests.
pub fn use_pool(serving_thread: usize) {
    POOL.with(|p| p.set(serving_thread + 1));
}

pub struct Upstream {
    /// One pool per serving thread ([`use_pool`]).
    pools: Box<[Arc<Pool>]>,
    chat_uri: Uri,
    responses_uri: Uri,
    messages_uri: Uri,
    models_uri: Uri,
    balance_uri: Uri,
    first_byte: Duration,
    user_agent: HeaderValue,
}

impl Upstream {
    /// `policy.base_url` is e.g. `https://api.poe.com`; a trailing `/v1` is accepted too.
    /// `serving_threads` is the number of threads that call [`use_pool`]; one more pool
    /// serves every other thread.
    pub fn new(
        policy: &UpstreamPolicy,
        connect: Duration,
        first_byte: Duration,
        serving_threads: usize,
    ) -> Result<Self, String> {
        let base = policy.base_url.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        let uri = |path: &str| {
            format!("{base}{path}")
                .parse::<Uri>()
                .map_err(|e| format!("invalid upstream URL {base:?}: {e}"))
        };
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect));
        // A dead path to the upstream is noticed by the kernel too, on the PING's schedule:
        // probes on an idle connection after the interval, three within the timeout; and a
        // cap on how long sent data may go unacknowledged (an HTTP/1.1 connection has no
        // PING). The cap also ends keep-alive: Linux gives up once a probe is out and nothing
        // has been heard for it, so it is interval + timeout, or one lost probe would close a
        // healthy idle connection. Keep-alive takes whole seconds.
        let whole_secs = |d: Duration| Duration::from_secs(d.as_secs_f64().ceil().max(1.0) as u64);
        http.set_keepalive(Some(whole_secs(policy.keepalive_interval)));
        http.set_keepalive_interval(Some(whole_secs(policy.keepalive_timeout / 3)));
        http.set_keepalive_retries(Some(3));
        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        http.set_tcp_user_timeout(Some(policy.keepalive_interval + policy.keepalive_timeout));
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &policy.ca_file {
            for cert in read_ca_file(path).map_err(|e| format!("upstream.ca_file: {e}"))? {
                roots
                    .add(cert)
                    .map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        // The builder offers h2 and http/1.1 by ALPN.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let origin = uri("/")?;
        let h2 = pool::H2Settings::from(policy);
        let pools = (0..=serving_threads)
            .map(|_| {
                Pool::new(https.clone(), origin.clone(), Duration::from_secs(90), h2)
                    .map(|p| Arc::new(p.with_connect_timeout(connect)))
            })
            .collect::<Result<_, _>>()?;
        Ok(Upstream {
            pools,
            chat_uri: uri(Endpoint::ChatCompletions.path())?,
            responses_uri: uri(Endpoint::Responses.path())?,
            messages_uri: uri(Endpoint::Messages.path())?,
            models_uri: uri("/v1/models")?,
            balance_uri: uri("/usage/current_balance")?,
            first_byte,
            user_agent: HeaderValue::from_static(concat!(
                "poe-gateway/",
                env!("CARGO_PKG_VERSION")
            )),
        })
    }

    /// Sends one chat completion (Responses, Messages) request and waits for the response head.
    ///
    /// The request is built before the future is made, so the future holds only the
    /// request and the send: it is part of every chat request's future, whose size is
    /// copied on each request (`the_chat_future_stays_small`).
    pub fn chat(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        key: &Secret,
        request_id: &str,
        extra: http::HeaderMap,
    ) -> impl Future<Output = Result<Response<Body>, UpstreamError>> + '_ {
        // Built in place with static values: the builder moves the request head on every
        // call and checks each `&str` value again.
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri(endpoint).clone();
        let h = req.headers_mut();
        h.reserve(8);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        h.insert(header::USER_AGENT, self.user_agent.clone());
        // No `Accept-Encoding` would allow any coding (RFC 9110): a compressed answer could
        // not be read for usage, and the client may not have asked for one.
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if let Some(auth) = key.bearer() {
            req.headers_mut().insert(header::AUTHORIZATION, auth);
        }
        if endpoint == Endpoint::Messages {
            // Poe documents both for its Messages API: `Authorization: Bearer` in its API
            // reference, and Anthropic's SDKs (which send `x-api-key`) in its guide.
            if let Some(v) = key.api_key_header() {
                req.headers_mut().insert(X_API_KEY, v);
            }
        }
        if let Ok(id) = HeaderValue::from_str(request_id) {
            req.headers_mut()
                .insert(crate::gateway::REQUEST_ID_HEADER, id);
        }
        // Trace context for the attempt (`traceparent`), when traces are on.
        req.headers_mut().extend(extra);
        self.send(req)
    }

    /// The calling serving thread's pool (see [`use_pool`]).
    fn pool(&self) -> &Arc<Pool> {
        &self.pools[POOL.with(|p| p.get()) % self.pools.len()]
    }

    /// Closes the connections of the calling serving thread's pool (see [`use_pool`]): a
    /// shutdown whose grace is over ends what still streams on them.
    pub fn close_connections(&self) {
        CUT.with(|c| c.set(true));
        self.pool().close_all();
    }

    /// Waits out a retry's backoff, or less: when a shutdown's grace ends and this thread's
    /// upstream connections are closed, at once (the next attempt then fails as `Closed`,
    /// and its client gets a 503 rather than a connection cut when the server stops).
    pub async fn backoff(&self, wait: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = self.closed() => {}
        }
    }

    /// Resolves once this thread's upstream connections are closed at the end of a
    /// shutdown's grace: a request waiting for anything else (a retry's backoff, a slot in
    /// the upstream limiter) races it, so that it ends with a 503 rather than a cut.
    pub async fn closed(&self) {
        self.pool().closed().await
    }

    /// Where requests to `endpoint` go.
    pub fn uri(&self, endpoint: Endpoint) -> &Uri {
        match endpoint {
            Endpoint::ChatCompletions => &self.chat_uri,
            Endpoint::Responses => &self.responses_uri,
            Endpoint::Messages => &self.messages_uri,
        }
    }

    /// Fetches Poe's model catalogue (no auth needed), up to `limit` bytes, waiting at most
    /// [`CATALOGUE_WAIT`] for all of it (the first-byte timeout is sized for slow bots).
    pub async fn models(
        &self,
        limit: usize,
    ) -> Result<(http::response::Parts, Bytes), UpstreamError> {
        let wait = self.first_byte.min(CATALOGUE_WAIT);
        let req = Request::builder()
            .method(Method::GET)
            .uri(self.models_uri.clone())
            .header(header::ACCEPT, "application/json")
            .header(header::ACCEPT_ENCODING, "identity")
            .header(header::USER_AGENT, self.user_agent.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|e| UpstreamError::Broken(e.to_string()))?;
        let pool = self.pool();
        tokio::time::timeout(wait, async {
            let (head, body) = pool.send(req).await?.into_parts();
            let body = Limited::new(body, limit)
                .collect()
                .await
                .map_err(|e| UpstreamError::Broken(e.to_string()))?
                .to_bytes();
            Ok((head, body))
        })
        .await
        .unwrap_or(Err(UpstreamError::Timeout(wait)))
    }

    /// Whether Poe takes `key`: `Ok(false)` when its balance call (which spends nothing) is
    /// refused with 401 or 403.
    pub async fn accepts_key(&self, key: &Secret) -> Result<bool, String> {
        let resp = self
            .send(self.balance_request(key)?)
            .await
            .map_err(|e| e.to_string())?;
        Ok(!matches!(resp.status().as_u16(), 401 | 403))
    }

    /// `GET /usage/current_balance` with `key`.
    fn balance_request(&self, key: &Secret) -> Result<Request<Full<Bytes>>, String> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(self.balance_uri.clone())
            .header(header::ACCEPT, "application/json")
            .header(header::ACCEPT_ENCODING, "identity")
            .header(header::USER_AGENT, self.user_agent.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        if let Some(auth) = key.bearer() {
            req.headers_mut().insert(header::AUTHORIZATION, auth);
        }
        Ok(req)
    }

    /// Poe's compute-point balance for `key` (`GET /usage/current_balance`).
    pub async fn balance(&self, key: &Secret) -> Result<i64, String> {
        let resp = self
            .send(self.balance_request(key)?)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = tokio::time::timeout(
            self.first_byte,
            Limited::new(resp.into_body(), 64 * 1024).collect(),
        )
        .await
        .map_err(|_| "timed out reading the balance".to_string())?
        .map_err(|e| e.to_string())?
        .to_bytes();
        if !status.is_success() {
            // Poe's error may quote the key it was called with (`poe-gateway usage balance`
            // prints this).
            let body = crate::error::redact_secrets(body, &[key.expose()]);
            return Err(format!(
                "Poe answered {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        #[derive(serde::Deserialize)]
        struct Balance {
            current_point_balance: i64,
        }
        serde_json::from_slice::<Balance>(&body)
            .map(|b| b.current_point_balance)
            .map_err(|e| format!("unexpected balance answer: {e}"))
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Body>, UpstreamError> {
        let pool = self.pool();
        tokio::time::timeout(self.first_byte, pool.send(req))
            .await
            .unwrap_or(Err(UpstreamError::Timeout(self.first_byte)))
    }
}

/// The certificates of a PEM file (`upstream.ca_file`); an error names the file and says
/// what is wrong with it.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The error with its sources, which carry the useful part ("connection refused").
/// None of these include request headers, so no key can appear.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
