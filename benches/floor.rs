//! The floor: a reverse proxy made only of the hyper pieces the gateway is built on, for
//! `benches/run.sh` to measure beside nginx and the gateway (the `hyper` rows).
//!
//! Issue 8 asks the gateway for 0.8 × nginx's throughput. This proxy does nothing a gateway
//! does (no parse, no auth, no cache, no ledger, no tap) and is laid out the way the gateway is
//! at its cheapest: one single-threaded runtime and accept loop per thread on a shared socket,
//! each new connection served by the thread with the fewest open (the gateway's
//! `http::balance`), hyper-util's auto server with the gateway's HTTP/1.1 settings, the
//! request body read whole (the gateway must read it to parse it), and per thread a stack of idle
//! `hyper::client::conn::http1` senders, a connection going back when its response body ends.
//! What it reaches is the most any gateway on these crates can reach on this machine: the gap
//! between it and nginx is hyper's, the gap between it and the gateway is ours.
//!
//!   floor --listen 127.0.0.1:0 --upstream 127.0.0.1:PORT [--threads N]
//!
//! Prints `floor listening on http://ADDR` once it accepts. Loopback only; it exits by itself
//! after `--max-secs`.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use poe_gateway::http::balance::{self, Accepted, Lane};
use poe_gateway::metrics::Metrics;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

type Sender = http1::SendRequest<Full<Bytes>>;

thread_local! {
    /// This serving thread's idle upstream connections, warmest last. Each thread runs one
    /// single-threaded runtime, so a thread-local needs no lock.
    static IDLE: RefCell<Vec<Sender>> = const { RefCell::new(Vec::new()) };
}

struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    threads: usize,
    max_secs: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let mut upstream = None;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut max_secs = 7200;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--upstream" => {
                upstream = Some(
                    value()?
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("--upstream: {e}"))?,
                )
            }
            "--threads" => threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--max-secs" => max_secs = value()?.parse().map_err(|e| format!("--max-secs: {e}"))?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let upstream = upstream.ok_or("--upstream HOST:PORT is required")?;
    if !listen.ip().is_loopback() || !upstream.ip().is_loopback() {
        return Err("the floor proxy listens on and proxies to loopback only".into());
    }
    Ok(Args {
        listen,
        upstream,
        threads: threads.max(1),
        max_secs,
    })
}

fn main() -> ExitCode {
    // `cargo bench` runs harness = false targets with `--bench`: print the usage, do nothing.
    if std::env::args()
        .nth(1)
        .is_none_or(|a| a.starts_with("--bench"))
    {
        println!(
            "benches/floor.rs: started by `bash benches/run.sh compare`; nothing to do under `cargo bench`."
        );
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let listener = std::net::TcpListener::bind(args.listen).map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    println!(
        "floor listening on http://{}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let host = HeaderValue::from_str(&args.upstream.to_string()).map_err(|e| e.to_string())?;
    let metrics = Metrics::new();
    let slots = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
    let mut threads = Vec::new();
    for (i, lane) in balance::lanes(args.threads, &metrics)
        .into_iter()
        .enumerate()
    {
        let listener = listener.try_clone().map_err(|e| e.to_string())?;
        let slots = slots.clone();
        let (upstream, host) = (args.upstream, host.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let thread = std::thread::Builder::new()
            .name(format!("floor-{i}"))
            .spawn(move || runtime.block_on(accept_loop(listener, lane, slots, upstream, host)))
            .map_err(|e| e.to_string())?;
        threads.push(thread);
    }
    std::thread::sleep(Duration::from_secs(args.max_secs));
    eprintln!("floor: --max-secs reached; exiting");
    Ok(())
}

async fn accept_loop(
    listener: std::net::TcpListener,
    mut lane: Lane,
    slots: Arc<Semaphore>,
    upstream: SocketAddr,
    host: HeaderValue,
) {
    let listener = TcpListener::from_std(listener).expect("register the listener");
    // The gateway's trick, for the same reason: an earlier timer deadline kept registered
    // spares each request's header-read timer a wake-up of the runtime's driver.
    tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(8 * 1024)
        .keep_alive(true);
    loop {
        let Ok(Accepted {
            stream, slot, seat, ..
        }) = lane.next(&listener, &slots).await
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let host = host.clone();
        let service = hyper::service::service_fn(move |req| {
            let host = host.clone();
            Box::pin(async move { Ok::<_, Infallible>(proxy(req, upstream, host).await) })
        });
        let conn = Box::pin(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            let _ = conn.await;
            drop((slot, seat));
        });
    }
}

type ProxyBody = Either<Back, Full<Bytes>>;

async fn proxy(
    req: Request<Incoming>,
    upstream: SocketAddr,
    host: HeaderValue,
) -> Response<ProxyBody> {
    let (mut head, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|c| c.to_bytes()) else {
        return fail(StatusCode::BAD_REQUEST);
    };
    if let Some(pq) = head.uri.path_and_query().cloned() {
        head.uri = Uri::from(pq);
    }
    head.headers.insert(header::HOST, host);
    let mut req = Request::from_parts(head, Full::new(body));
    loop {
        let Some((mut tx, reused)) = checkout(upstream).await else {
            return fail(StatusCode::BAD_GATEWAY);
        };
        match tx.try_send_request(req).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let mut back = Back {
                    body: Some(body),
                    tx: Some(tx),
                };
                // Nothing to read (an empty body): reusable right away.
                if back.is_end_stream() {
                    back.home();
                }
                return Response::from_parts(parts, Either::Left(back));
            }
            // A kept connection the upstream closed before taking the request: once more.
            Err(mut e) => match e.take_message() {
                Some(again) if reused => req = again,
                _ => return fail(StatusCode::BAD_GATEWAY),
            },
        }
    }
}

fn fail(status: StatusCode) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    *resp.status_mut() = status;
    resp
}

/// An idle sender ready for a request, or a new connection; `true` if reused.
async fn checkout(upstream: SocketAddr) -> Option<(Sender, bool)> {
    while let Some(mut tx) = IDLE.with(|idle| idle.borrow_mut().pop()) {
        if tx.ready().await.is_ok() {
            return Some((tx, true));
        }
    }
    let stream = TcpStream::connect(upstream).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (tx, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some((tx, false))
}

/// The upstream response body; its connection goes back to the thread's stack at the end.
struct Back {
    body: Option<Incoming>,
    tx: Option<Sender>,
}

impl Back {
    fn home(&mut self) {
        if let Some(tx) = self.tx.take() {
            IDLE.with(|idle| idle.borrow_mut().push(tx));
        }
    }
}

impl Body for Back {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.home(),
            Poll::Ready(Some(Ok(_))) if this.body.as_ref().is_some_and(|b| b.is_end_stream()) => {
                this.home()
            }
            // A broken body: its connection is not reused (dropping the sender closes it).
            Poll::Ready(Some(Err(_))) => this.tx = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint())
    }
}
