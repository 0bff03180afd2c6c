//! The gateway core: the one in-process API that the HTTP layer and the MCP layer both call.
//!
//! `Gateway::chat` takes a parsed request and a caller, resolves the alias, waits for the
//! upstream limiter, calls Poe with retries and fallbacks, and returns a [`Reply`] whose body
//! is the upstream body behind the [`tap::Tap`]. Nothing here knows about HTTP servers.

pub mod accounting;
pub mod alias;
pub mod cache;
mod canonical;
pub mod completion;
pub mod json;
mod jsonscan;
pub mod keys;
pub mod limits;
pub mod models;
pub mod request;
pub mod retry;
pub mod sse;
pub mod tap;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{StatusCode, response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{AuthMode, Policy};
use crate::error::GatewayError;
use crate::ledger::{KeyRecord, Ledger, Store, UsageRow, now_ms};
use crate::metrics::Metrics;
use crate::shared_state::SharedState;
use crate::upstream::{self, Secret, Upstream, UpstreamError};
use accounting::Accountant;
use alias::{Aliases, Route};
use cache::{CacheStatus, Coalesced, ResponseCache, Shared, Waited};
use completion::{Accounting, Completion, RequestInfo};
use keys::{BudgetHold, KeyRing};
use limits::{TokioClock, UpstreamLimits};
use models::{Catalogue, Models};
pub use request::{ChatRequest, Endpoint};
use retry::RetryBudget;
use tap::{BoxError, Observed, Outcome, ReplayBody, Tap};

/// The request id header: echoed to the client and sent on to Poe.
pub const REQUEST_ID_HEADER: http::HeaderName = http::HeaderName::from_static("x-request-id");
/// Header naming the bot that answered (after aliasing and fallbacks).
pub const BOT_HEADER: http::HeaderName = http::HeaderName::from_static("x-poe-gateway-bot");
/// Header counting upstream calls made for the request, retries and fallbacks included.
pub const ATTEMPTS_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-poe-gateway-attempts");
/// The OpenAI SDKs retry 408, 409, 429 and 5xx answers twice by default unless this says
/// `false`. It does where a retry cannot help (a spent budget, an answer every attempt gets
/// alike) and where the gateway has already retried: the SDK's retries would multiply its
/// attempts at Poe.
pub const SHOULD_RETRY_HEADER: http::HeaderName = http::HeaderName::from_static("x-should-retry");
/// Largest upstream error body read (to classify it and pass it on).
const ERROR_BODY_LIMIT: usize = 1024 * 1024;
/// The output tokens a request that sets no `max_tokens` is taken to cost while it runs
/// ([`Gateway::cost_estimate`]): about a long answer's, so a key's budget is not held by
/// far more than its requests spend, nor by nearly nothing.
const OUTPUT_ESTIMATE: i64 = 1_000;
/// The most output tokens a request's `max_tokens` is taken at: past any bot's window.
const MAX_OUTPUT_ESTIMATE: u64 = 10_000_000;

/// Who is calling, as the front ends established it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub request_id: Arc<str>,
    /// How the upstream call is paid for.
    pub credential: Credential,
    /// A stable, non-secret id for logs and accounting.
    pub key_id: Option<Arc<str>>,
    /// The gateway key's record (`auth.mode = keys`): its limits apply.
    pub key: Option<Arc<KeyRecord>>,
    /// The caller's trace context (an incoming `traceparent`), parent of the request's span.
    pub trace_context: Option<opentelemetry::Context>,
}

impl Caller {
    /// A caller paid for by the server's key, with no gateway key.
    pub fn server(request_id: Arc<str>) -> Caller {
        Caller {
            request_id,
            credential: Credential::Server,
            key_id: None,
            key: None,
            trace_context: None,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Credential {
    /// The server's own `POE_API_KEY`.
    Server,
    /// The caller's Poe key, forwarded as is (`auth.mode = passthrough`).
    Poe(Secret),
}

/// A chat answer: the head to send and a body that streams from upstream.
pub struct Reply {
    pub status: StatusCode,
    /// Upstream headers worth passing on (hop-by-hop ones removed).
    pub headers: HeaderMap,
    pub body: ReplyBody,
    /// The bot that answered (or, for an error, the last one tried).
    pub bot: String,
    pub attempts: u32,
    /// Whether the response cache answered (`x-cache`).
    pub cache: CacheStatus,
}

/// The body of a [`Reply`]: live from upstream through the tap, or already complete
/// (an upstream error, read to be classified).
///
/// The taps are boxed: a tap is about 800 bytes, and a reply is moved by value through
/// every layer between the upstream call and hyper (and sits in the futures that hold one),
/// so inline it was copied whole several times per request.
pub enum ReplyBody {
    Stream { tap: Box<Tap<upstream::Body>> },
    Replay { tap: Box<Tap<ReplayBody>> },
    Full { data: Option<Bytes> },
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReplyBody::Stream { tap } => Pin::new(&mut **tap).poll_frame(cx),
            ReplyBody::Replay { tap } => Pin::new(&mut **tap).poll_frame(cx),
            ReplyBody::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReplyBody::Stream { tap } => tap.is_end_stream(),
            ReplyBody::Replay { tap } => tap.is_end_stream(),
            ReplyBody::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReplyBody::Stream { tap } => tap.size_hint(),
            ReplyBody::Replay { tap } => tap.size_hint(),
            ReplyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// The core. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    policy: Policy,
    aliases: Arc<Aliases>,
    upstream: Arc<Upstream>,
    server_key: Option<Secret>,
    admin_key: Option<Secret>,
    models: Arc<Models>,
    limits: UpstreamLimits,
    budget: RetryBudget,
    keys: Arc<KeyRing>,
    /// Prices, also read here: a key with a budget may only reach bots with a known price.
    accountant: Arc<Accountant>,
    acct: Arc<Accounting>,
    cache: Arc<ResponseCache>,
    /// Poe's point balance for the server key, last read (`i64::MIN`: not read yet).
    balance: std::sync::atomic::AtomicI64,
    /// KiB of request bodies the front ends may hold at once (`server.max_bodies_bytes`).
    bodies: Arc<tokio::sync::Semaphore>,
    epoch: Instant,
}

/// Why one upstream attempt did not produce an answer to stream.
enum Failure {
    Status { head: response::Parts, body: Bytes },
    Transport(UpstreamError),
}

impl Failure {
    fn retryable(&self) -> bool {
        match self {
            Failure::Status { head, .. } => retry::retryable_status(head.status.as_u16()),
            Failure::Transport(UpstreamError::Closed { .. }) => false,
            Failure::Transport(_) => true,
        }
    }

    /// A bot that is missing or cannot do what was asked: the next bot in a chain may.
    fn wrong_bot(&self) -> bool {
        match self {
            Failure::Status { head, body } => {
                head.status == StatusCode::NOT_FOUND
                    || memchr::memmem::find(body, b"unsupported_feature_for_model").is_some()
            }
            Failure::Transport(_) => false,
        }
    }
}

impl Gateway {
    /// A core with an in-memory ledger: for embedding and tests. `server_key` is `POE_API_KEY`.
    /// Must be called inside a tokio runtime (the ledger writer is a task).
    pub fn new(policy: Policy, server_key: Option<Secret>) -> Result<Gateway, String> {
        let store = Store::memory().map_err(|e| e.to_string())?;
        Gateway::with_store(policy, server_key, None, store)
    }

    /// The core as `serve` runs it: the ledger at `database_url` (migrated on open), and the
    /// point-balance gauge refreshed in the background when there is a server key.
    pub async fn open(
        policy: Policy,
        server_key: Option<Secret>,
        admin_key: Option<Secret>,
        database_url: &str,
    ) -> Result<Gateway, String> {
        let store = Store::open(database_url)
            .await
            .map_err(|e| format!("ledger: {e}"))?;
        let gw = Gateway::with_store(policy, server_key, admin_key, store)?;
        gw.spawn_balance_refresh();
        Ok(gw)
    }

    /// Builds the core over an opened store.
    pub fn with_store(
        policy: Policy,
        server_key: Option<Secret>,
        admin_key: Option<Secret>,
        store: Store,
    ) -> Result<Gateway, String> {
        if policy.auth_mode() != AuthMode::Passthrough && server_key.is_none() {
            return Err(format!(
                "POE_API_KEY is not set: with auth.mode = {} the gateway calls Poe with the \
                 server's key (get one at https://poe.com/api_key), or use auth.mode = passthrough",
                policy.auth_mode()
            ));
        }
        let upstream = Arc::new(Upstream::new(
            &policy.upstream,
            policy.timeouts.connect,
            policy.timeouts.first_byte,
            policy.server.thread_count(),
        )?);
        let clock = TokioClock::new();
        let aliases = Arc::new(Aliases::new(&policy.aliases));
        let models = Arc::new(Models::new(policy.upstream.models_ttl));
        let metrics = Arc::new(Metrics::new());
        let shared = SharedState::new(&policy.redis, metrics.clone())?.map(Arc::new);
        if let Some(s) = &shared {
            s.start_renewing();
        }
        let keys = Arc::new(KeyRing::with_shared(
            store.clone(),
            clock,
            shared.clone(),
            policy.redis.limits_on_error,
            policy.redis.budgets_on_error,
        ));
        let accountant = Accountant {
            models: models.clone(),
            upstream: upstream.clone(),
            aliases: aliases.clone(),
            overrides: policy
                .pricing
                .iter()
                .map(|(bot, price)| (bot.to_ascii_lowercase(), *price))
                .collect(),
            keys: Some(keys.clone()),
            metrics: metrics.clone(),
            last_fetch: tokio::sync::Mutex::new(None),
        };
        let accountant = Arc::new(accountant);
        let ledger = Ledger::start(store, Some(accountant.clone()));
        Ok(Gateway {
            inner: Arc::new(Inner {
                limits: UpstreamLimits::with_shared(
                    &policy.limits,
                    shared.clone(),
                    policy.redis.limits_on_error,
                ),
                budget: RetryBudget::new(
                    policy.retry.budget_ratio,
                    policy.retry.budget_min_per_second,
                ),
                cache: Arc::new(ResponseCache::with_shared(
                    &policy.cache,
                    models.clone(),
                    metrics.clone(),
                    shared.filter(|s| s.cache_tier),
                )),
                acct: Arc::new(Accounting {
                    metrics,
                    ledger,
                    charger: Some(accountant.clone()),
                }),
                balance: std::sync::atomic::AtomicI64::new(i64::MIN),
                bodies: Arc::new(tokio::sync::Semaphore::new(
                    usize::try_from(policy.server.max_bodies_bytes.0 / 1024)
                        .unwrap_or(usize::MAX)
                        .min(tokio::sync::Semaphore::MAX_PERMITS),
                )),
                epoch: Instant::now(),
                aliases,
                models,
                keys,
                accountant,
                upstream,
                server_key,
                admin_key,
                policy,
            }),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The KiB of request bodies still free to be held (`server.max_bodies_bytes`): a front
    /// end takes what a body needs while reading it, and gives it back when the request is
    /// done with it.
    pub fn body_budget(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.inner.bodies
    }

    pub fn aliases(&self) -> &Aliases {
        &self.inner.aliases
    }

    pub fn ledger(&self) -> &Ledger {
        &self.inner.acct.ledger
    }

    pub fn keys(&self) -> &KeyRing {
        &self.inner.keys
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.acct.metrics
    }

    pub fn upstream(&self) -> &Upstream {
        &self.inner.upstream
    }

    /// The admin key (`POE_GATEWAY_ADMIN_KEY`), if the admin API is enabled.
    pub fn admin_key(&self) -> Option<&Secret> {
        self.inner.admin_key.as_ref()
    }

    /// Prometheus text, with the ledger's own counters brought up to date first.
    pub fn render_metrics(&self) -> Vec<u8> {
        let m = &self.inner.acct.metrics;
        let st = self.inner.acct.ledger.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        m.ledger_queue_depth.set(st.depth() as i64);
        m.cache_evictions.inc_by(
            self.inner
                .cache
                .evictions()
                .saturating_sub(m.cache_evictions.get()),
        );
        m.cache_bytes.set(self.inner.cache.weighted_size() as i64);
        m.ledger_dropped
            .inc_by(load(&st.dropped).saturating_sub(m.ledger_dropped.get()));
        m.ledger_written
            .inc_by(load(&st.written).saturating_sub(m.ledger_written.get()));
        m.ledger_write_errors
            .inc_by(load(&st.write_errors).saturating_sub(m.ledger_write_errors.get()));
        let reopened = self.inner.acct.ledger.store().reopened();
        m.ledger_reopened
            .inc_by(reopened.saturating_sub(m.ledger_reopened.get()));
        m.render()
    }

    /// Reads Poe's point balance for the server key into the gauge now and every 5 minutes.
    fn spawn_balance_refresh(&self) {
        let Some(key) = self.inner.server_key.clone() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                match inner.upstream.balance(&key).await {
                    Ok(points) => {
                        inner.acct.metrics.point_balance.set(points as f64);
                        inner
                            .balance
                            .store(points, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!(error = %e, "point balance not read"),
                }
                drop(inner);
                tokio::time::sleep(std::time::Duration::from_secs(300)).await;
            }
        });
    }

    /// Poe's point balance for the server key, as last read (every 5 minutes under `open`).
    pub fn point_balance(&self) -> Option<i64> {
        match self
            .inner
            .balance
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            i64::MIN => None,
            b => Some(b),
        }
    }

    /// The caller's own usage report: its key's rows, or all rows for a caller without a key
    /// (open mode, stdio). Rows still queued are written first.
    pub async fn usage_report(
        &self,
        caller: &Caller,
        mut query: crate::ledger::ReportQuery,
    ) -> Result<crate::ledger::Report, GatewayError> {
        query.key_id = caller.key_id.as_deref().map(String::from);
        self.flush().await;
        self.inner
            .acct
            .ledger
            .store()
            .report(&query)
            .await
            .map_err(|e| GatewayError::internal("the usage report", &e))
    }

    /// Waits until every usage row so far is written (graceful shutdown, tests).
    pub async fn flush(&self) {
        self.inner.acct.ledger.flush().await;
    }

    /// At shutdown: the ledger writes what it holds, for up to `wait`, and takes no more.
    pub async fn close_ledger(&self, wait: std::time::Duration) {
        self.inner.acct.ledger.close(wait).await;
    }

    /// Accounts a request to `endpoint` the gateway refused before calling Poe (its body
    /// could not be read or parsed).
    pub fn record_rejection(
        &self,
        caller: &Caller,
        endpoint: Endpoint,
        model: &str,
        stream: bool,
        err: &GatewayError,
        started: Instant,
    ) {
        let row = rejected_row(caller, endpoint, model, model, stream, err, started);
        self.record_unreplied(row, &err.to_string());
    }

    /// [`record_rejection`](Self::record_rejection) for a request whose route is known: the
    /// row names the alias and the bot it would have called first, as a reply's row does, so
    /// a report by model does not split one bot's requests under its alias.
    fn record_refusal(
        &self,
        caller: &Caller,
        req: &ChatRequest,
        route: Route<'_>,
        bots: &[String],
        err: &GatewayError,
        started: Instant,
    ) {
        let bot = bots.first().map_or(req.model(), String::as_str);
        let mut row = rejected_row(
            caller,
            req.endpoint(),
            req.model(),
            bot,
            req.stream(),
            err,
            started,
        );
        row.alias = route.alias().map(String::from);
        self.record_unreplied(row, &err.to_string());
    }

    /// Counts, logs and queues the row of a request that has no reply to do it (refused, or
    /// dropped before Poe's head): the rows of replies are written by their [`Completion`].
    fn record_unreplied(&self, row: UsageRow, reason: &str) {
        let acct = &self.inner.acct;
        let bot = self.metric_bot(&row.bot);
        acct.metrics
            .requests
            .with_label_values(&[
                &*bot,
                &row.status.to_string(),
                crate::metrics::key_label(row.key_id.as_deref()),
            ])
            .inc();
        // A request dropped before Poe's head has its prompt estimated and priced (Poe
        // charges it): the token counters count it as the ledger does.
        if let Some(t) = row.prompt_tokens.filter(|t| *t > 0) {
            acct.metrics
                .prompt_tokens
                .with_label_values(&[&*bot])
                .inc_by(t as u64);
        }
        acct.close(row, reason, 0, None);
    }

    /// A key with a budget may only reach bots with a known price (Poe's catalogue or
    /// `[pricing]`): an unpriced row costs nothing against the budget, so one unpriced bot
    /// would be spending without a limit. When no catalogue could be read, requests go
    /// through (an outage of the catalogue must not stop every budgeted key).
    fn check_priced(
        &self,
        rec: &crate::ledger::KeyRecord,
        bots: &[String],
    ) -> Result<(), GatewayError> {
        if rec.budget_usd.is_none() || !self.inner.models.loaded() {
            return Ok(());
        }
        match bots
            .iter()
            .find(|b| self.inner.accountant.price(b).is_none())
        {
            None => Ok(()),
            Some(bot) => Err(GatewayError::Forbidden(format!(
                "this key has a budget, and `{bot}` has no known price, so its cost could not be counted against it; \
                 an admin can price it with a [pricing.\"{bot}\"] table"
            ))),
        }
    }

    /// What a request of a key with a budget may cost, held against the budget while it
    /// runs ([`keys::BudgetHold`]): its prompt's estimated tokens and its `max_tokens` of
    /// output ([`OUTPUT_ESTIMATE`] when it sets none), at the dearest price of its chain
    /// (a fallback may answer). Nothing for bots without a known price.
    fn cost_estimate(&self, req: &ChatRequest, bots: &[String]) -> f64 {
        let prompt = completion::estimated_tokens(req.text_bytes());
        let output = req
            .max_tokens()
            .map_or(OUTPUT_ESTIMATE, |m| m.min(MAX_OUTPUT_ESTIMATE) as i64);
        bots.iter()
            .filter_map(|b| self.inner.accountant.price(b))
            .map(|p| p.cost(prompt, output))
            .fold(0.0, f64::max)
    }

    /// Whether `bot` is a name the gateway knows of: an alias, a bot an alias names, or a
    /// bot in the last catalogue fetched. Asked only where Poe did not answer the name.
    ///
    /// Exact catalogue names only: an Anthropic model id ([`Catalogue::lists`]) may carry any
    /// date, and each would be a new metric series for a request Poe refused.
    fn known_bot(&self, bot: &str) -> bool {
        let inner = &*self.inner;
        inner.aliases.iter().any(|(name, bots)| {
            name.eq_ignore_ascii_case(bot) || bots.iter().any(|b| b.eq_ignore_ascii_case(bot))
        }) || inner
            .models
            .snapshot()
            .is_some_and(|c| c.entry(bot).is_some())
    }

    /// The `bot` label of a request Poe did not answer (see [`RequestInfo::unlisted`]).
    fn metric_bot<'a>(&self, bot: &'a str) -> std::borrow::Cow<'a, str> {
        if self.known_bot(bot) {
            crate::metrics::bot_label(bot)
        } else {
            std::borrow::Cow::Borrowed(completion::UNLISTED)
        }
    }

    /// The model catalogue with aliases, from cache or upstream.
    pub async fn models(&self) -> Result<Arc<Catalogue>, GatewayError> {
        self.inner
            .models
            .get(&self.inner.upstream, &self.inner.aliases)
            .await
    }

    /// One chat completion: aliasing, limits, retries, fallbacks, and the tapped reply.
    ///
    /// Retries and fallbacks happen only here, before a `Reply` exists, so nothing has reached
    /// the client yet; once the reply is returned its bytes are never sent twice.
    pub async fn chat(&self, caller: &Caller, req: ChatRequest) -> Result<Reply, GatewayError> {
        // A key pasted into `model` would be logged, traced and stored with the row as a
        // model name: it is refused before anything records it.
        if self.is_a_key(caller, req.model()) {
            return Err(GatewayError::bad_param(
                "model",
                "`model` holds an API key: send keys in the Authorization header, and a bot \
                 name in `model`",
            ));
        }
        let span = self.chat_span(caller, &req);
        self.chat_in_span(caller, req).instrument(span).await
    }

    /// Whether `model` is a key: a gateway key's shape, the server's Poe key, or the caller's.
    fn is_a_key(&self, caller: &Caller, model: &str) -> bool {
        let model = model.trim();
        let gateway_key = model.strip_prefix(keys::KEY_PREFIX).is_some_and(|rest| {
            rest.len() >= 32 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
        });
        let poe_key = |k: &Secret| !k.expose().is_empty() && k.expose() == model;
        gateway_key
            || self.inner.server_key.as_ref().is_some_and(poe_key)
            || matches!(&caller.credential, Credential::Poe(k) if poe_key(k))
    }

    /// The request's span, with the GenAI attributes known up front; the rest are recorded
    /// when the response ends. `Span::none()` when traces are off.
    fn chat_span(&self, caller: &Caller, req: &ChatRequest) -> tracing::Span {
        if !crate::telemetry::traces_enabled() {
            return tracing::Span::none();
        }
        use tracing::field::Empty;
        let span = tracing::info_span!(
            "chat",
            otel.name = %format!("chat {}", req.model()),
            otel.kind = "server",
            gen_ai.operation.name = "chat",
            gen_ai.system = "poe",
            gen_ai.provider.name = "poe",
            gen_ai.request.model = %req.model(),
            gen_ai.request.temperature = Empty,
            gen_ai.request.max_tokens = Empty,
            gen_ai.response.model = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            http.response.status_code = Empty,
            error.type = Empty,
            poe_gateway.request_id = %caller.request_id,
            poe_gateway.key_id = caller.key_id.as_deref().unwrap_or(""),
            poe_gateway.alias = Empty,
            poe_gateway.stream = req.stream(),
            poe_gateway.cache = Empty,
            poe_gateway.cache_hit = Empty,
            poe_gateway.attempts = Empty,
            poe_gateway.outcome = Empty,
            poe_gateway.ttfb_ms = Empty,
        );
        if let Some(t) = req.temperature() {
            span.record("gen_ai.request.temperature", t);
        }
        if let Some(m) = req.max_tokens() {
            span.record("gen_ai.request.max_tokens", m as i64);
        }
        // A remote parent only when there is no local one (an MCP tool span is one).
        if let Some(cx) = caller
            .trace_context
            .as_ref()
            .filter(|_| tracing::Span::current().is_none())
        {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let _ = span.set_parent(cx.clone());
        }
        span
    }

    async fn chat_in_span(&self, caller: &Caller, req: ChatRequest) -> Result<Reply, GatewayError> {
        let inner = &*self.inner;
        let started = Instant::now();
        let route = inner.aliases.resolve(req.model());
        let direct;
        let bots: &[String] = match route {
            Route::Alias { bots, .. } => bots,
            Route::Direct(model) => {
                direct = [model.to_string()];
                &direct
            }
        };
        // This request's estimated cost, held against its key's budget until it is charged.
        let mut hold = None;
        if let Some(rec) = &caller.key {
            if rec.budget_usd.is_some() && !inner.models.loaded() {
                // A budget needs prices, for the checks below and to charge the request as it
                // ends: the first budgeted request waits for the catalogue (once, bounded).
                // Boxed: the fetch's state would otherwise grow every request's future.
                Box::pin(inner.accountant.ensure_catalogue()).await;
            }
            let checked = async {
                inner.keys.check_model(rec, req.model(), bots)?;
                if let Some(previous) = req.previous_response_id()? {
                    inner.keys.check_previous_response(rec, &previous)?;
                }
                self.check_priced(rec, bots)?;
                let estimate = match rec.budget_usd {
                    Some(_) => self.cost_estimate(&req, bots),
                    None => 0.0,
                };
                // The budget before the rate: a request the budget refuses never reaches
                // Poe, and must not spend one of the key's requests per minute (the SDKs
                // retry a held budget's 429). One the rate refuses drops its hold.
                // Boxed, only for a key with a budget: the check's reads of Redis or the
                // ledger would grow every request's future.
                let hold = match rec.budget_usd {
                    Some(_) => Box::pin(inner.keys.check_budget(rec, estimate)).await?,
                    None => None,
                };
                inner.keys.check_rpm(rec).await?;
                Ok(hold)
            }
            .await;
            match checked {
                Ok(h) => hold = h,
                Err(e) => {
                    self.record_refusal(caller, &req, route, bots, &e, started);
                    return Err(e);
                }
            }
        }
        let span = tracing::Span::current();
        if let Some(alias) = route.alias() {
            span.record("poe_gateway.alias", alias);
        }
        let cache = &inner.cache;
        let Some(plan) = cache.plan(caller, &req, bots) else {
            span.record("poe_gateway.cache", "BYPASS");
            return self
                .fetch(caller, &req, route, bots, started, None, hold)
                .await;
        };
        let lookup = if crate::telemetry::traces_enabled() {
            tracing::info_span!("cache lookup", poe_gateway.cache = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        let found = cache.get(&plan).instrument(lookup.clone()).await;
        let status = if found.is_some() { "HIT" } else { "MISS" };
        lookup.record("poe_gateway.cache", status);
        span.record("poe_gateway.cache", status);
        drop(lookup);
        if let Some(entry) = found {
            return Ok(self.hit_reply(caller, &req, route, entry, started));
        }
        if !inner.models.loaded() {
            // Whether a miss may be stored depends on its bot's output (a media bot's is
            // not), which the catalogue says: the first cacheable miss waits for it (once,
            // bounded); until it is read, nothing is stored. Boxed, as above.
            Box::pin(inner.accountant.ensure_catalogue()).await;
        }
        // A stream miss is recorded by the tap as it goes to the client, never buffered. A
        // request that asked for a fresh answer (`Cache-Control: no-cache`) makes its own
        // call rather than take one in flight (which it was told was a HIT).
        if req.stream() || !plan.read {
            cache.count_miss();
            return self
                .fetch(caller, &req, route, bots, started, Some(&plan), hold)
                .await;
        }
        let mut led_once = false;
        loop {
            let guard = match cache.coalesce(plan.key) {
                Coalesced::Leader(guard) => guard,
                Coalesced::Follower(waiting) => {
                    // A follower's client may leave while it waits: its row is recorded then
                    // (cancelled, at no cost), as every chat request has one.
                    let mut watch = Unanswered::new(self, caller, &req, route, bots, started);
                    let waited = cache::wait_for_leader(waiting).await;
                    watch.armed = false;
                    // Out of flight as a waiter before any call of its own counts it again.
                    drop(watch);
                    match waited {
                        Waited::Answered(shared) => {
                            if shared.answer {
                                cache.count_shared_answer();
                                span.record("poe_gateway.cache", "HIT");
                            } else {
                                cache.count_miss();
                            }
                            return Ok(self.shared_reply(caller, &req, route, shared, started));
                        }
                        // The leader's call failed on the gateway's side (its answer broke
                        // off, or the gateway refused it): those waiting coalesce once more,
                        // behind one of them, rather than all calling Poe at once.
                        Waited::Failed if !led_once => {
                            led_once = true;
                            continue;
                        }
                        // A second leader failed too: make our own.
                        Waited::Failed => {
                            cache.count_miss();
                            return self
                                .fetch(caller, &req, route, bots, started, Some(&plan), hold)
                                .await;
                        }
                        // Its client went away: one of those still waiting takes over.
                        Waited::Cancelled => continue,
                    }
                }
            };
            cache.count_miss();
            let reply = match self
                .fetch(caller, &req, route, bots, started, Some(&plan), hold.take())
                .await
            {
                Ok(reply) => reply,
                Err(e) => {
                    guard.fail();
                    return Err(e);
                }
            };
            // Usually nobody waits on this answer (the window is the upstream's time to
            // its head, which is where a non-stream answer spends its seconds): then it
            // streams through the tap like any other, never buffered here. One that joins
            // after this check makes its own call, or hits the answer once it is stored.
            if !guard.has_followers() {
                return Ok(reply);
            }
            // Others wait: read the answer whole so they can share it.
            let Reply {
                status,
                headers,
                body,
                bot,
                attempts,
                cache: cache_status,
            } = reply;
            let bytes = match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    guard.fail();
                    // Its head not sent yet, the client gets a 502 rather than the cut
                    // body, with the headers any reply of a call has: a MISS, the attempts.
                    // (Its row, written by the tap as the body broke, keeps Poe's status
                    // and says `incomplete`.)
                    let (status, headers, body) = own_error(
                        &GatewayError::UpstreamUnreachable(e.to_string()),
                        req.endpoint(),
                    );
                    return Ok(Reply {
                        status,
                        headers,
                        body: ReplyBody::Full { data: Some(body) },
                        bot,
                        attempts,
                        cache: CacheStatus::Miss,
                    });
                }
            };
            guard.publish(Arc::new(Shared {
                status,
                headers: headers.clone(),
                body: bytes.clone(),
                bot: bot.clone(),
                usage: tap::json_usage(&bytes),
                attempts,
                answer: status.is_success() && !tap::is_error_object(req.endpoint(), &bytes),
            }));
            return Ok(Reply {
                status,
                headers,
                body: ReplyBody::Full { data: Some(bytes) },
                bot,
                attempts,
                cache: cache_status,
            });
        }
    }

    /// The upstream call with retries and fallbacks. `plan` is the cache's, when the answer
    /// may be stored. A request dropped before it has a reply still gets its ledger row.
    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        &self,
        caller: &Caller,
        req: &ChatRequest,
        route: Route<'_>,
        bots: &[String],
        started: Instant,
        plan: Option<&cache::Plan>,
        hold: Option<BudgetHold>,
    ) -> Result<Reply, GatewayError> {
        let inner = &*self.inner;
        let key = match &caller.credential {
            Credential::Server => inner.server_key.clone().ok_or_else(|| {
                GatewayError::Internal("the gateway has no POE_API_KEY configured".into())
            })?,
            Credential::Poe(k) => k.clone(),
        };
        // Disarmed at each way out below, which records its own row (the reply's, an
        // error's, a rejection's); dropped armed, it records a cancelled one.
        let mut watch = Unanswered::new(self, caller, req, route, bots, started);
        inner.budget.deposit(Instant::now(), inner.epoch);
        let retry = &inner.policy.retry;
        let mut attempts = 0u32;
        let mut last: Option<(Failure, &str)> = None;

        'bots: for (i, bot) in bots.iter().enumerate() {
            let has_next = i + 1 < bots.len();
            let body = req.upstream_body(bot);
            for try_no in 1..=retry.max_attempts {
                let attempt_span = if crate::telemetry::traces_enabled() {
                    tracing::info_span!(
                        "upstream attempt",
                        otel.name = "POST",
                        otel.kind = "client",
                        http.request.method = "POST",
                        url.full = %inner.upstream.uri(req.endpoint()),
                        server.address = inner.upstream.uri(req.endpoint()).host().unwrap_or(""),
                        gen_ai.request.model = %bot,
                        poe_gateway.attempt = attempts + 1,
                        http.response.status_code = tracing::field::Empty,
                        error.type = tracing::field::Empty,
                    )
                } else {
                    tracing::Span::none()
                };
                let admitted = match inner.limits.admit_now(&key) {
                    Some(p) => Ok(p),
                    // Boxed: a wait (or the shared limiter's round trip) is the rare case,
                    // and its state would grow every request's future.
                    None => Box::pin(inner.limits.admit(&key, inner.upstream.closed())).await,
                };
                let permit = match admitted {
                    Ok(p) => p,
                    // A retry queued here when a shutdown's grace ended: the 503 that a
                    // request waiting on Poe then gets, not Poe's earlier answer.
                    Err(GatewayError::ShuttingDown(_)) if last.is_some() => {
                        last = Some((
                            Failure::Transport(UpstreamError::Closed { sent: false }),
                            bot,
                        ));
                        break 'bots;
                    }
                    // A retry or fallback the gateway's own upstream limits refuse: Poe has
                    // already answered, and that answer is what the client gets and the
                    // ledger records, not a rejection with no attempts.
                    Err(_) if last.is_some() => break 'bots,
                    Err(e) => {
                        watch.armed = false;
                        self.record_refusal(caller, req, route, bots, &e, started);
                        return Err(e);
                    }
                };
                attempts += 1;
                watch.bot = bot;
                watch.attempts = attempts;
                let mut trace_headers = HeaderMap::new();
                crate::telemetry::inject_context(&attempt_span, &mut trace_headers);
                if let Some(h) = req.forwarded_headers() {
                    trace_headers.extend(h.iter().map(|(n, v)| (n.clone(), v.clone())));
                }
                watch.in_flight = true;
                let mut sent = inner
                    .upstream
                    .chat(
                        req.endpoint(),
                        body.clone(),
                        &key,
                        &caller.request_id,
                        trace_headers,
                    )
                    .instrument(attempt_span.clone())
                    .await;
                if let Err(e @ UpstreamError::Closed { sent: true }) = &sent {
                    // The shutdown's grace ran out while Poe had the call: Poe charges it,
                    // as when a client leaves before Poe's head, and the row is that one
                    // (cancelled, the prompt estimated and priced, by `watch`).
                    return Err(GatewayError::ShuttingDown(e.to_string()));
                }
                // A failed call costs nothing: a client that leaves from here on (reading
                // Poe's error body, a backoff) is not charged for it. But one given up on
                // before its head: Poe had it, and charges its prompt.
                watch.in_flight = false;
                if let Err(UpstreamError::Timeout(_)) = &sent {
                    watch.abandoned += 1;
                }
                // Poe may echo the key it was called with (an error message quoting the
                // Authorization value, a debug header). It must reach neither the client, nor
                // the logs and spans, nor an MCP answer.
                if let Ok(resp) = &mut sent {
                    key.redact_headers(resp.headers_mut());
                }
                match &sent {
                    Ok(resp) => {
                        attempt_span
                            .record("http.response.status_code", resp.status().as_u16() as i64);
                        if !resp.status().is_success() {
                            attempt_span.record("error.type", resp.status().as_str());
                        }
                    }
                    Err(e) => {
                        attempt_span.record("error.type", e.kind());
                    }
                }
                drop(attempt_span);
                let why_not = sent.as_ref().ok().and_then(|resp| unpassable(resp, req));
                // A redirect, or a compressed stream, is how Poe (or a proxy before it)
                // answers every attempt: made again, each would be an answer Poe produced
                // and bills, for the same 502.
                let hopeless = why_not.is_some()
                    && sent.as_ref().is_ok_and(|r| {
                        !r.status().is_client_error() && !r.status().is_server_error()
                    });
                let failure = match sent {
                    Ok(resp) if resp.status().is_success() && why_not.is_none() => {
                        let mut info = self.request_info(
                            caller,
                            req,
                            route,
                            bot,
                            resp.status().as_u16(),
                            attempts,
                            started,
                            false,
                        );
                        info.abandoned = watch.abandoned;
                        inner.acct.metrics.upstream_ok.inc();
                        watch.armed = false;
                        return Ok(
                            self.stream_reply(resp, info, permit, hold, attempts, req, plan, &key)
                        );
                    }
                    Ok(resp) => {
                        let (mut head, body) = resp.into_parts();
                        let body = match why_not {
                            // Not read: none of it is passed on.
                            Some(why) => {
                                if hopeless {
                                    // Nor would the client's SDK get anything else.
                                    head.headers.insert(
                                        SHOULD_RETRY_HEADER,
                                        http::HeaderValue::from_static("false"),
                                    );
                                }
                                own_error_body(&mut head, why, req.endpoint())
                            }
                            None => match read_error_body(body, inner.policy.timeouts.idle).await {
                                Ok(body) => crate::error::redact_secrets(body, &[key.expose()]),
                                // Poe's status still says what happened (a 400 is not
                                // retried, a 429 is); only its explanation is lost.
                                Err(why) => own_error_body(
                                    &mut head,
                                    &format!("its error body could not be read ({why})"),
                                    req.endpoint(),
                                ),
                            },
                        };
                        Failure::Status { head, body }
                    }
                    Err(e) => Failure::Transport(e),
                };
                drop(permit);
                let result = match &failure {
                    Failure::Status { head, .. } => format!("http_{}", head.status.as_u16()),
                    Failure::Transport(e) => e.kind().to_string(),
                };
                inner
                    .acct
                    .metrics
                    .upstream_attempts
                    .with_label_values(&[&result])
                    .inc();
                tracing::debug!(
                    request_id = %caller.request_id,
                    bot,
                    attempt = attempts,
                    status = failure_status(&failure),
                    "upstream attempt failed"
                );
                if failure.wrong_bot() && has_next {
                    last = Some((failure, bot));
                    continue 'bots;
                }
                if hopeless || !failure.retryable() {
                    last = Some((failure, bot));
                    break 'bots;
                }
                let asked = match &failure {
                    Failure::Status { head, .. } => {
                        retry::requested_wait(head.status, &head.headers)
                    }
                    Failure::Transport(_) => None,
                };
                last = Some((failure, bot));
                if try_no == retry.max_attempts {
                    continue 'bots;
                }
                let wait = match asked {
                    // Longer than we will hold the client: move on, or hand the 429 back now
                    // with its Retry-After so the client can schedule it.
                    Some(w) if w > retry.max_retry_after => continue 'bots,
                    Some(w) => w,
                    None => retry::backoff(retry, try_no - 1),
                };
                // Only a retry of the same bot spends the budget, and a spent budget moves
                // on to the chain's next bot: its first attempt is not a retry, and a chain
                // must reach a healthy bot even when a dead one has spent the budget.
                if !inner.budget.try_withdraw(Instant::now(), inner.epoch) {
                    // Counted, not logged at warn: it happens on every request while Poe
                    // fails, when a log line per request is the last thing wanted.
                    inner.acct.metrics.retries_skipped.inc();
                    tracing::debug!(request_id = %caller.request_id, bot, "retry budget spent; not retrying");
                    continue 'bots;
                }
                // Boxed: rare, and a sleep beside a shutdown's notice would grow every
                // request's future.
                Box::pin(inner.upstream.backoff(wait)).await;
            }
        }
        let (failure, bot) = last.expect("at least one attempt was made");
        // Boxed: the error path can fetch the catalogue for a suggestion, and that state
        // would otherwise more than double the size of every request's future (which is
        // allocated and moved whole on each request).
        let mut reply =
            Box::pin(self.error_reply(caller, req, route, failure, bot, &watch, started)).await;
        watch.armed = false;
        // A cacheable request that failed was still a miss (errors are never stored).
        if plan.is_some() {
            reply.cache = CacheStatus::Miss;
        }
        Ok(reply)
    }

    #[allow(clippy::too_many_arguments)]
    fn stream_reply(
        &self,
        resp: http::Response<upstream::Body>,
        info: RequestInfo,
        permit: tokio::sync::OwnedSemaphorePermit,
        hold: Option<BudgetHold>,
        attempts: u32,
        req: &ChatRequest,
        plan: Option<&cache::Plan>,
        key: &Secret,
    ) -> Reply {
        let (head, body) = resp.into_parts();
        let sse = is_event_stream(&head.headers, req);
        let bot = info.bot.clone();
        let cache_status = if plan.is_some() {
            CacheStatus::Miss
        } else {
            CacheStatus::Bypass
        };
        // (A compressed answer never comes here: `unpassable` refuses it.)
        let recorder = plan
            .and_then(|p| self.inner.cache.recorder(p, sse, &bot))
            .map(|mut r| {
                r.set_content_type(head.headers.get(header::CONTENT_TYPE).cloned());
                r
            });
        let completion = Completion::new(info, self.inner.acct.clone(), Some(permit)).holding(hold);
        let tap = Tap::new(
            body,
            sse,
            sse && req.injects_usage(),
            self.inner.policy.timeouts.idle,
            completion,
            recorder,
        )
        .answering(req.endpoint())
        // Applied only once an error shows (an error event, a 200 that is an error object):
        // an answer is not searched.
        .redacting(key.clone());
        Reply {
            status: head.status,
            headers: passthrough_headers(head.headers),
            body: ReplyBody::Stream { tap: Box::new(tap) },
            bot,
            attempts,
            cache: cache_status,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn error_reply(
        &self,
        caller: &Caller,
        req: &ChatRequest,
        route: Route<'_>,
        failure: Failure,
        bot: &str,
        watch: &Unanswered<'_>,
        started: Instant,
    ) -> Reply {
        let attempts = watch.attempts;
        let (status, headers, body) = match failure {
            Failure::Status { head, body } => {
                let body = if head.status == StatusCode::NOT_FOUND {
                    self.with_suggestion(body, bot).await
                } else {
                    body
                };
                let mut headers = passthrough_headers(head.headers);
                // A 429 goes back with a `Retry-After` the client's SDK understands, also
                // when Poe gave only its window reset.
                if head.status == StatusCode::TOO_MANY_REQUESTS
                    && !headers.contains_key(header::RETRY_AFTER)
                    && let Some(wait) = retry::requested_wait(head.status, &headers)
                {
                    headers.insert(header::RETRY_AFTER, crate::error::retry_after_value(wait));
                }
                (head.status, headers, body)
            }
            Failure::Transport(e) => {
                let err = match e {
                    UpstreamError::Timeout(_) => GatewayError::UpstreamTimeout(e.to_string()),
                    UpstreamError::Closed { .. } => GatewayError::ShuttingDown(e.to_string()),
                    _ => GatewayError::UpstreamUnreachable(e.to_string()),
                };
                own_error(&err, req.endpoint())
            }
        };
        let mut info = self.request_info(
            caller,
            req,
            route,
            bot,
            status.as_u16(),
            attempts,
            started,
            false,
        );
        info.unlisted = !self.known_bot(bot);
        info.abandoned = watch.abandoned;
        let observed = Observed {
            bytes: body.len() as u64,
            ..Observed::default()
        };
        Completion::new(info, self.inner.acct.clone(), None).finish(&observed, Outcome::Completed);
        Reply {
            status,
            headers,
            body: ReplyBody::Full { data: Some(body) },
            bot: bot.to_string(),
            attempts,
            cache: CacheStatus::Bypass,
        }
    }

    /// Poe's 404 for an unknown model, with `did you mean` added when a close name exists.
    /// The rest of Poe's error object is kept as it was.
    async fn with_suggestion(&self, body: Bytes, bot: &str) -> Bytes {
        let Ok(Ok(catalogue)) =
            tokio::time::timeout(std::time::Duration::from_secs(5), self.models()).await
        else {
            return body;
        };
        let Some(name) = catalogue.suggest(bot, &self.inner.aliases) else {
            return body;
        };
        let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return body;
        };
        let Some(msg) = doc
            .get_mut("error")
            .and_then(|e| e.get_mut("message"))
            .filter(|m| m.is_string())
        else {
            return body;
        };
        let text = format!(
            "{} (did you mean `{name}`?)",
            msg.as_str().unwrap_or_default()
        );
        *msg = serde_json::Value::String(text);
        serde_json::to_vec(&doc).map(Bytes::from).unwrap_or(body)
    }
}

/// The row of a request refused before any call to Poe.
fn rejected_row(
    caller: &Caller,
    endpoint: Endpoint,
    model: &str,
    bot: &str,
    stream: bool,
    err: &GatewayError,
    started: Instant,
) -> UsageRow {
    UsageRow {
        ts_ms: now_ms(),
        request_id: caller.request_id.to_string(),
        key_id: caller.key_id.as_deref().map(String::from),
        model: model.to_string(),
        bot: bot.to_string(),
        stream,
        status: err.status().as_u16(),
        outcome: "rejected",
        attempts: 0,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        api: endpoint.api(),
        ..UsageRow::default()
    }
}

impl Gateway {
    /// The response cache (admin purge, tests).
    pub fn cache(&self) -> &ResponseCache {
        &self.inner.cache
    }

    /// The request body for the access log, only when `log.bodies = true`.
    fn logged_body(&self, req: &ChatRequest) -> Option<Bytes> {
        self.inner.policy.log.bodies.then(|| req.body().clone())
    }

    #[allow(clippy::too_many_arguments)]
    fn request_info(
        &self,
        caller: &Caller,
        req: &ChatRequest,
        route: Route<'_>,
        bot: &str,
        status: u16,
        attempts: u32,
        started: Instant,
        cache_hit: bool,
    ) -> RequestInfo {
        RequestInfo {
            request_id: caller.request_id.clone(),
            key_id: caller.key_id.clone(),
            model: req.model().to_string(),
            alias: route.alias().map(String::from),
            bot: bot.to_string(),
            stream: req.stream(),
            api: req.endpoint().api(),
            status,
            attempts,
            started,
            cache_hit,
            span: tracing::Span::current(),
            request_body: self.logged_body(req),
            request_text_bytes: req.text_bytes(),
            abandoned: 0,
            unlisted: false,
        }
    }

    /// An answer from the cache: a JSON body at once, or a stream replayed through the tap
    /// (which strips the usage chunk again if this client did not ask for it).
    fn hit_reply(
        &self,
        caller: &Caller,
        req: &ChatRequest,
        route: Route<'_>,
        entry: Arc<cache::Entry>,
        started: Instant,
    ) -> Reply {
        let info = self.request_info(caller, req, route, &entry.bot, 200, 0, started, true);
        let mut headers = HeaderMap::new();
        if let Some(ct) = &entry.content_type {
            headers.insert(header::CONTENT_TYPE, ct.clone());
        }
        let completion = Completion::new(info, self.inner.acct.clone(), None);
        let body = if entry.stream {
            let pace = self.inner.policy.cache.replay_frame_delay;
            let replay = ReplayBody::new(entry.frames.clone(), pace);
            // A replay's gaps are the gateway's own pacing, not Poe's silence: a pace at or
            // over `timeouts.idle` ended every replay after its first frame, blaming Poe.
            let tap = Tap::new(
                replay,
                true,
                req.injects_usage(),
                self.inner.policy.timeouts.idle.saturating_add(pace),
                completion,
                None,
            );
            ReplyBody::Replay { tap: Box::new(tap) }
        } else {
            let data = entry.frames.first().cloned().unwrap_or_default();
            let observed = Observed {
                bytes: data.len() as u64,
                usage: entry.usage,
                ..Observed::default()
            };
            completion.finish(&observed, Outcome::Completed);
            ReplyBody::Full { data: Some(data) }
        };
        Reply {
            status: StatusCode::OK,
            headers,
            body,
            bot: entry.bot.clone(),
            attempts: 0,
            cache: CacheStatus::Hit,
        }
    }

    /// The answer another identical request fetched while this one waited.
    fn shared_reply(
        &self,
        caller: &Caller,
        req: &ChatRequest,
        route: Route<'_>,
        shared: Arc<Shared>,
        started: Instant,
    ) -> Reply {
        let ok = shared.answer;
        let info = self.request_info(
            caller,
            req,
            route,
            &shared.bot,
            shared.status.as_u16(),
            0,
            started,
            ok,
        );
        let observed = Observed {
            bytes: shared.body.len() as u64,
            usage: shared.usage,
            ..Observed::default()
        };
        let outcome = if shared.status.is_success() && !ok {
            Outcome::Incomplete("upstream answered 200 with an error object".into())
        } else {
            Outcome::Completed
        };
        Completion::new(info, self.inner.acct.clone(), None).finish(&observed, outcome);
        Reply {
            status: shared.status,
            headers: shared.headers.clone(),
            body: ReplyBody::Full {
                data: Some(shared.body.clone()),
            },
            bot: shared.bot.clone(),
            // A shared answer cost this request no call (its row says 0). A shared error
            // carries the leader's count, so the client is told, as the leader's was, not
            // to retry what the gateway already retried.
            attempts: if ok { 0 } else { shared.attempts },
            cache: if ok {
                CacheStatus::Hit
            } else {
                CacheStatus::Miss
            },
        }
    }
}

/// The gateway's own error as a reply's parts: its status, a JSON content type, and the
/// body in `api`'s shape.
fn own_error(err: &GatewayError, api: Endpoint) -> (StatusCode, HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    (err.status(), headers, err.to_json_for(api))
}

fn failure_status(f: &Failure) -> u16 {
    match f {
        Failure::Status { head, .. } => head.status.as_u16(),
        Failure::Transport(_) => 0,
    }
}

/// Reads an upstream error body, bounded in size and time.
async fn read_error_body(body: upstream::Body, idle: std::time::Duration) -> Result<Bytes, String> {
    match tokio::time::timeout(idle, Limited::new(body, ERROR_BODY_LIMIT).collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) => Err(format!("reading upstream error body: {e}")),
        Err(_) => Err("upstream error body timed out".into()),
    }
}

/// A request between its first look at Poe and its reply. Dropped while still armed (the
/// client hung up while the gateway waited on Poe's head or a retry's backoff; a shutdown
/// that ran out of grace), it records a `cancelled` row: every chat request is one row, and
/// Poe, once called, charges the prompt whether or not anyone reads the answer.
struct Unanswered<'a> {
    gateway: &'a Gateway,
    caller: &'a Caller,
    req: &'a ChatRequest,
    alias: Option<&'a str>,
    started: Instant,
    /// The bot last called (or about to be).
    bot: &'a str,
    attempts: u32,
    /// An attempt is out and its head not back: Poe may be answering, and charges for it.
    /// Between attempts (a retry's backoff) every call so far failed, and failed calls cost
    /// nothing.
    in_flight: bool,
    /// Attempts given up on before their head (see `RequestInfo::abandoned`).
    abandoned: u32,
    armed: bool,
}

impl<'a> Unanswered<'a> {
    /// Armed, before any attempt, for the chain's first bot.
    fn new(
        gateway: &'a Gateway,
        caller: &'a Caller,
        req: &'a ChatRequest,
        route: Route<'a>,
        bots: &'a [String],
        started: Instant,
    ) -> Self {
        // Counted from here, not only once Poe's head is back: a request waiting on Poe (its
        // first byte, a retry's backoff, the limiter) is in flight too, and during a drain or
        // a slow media bot that is most of them. The reply's completion counts it after.
        gateway.inner.acct.metrics.in_flight.inc();
        Unanswered {
            gateway,
            caller,
            req,
            alias: route.alias(),
            started,
            bot: bots.first().map_or(req.model(), String::as_str),
            attempts: 0,
            in_flight: false,
            abandoned: 0,
            armed: true,
        }
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.gateway.inner.acct.metrics.in_flight.dec();
        if !self.armed {
            return;
        }
        // Left while Poe had the call: the prompt is estimated as in any row without Poe's
        // usage, and priced.
        let prompts = u32::from(self.in_flight) + self.abandoned;
        let prompt = (prompts > 0)
            .then(|| i64::from(prompts) * completion::estimated_tokens(self.req.text_bytes()));
        let row = UsageRow {
            ts_ms: now_ms(),
            request_id: self.caller.request_id.to_string(),
            key_id: self.caller.key_id.as_deref().map(String::from),
            alias: self.alias.map(String::from),
            model: self.req.model().to_string(),
            bot: self.bot.to_string(),
            stream: self.req.stream(),
            // nginx's "client closed request": no status was sent.
            status: 499,
            outcome: "cancelled",
            prompt_tokens: prompt,
            completion_tokens: prompt.map(|_| 0),
            total_tokens: prompt,
            tokens_estimated: prompt.is_some(),
            // Left during a backoff or before any call: nothing Poe would charge (but the
            // attempts it gave up on before).
            cost_usd: (prompts == 0).then_some(0.0),
            attempts: self.attempts as i32,
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            api: self.req.endpoint().api(),
            ..UsageRow::default()
        };
        let reason = if self.in_flight {
            "the client went away before Poe's answer began"
        } else {
            "the client went away before the call to Poe was made or retried"
        };
        self.gateway.record_unreplied(row, reason);
    }
}

/// The body sent in place of an upstream error body that could not be read (cut off, too
/// large, too slow) or an answer that cannot be passed on, in the shape of the API asked,
/// with Poe's status kept (a 502 for a status that is no error).
fn own_error_body(head: &mut http::response::Parts, why: &str, api: Endpoint) -> Bytes {
    let message = format!("upstream answered {} and {why}", head.status);
    // A redirect is not the client's to follow (its SDK would send the prompt past the
    // gateway, to wherever `Location` points), nor an interim status its to read, nor a
    // stream it could not read: the gateway's upstream failed.
    if !head.status.is_client_error() && !head.status.is_server_error() {
        head.status = StatusCode::BAD_GATEWAY;
    }
    head.headers.remove(header::LOCATION);
    head.headers.remove(header::CONTENT_ENCODING);
    head.headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    // In the shape of the API asked (Anthropic's on the Messages API), as the gateway's
    // other errors are.
    GatewayError::UpstreamUnreachable(message).to_json_for(api)
}

/// Why an upstream answer cannot go to the client as it came, if it cannot: a redirect or an
/// interim status; an error body in a coding other than `identity` (the gateway asks for
/// `identity`; a proxy may compress anyway), whose text cannot be searched for the key; a
/// stream in such a coding, which the tap cannot read (it would end it with a plain-text
/// event under the coding's header, unreadable to the client). A compressed JSON answer
/// passes: the client decodes it, and only its token counts are estimated.
fn unpassable(resp: &http::Response<upstream::Body>, req: &ChatRequest) -> Option<&'static str> {
    let status = resp.status();
    if status.is_redirection() || status.is_informational() {
        return Some("the gateway follows no redirect and passes on no interim status");
    }
    if !is_encoded(resp.headers()) {
        return None;
    }
    if !status.is_success() {
        Some("its error body was compressed, so it could not be checked for the key")
    } else if is_event_stream(resp.headers(), req) {
        Some("its stream was compressed, which the gateway cannot read")
    } else {
        // The gateway asks for `identity`. A compressed answer could be neither accounted
        // (its usage unread, its tokens guessed from compressed bytes), nor checked for the
        // key when it is an error object, nor stored.
        Some("its answer was compressed, which the gateway cannot read or account for")
    }
}

/// A body in a coding other than `identity`.
fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"))
}

/// Whether an answer is an event stream. Media types compare without regard to case; a
/// stream asked for and answered with no type is read as the stream it is.
fn is_event_stream(headers: &HeaderMap, req: &ChatRequest) -> bool {
    match headers.get(header::CONTENT_TYPE) {
        Some(ct) => ct
            .as_bytes()
            .trim_ascii_start()
            .get(..17)
            .is_some_and(|t| t.eq_ignore_ascii_case(b"text/event-stream")),
        None => req.stream(),
    }
}

/// Upstream response headers minus hop-by-hop ones (RFC 9110 section 7.6.1) and those that
/// speak for Poe's origin, which the client would apply to the gateway's: cookies set by
/// Poe's CDN, `Alt-Svc` (an HTTP/3 endpoint the gateway does not have), HSTS (it would pin
/// the gateway's name to HTTPS), and CORS grants (they would let web pages read answers).
fn passthrough_headers(mut headers: HeaderMap) -> HeaderMap {
    const DROP: [HeaderName; 9] = [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::SET_COOKIE,
        header::ALT_SVC,
        header::STRICT_TRANSPORT_SECURITY,
    ];
    // hyper frames the body itself: a JSON body's exact size comes through the tap's size
    // hint, and a body the gateway edits (a suggestion, an error event) must not keep the old length.
    headers.remove(header::CONTENT_LENGTH);
    // Usually one of them at most is there (`Connection` from an HTTP/1.1 upstream): one look
    // over the few names present, then a removal (a hash and a probe) only for those found.
    let mut strip: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            DROP.contains(k)
                || k.as_str() == "keep-alive"
                || k.as_str() == "clear-site-data"
                || k.as_str().starts_with("access-control-")
        })
        .cloned()
        .collect();
    // So are the headers `Connection` names (`Connection: close, x-hop`). Its usual values
    // name no other header (`keep-alive` names one found above already).
    for value in headers.get_all(header::CONNECTION) {
        for name in value.to_str().unwrap_or("").split(',').map(str::trim) {
            if name.eq_ignore_ascii_case("keep-alive") || name.eq_ignore_ascii_case("close") {
                continue;
            }
            strip.extend(HeaderName::from_bytes(name.as_bytes()).ok());
        }
    }
    for h in strip {
        headers.remove(h);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_length_are_not_passed_on() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/json"),
            ("content-length", "12"),
            ("x-request-id", "abc"),
        ] {
            h.insert(HeaderName::from_static(k), v.parse().unwrap());
        }
        let kept = passthrough_headers(h.clone());
        assert_eq!(kept.len(), 2);
        assert!(!kept.contains_key(header::CONTENT_LENGTH));

        for (k, v) in [
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
        ] {
            h.insert(HeaderName::from_static(k), v.parse().unwrap());
        }
        let kept = passthrough_headers(h.clone());
        let mut names: Vec<&str> = kept.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-type", "x-request-id"]);

        // A header the `Connection` value names is hop-by-hop too.
        h.insert(header::CONNECTION, "close, X-Hop".parse().unwrap());
        h.insert(HeaderName::from_static("x-hop"), "1".parse().unwrap());
        let kept = passthrough_headers(h);
        assert!(!kept.contains_key("x-hop"));
        assert!(kept.contains_key("x-request-id"));
    }
}
