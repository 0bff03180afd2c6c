//! Upstream connections, kept for reuse: one [`Pool`] per serving thread.
//!
//! This sits on hyper's connection-level client (`hyper::client::conn`) rather than
//! hyper-util's legacy `Client`, which profiles showed to cost about a fifth of a proxied
//! request's instructions: a pool keyed by scheme and authority behind a lock shared by every
//! caller, a race between checkout and connect on every request, and a task spawned per
//! HTTP/1.1 request just to put the connection back once its body ends. Here every request
//! goes to one origin and each pool is used by one serving thread, so a pool is a short stack
//! of idle HTTP/1.1 senders (most recent on top) and a few shared HTTP/2 senders, and a
//! connection goes back when the response [`Body`] reaches its end.
//!
//! An HTTP/2 connection carries at most `upstream.http2_max_streams` requests at once. A
//! server caps its concurrent streams (RFC 9113 asks for at least 100), and hyper queues a
//! request past the cap inside the connection, unseen, until another stream ends: with one
//! connection per serving thread, long streams (media bots take minutes) would hold every
//! later request. So the pool counts each connection's open streams and opens another
//! connection when all are full.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service as _;

use super::{UpstreamError, error_chain};
use crate::config::UpstreamPolicy;

type ReqBody = Full<Bytes>;

/// Idle HTTP/1.1 connections kept per pool at most (the legacy client's limit was the same).
const MAX_IDLE: usize = 1024;

/// How the pool's HTTP/2 connections behave.
#[derive(Debug, Clone, Copy)]
pub(super) struct H2Settings {
    /// Requests one connection carries at once; past it, another connection opens.
    pub max_streams: usize,
    /// With a request open and nothing read for this long, a PING goes out...
    pub keepalive_interval: Duration,
    /// ...and with no answer in this long the connection is closed, failing its requests
    /// (which are retried) rather than leaving them to wait out the first-byte timeout.
    pub keepalive_timeout: Duration,
}

/// Each stream's receive window on an HTTP/2 connection upstream. What a client has not read
/// stays in its stream's window, so the connection's window holds every stream's whole
/// window ([`H2Settings::connection_window`]): clients that stop reading cannot take the
/// room of the others on their connection. (hyper's defaults, 2 MiB per stream and 5 MiB per
/// connection, let three such clients stall it.) 256 KiB still streams at several MB/s per
/// answer at Poe's round-trip times.
const H2_STREAM_WINDOW: u32 = 256 * 1024;

impl H2Settings {
    /// `max_streams` whole stream windows (25 MiB at the default 100 streams), within
    /// HTTP/2's largest window. Memory is taken only for data received and not yet read.
    fn connection_window(&self) -> u32 {
        let streams = u32::try_from(self.max_streams).unwrap_or(u32::MAX);
        H2_STREAM_WINDOW
            .saturating_mul(streams)
            .clamp(H2_STREAM_WINDOW, i32::MAX as u32)
    }
}

impl From<&UpstreamPolicy> for H2Settings {
    fn from(p: &UpstreamPolicy) -> Self {
        H2Settings {
            max_streams: p.http2_max_streams as usize,
            keepalive_interval: p.keepalive_interval,
            keepalive_timeout: p.keepalive_timeout,
        }
    }
}

/// [`Pool::connect_timeout`] until [`Pool::with_connect_timeout`] sets it.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections of one serving thread to the upstream origin.
pub(super) struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// The origin, `scheme://authority/`, for the connector.
    origin: Uri,
    /// The `Host` header for HTTP/1.1 requests (HTTP/2 takes `:authority` from the URI).
    host: HeaderValue,
    /// An idle connection older than this is closed instead of reused.
    idle_timeout: Duration,
    /// The longest a new connection may take, TCP, TLS and the HTTP/2 handshake together
    /// (`timeouts.connect`): a server that takes the TCP connection and then says nothing
    /// would otherwise hold the request until `timeouts.first_byte`.
    connect_timeout: Duration,
    h2: H2Settings,
    idle: Mutex<Idle>,
    /// Whether the task that closes idle connections nobody came back for is running.
    reaping: AtomicBool,
    /// The tasks driving this pool's connections, so a shutdown can end them
    /// ([`Pool::close_all`]). Finished ones are dropped as new ones come.
    drives: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Set by [`Pool::close_all`]: no request goes out any more, and one whose connection
    /// was closed under it fails as `Closed`, not to be retried.
    closed: AtomicBool,
    /// Wakes the retries waiting out a backoff when [`Pool::close_all`] runs.
    closing: tokio::sync::Notify,
}

#[derive(Default)]
struct Idle {
    /// Oldest first; requests take from the end, where connections are warmest.
    h1: Vec<(http1::SendRequest<ReqBody>, Instant)>,
    /// Open HTTP/2 connections, oldest first. A request takes the first with a free stream,
    /// so traffic gathers on the oldest and the others fall idle and are closed.
    h2: Vec<H2Conn>,
}

struct H2Conn {
    tx: http2::SendRequest<ReqBody>,
    /// Requests in flight on it: a [`Slot`] each.
    streams: Arc<AtomicUsize>,
    /// When a request last took a stream on it.
    used: Instant,
}

/// One stream of an HTTP/2 connection, held by a request until its response body ends (or
/// is dropped, or the request fails).
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(streams: &Arc<AtomicUsize>) -> Slot {
        streams.fetch_add(1, Ordering::Relaxed);
        Slot(streams.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>, Slot),
}

impl Pool {
    pub(super) fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: Uri,
        idle_timeout: Duration,
        h2: H2Settings,
    ) -> Result<Self, String> {
        let authority = origin
            .authority()
            .ok_or_else(|| format!("upstream URL {origin} has no host"))?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("upstream host {authority} is not a valid Host header: {e}"))?;
        Ok(Pool {
            connector,
            origin,
            host,
            idle_timeout,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            h2: H2Settings {
                max_streams: h2.max_streams.max(1),
                ..h2
            },
            idle: Mutex::new(Idle::default()),
            reaping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            closing: tokio::sync::Notify::new(),
            drives: Mutex::new(Vec::new()),
        })
    }

    /// Runs a connection's task, kept where [`close_all`](Self::close_all) can end it.
    fn drive<F>(&self, conn: F, proto: &'static str)
    where
        F: Future<Output = hyper::Result<()>> + Send + 'static,
    {
        let task = tokio::spawn(Drive { conn, proto });
        let mut drives = self.drives.lock().unwrap_or_else(|p| p.into_inner());
        drives.retain(|d| !d.is_finished());
        drives.push(task.abort_handle());
    }

    /// At the end of a shutdown's grace: closes every connection of this pool. The answers
    /// still streaming on them end, and each tap ends its client's stream with an error
    /// event (instead of the client's connection being cut mid-body).
    pub(super) fn close_all(&self) {
        self.closed.store(true, Ordering::Release);
        self.closing.notify_waiters();
        let drives = std::mem::take(&mut *self.drives.lock().unwrap_or_else(|p| p.into_inner()));
        for d in drives {
            d.abort();
        }
        *self.lock_idle() = Idle::default();
    }

    /// Resolves once [`Pool::close_all`] has run (at once if it has).
    pub(super) async fn closed(&self) {
        // Made before the flag is read: a `Notified` hears every `notify_waiters` after it
        // was made, polled or not.
        let closing = self.closing.notified();
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        closing.await
    }

    /// Sends `req` (absolute URI) on an idle connection, or on a new one, and returns the
    /// response head. The body hands an HTTP/1.1 connection back when it ends.
    pub(super) async fn send(
        self: &Arc<Self>,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Body>, UpstreamError> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(UpstreamError::Closed { sent: false });
            }
            let (sender, reused) = self.checkout().await?;
            let result = match sender {
                Sender::H2(mut tx, slot) => tx.try_send_request(req).await.map(|resp| {
                    resp.map(|inner| Body {
                        inner,
                        home: None,
                        slot: Some(slot),
                    })
                }),
                Sender::H1(mut tx) => {
                    // HTTP/1.1 wants origin-form (`/v1/...`) and a Host header.
                    if let Some(pq) = req.uri().path_and_query().cloned() {
                        *req.uri_mut() = Uri::from(pq);
                    }
                    req.headers_mut().insert(header::HOST, self.host.clone());
                    tx.try_send_request(req).await.map(|resp| {
                        let mut home = Some(Home {
                            pool: self.clone(),
                            tx,
                        });
                        // Nothing to read (a 204, an empty body): reusable right away.
                        if resp.body().is_end_stream() {
                            Home::back(&mut home);
                        }
                        resp.map(|inner| Body {
                            inner,
                            home,
                            slot: None,
                        })
                    })
                }
            };
            match result {
                Ok(resp) => return Ok(resp),
                Err(_) if self.closed.load(Ordering::Acquire) => {
                    return Err(UpstreamError::Closed { sent: true });
                }
                Err(mut e) => match e.take_message() {
                    // An idle connection that closed before it took any of the request (the
                    // server's keep-alive ran out): the request goes once more, on another
                    // connection (the next checkout drops a closed one from the pool). A fresh
                    // connection that fails so is a real failure.
                    Some(back) if reused => req = self.absolute(back),
                    _ => return Err(UpstreamError::Broken(error_chain(&e.into_error()))),
                },
            }
        }
    }

    /// An idle sender ready for a request, or a new connection. `true` if reused.
    async fn checkout(self: &Arc<Self>) -> Result<(Sender, bool), UpstreamError> {
        loop {
            match self.take_idle() {
                // An HTTP/1.1 sender goes back as soon as its body ends, which can be before
                // its connection task has finished the response: wait for that (or for the
                // news that the connection closed, and try the next).
                Some(Sender::H1(mut tx)) => {
                    if tx.ready().await.is_ok() {
                        return Ok((Sender::H1(tx), true));
                    }
                }
                Some(h2 @ Sender::H2(..)) => return Ok((h2, true)),
                // Boxed: the TLS and HTTP/2 handshakes make a large future, which would
                // otherwise size (and be copied with) every request's future.
                None => return Ok((Box::pin(self.connect()).await?, false)),
            }
        }
    }

    /// The idle connections. A panic while the lock was held cannot leave them inconsistent
    /// (each change is one push, pop or retain), so a poisoned lock is used as is.
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.lock_idle();
        if !idle.h2.is_empty() {
            idle.h2.retain(|c| !c.tx.is_closed());
            let max = self.h2.max_streams;
            if let Some(c) = idle
                .h2
                .iter_mut()
                .find(|c| c.streams.load(Ordering::Relaxed) < max)
            {
                c.used = Instant::now();
                return Some(Sender::H2(c.tx.clone(), Slot::take(&c.streams)));
            }
            // Every HTTP/2 connection is full: the caller opens another.
            if !idle.h2.is_empty() {
                return None;
            }
        }
        while let Some((tx, since)) = idle.h1.pop() {
            if !tx.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(Sender::H1(tx));
            }
        }
        None
    }

    /// A request handed back unsent, as [`Pool::send`] takes it: absolute URI, no `Host`
    /// (the next connection may be HTTP/2).
    fn absolute(&self, mut req: Request<ReqBody>) -> Request<ReqBody> {
        if req.uri().authority().is_none() {
            let mut parts = self.origin.clone().into_parts();
            parts.path_and_query = req.uri().path_and_query().cloned();
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
            req.headers_mut().remove(header::HOST);
        }
        req
    }

    fn checkin(&self, tx: http1::SendRequest<ReqBody>) {
        if tx.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock_idle();
        // Connections unused for the idle timeout are closed (dropping the sender ends its
        // connection task); they sit at the front.
        let stale = idle
            .h1
            .iter()
            .position(|(_, since)| now.duration_since(*since) < self.idle_timeout)
            .unwrap_or(idle.h1.len());
        idle.h1.drain(..stale);
        if idle.h1.len() < MAX_IDLE {
            idle.h1.push((tx, now));
        }
    }

    /// Drops idle connections past the idle timeout, and closed ones.
    fn prune(&self) {
        let now = Instant::now();
        let mut idle = self.lock_idle();
        idle.h1.retain(|(tx, since)| {
            !tx.is_closed() && now.duration_since(*since) < self.idle_timeout
        });
        // The first HTTP/2 connection is kept open (Poe's own keep-alive closes it); the
        // others, opened for a burst, close once no stream is open on them and no request
        // has taken one for the idle timeout.
        let mut first = true;
        idle.h2.retain(|c| {
            let keep = !c.tx.is_closed()
                && (first
                    || c.streams.load(Ordering::Relaxed) > 0
                    || now.duration_since(c.used) < self.idle_timeout);
            first &= !keep;
            keep
        });
    }

    /// Starts (once) a task on this runtime that prunes the pool every half idle timeout, so
    /// connections left over from a burst are closed even if no request comes back to do it.
    /// It holds the pool weakly and ends with it.
    fn start_reaping(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<Pool> = Arc::downgrade(self);
        let every = (self.idle_timeout / 2).max(Duration::from_millis(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match pool.upgrade() {
                    Some(pool) => pool.prune(),
                    None => return,
                }
            }
        });
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub(super) fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Opens a connection (TCP, TLS with ALPN), within the connect timeout, and starts its
    /// task on this thread's runtime.
    async fn connect(self: &Arc<Self>) -> Result<Sender, UpstreamError> {
        let limit = self.connect_timeout;
        tokio::time::timeout(limit, self.open())
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Connect(format!(
                    "no connection within {}s (timeouts.connect)",
                    limit.as_secs_f64()
                )))
            })
    }

    async fn open(self: &Arc<Self>) -> Result<Sender, UpstreamError> {
        self.start_reaping();
        let connect_error = |e: &dyn std::error::Error| UpstreamError::Connect(error_chain(e));
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| connect_error(&*e))?;
        let io = connector
            .call(self.origin.clone())
            .await
            .map_err(|e| connect_error(&*e))?;
        if io.connected().is_negotiated_h2() {
            // PINGs only while a request is open: an idle connection is left to TCP's own
            // keep-alive, since some servers close connections that ping with nothing open.
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(self.h2.connection_window())
                .keep_alive_interval(self.h2.keepalive_interval)
                .keep_alive_timeout(self.h2.keepalive_timeout)
                .keep_alive_while_idle(false)
                .handshake(io)
                .await
                .map_err(|e| connect_error(&e))?;
            self.drive(conn, "HTTP/2");
            let streams = Arc::new(AtomicUsize::new(0));
            let slot = Slot::take(&streams);
            self.lock_idle().h2.push(H2Conn {
                tx: tx.clone(),
                streams,
                used: Instant::now(),
            });
            Ok(Sender::H2(tx, slot))
        } else {
            let (tx, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| connect_error(&e))?;
            self.drive(conn, "HTTP/1.1");
            Ok(Sender::H1(tx))
        }
    }
}

pin_project_lite::pin_project! {
    /// Runs an upstream connection to its end. A plain future, not an `async` block: a block
    /// that awaits a captured connection keeps it twice in its task, once captured and once
    /// awaited (1.7 KB each for an HTTP/1.1 connection, on every held stream).
    struct Drive<F> {
        #[pin]
        conn: F,
        proto: &'static str,
    }
}

impl<F: Future<Output = hyper::Result<()>>> Future for Drive<F> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Err(e) = ready!(this.conn.poll(cx)) {
            tracing::debug!(error = %e, protocol = *this.proto, "upstream connection ended");
        }
        Poll::Ready(())
    }
}

/// An HTTP/1.1 connection on loan to a response body.
struct Home {
    pool: Arc<Pool>,
    tx: http1::SendRequest<ReqBody>,
}

impl Home {
    fn back(home: &mut Option<Home>) {
        if let Some(h) = home.take() {
            h.pool.checkin(h.tx);
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body. Read to its end, it returns its HTTP/1.1 connection to the
    /// pool; dropped before that, the connection is closed (the rest of the response would
    /// still be on the wire). Over HTTP/2 it holds its stream's slot until then.
    pub struct Body {
        #[pin]
        inner: Incoming,
        home: Option<Home>,
        slot: Option<Slot>,
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            // Readers may stop at the last frame once `is_end_stream` says so.
            None => {
                Home::back(this.home);
                *this.slot = None;
            }
            Some(Ok(_)) if this.inner.is_end_stream() => {
                Home::back(this.home);
                *this.slot = None;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) => {
                *this.home = None;
                *this.slot = None;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::*;

    /// A self-signed certificate for `localhost`, for tests only.
    const CERT: &str = include_str!("../../tests/data/localhost.cert.pem");
    const KEY: &str = include_str!("../../tests/data/localhost.key.pem");

    /// A TLS server offering HTTP/2 and HTTP/1.1 by ALPN that answers each request with its
    /// version; returns its port and a count of the connections it accepted.
    async fn tls_upstream() -> (u16, Arc<AtomicUsize>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(KEY.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let text = format!("{:?} {}", req.version(), req.uri().path());
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            text,
                        ))))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (port, accepted)
    }

    fn pool_trusting_the_test_certificate(port: u16) -> Arc<Pool> {
        tls_pool(port, Duration::from_secs(90), 100)
    }

    fn tls_pool(port: u16, idle_timeout: Duration, max_streams: usize) -> Arc<Pool> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap())
            .unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let origin = format!("https://localhost:{port}/").parse().unwrap();
        let h2 = H2Settings {
            max_streams,
            ..H2Settings::from(&UpstreamPolicy::default())
        };
        Arc::new(Pool::new(https, origin, idle_timeout, h2).unwrap())
    }

    /// Connections left idle past the idle timeout are closed by the pool's own task, with no
    /// request coming to notice.
    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout_without_traffic() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let count = open.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let count = count.clone();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .unwrap()
            .https_or_http()
            .enable_http1()
            .wrap_connector(HttpConnector::new());
        let origin: Uri = format!("http://{addr}/").parse().unwrap();
        let pool = Arc::new(
            Pool::new(
                https,
                origin,
                Duration::from_millis(100),
                H2Settings::from(&UpstreamPolicy::default()),
            )
            .unwrap(),
        );
        let resp = pool
            .send(
                Request::get(format!("http://{addr}/v1/models"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
        assert_eq!(pool.idle.lock().unwrap().h1.len(), 1, "kept for reuse");
        assert_eq!(open.load(Ordering::SeqCst), 1);
        for _ in 0..100 {
            if open.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pool.idle.lock().unwrap().h1.len(), 0);
        assert_eq!(
            open.load(Ordering::SeqCst),
            0,
            "the idle connection was closed"
        );
    }

    /// Poe's path: TLS, where ALPN picks HTTP/2, and then one connection carries every
    /// request, one after another and many at once.
    #[tokio::test]
    async fn over_tls_alpn_picks_http2_and_one_connection_carries_every_request() {
        let (port, accepted) = tls_upstream().await;
        let pool = pool_trusting_the_test_certificate(port);
        let request = move || {
            Request::post(format!("https://localhost:{port}/v1/chat/completions"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap()
        };
        let answer = |resp: Response<Body>| async move {
            assert_eq!(resp.version(), http::Version::HTTP_2);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"HTTP/2.0 /v1/chat/completions");
        };
        for _ in 0..3 {
            answer(pool.send(request()).await.unwrap()).await;
        }
        let mut many = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let pool = pool.clone();
            many.spawn(async move { pool.send(request()).await.unwrap() });
        }
        while let Some(resp) = many.join_next().await {
            answer(resp.unwrap()).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// A full HTTP/2 connection makes the next request open another; once their streams end
    /// and they sit unused for the idle timeout, the extra connections close and the first
    /// stays.
    #[tokio::test]
    async fn full_http2_connections_open_more_and_the_extra_ones_close_when_idle() {
        let (port, accepted) = tls_upstream().await;
        let pool = tls_pool(port, Duration::from_millis(100), 1);
        let request = || {
            Request::post(format!("https://localhost:{port}/v1/chat/completions"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap()
        };
        let mut bodies = Vec::new();
        for _ in 0..3 {
            let resp = pool.send(request()).await.unwrap();
            assert_eq!(resp.version(), http::Version::HTTP_2);
            // Unread, each body keeps its stream: the connection stays full.
            bodies.push(resp.into_body());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle.lock().unwrap().h2.len(), 3);
        drop(bodies);
        for _ in 0..100 {
            if pool.idle.lock().unwrap().h2.len() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pool.idle.lock().unwrap().h2.len(), 1, "the first one stays");
        // The one left carries the next request, without a new connection.
        let resp = pool.send(request()).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }
}
