//! Load generator, slow SSE upstream and memory probe for the gateway benchmarks (issue 8).
//!
//! Driven by `benches/run.sh`; see `benches/README.md`. `cargo bench` on its own only prints
//! the usage: nothing here sends traffic unless a subcommand asks for it.
//!
//! Subcommands:
//! - `compare`: direct / nginx / gateway, JSON and SSE, serial latency at 1 connection and
//!   throughput at N connections, over several interleaved rounds; prints a table and ratios.
//! - `slow-upstream`: a Poe-shaped SSE upstream that sends one event and then holds the
//!   stream open (model `"hold"`), or drips events with gaps (any other model).
//! - `hold`: opens many concurrent SSE streams (HTTP/1.1, one connection each, or h2c
//!   multiplexed), checks that every one is held, and reads the gateway's RSS.
//! - `soak`: moderate paced load against several targets while sampling RSS.
//! - `ports`: prints free loopback ports.
//!
//! Every target must be a loopback address, and every loop is bounded by a duration and a
//! request count.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpSocket, TcpStream};

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Parser)]
#[command(
    name = "load",
    about = "poe-gateway load and memory benchmarks (run benches/run.sh)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compare targets: `--target KIND:LABEL=URL`, KIND one of json, sse, drip.
    Compare(CompareArgs),
    /// A slow SSE upstream: one event then hold (model "hold"), or a drip of events.
    SlowUpstream(SlowArgs),
    /// Open and hold many SSE streams; measure the gateway's RSS.
    Hold(HoldArgs),
    /// Paced load on several targets while sampling RSS.
    Soak(SoakArgs),
    /// Print N free loopback TCP ports.
    Ports { n: usize },
}

#[derive(clap::Args)]
struct CompareArgs {
    /// KIND:LABEL=URL; labels `direct`, `nginx`, `gateway` get ratios; `gateway-info`,
    /// `gateway-keys` and `gateway-base` are compared with `gateway`.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    #[arg(long)]
    body_json: String,
    #[arg(long)]
    body_sse: String,
    /// Request body for `drip` targets (its model is not "hold").
    #[arg(long)]
    body_drip: Option<String>,
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// Seconds measured per run (each round has one serial and one concurrent run per target).
    #[arg(long, default_value_t = 4.0)]
    duration: f64,
    /// Seconds of unmeasured warm-up before each run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Upper bound on requests per run.
    #[arg(long, default_value_t = 2_000_000)]
    max_requests: u64,
    /// Also write the markdown table here.
    #[arg(long)]
    markdown_out: Option<String>,
    /// Only the serial (1 connection) runs.
    #[arg(long)]
    serial_only: bool,
    /// Skip the serial runs (a profile of the concurrent load only).
    #[arg(long)]
    no_serial: bool,
    /// Pids (comma-separated) of every server process on the measured paths. When given, each
    /// serial run is done twice: once with those processes and this tool pinned to one CPU
    /// (cross-CPU wake-ups on a VM cost tens of µs and make serial latency bimodal), once not.
    #[arg(long)]
    pin_pids: Option<String>,
    #[arg(long, default_value_t = 0)]
    pin_cpu: usize,
    /// The bearer token every request carries: a gateway key for a gateway in
    /// `auth.mode = "keys"`, so the key's look-up and limits are on the measured path.
    #[arg(long, default_value = BENCH_TOKEN)]
    bearer: String,
    /// Every request opens a connection of its own and closes it after the response, as
    /// curl in a loop or a client without a pool does. Latency then includes the connect.
    #[arg(long)]
    new_conn: bool,
}

/// What requests carry when no gateway key is asked for: open-mode gateways ignore it.
const BENCH_TOKEN: &str = "bench-not-a-key";

#[derive(clap::Args)]
struct SlowArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// How long a held stream stays open before it is finished with [DONE].
    #[arg(long, default_value_t = 240)]
    hold_secs: u64,
    /// Events in a drip response (the last one carries usage), then [DONE].
    #[arg(long, default_value_t = 10)]
    drip_events: u32,
    /// Gap between drip events.
    #[arg(long, default_value_t = 2)]
    drip_gap_ms: u64,
    /// The process exits by itself after this long.
    #[arg(long, default_value_t = 3600)]
    max_secs: u64,
    /// Serve TLS with this certificate (PEM), HTTP/2 and HTTP/1.1 by ALPN, as Poe does.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<String>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<String>,
    /// Concurrent streams allowed per HTTP/2 connection (with --tls-cert).
    #[arg(long, default_value_t = 100)]
    h2_max_streams: u32,
}

// `slow-upstream --tls-cert` serves TLS the way the tests' upstream does.
#[path = "../tests/support/tls.rs"]
mod tls;

#[derive(clap::Args)]
struct HoldArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    body: String,
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// Multiplex the streams over h2c connections instead of one HTTP/1.1 connection each.
    #[arg(long)]
    h2: bool,
    /// Streams per h2c connection (hyper's server allows 200).
    #[arg(long, default_value_t = 100)]
    per_conn: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 128)]
    connect_parallel: usize,
    /// The pid(s) of the process holding the streams (comma-separated: RSS and open files
    /// are summed, e.g. over nginx workers). The first one is checked for --fit-fd-limit.
    #[arg(long)]
    pid: String,
    /// Name of what holds the streams, for the report.
    #[arg(long, default_value = "gateway")]
    name: String,
    /// HTTP/1.1 only: lower the count to what the gateway's open-file limit allows
    /// (each stream costs it two descriptors: client and upstream).
    #[arg(long)]
    fit_fd_limit: bool,
    /// RSS is also read when this many streams are held (for a slope).
    #[arg(long)]
    checkpoint: Option<usize>,
    /// How long all streams are held (and watched) before they are closed.
    #[arg(long, default_value_t = 5.0)]
    settle: f64,
    /// Give up if the streams are not all open by then.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
}

#[derive(clap::Args)]
struct SoakArgs {
    /// KIND:LABEL=URL (KIND json, sse, or drip-cancel: read the first event, then hang up).
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    #[arg(long)]
    body_json: String,
    #[arg(long)]
    body_sse: String,
    #[arg(long)]
    body_drip: Option<String>,
    /// LABEL=PID of a process whose RSS is sampled.
    #[arg(long = "pid", required = true)]
    pids: Vec<String>,
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Requests per second per target.
    #[arg(long, default_value_t = 300.0)]
    rate: f64,
    #[arg(long, default_value_t = 8)]
    conns: usize,
    #[arg(long, default_value_t = 5.0)]
    sample_secs: f64,
    /// Share of the run treated as warm-up (at least 60 s, or half of a shorter run).
    #[arg(long, default_value_t = 0.2)]
    warmup_frac: f64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` runs harness = false targets with `--bench`: print the usage, send nothing.
    if args.len() < 2 || args[1].starts_with("--bench") {
        println!(
            "benches/load.rs: run `bash benches/run.sh` (see benches/README.md); nothing to do under `cargo bench`."
        );
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Compare(a) => compare(a).await,
            Cmd::SlowUpstream(a) => slow_upstream(a).await,
            Cmd::Hold(a) => hold(a).await,
            Cmd::Soak(a) => soak(a).await,
            Cmd::Ports { n } => ports(n),
        }
    });
    // Held connections and the slow upstream's streams must not delay the exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Targets and requests

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Json,
    Sse,
    /// SSE from the slow upstream's drip (events with gaps): for time to first byte.
    Drip,
    /// Soak only: read the first event, then hang up (the client-went-away path).
    DripCancel,
}

impl Kind {
    fn parse(s: &str) -> Result<Kind, String> {
        match s {
            "json" => Ok(Kind::Json),
            "sse" => Ok(Kind::Sse),
            "drip" => Ok(Kind::Drip),
            "drip-cancel" => Ok(Kind::DripCancel),
            _ => Err(format!("unknown kind {s:?} (json, sse, drip, drip-cancel)")),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Json => "JSON",
            Kind::Sse => "SSE",
            Kind::Drip => "SSE drip",
            Kind::DripCancel => "SSE drip, cancel",
        }
    }
    fn sse(self) -> bool {
        self != Kind::Json
    }
}

#[derive(Clone, Debug)]
struct Target {
    addr: SocketAddr,
    /// Absolute URI (h2 needs scheme and authority).
    uri: Uri,
    /// Origin-form URI for HTTP/1.1.
    path: Uri,
    host: HeaderValue,
    authorization: HeaderValue,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{url}: only http:// targets"));
        }
        let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
        let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| format!("{url}: host must be a loopback IP address"))?
        };
        // Traffic from this tool never leaves the machine.
        if !ip.is_loopback() {
            return Err(format!("{url}: refusing a non-loopback target"));
        }
        let port = uri.port_u16().unwrap_or(80);
        let authority = uri.authority().expect("host checked").as_str().to_string();
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        Ok(Target {
            addr: SocketAddr::new(ip, port),
            path: pq.parse().map_err(|e| format!("{url}: {e}"))?,
            host: HeaderValue::from_str(&authority).map_err(|e| format!("{url}: {e}"))?,
            authorization: bearer(BENCH_TOKEN)?,
            uri,
        })
    }

    fn request(&self, body: &Bytes, h2: bool) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(body.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = if h2 {
            self.uri.clone()
        } else {
            self.path.clone()
        };
        let h = req.headers_mut();
        if !h2 {
            h.insert(header::HOST, self.host.clone());
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::AUTHORIZATION, self.authorization.clone());
        req
    }
}

fn bearer(token: &str) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "--bearer: not a valid header value".to_string())?;
    v.set_sensitive(true);
    Ok(v)
}

/// `KIND:LABEL=URL`
fn parse_spec(spec: &str) -> Result<(Kind, String, Target), String> {
    let (kind, rest) = spec
        .split_once(':')
        .ok_or_else(|| format!("target {spec:?}: want KIND:LABEL=URL"))?;
    let (label, url) = rest
        .split_once('=')
        .ok_or_else(|| format!("target {spec:?}: want KIND:LABEL=URL"))?;
    Ok((Kind::parse(kind)?, label.to_string(), Target::parse(url)?))
}

/// `__N__` in a request body is replaced by a number unique to each request, so a response
/// cache sees every request as new (a miss) while the bodies stay the same size class.
const UNIQUE_MARK: &[u8] = b"__N__";
/// Starts at the clock, not at 0: a warm-up run and the measured run that follows it are two
/// processes, and the second must not ask what the first already stored (those are hits).
static NEXT_ID: LazyLock<AtomicU64> = LazyLock::new(|| {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    AtomicU64::new(now.as_nanos() as u64)
});

struct BodyTemplate {
    whole: Bytes,
    split: Option<(Bytes, Bytes)>,
}

impl BodyTemplate {
    fn new(body: &Bytes) -> Self {
        let split = memchr::memmem::find(body, UNIQUE_MARK)
            .map(|at| (body.slice(..at), body.slice(at + UNIQUE_MARK.len()..)));
        BodyTemplate {
            whole: body.clone(),
            split,
        }
    }

    fn next(&self) -> Bytes {
        let Some((a, b)) = &self.split else {
            return self.whole.clone();
        };
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut v = Vec::with_capacity(a.len() + b.len() + 20);
        v.extend_from_slice(a);
        v.extend_from_slice(format!("{n:016x}").as_bytes());
        v.extend_from_slice(b);
        Bytes::from(v)
    }
}

fn read_body(path: &str) -> Result<Bytes, String> {
    std::fs::read(path)
        .map(Bytes::from)
        .map_err(|e| format!("cannot read {path}: {e}"))
}

type H1Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect_h1(addr: SocketAddr) -> Result<H1Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The last bytes of a body, to check how it ended without keeping it.
#[derive(Default)]
struct Tail {
    buf: [u8; 32],
    len: usize,
    total: usize,
}

impl Tail {
    fn push(&mut self, d: &[u8]) {
        self.total += d.len();
        const N: usize = 32;
        if d.len() >= N {
            self.buf.copy_from_slice(&d[d.len() - N..]);
            self.len = N;
        } else {
            let keep = (N - d.len()).min(self.len);
            self.buf.copy_within(self.len - keep..self.len, 0);
            self.buf[keep..keep + d.len()].copy_from_slice(d);
            self.len = keep + d.len();
        }
    }
    fn ends_well(&self, sse: bool) -> bool {
        let t = self.buf[..self.len].trim_ascii_end();
        if sse {
            t.ends_with(b"data: [DONE]")
        } else {
            t.ends_with(b"}")
        }
    }
}

struct Sample {
    latency: Duration,
    ttfb: Duration,
}

/// One request on a ready HTTP/1.1 connection. `Ok(false)` in the tuple: the connection
/// cannot be reused (the body was abandoned on purpose).
async fn one_request(
    sender: &mut H1Sender,
    req: Request<Full<Bytes>>,
    kind: Kind,
) -> Result<Sample, String> {
    let t0 = Instant::now();
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut ttfb = None;
    let mut tail = Tail::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        if let Some(d) = frame.data_ref() {
            if ttfb.is_none() {
                ttfb = Some(t0.elapsed());
                if kind == Kind::DripCancel && status == StatusCode::OK {
                    // Hang up mid-stream; the caller drops this connection.
                    return Ok(Sample {
                        latency: t0.elapsed(),
                        ttfb: ttfb.unwrap_or_default(),
                    });
                }
            }
            tail.push(d);
        }
    }
    let latency = t0.elapsed();
    if status != StatusCode::OK {
        return Err(format!("status {status}"));
    }
    if !tail.ends_well(kind.sse()) {
        return Err(format!(
            "body ended badly ({} bytes, tail {:?})",
            tail.total,
            String::from_utf8_lossy(&tail.buf[..tail.len])
        ));
    }
    Ok(Sample {
        latency,
        ttfb: ttfb.unwrap_or(latency),
    })
}

fn new_hist() -> Histogram<u64> {
    // Nanoseconds, 1 µs .. 120 s, 3 significant digits.
    Histogram::new_with_bounds(1_000, 120_000_000_000, 3).expect("histogram bounds")
}

struct RunResult {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
    secs: f64,
}

impl RunResult {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }
}

struct Plan {
    measure_from: Instant,
    end: Instant,
    max_requests: u64,
    issued: AtomicU64,
    /// Per-connection pacing interval, when the run is rate limited.
    interval: Option<Duration>,
    /// A connection per request (`compare --new-conn`).
    new_conn: bool,
}

/// `conns` keep-alive HTTP/1.1 connections (or `conns` clients that connect per request),
/// each sending requests back to back (or paced), until `warmup + duration` has passed or
/// `max_requests` have been issued.
#[allow(clippy::too_many_arguments)]
async fn run_load(
    target: &Target,
    body: &Bytes,
    kind: Kind,
    conns: usize,
    warmup: Duration,
    duration: Duration,
    max_requests: u64,
    rate: Option<f64>,
    new_conn: bool,
) -> RunResult {
    let start = Instant::now();
    let plan = Arc::new(Plan {
        measure_from: start + warmup,
        end: start + warmup + duration,
        max_requests,
        issued: AtomicU64::new(0),
        interval: rate.map(|r| Duration::from_secs_f64(conns as f64 / r)),
        new_conn,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..conns {
        let (plan, target, body) = (plan.clone(), target.clone(), body.clone());
        tasks.spawn(async move { conn_loop(i, conns, plan, target, body, kind).await });
    }
    let mut total = RunResult {
        ok: 0,
        errors: 0,
        first_error: None,
        latency: new_hist(),
        ttfb: new_hist(),
        secs: duration.as_secs_f64(),
    };
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("connection task panicked");
        total.ok += r.ok;
        total.errors += r.errors;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
        total.latency.add(&r.latency).expect("same bounds");
        total.ttfb.add(&r.ttfb).expect("same bounds");
    }
    total
}

async fn conn_loop(
    i: usize,
    conns: usize,
    plan: Arc<Plan>,
    target: Target,
    body: Bytes,
    kind: Kind,
) -> RunResult {
    let mut r = RunResult {
        ok: 0,
        errors: 0,
        first_error: None,
        latency: new_hist(),
        ttfb: new_hist(),
        secs: 0.0,
    };
    let mut sender: Option<H1Sender> = None;
    // Paced connections start spread over one interval.
    let mut next = plan
        .interval
        .map(|iv| tokio::time::Instant::now() + iv.mul_f64(i as f64 / conns as f64));
    let request_timeout = Duration::from_secs(30);
    let template = BodyTemplate::new(&body);
    fn fail(r: &mut RunResult, e: String) {
        r.errors += 1;
        if r.first_error.is_none() {
            r.first_error = Some(e);
        }
    }
    loop {
        if let (Some(n), Some(iv)) = (next.as_mut(), plan.interval) {
            tokio::time::sleep_until(*n).await;
            *n += iv;
            // Behind schedule (a slow response): skip missed slots rather than burst.
            let now = tokio::time::Instant::now();
            if *n < now {
                *n = now + iv;
            }
        }
        if Instant::now() >= plan.end
            || plan.issued.fetch_add(1, Ordering::Relaxed) >= plan.max_requests
        {
            break;
        }
        let t_connect = Instant::now();
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            match connect_h1(target.addr).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    fail(&mut r, e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let s = sender.as_mut().expect("connected");
        if s.ready().await.is_err() {
            // The server closed an idle keep-alive connection: reconnect, not an error.
            sender = None;
            continue;
        }
        let t0 = Instant::now();
        let req = target.request(&template.next(), false);
        match tokio::time::timeout(request_timeout, one_request(s, req, kind)).await {
            Ok(Ok(sample)) => {
                // The connect counts too when every request pays for one.
                let connect = if plan.new_conn {
                    t0 - t_connect
                } else {
                    Duration::ZERO
                };
                if kind == Kind::DripCancel || plan.new_conn {
                    sender = None;
                }
                if t0 >= plan.measure_from && Instant::now() <= plan.end {
                    r.ok += 1;
                    let _ = r
                        .latency
                        .record((connect + sample.latency).as_nanos() as u64);
                    let _ = r.ttfb.record((connect + sample.ttfb).as_nanos() as u64);
                }
            }
            Ok(Err(e)) => {
                fail(&mut r, e);
                sender = None;
            }
            Err(_) => {
                fail(&mut r, "request timed out after 30s".into());
                sender = None;
            }
        }
    }
    r
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        f64::NAN
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

// ---------------------------------------------------------------------------------------------
// compare

struct Row {
    kind: Kind,
    label: String,
    target: Target,
    /// Serial runs with this tool and every server on one CPU.
    pinned: Vec<RunResult>,
    /// Serial runs as the scheduler likes.
    free: Vec<RunResult>,
    /// Runs at `--conns` connections.
    many: Vec<RunResult>,
}

struct Merged {
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
}

fn merge(runs: &[RunResult]) -> Merged {
    let mut m = Merged {
        latency: new_hist(),
        ttfb: new_hist(),
        ok: 0,
        errors: 0,
        first_error: None,
    };
    for r in runs {
        m.latency.add(&r.latency).expect("same bounds");
        m.ttfb.add(&r.ttfb).expect("same bounds");
        m.ok += r.ok;
        m.errors += r.errors;
        if m.first_error.is_none() {
            m.first_error = r.first_error.clone();
        }
    }
    m
}

fn median_rps(runs: &[RunResult]) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(RunResult::rps).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl Row {
    /// The serial runs the targets are judged on: pinned when there are any.
    fn serial(&self) -> &[RunResult] {
        if self.pinned.is_empty() {
            &self.free
        } else {
            &self.pinned
        }
    }
    fn p50(&self) -> f64 {
        us(&merge(self.serial()).latency, 0.5)
    }
}

/// Sets the CPU affinity of every thread of `pids` and of this process.
fn pin(pids: &[u32], cpus: &str) -> Result<(), String> {
    for pid in pids.iter().copied().chain([std::process::id()]) {
        let status = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("taskset: {e}"))?;
        if !status.success() {
            return Err(format!("taskset -a -p -c {cpus} {pid} failed"));
        }
    }
    Ok(())
}

fn fmt0(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "–".into()
    }
}

fn fmt1(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "–".into()
    }
}

async fn compare(a: CompareArgs) -> Result<(), String> {
    let bodies = [
        (Kind::Json, read_body(&a.body_json)?),
        (Kind::Sse, read_body(&a.body_sse)?),
        (
            Kind::Drip,
            match &a.body_drip {
                Some(p) => read_body(p)?,
                None => Bytes::new(),
            },
        ),
    ];
    let body_of = |k: Kind| {
        bodies
            .iter()
            .find(|(kk, _)| *kk == k)
            .map(|(_, b)| b.clone())
            .unwrap_or_default()
    };
    let mut rows = Vec::new();
    let authorization = bearer(&a.bearer)?;
    for spec in &a.targets {
        let (kind, label, mut target) = parse_spec(spec)?;
        target.authorization = authorization.clone();
        if kind == Kind::DripCancel {
            return Err("drip-cancel is for soak only".into());
        }
        if kind == Kind::Drip && a.body_drip.is_none() {
            return Err("drip targets need --body-drip".into());
        }
        rows.push(Row {
            kind,
            label,
            target,
            pinned: Vec::new(),
            free: Vec::new(),
            many: Vec::new(),
        });
    }
    let pin_pids: Vec<u32> = a
        .pin_pids
        .as_deref()
        .unwrap_or("")
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("--pin-pids: bad pid {s:?}")))
        .collect::<Result<_, _>>()?;
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let all_cpus = format!("0-{}", ncpu - 1);
    let pin_cpu = a.pin_cpu.to_string();
    let warmup = Duration::from_secs_f64(a.warmup);
    let duration = Duration::from_secs_f64(a.duration);
    eprintln!(
        "compare: {} targets x {} rounds, {:.1}s warm-up + {:.1}s per run; serial{}, then {} connections",
        rows.len(),
        a.rounds,
        a.warmup,
        a.duration,
        if pin_pids.is_empty() {
            "".to_string()
        } else {
            format!(" pinned to CPU {pin_cpu} and unpinned")
        },
        a.conns
    );
    let line = |round: usize, row: &Row, what: &str, r: &RunResult| {
        eprintln!(
            "  round {round} {:<9} {:<13} {:<13}: {:>7.0} req/s  p50 {:>8.1} us  p99 {:>8.1} us  ttfb p50 {:>8.1} us  errors {}",
            row.kind.name(),
            row.label,
            what,
            r.rps(),
            us(&r.latency, 0.5),
            us(&r.latency, 0.99),
            us(&r.ttfb, 0.5),
            r.errors
        );
    };
    let result: Result<(), String> = async {
        for round in 1..=a.rounds {
            for row in rows.iter_mut() {
                let body = body_of(row.kind);
                if !a.no_serial {
                    // Serial: pinned to one CPU first (when pids are given), then free.
                    for pinned in [true, false] {
                        if pinned && pin_pids.is_empty() {
                            continue;
                        }
                        if pinned {
                            pin(&pin_pids, &pin_cpu)?;
                        }
                        let s = run_load(
                            &row.target,
                            &body,
                            row.kind,
                            1,
                            warmup,
                            duration,
                            a.max_requests,
                            None,
                            a.new_conn,
                        )
                        .await;
                        if pinned {
                            pin(&pin_pids, &all_cpus)?;
                            line(round, row, "1 conn pinned", &s);
                            row.pinned.push(s);
                        } else {
                            line(round, row, "1 conn", &s);
                            row.free.push(s);
                        }
                    }
                }
                // Drip responses take milliseconds by design: only their latency matters.
                if row.kind != Kind::Drip && !a.serial_only {
                    let m = run_load(
                        &row.target,
                        &body,
                        row.kind,
                        a.conns,
                        warmup,
                        duration,
                        a.max_requests,
                        None,
                        a.new_conn,
                    )
                    .await;
                    line(round, row, &format!("{} conns", a.conns), &m);
                    row.many.push(m);
                }
            }
        }
        Ok(())
    }
    .await;
    if !pin_pids.is_empty() {
        let _ = pin(&pin_pids, &all_cpus);
    }
    result?;

    let mut md = String::new();
    let c = a.conns;
    let pinned = !pin_pids.is_empty();
    if pinned {
        md.push_str(&format!(
            "| payload | path | req/s @{c} (median) | req/s @{c} (min..max) | p50 @1 (µs) | p99 @1 (µs) | TTFB p50 @1 (µs) | TTFB p99 @1 (µs) | p50 @1 unpinned (µs) | p99 @1 unpinned (µs) | p50 @{c} (µs) | p99 @{c} (µs) | requests | errors |\n"
        ));
        md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    } else {
        md.push_str(&format!(
            "| payload | path | req/s @{c} (median) | req/s @{c} (min..max) | p50 @1 (µs) | p99 @1 (µs) | TTFB p50 @1 (µs) | TTFB p99 @1 (µs) | p50 @{c} (µs) | p99 @{c} (µs) | requests | errors |\n"
        ));
        md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    }
    let mut total_errors = 0;
    for row in &rows {
        let serial = merge(row.serial());
        let free = merge(&row.free);
        let many = merge(&row.many);
        let all = merge(&row.pinned);
        let errors = free.errors + many.errors + all.errors;
        let ok = free.ok + many.ok + all.ok;
        total_errors += errors;
        let range = if row.many.is_empty() {
            "–".to_string()
        } else {
            let v: Vec<f64> = row.many.iter().map(RunResult::rps).collect();
            format!(
                "{:.0}..{:.0}",
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
            )
        };
        let mut cells = vec![
            row.kind.name().to_string(),
            row.label.clone(),
            fmt0(median_rps(&row.many)),
            range,
            fmt1(us(&serial.latency, 0.5)),
            fmt1(us(&serial.latency, 0.99)),
            fmt1(us(&serial.ttfb, 0.5)),
            fmt1(us(&serial.ttfb, 0.99)),
        ];
        if pinned {
            cells.push(fmt1(us(&free.latency, 0.5)));
            cells.push(fmt1(us(&free.latency, 0.99)));
        }
        cells.push(fmt1(us(&many.latency, 0.5)));
        cells.push(fmt1(us(&many.latency, 0.99)));
        cells.push(ok.to_string());
        cells.push(errors.to_string());
        md.push_str(&format!("| {} |\n", cells.join(" | ")));
        if let Some(e) = all.first_error.or(free.first_error).or(many.first_error) {
            eprintln!("  first error for {} {}: {e}", row.kind.name(), row.label);
        }
    }

    let mut ratio_lines = String::new();
    let find = |k: Kind, l: &str| rows.iter().find(|r| r.kind == k && r.label == l);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    for k in [Kind::Json, Kind::Sse, Kind::Drip] {
        let (Some(n), Some(g)) = (find(k, "nginx"), find(k, "gateway")) else {
            continue;
        };
        let d = find(k, "direct");
        // A drip response lasts as long as the upstream drips: only its first byte tells
        // anything about the proxy, and it is not one of the issue's targets.
        let drip = k == Kind::Drip;
        let q = |runs: &[RunResult], quantile: f64| {
            let m = merge(runs);
            us(if drip { &m.ttfb } else { &m.latency }, quantile)
        };
        let rps = if n.many.is_empty() {
            "–".to_string()
        } else {
            let r = median_rps(&g.many) / median_rps(&n.many);
            format!("{r:.2} ({})", verdict(r >= 0.8))
        };
        let p50 = q(g.serial(), 0.5) / q(n.serial(), 0.5);
        let added = |row: &Row| match d {
            Some(d) => format!("{:+.1} µs", q(row.serial(), 0.5) - q(d.serial(), 0.5)),
            None => "–".into(),
        };
        let free = if pinned {
            format!(" {:.2} |", q(&g.free, 0.5) / q(&n.free, 0.5))
        } else {
            String::new()
        };
        ratio_lines.push_str(&format!(
            "| {} | {} | {:.2} ({}) | {:.2} |{} {} | {} |\n",
            if drip { "SSE drip: TTFB" } else { k.name() },
            rps,
            p50,
            if drip {
                "not a target"
            } else {
                verdict(p50 <= 1.3)
            },
            q(g.serial(), 0.99) / q(n.serial(), 0.99),
            free,
            added(n),
            added(g)
        ));
    }
    if !ratio_lines.is_empty() {
        md.push('\n');
        md.push_str(&format!(
            "| payload | gateway/nginx req/s @{c} (target ≥ 0.8) | gateway/nginx p50 @1 (target ≤ 1.3) | gateway/nginx p99 @1 |{} added p50 over direct: nginx | added p50 over direct: gateway |\n",
            if pinned { " gateway/nginx p50 @1 unpinned |" } else { "" }
        ));
        md.push_str(if pinned {
            "|---|---:|---:|---:|---:|---:|---:|\n"
        } else {
            "|---|---:|---:|---:|---:|---:|\n"
        });
        md.push_str(&ratio_lines);
    }
    let ratio = |a: Option<&Row>, b: Option<&Row>| match (a, b) {
        (Some(a), Some(b)) => (
            format!("{:.2}", median_rps(&a.many) / median_rps(&b.many)),
            format!("{:.2}", a.p50() / b.p50()),
        ),
        _ => ("–".to_string(), "–".to_string()),
    };
    // The floor (benches/floor.rs, label "hyper"): what bare hyper reaches against nginx, and
    // what the gateway's own work costs against bare hyper.
    let mut floor_lines = String::new();
    for k in [Kind::Json, Kind::Sse] {
        let h = find(k, "hyper");
        if h.is_none() {
            continue;
        }
        let (hn_rps, hn_p50) = ratio(h, find(k, "nginx"));
        let (gh_rps, gh_p50) = ratio(find(k, "gateway"), h);
        floor_lines.push_str(&format!(
            "| {} | {hn_rps} | {hn_p50} | {gh_rps} | {gh_p50} |\n",
            k.name()
        ));
    }
    if !floor_lines.is_empty() {
        md.push_str(&format!(
            "\n| payload | hyper/nginx req/s @{c} | hyper/nginx p50 @1 | gateway/hyper req/s @{c} | gateway/hyper p50 @1 |\n|---|---:|---:|---:|---:|\n"
        ));
        md.push_str(&floor_lines);
    }
    // What a feature costs: the access log (RUST_LOG=info against warn), gateway keys (a key's
    // look-up, rate limit and budget against open mode), and whatever an older build
    // ("gateway-base") did not have.
    let mut cost_lines = String::new();
    for k in [Kind::Json, Kind::Sse] {
        let g = find(k, "gateway");
        let (info, keys, base) = (
            find(k, "gateway-info"),
            find(k, "gateway-keys"),
            find(k, "gateway-base"),
        );
        if g.is_some() && (info.is_some() || keys.is_some() || base.is_some()) {
            let (info_rps, info_p50) = ratio(info, g);
            let (keys_rps, keys_p50) = ratio(keys, g);
            let (base_rps, base_p50) = ratio(g, base);
            cost_lines.push_str(&format!(
                "| {} | {info_rps} | {info_p50} | {keys_rps} | {keys_p50} | {base_rps} | {base_p50} |\n",
                k.name()
            ));
        }
    }
    if !cost_lines.is_empty() {
        md.push_str(&format!(
            "\n| payload | RUST_LOG=info / warn: req/s @{c} | RUST_LOG=info / warn: p50 @1 | keys / open: req/s @{c} | keys / open: p50 @1 | gateway / gateway-base: req/s @{c} | gateway / gateway-base: p50 @1 |\n|---|---:|---:|---:|---:|---:|---:|\n"
        ));
        md.push_str(&cost_lines);
    }
    println!("{md}");
    if let Some(p) = &a.markdown_out {
        std::fs::write(p, &md).map_err(|e| format!("{p}: {e}"))?;
    }
    if total_errors > 0 {
        return Err(format!("{total_errors} requests failed"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// slow upstream

const CHUNK_PREFIX: &str = r#"data: {"id":"chatcmpl-slow","object":"chat.completion.chunk","created":1767225600,"model":"bench","choices":[{"index":0,"delta":{"content":"tick "},"finish_reason":null}]}"#;
const CATALOGUE: &[u8] = br#"{"object":"list","data":[{"id":"hold","object":"model","created":1767225600,"owned_by":"bench","pricing":{"prompt":"0.000001","completion":"0.00001","request":"0"}},{"id":"drip","object":"model","created":1767225600,"owned_by":"bench","pricing":{"prompt":"0.000001","completion":"0.00001","request":"0"}}]}"#;
const CHUNK_LAST: &str = "data: {\"id\":\"chatcmpl-slow\",\"object\":\"chat.completion.chunk\",\"created\":1767225600,\"model\":\"bench\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":10,\"total_tokens\":19}}\n\n";

pin_project_lite::pin_project! {
    /// SSE body: `events` chunks `gap` apart (the first at once), then [DONE].
    struct SlowBody {
        sent: u32,
        events: u32,
        gap: Duration,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        done: bool,
        open: Arc<AtomicUsize>,
        counted: bool,
    }

    impl PinnedDrop for SlowBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if *this.counted {
                this.open.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Body for SlowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Some(sleep) = this.sleep.as_mut().as_pin_mut() {
            std::task::ready!(sleep.poll(cx));
            this.sleep.set(None);
        }
        let data = if *this.sent < *this.events {
            *this.sent += 1;
            if *this.sent == *this.events {
                Bytes::from_static(CHUNK_LAST.as_bytes())
            } else {
                Bytes::from(format!("{CHUNK_PREFIX}\n\n"))
            }
        } else {
            *this.done = true;
            Bytes::from_static(b"data: [DONE]\n\n")
        };
        if !*this.done {
            this.sleep.set(Some(tokio::time::sleep(*this.gap)));
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

async fn slow_upstream(a: SlowArgs) -> Result<(), String> {
    if !a.listen.ip().is_loopback() {
        return Err("slow-upstream listens on loopback only".into());
    }
    let socket = if a.listen.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    socket.set_reuseaddr(true).map_err(|e| e.to_string())?;
    socket
        .bind(a.listen)
        .map_err(|e| format!("bind {}: {e}", a.listen))?;
    let listener = socket.listen(8192).map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let acceptor = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(tls::acceptor(c, k)?),
        _ => None,
    };
    if acceptor.is_some() {
        // The certificate is for localhost.
        println!(
            "slow-upstream listening on https://localhost:{}",
            addr.port()
        );
    } else {
        println!("slow-upstream listening on http://{addr}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let open = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let hold = Duration::from_secs(a.hold_secs);
    let gap = Duration::from_millis(a.drip_gap_ms);
    let drip_events = a.drip_events.max(1);
    let deadline = tokio::time::sleep(Duration::from_secs(a.max_secs));
    tokio::pin!(deadline);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("slow-upstream: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut deadline => {
                eprintln!("slow-upstream: --max-secs reached; exiting");
                return Ok(());
            }
        };
        let _ = stream.set_nodelay(true);
        let (open, served) = (open.clone(), served.clone());
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (open, served) = (open.clone(), served.clone());
            async move {
                if req.uri().path() == "/v1/models" {
                    // A small Poe-shaped catalogue, so the gateway can price what it accounts.
                    let mut resp =
                        Response::new(Either::Right(Full::new(Bytes::from_static(CATALOGUE))));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    return Ok::<_, Infallible>(resp);
                }
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let hold_mode = memchr::memmem::find(&body, br#""model":"hold""#).is_some();
                let (events, gap) = if hold_mode {
                    (2, hold)
                } else {
                    (drip_events, gap)
                };
                open.fetch_add(1, Ordering::Relaxed);
                served.fetch_add(1, Ordering::Relaxed);
                let body = SlowBody {
                    sent: 0,
                    events,
                    gap,
                    sleep: None,
                    done: false,
                    open,
                    counted: true,
                };
                let mut resp = Response::new(Either::Left(body));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                resp.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                Ok::<_, Infallible>(resp)
            }
        });
        let (acceptor, h2_max_streams) = (acceptor.clone(), a.h2_max_streams);
        tokio::spawn(async move {
            match acceptor {
                None => {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                }
                Some(acceptor) => {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder.http2().max_concurrent_streams(h2_max_streams);
                    let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// memory: RSS and open files of another process

fn rss_kb(pid: u32) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("pid {pid}: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("pid {pid}: no VmRSS"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn fd_soft_limit(pid: u32) -> Option<usize> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// hold

#[derive(Default)]
struct HoldState {
    held: AtomicUsize,
    failed: AtomicUsize,
    /// Streams that ended or broke after they were held.
    dropped: AtomicUsize,
    first_error: std::sync::Mutex<Option<String>>,
}

impl HoldState {
    fn fail(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_error.lock().expect("lock");
        if f.is_none() {
            *f = Some(e);
        }
    }
}

/// Waits for the head and the first event, counts the stream as held, then keeps reading
/// (nothing more should come while it is held).
async fn hold_stream(resp: Result<Response<Incoming>, hyper::Error>, st: Arc<HoldState>) {
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return st.fail(format!("request: {e}")),
    };
    if resp.status() != StatusCode::OK {
        return st.fail(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut held = false;
    loop {
        match body.frame().await {
            Some(Ok(f)) => {
                if !held && f.is_data() {
                    held = true;
                    st.held.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(Err(e)) => {
                if held {
                    st.dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    st.fail(format!("body: {e}"));
                }
                return;
            }
            None => {
                if held {
                    st.dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    st.fail("stream ended before its first event".into());
                }
                return;
            }
        }
    }
}

async fn hold(a: HoldArgs) -> Result<(), String> {
    let target = Target::parse(&a.url)?;
    let body = read_body(&a.body)?;
    let pids: Vec<u32> = a
        .pid
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.trim()
                .parse()
                .map_err(|_| format!("--pid: bad pid {p:?}"))
        })
        .collect::<Result<_, _>>()?;
    let pid = *pids.first().ok_or("--pid: none given")?;
    let rss_kb = |_: u32| -> Result<u64, String> { pids.iter().map(|p| rss_kb(*p)).sum() };
    let open_fds = |_: u32| -> usize { pids.iter().map(|p| open_fds(*p)).sum() };
    let who = &a.name;
    let fds0 = open_fds(pid);
    let mut n = a.streams;
    if !a.h2
        && a.fit_fd_limit
        && let Some(limit) = fd_soft_limit(pid)
    {
        let fit = limit.saturating_sub(fds0 + 64) / 2;
        if fit < n {
            println!(
                "hold: the {who} may open {limit} files and has {fds0} open; an HTTP/1.1 stream costs it 2 \
                 (client + upstream), so {fit} streams are opened instead of {n}"
            );
            n = fit;
        }
    }
    let rss0 = rss_kb(pid)?;
    let mode = if a.h2 {
        format!("h2c, {} streams per connection", a.per_conn)
    } else {
        "HTTP/1.1, one connection per stream".into()
    };
    println!(
        "hold: {n} streams ({mode}); {who} pid {}: RSS {rss0} kB, {fds0} open files before",
        a.pid
    );

    let st = Arc::new(HoldState::default());
    let mut tasks = tokio::task::JoinSet::new();
    let mut conns = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(a.connect_parallel));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.timeout);
    let per_conn = if a.h2 { a.per_conn.clamp(1, 200) } else { 1 };
    let mut checkpoint: Option<(usize, u64)> = None;
    let mut opened = 0;
    while opened < n {
        if Instant::now() > deadline {
            break;
        }
        let batch = per_conn.min(n - opened);
        let permit = gate.clone().acquire_owned().await.expect("semaphore");
        let (st2, target2, body2) = (st.clone(), target.clone(), body.clone());
        if a.h2 {
            let stream = match TcpStream::connect(target.addr).await {
                Ok(s) => s,
                Err(e) => {
                    st.fail(format!("connect: {e}"));
                    opened += batch;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (sender, conn) = match hyper::client::conn::http2::handshake(
                TokioExecutor::new(),
                TokioIo::new(stream),
            )
            .await
            {
                Ok(x) => x,
                Err(e) => {
                    st.fail(format!("h2 handshake: {e}"));
                    opened += batch;
                    continue;
                }
            };
            conns.spawn(async move {
                let _ = conn.await;
            });
            for _ in 0..batch {
                let mut s = sender.clone();
                let (st3, req) = (st2.clone(), target2.request(&body2, true));
                tasks.spawn(async move {
                    let resp = s.send_request(req).await;
                    hold_stream(resp, st3).await;
                });
            }
            drop(permit);
        } else {
            tasks.spawn(async move {
                let stream = match TcpStream::connect(target2.addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        drop(permit);
                        return st2.fail(format!("connect: {e}"));
                    }
                };
                let _ = stream.set_nodelay(true);
                let (mut sender, conn) =
                    match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                        Ok(x) => x,
                        Err(e) => {
                            drop(permit);
                            return st2.fail(format!("handshake: {e}"));
                        }
                    };
                // The connection is driven in this task, so aborting the task closes it.
                let st3 = st2.clone();
                let work = async move {
                    let resp = sender.send_request(target2.request(&body2, false)).await;
                    drop(permit);
                    hold_stream(resp, st3).await;
                };
                tokio::pin!(work);
                tokio::pin!(conn);
                tokio::select! {
                    biased;
                    _ = &mut work => return,
                    _ = &mut conn => {}
                }
                // The connection ended first: let the stream report how.
                work.await;
            });
        }
        opened += batch;
        if let Some(c) = a.checkpoint
            && checkpoint.is_none()
            && opened >= c
        {
            // Wait until the checkpoint's streams are all held, then read the RSS.
            while st.held.load(Ordering::Relaxed) + st.failed.load(Ordering::Relaxed) < c
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let held = st.held.load(Ordering::Relaxed);
            let rss = rss_kb(pid)?;
            println!("hold: checkpoint: {held} held, RSS {rss} kB");
            checkpoint = Some((held, rss));
        }
    }
    while st.held.load(Ordering::Relaxed) + st.failed.load(Ordering::Relaxed) < n
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_secs = started.elapsed().as_secs_f64();
    let held = st.held.load(Ordering::Relaxed);
    println!(
        "hold: {held} of {n} streams held after {open_secs:.1}s; {} failed",
        st.failed.load(Ordering::Relaxed)
    );
    // Hold them all for a while, watching for any that end.
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let rss1 = rss_kb(pid)?;
    let fds1 = open_fds(pid);
    let held_end = st.held.load(Ordering::Relaxed);
    let dropped = st.dropped.load(Ordering::Relaxed);
    let failed = st.failed.load(Ordering::Relaxed);
    let still_open = held_end.saturating_sub(dropped);
    let per_stream = (rss1 as f64 - rss0 as f64) / held_end.max(1) as f64;
    println!(
        "hold: after {:.1}s held: {still_open} still open, {dropped} ended early, {failed} failed",
        a.settle
    );
    println!(
        "hold: {who} RSS {rss0} kB -> {rss1} kB with {still_open} open streams; {fds1} open files"
    );
    println!("hold: per stream: {per_stream:.1} KB (RSS growth / streams held)");
    if let Some((h, r)) = checkpoint
        && held_end > h
    {
        let slope = (rss1 as f64 - r as f64) / (held_end - h) as f64;
        println!("hold: per stream, slope between {h} and {held_end} streams: {slope:.1} KB");
    }
    if let Some(e) = st.first_error.lock().expect("lock").as_ref() {
        println!("hold: first error: {e}");
    }
    // Close everything and see how much comes back.
    tasks.abort_all();
    conns.abort_all();
    while tasks.join_next().await.is_some() {}
    while conns.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "hold: 3s after closing: {who} RSS {} kB, {} open files",
        rss_kb(pid)?,
        open_fds(pid)
    );
    println!(
        "HOLD-RESULT {who} mode={} streams={n} held={still_open} failed={failed} dropped={dropped} rss_before_kb={rss0} rss_held_kb={rss1} per_stream_kb={per_stream:.1}",
        if a.h2 { "h2c" } else { "http1" }
    );
    if still_open != n || failed > 0 || dropped > 0 {
        return Err(format!(
            "not every stream was held: {still_open} of {n} open, {failed} failed, {dropped} ended"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// soak

async fn soak(a: SoakArgs) -> Result<(), String> {
    let mut targets = Vec::new();
    for spec in &a.targets {
        let (kind, label, target) = parse_spec(spec)?;
        let body = match kind {
            Kind::Json => read_body(&a.body_json)?,
            Kind::Sse => read_body(&a.body_sse)?,
            Kind::Drip | Kind::DripCancel => read_body(
                a.body_drip
                    .as_deref()
                    .ok_or("drip targets need --body-drip")?,
            )?,
        };
        targets.push((kind, label, target, body));
    }
    let mut pids = Vec::new();
    for p in &a.pids {
        let (label, pid) = p
            .split_once('=')
            .ok_or_else(|| format!("--pid {p:?}: want LABEL=PID"))?;
        let pid: u32 = pid.parse().map_err(|_| format!("--pid {p:?}: bad pid"))?;
        rss_kb(pid)?;
        pids.push((label.to_string(), pid));
    }
    let duration = Duration::from_secs_f64(a.duration);
    println!(
        "soak: {:.0}s, {} targets at {:.0} req/s each over {} connections; RSS every {:.0}s; warm-up {:.0}%",
        a.duration,
        targets.len(),
        a.rate,
        a.conns,
        a.sample_secs,
        a.warmup_frac * 100.0
    );
    let mut loads = tokio::task::JoinSet::new();
    for (kind, label, target, body) in targets {
        let (rate, conns) = (a.rate, a.conns);
        loads.spawn(async move {
            let max = (rate * duration.as_secs_f64() * 1.2) as u64 + 1000;
            let r = run_load(
                &target,
                &body,
                kind,
                conns,
                Duration::ZERO,
                duration,
                max,
                Some(rate),
                false,
            )
            .await;
            (kind, label, r)
        });
    }
    // Sampler.
    let start = Instant::now();
    let mut samples: Vec<(f64, Vec<u64>)> = Vec::new();
    let sample = |t: f64| -> Result<(f64, Vec<u64>), String> {
        Ok((
            t,
            pids.iter()
                .map(|(_, p)| rss_kb(*p))
                .collect::<Result<Vec<_>, _>>()?,
        ))
    };
    samples.push(sample(0.0)?);
    let header: Vec<String> = pids.iter().map(|(l, _)| format!("{l} RSS kB")).collect();
    println!("soak: t(s)  {}", header.join("  "));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(a.sample_secs));
    tick.tick().await;
    while start.elapsed() < duration {
        tick.tick().await;
        let s = sample(start.elapsed().as_secs_f64())?;
        println!(
            "soak: {:>5.0}  {}",
            s.0,
            s.1.iter()
                .map(|v| format!("{v:>10}"))
                .collect::<Vec<_>>()
                .join("  ")
        );
        samples.push(s);
    }
    let mut errors = 0;
    while let Some(r) = loads.join_next().await {
        let (kind, label, r) = r.map_err(|e| e.to_string())?;
        errors += r.errors;
        println!(
            "soak: load {} {}: {} requests ({:.0} req/s), p50 {:.1} us, p99 {:.1} us, errors {}{}",
            kind.name(),
            label,
            r.ok,
            r.rps(),
            us(&r.latency, 0.5),
            us(&r.latency, 0.99),
            r.errors,
            r.first_error
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
    }
    // Flatness after warm-up: growth from the first three samples after warm-up to the last
    // three, and a least-squares slope.
    // Warm-up: the given share of the run, but at least a minute (half of a short run).
    let warm_t = (a.duration * a.warmup_frac).max(60.0f64.min(a.duration / 2.0));
    let mut all_flat = true;
    for (i, (label, _)) in pids.iter().enumerate() {
        let post: Vec<(f64, f64)> = samples
            .iter()
            .filter(|(t, _)| *t >= warm_t)
            .map(|(t, v)| (*t, v[i] as f64))
            .collect();
        if post.len() < 6 {
            println!("soak: {label}: too few samples after warm-up for a verdict");
            all_flat = false;
            continue;
        }
        let first = post[..3].iter().map(|x| x.1).sum::<f64>() / 3.0;
        let last = post[post.len() - 3..].iter().map(|x| x.1).sum::<f64>() / 3.0;
        let (min, max) = post
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                (lo.min(x.1), hi.max(x.1))
            });
        let n = post.len() as f64;
        let mt = post.iter().map(|x| x.0).sum::<f64>() / n;
        let mv = post.iter().map(|x| x.1).sum::<f64>() / n;
        let cov = post.iter().map(|x| (x.0 - mt) * (x.1 - mv)).sum::<f64>();
        let var = post.iter().map(|x| (x.0 - mt).powi(2)).sum::<f64>();
        let slope_kb_min = if var > 0.0 { cov / var * 60.0 } else { 0.0 };
        let growth = last - first;
        // Flat: less than 1 MiB (or 2%) of growth after warm-up.
        let flat = growth <= (1024.0f64).max(first * 0.02);
        all_flat &= flat;
        println!(
            "SOAK-RESULT {label}: start {} kB, after warm-up ({warm_t:.0}s) {first:.0} kB, end {last:.0} kB, \
             min..max after warm-up {min:.0}..{max:.0} kB, growth {growth:+.0} kB, slope {slope_kb_min:+.1} kB/min: {}",
            samples[0].1[i],
            if flat { "flat" } else { "GROWING" }
        );
    }
    if errors > 0 {
        return Err(format!("{errors} requests failed during the soak"));
    }
    if !all_flat {
        return Err("RSS grew after warm-up".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn ports(n: usize) -> Result<(), String> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let ports: Vec<String> = listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port().to_string())
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    println!("{}", ports.join(" "));
    Ok(())
}
