//! Prometheus metrics, names prefixed `poe_gateway_`. One registry per gateway, so tests that
//! run several gateways in one process do not mix their numbers.

use prometheus::{
    CounterVec, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The `bot` label of a bot name. Poe reads names case-insensitively and lists them in lower
/// case, so every spelling of one bot is one series (a client varying the case of a name
/// would otherwise add series without end). No allocation for a name already in lower case.
pub fn bot_label(bot: &str) -> std::borrow::Cow<'_, str> {
    // An Anthropic model id (what Claude Code sends) may carry any date, and Poe answers
    // each: one series per bot, under Poe's own name, not one per spelling.
    if let Some(poe) = crate::gateway::models::poe_id_of_anthropic_model(bot) {
        return std::borrow::Cow::Owned(poe);
    }
    if bot.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(bot.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(bot)
    }
}

/// The `key` label of a request's key id: a gateway key's id, which an admin made, so there
/// are few. A passthrough caller's id is a hash of whatever token the client sent, which
/// anyone could vary without end: those requests go under `passthrough`. (The ledger keeps
/// the ids; usage per caller is a report, not a metric.)
pub fn key_label(key_id: Option<&str>) -> &str {
    match key_id {
        Some(id) if id.starts_with(crate::gateway::keys::PASSTHROUGH_ID_PREFIX) => "passthrough",
        Some(id) => id,
        None => "",
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounterVec,
    pub completion_tokens: IntCounterVec,
    pub cost_usd: CounterVec,
    pub duration: HistogramVec,
    pub ttfb: HistogramVec,
    pub in_flight: IntGauge,
    pub streams_in_flight: IntGauge,
    /// Client connections open, by serving thread (`http::balance` places new ones by it).
    pub open_connections: IntGaugeVec,
    pub upstream_attempts: IntCounterVec,
    /// `duration` and `ttfb` for `stream="false"` and `stream="true"`, in that order.
    pub duration_by_stream: [Histogram; 2],
    pub ttfb_by_stream: [Histogram; 2],
    /// `upstream_attempts{result="ok"}`.
    pub upstream_ok: IntCounter,
    pub retries_skipped: IntCounter,
    pub auth_failures: IntCounterVec,
    pub client_connections_refused: IntCounter,
    pub ledger_queue_depth: IntGauge,
    pub ledger_dropped: IntCounter,
    pub ledger_written: IntCounter,
    pub ledger_write_errors: IntCounter,
    pub ledger_reopened: IntCounter,
    pub point_balance: Gauge,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_bytes: IntGauge,
    pub cache_evictions: IntCounter,
    pub cache_shared_hits: IntCounter,
    pub redis_up: IntGauge,
    pub redis_errors: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric registers once");
                m
            }};
        }
        let opts = |name: &str, help: &str| Opts::new(format!("poe_gateway_{name}"), help);
        let hist = |name: &str, help: &str| {
            HistogramOpts::new(format!("poe_gateway_{name}"), help)
                .buckets(LATENCY_BUCKETS.to_vec())
        };
        let duration = reg!(HistogramVec::new(
            hist(
                "request_duration_seconds",
                "Request duration, to the end of the response body."
            ),
            &["stream"]
        ));
        let ttfb = reg!(HistogramVec::new(
            hist(
                "time_to_first_byte_seconds",
                "Time from request to the first response byte from Poe."
            ),
            &["stream"]
        ));
        let upstream_attempts = reg!(IntCounterVec::new(
            opts(
                "upstream_attempts_total",
                "Calls to Poe, by result (ok, http_<status>, connect, timeout, broken)."
            ),
            &["result"]
        ));
        // Looked up once: a label look-up hashes the values and takes a read lock, and these
        // are counted on every request.
        let by_stream = |h: &HistogramVec| {
            [
                h.with_label_values(&["false"]),
                h.with_label_values(&["true"]),
            ]
        };
        let duration_by_stream = by_stream(&duration);
        let ttfb_by_stream = by_stream(&ttfb);
        let upstream_ok = upstream_attempts.with_label_values(&["ok"]);
        Metrics {
            requests: reg!(IntCounterVec::new(
                opts(
                    "requests_total",
                    "Chat completion requests by bot, status and key id."
                ),
                &["bot", "status", "key"]
            )),
            prompt_tokens: reg!(IntCounterVec::new(
                opts("prompt_tokens_total", "Prompt tokens by bot."),
                &["bot"]
            )),
            completion_tokens: reg!(IntCounterVec::new(
                opts("completion_tokens_total", "Completion tokens by bot."),
                &["bot"]
            )),
            cost_usd: reg!(CounterVec::new(
                opts("cost_usd_total", "Cost in USD by bot (priced rows only)."),
                &["bot"]
            )),
            duration,
            ttfb,
            in_flight: reg!(IntGauge::with_opts(opts(
                "requests_in_flight",
                "Chat requests being answered: waiting on Poe, or their response still open."
            ))),
            streams_in_flight: reg!(IntGauge::with_opts(opts(
                "streams_in_flight",
                "Open streamed responses."
            ))),
            open_connections: reg!(IntGaugeVec::new(
                opts(
                    "open_connections",
                    "Client connections open, by serving thread."
                ),
                &["thread"]
            )),
            upstream_attempts,
            auth_failures: reg!(IntCounterVec::new(
                opts(
                    "auth_failures_total",
                    "Requests refused before they had a caller: no key, a bad or revoked key (401), a key that could not be checked (503)."
                ),
                &["status"]
            )),
            client_connections_refused: reg!(IntCounter::with_opts(opts(
                "client_connections_refused_total",
                "Connections closed at once because their client address held server.max_connections_per_client."
            ))),
            retries_skipped: reg!(IntCounter::with_opts(opts(
                "retries_skipped_total",
                "Retries not made because the retry budget was spent."
            ))),
            ledger_queue_depth: reg!(IntGauge::with_opts(opts(
                "ledger_queue_depth",
                "Usage rows waiting to be written."
            ))),
            ledger_dropped: reg!(IntCounter::with_opts(opts(
                "ledger_dropped_total",
                "Usage rows dropped because the ledger queue was full."
            ))),
            ledger_written: reg!(IntCounter::with_opts(opts(
                "ledger_written_total",
                "Usage rows written."
            ))),
            ledger_write_errors: reg!(IntCounter::with_opts(opts(
                "ledger_write_errors_total",
                "Usage rows lost to database errors."
            ))),
            ledger_reopened: reg!(IntCounter::with_opts(opts(
                "ledger_reopened_total",
                "Times the SQLite ledger file was found deleted or replaced under the gateway and opened again at its path."
            ))),
            // NaN until read: a balance of 0 before the first read (or with no server key)
            // set off low-balance alerts. NaN compares false with any threshold.
            point_balance: reg!(
                Gauge::with_opts(opts(
                    "point_balance",
                    "Poe compute-point balance of the server key (last read; NaN until read)."
                ))
                .inspect(|g| g.set(f64::NAN))
            ),
            cache_hits: reg!(IntCounter::with_opts(opts(
                "cache_hits_total",
                "Response cache hits."
            ))),
            cache_misses: reg!(IntCounter::with_opts(opts(
                "cache_misses_total",
                "Response cache misses."
            ))),
            cache_bytes: reg!(IntGauge::with_opts(opts(
                "cache_bytes",
                "Bytes held by the response cache."
            ))),
            cache_evictions: reg!(IntCounter::with_opts(opts(
                "cache_evictions_total",
                "Response cache entries evicted for space."
            ))),
            cache_shared_hits: reg!(IntCounter::with_opts(opts(
                "cache_shared_hits_total",
                "Cache hits served from the shared (Redis) tier after a local miss."
            ))),
            redis_up: reg!(IntGauge::with_opts(opts(
                "redis_up",
                "1 while Redis (shared limits, budgets, cache) answered the last call, else 0."
            ))),
            redis_errors: reg!(IntCounterVec::new(
                opts(
                    "redis_errors_total",
                    "Failed Redis calls, by operation (rate, spend, charge, cache_get, cache_put, cache_purge)."
                ),
                &["op"]
            )),
            duration_by_stream,
            ttfb_by_stream,
            upstream_ok,
            registry,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
