//! The HTTP front end: accept loop, connection setup, graceful shutdown.
//!
//! One port serves HTTP/1.1 and h2c. Routing, auth and error mapping are in [`routes`]; the
//! work is done by the [`Gateway`] core.

mod admin;
mod anthropic;
pub mod balance;
mod browser;
mod clients;
pub(crate) use browser::with_port as browser_origin_with_port;
mod routes;
mod token_count;

pub(crate) use routes::read_body_of;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::gateway::Gateway;
use crate::mcp::McpCore;
use crate::mcp::http::McpHttp;
use balance::{Accepted, Lane};

/// How long a served connection may stay without a new request while the server is crowded
/// (few connection slots free), instead of `server.idle_timeout`.
const BUSY_IDLE: Duration = Duration::from_secs(10);

/// How long a connection may take to send its first request while the server is crowded,
/// instead of `server.header_read_timeout`: a client sends its request as it connects, and
/// connections that send nothing would otherwise hold every slot for the whole timeout.
const BUSY_HEAD: Duration = Duration::from_secs(5);

/// State shared by every connection.
pub(crate) struct App {
    pub gateway: Gateway,
    /// `/mcp`: rmcp's streamable HTTP service over the same core.
    pub mcp: McpHttp,
    /// Set once shutdown starts: `/readyz` fails so load balancers stop sending traffic.
    pub draining: AtomicBool,
    /// `server.max_connections`, shared by every accept loop.
    slots: Arc<tokio::sync::Semaphore>,
    /// Set while few connection slots are free (see [`App::update_crowded`]): idle
    /// connections are then closed after [`BUSY_IDLE`] instead of `server.idle_timeout`.
    crowded: watch::Sender<bool>,
    /// Open mode only: refuses web pages (see `browser`).
    browser: Option<browser::BrowserGuard>,
    /// CORS for the origins the policy lists, in every mode.
    cors: browser::Cors,
    /// `server.max_connections_per_client`, when set.
    per_client: Option<Arc<clients::ClientCounts>>,
}

/// A running server: its address, and a way to stop it.
pub struct ServerHandle {
    pub local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Starts a graceful shutdown and waits for it to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Starts a graceful shutdown without waiting.
    pub fn begin_shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Serves on `listener` until `shutdown` resolves, then drains for up to the policy's grace.
pub fn spawn(listener: TcpListener, gateway: Gateway) -> std::io::Result<ServerHandle> {
    let local_addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let signal = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        serve(listener, gateway, signal).await;
    });
    Ok(ServerHandle {
        local_addr,
        stop,
        task,
    })
}

/// Serves on `listener` in the calling task until `shutdown` resolves, then drains for up to
/// the policy's grace. Tests and embedders use this; `poe-gateway serve` uses [`serve_threads`].
pub async fn serve(listener: TcpListener, gateway: Gateway, shutdown: impl Future<Output = ()>) {
    let app = App::new(gateway);
    let stopping = {
        let app = app.clone();
        async move {
            shutdown.await;
            app.begin_drain();
            app.mcp.shutdown();
        }
    };
    let lane = balance::lanes(1, app.gateway.metrics()).remove(0);
    // Its upstream connections are not its own to close (pool 0 serves every thread that is
    // not a serving thread's: other servers on this gateway, background work).
    let cut = accept_loop(
        listener,
        app.clone(),
        lane,
        stopping,
        std::future::pending(),
        false,
    )
    .await;
    log_drained(cut);
    // Every finished request's usage row is on disk before the process exits.
    app.gateway.flush().await;
}

/// How far a shutdown has gone, told to every serving thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stop {
    Serving,
    /// Stop accepting; what is in flight gets `server.shutdown_grace`.
    Draining,
    /// A second signal: close what is still open now.
    Hurry,
}

fn log_drained(cut: usize) {
    if cut == 0 {
        tracing::info!("all connections closed");
    } else {
        tracing::warn!(
            open = cut,
            "closed the connections still open at the end of the drain"
        );
    }
}

/// Serves on `listener` with `threads` threads, each running its own single-threaded runtime
/// and accept loop on the shared socket (like nginx's workers), until `shutdown` resolves;
/// then drains them all. A thread that accepts a connection while another has fewer open
/// hands it over ([`balance`]). Called from the main runtime, which keeps the background work
/// (ledger writer, refreshes, exporters).
///
/// Why: on a work-stealing runtime a request, its connection and the upstream connection it
/// borrows are separate tasks, and their wake-ups cross threads (a futex wake and a context
/// switch per hop). Here each serving thread has its own upstream pool
/// ([`crate::upstream::use_pool`]), so one request stays on one thread.
///
/// `shutdown` starts a graceful shutdown: `/readyz` fails at once, the listener stays open for
/// `server.shutdown_delay`, then in-flight requests get `server.shutdown_grace`. `hurry` (a
/// second signal) closes whatever is still open at once. The ledger then writes what it holds
/// (for up to [`LEDGER_CLOSE_WAIT`]).
pub async fn serve_threads(
    listener: std::net::TcpListener,
    gateway: Gateway,
    threads: usize,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let app = App::new(gateway);
    let (stop, stopped) = watch::channel(Stop::Serving);
    let threads = threads.max(1);
    let mut finished = Vec::with_capacity(threads);
    for (index, lane) in balance::lanes(threads, app.gateway.metrics())
        .into_iter()
        .enumerate()
    {
        let listener = listener.try_clone()?;
        let app = app.clone();
        let mut stopped = stopped.clone();
        let mut hurried = stopped.clone();
        let (done, finished_rx) = tokio::sync::oneshot::channel::<usize>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("poe-gateway-http-{index}"))
            .spawn(move || {
                crate::upstream::use_pool(index);
                let cut = runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot register the listener");
                            return 0;
                        }
                    };
                    // tokio's timer wakes its own driver (an eventfd write, then one more
                    // epoll_wait) whenever a new timer is due before every registered one.
                    // hyper arms a header-read timer for each request on a keep-alive
                    // connection, so with no earlier deadline every request paid that
                    // wake-up. A tick each second keeps an earlier deadline registered.
                    let ticker = tokio::spawn(async {
                        let mut tick = tokio::time::interval(Duration::from_secs(1));
                        loop {
                            tick.tick().await;
                        }
                    });
                    let stopping = async move {
                        let _ = stopped.wait_for(|s| *s >= Stop::Draining).await;
                        ticker.abort();
                    };
                    let hurry = async move {
                        let _ = hurried.wait_for(|s| *s == Stop::Hurry).await;
                    };
                    let mcp = app.mcp.clone();
                    let cut = accept_loop(listener, app, lane, stopping, hurry, true).await;
                    // MCP tool calls of sessions opened here may still be answering on other
                    // threads' connections (see `McpHttp::calls_done`); those end within the
                    // grace, or are cut with their connections when it runs out.
                    mcp.calls_done().await;
                    cut
                });
                // Tasks still alive on this runtime (a stream past the grace) end here.
                drop(runtime);
                let _ = done.send(cut);
            })?;
        finished.push(finished_rx);
    }
    drop(listener);
    tokio::pin!(hurry);
    shutdown.await;
    app.begin_drain();
    let delay = app.gateway.policy().server.shutdown_delay;
    // A future that has resolved must not be polled again: whether `hurry` did is kept here.
    let mut hurried = false;
    if !delay.is_zero() {
        // Still serving, and accepting, while `/readyz` fails.
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut hurry => hurried = true,
        }
    }
    app.mcp.shutdown();
    let _ = stop.send(if hurried { Stop::Hurry } else { Stop::Draining });
    let mut finished = std::pin::pin!(async {
        let mut cut = 0;
        for f in finished {
            cut += f.await.unwrap_or(0);
        }
        cut
    });
    let cut = tokio::select! {
        cut = &mut finished => cut,
        _ = &mut hurry, if !hurried => {
            tracing::warn!("a second signal: closing what is still open");
            let _ = stop.send(Stop::Hurry);
            finished.await
        }
    };
    log_drained(cut);
    app.gateway.close_ledger(LEDGER_CLOSE_WAIT).await;
    Ok(())
}

/// The longest the ledger may take to write what it holds at shutdown: a database that does
/// not answer must not hold the process past its supervisor's stop timeout.
pub const LEDGER_CLOSE_WAIT: Duration = Duration::from_secs(10);

impl App {
    fn new(gateway: Gateway) -> Arc<App> {
        let max_connections = gateway.policy().server.max_connections as usize;
        let browser = (gateway.policy().auth_mode() == crate::config::AuthMode::Open)
            .then(|| browser::BrowserGuard::new(gateway.policy()));
        Arc::new(App {
            browser,
            cors: browser::Cors::new(gateway.policy()),
            per_client: clients::ClientCounts::new(
                gateway.policy().server.max_connections_per_client,
            ),
            mcp: McpHttp::new(McpCore::new(gateway.clone())),
            gateway,
            draining: AtomicBool::new(false),
            slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            crowded: watch::channel(false).0,
        })
    }

    /// Marks the server crowded while an eighth or less of its connection slots are free
    /// (told to every connection only when that changes). A client that sends one request
    /// per connection and then holds it idle would otherwise keep its slot for the whole
    /// `server.idle_timeout`, and enough of them would lock everyone else out.
    fn update_crowded(&self) {
        let max = self.gateway.policy().server.max_connections as usize;
        let now = self.slots.available_permits() <= max / 8;
        self.crowded
            .send_if_modified(|c| std::mem::replace(c, now) != now);
    }

    /// Marks the server as draining (once): `/readyz` fails from now on. The caller ends the
    /// MCP sessions when it stops accepting: MCP clients hold a GET stream open for server
    /// messages, which would keep the drain waiting for its whole grace period.
    fn begin_drain(&self) {
        if self.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        let server = &self.gateway.policy().server;
        tracing::info!(
            delay_secs = server.shutdown_delay.as_secs_f64(),
            grace_secs = server.shutdown_grace.as_secs_f64(),
            "shutting down: /readyz fails, then in-flight requests drain"
        );
    }
}

/// One accept loop. Returns once `shutdown` has resolved and this loop's connections have
/// drained (or the grace period ran out, or `hurry` came): how many it had to close.
/// `owns_pool`: this thread's upstream pool is this loop's alone (a serving thread's), so it
/// may close its connections to end the streams left at the end.
async fn accept_loop(
    listener: TcpListener,
    app: Arc<App>,
    mut lane: Lane,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
    owns_pool: bool,
) -> usize {
    let policy = app.gateway.policy().clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(policy.server.header_read_timeout)
        // hyper grows a connection's read buffer to 16 KiB after a large read and keeps it;
        // capped at its 8 KiB floor, an idle held stream costs 8 KiB less. A request head
        // must then fit in 8 KiB (nginx's default limit per header line is the same).
        .max_buf_size(8 * 1024)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    // Told to every connection when shutdown starts: each then finishes what it has in
    // flight (an h2 connection sends GOAWAY) and closes.
    let (stop_all, stopping) = watch::channel(false);
    // Connection tasks, so the ones still open when the grace period ends can be closed.
    let mut connections = tokio::task::JoinSet::new();
    let slots = app.slots.clone();
    // Request times are kept per connection as milliseconds since this instant.
    let base = tokio::time::Instant::now();
    tokio::pin!(shutdown);

    loop {
        // At the cap, stop accepting: new connections wait in the kernel's backlog instead of
        // costing memory and descriptors here.
        let Accepted {
            stream,
            peer,
            slot,
            seat,
        } = tokio::select! {
            next = lane.next(&listener, &slots) => match next {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let client = match &app.per_client {
            None => None,
            Some(counts) => match counts.seat(peer.ip()) {
                Some(seat) => Some(seat),
                None => {
                    // Closed before a byte is read: the address holds its share already.
                    app.gateway.metrics().client_connections_refused.inc();
                    tracing::debug!(%peer, "closing a connection over server.max_connections_per_client");
                    continue;
                }
            },
        };
        app.update_crowded();
        let mut crowded = app.crowded.subscribe();
        let app_for_close = app.clone();
        let app = app.clone();
        // Told when the connection's first request reaches the service.
        let first_request = Arc::new(tokio::sync::Notify::new());
        let seen = first_request.clone();
        // When the connection's latest request started (ms since `base`): a store, not a
        // wake-up, so requests cost the idle check nothing.
        let last_request = Arc::new(AtomicU64::new(0));
        let stamp = last_request.clone();
        let service = service_fn(move |req| {
            seen.notify_one();
            stamp.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
            let app = app.clone();
            // Boxed per request: hyper keeps the service future's slot for the connection's
            // whole life, sized for the largest future (3 KB, measured with jemalloc's stats
            // at 10,000 held streams). A pointer there leaves every held stream and idle
            // keep-alive connection that much lighter; the request's state is freed once the
            // response head is out.
            Box::pin(async move { Ok::<_, Infallible>(routes::handle(app, req).await) })
        });
        // Pinned on the heap before the task takes it: an `async` block keeps a captured
        // value and its pinned local in separate slots, which stored the connection twice
        // in every connection's task (heaptrack: 3.7 KB task cells per held stream).
        let mut conn = Box::pin(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        let head_timeout = policy.server.header_read_timeout;
        let idle_timeout = policy.server.idle_timeout;
        let mut stopping = stopping.clone();
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            // hyper's header_read_timeout starts only once the protocol is known (24 bytes
            // read) and only for HTTP/1: a client that connects and sends nothing, a few bytes,
            // or just the h2 preface would hold a connection slot for ever, and
            // `server.max_connections` of them would stop the gateway. Until a first request
            // arrives the whole connection gets `server.header_read_timeout`. After it, a
            // connection with no new request for `server.idle_timeout` is closed gracefully:
            // hyper has no idle limit for HTTP/2, so an h2 client could otherwise keep its
            // slot for ever after one request.
            let accepted = tokio::time::Instant::now();
            let head_limit = |crowded: &watch::Receiver<bool>| {
                if *crowded.borrow() {
                    head_timeout.min(BUSY_HEAD)
                } else {
                    head_timeout
                }
            };
            let timer = tokio::time::sleep(head_limit(&crowded));
            tokio::pin!(timer);
            let mut served = false;
            let mut closing = false;
            // How long a served connection may go without a new request: shorter while the
            // server is crowded.
            let last_request_at =
                || base + Duration::from_millis(last_request.load(Ordering::Relaxed));
            let idle_limit = |crowded: &watch::Receiver<bool>| {
                if *crowded.borrow() {
                    idle_timeout.min(BUSY_IDLE)
                } else {
                    idle_timeout
                }
            };
            let result = loop {
                tokio::select! {
                    biased;
                    r = conn.as_mut() => break r,
                    _ = first_request.notified(), if !served => {
                        served = true;
                        timer.as_mut().reset(tokio::time::Instant::now() + idle_limit(&crowded));
                    }
                    // Crowded or not any more: the idle limit changed; the timer branch below
                    // then closes the connection if it is past it.
                    Ok(()) = crowded.changed(), if !closing => {
                        if served {
                            let last = last_request_at();
                            timer.as_mut().reset(last + idle_limit(&crowded));
                        } else {
                            timer.as_mut().reset(accepted + head_limit(&crowded));
                        }
                    }
                    _ = stopping.wait_for(|s| *s), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    // Before a first request the head timeout holds even while closing.
                    _ = timer.as_mut(), if !(closing && served) => {
                        if !served {
                            tracing::debug!(%peer, "closing a connection that sent no request within server.header_read_timeout");
                            drop((slot, seat, client));
                            app_for_close.update_crowded();
                            return;
                        }
                        let last = last_request_at();
                        let due = last + idle_limit(&crowded);
                        if tokio::time::Instant::now() < due {
                            timer.as_mut().reset(due);
                        } else {
                            tracing::debug!(%peer, "closing a connection with no request within server.idle_timeout (shorter while crowded)");
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop((slot, seat, client));
            app_for_close.update_crowded();
        });
    }

    drop(listener);
    let _ = stop_all.send(true);
    let grace = policy.server.shutdown_grace;
    let drained = tokio::select! {
        r = tokio::time::timeout(grace, async {
            while connections.join_next().await.is_some() {}
        }) => r.is_ok(),
        _ = hurry => false,
    };
    if drained {
        return 0;
    }
    // Still open: end this thread's upstream connections, so each stream on them ends with
    // the tap's error event and a whole HTTP response (a client then knows its answer was
    // cut, where a connection closed mid-body tells it less). What is still open a moment
    // later is closed.
    let cut = connections.len();
    if owns_pool {
        app.gateway.upstream().close_connections();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while connections.join_next().await.is_some() {}
        })
        .await;
    }
    connections.abort_all();
    cut
}
