//! What happens when a request's response ends: metrics, the ledger row, the access-log line.
//! It runs exactly once per request, from the tap (or at once for an answer already complete).

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::accounting::Accountant;
use super::tap::{Observed, Outcome};
use crate::ledger::{Api, Ledger, UsageRow, now_ms};
use crate::metrics::{Metrics, key_label};

/// Where completions report to.
pub struct Accounting {
    pub metrics: Arc<Metrics>,
    pub ledger: Ledger,
    /// Charges the rows of keys with a budget as they finish (the gateway's pricing);
    /// `None` where nothing is priced (benchmarks, property tests).
    pub charger: Option<Arc<Accountant>>,
}

/// Facts about a request known before its body ends.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub request_id: Arc<str>,
    pub key_id: Option<Arc<str>>,
    pub model: String,
    pub alias: Option<String>,
    pub bot: String,
    pub stream: bool,
    /// The API the request came in on.
    pub api: Api,
    pub status: u16,
    pub attempts: u32,
    pub started: Instant,
    pub cache_hit: bool,
    /// The request's span (`Span::none()` when traces are off); it ends with the body.
    pub span: tracing::Span,
    /// Set only when `log.bodies = true`: the request as the client sent it.
    pub request_body: Option<bytes::Bytes>,
    /// The bot is not one the gateway knows of (no alias names it, the catalogue does not
    /// list it) and Poe did not answer it: its metrics go under `other`, so that names a client
    /// makes up cannot grow the metric series without bound. The row keeps the name.
    pub unlisted: bool,
    /// Bytes of the request's text ([`super::ChatRequest::text_bytes`]): the prompt estimate
    /// when Poe's usage is missing.
    pub request_text_bytes: u64,
    /// Attempts Poe had that the gateway gave up on before their head came (first-byte
    /// timeouts). Poe charges each one's prompt, as it does a client's that leaves then: the
    /// row adds their prompts, estimated, and is priced even when the request failed.
    pub abandoned: u32,
}

/// Tokens in `bytes` of text, estimated (a token per 4 bytes, rounded up) where Poe gave no
/// usage.
pub fn estimated_tokens(bytes: u64) -> i64 {
    tokens(bytes.div_ceil(4))
}

/// The most tokens a row records for one count: far over any real answer, and low enough
/// that no number of rows overflows the ledger's sums. An upstream's count of 2^64 - 1 was
/// stored as -1 (the completion then free), and two such rows failed every report.
const MAX_TOKENS: u64 = 1_000_000_000;

/// A count from upstream as the row stores it.
fn tokens(n: u64) -> i64 {
    n.min(MAX_TOKENS) as i64
}

/// The metric label for bots the gateway does not know of ([`RequestInfo::unlisted`]).
pub const UNLISTED: &str = "other";

pub struct Completion {
    info: RequestInfo,
    acct: Arc<Accounting>,
    /// The upstream concurrency slot, held until the body ends.
    _permit: Option<OwnedSemaphorePermit>,
    /// The request's estimated cost, held against its key's budget until [`Completion::finish`]
    /// has charged its row (fields drop after the body of `finish`).
    _hold: Option<super::keys::BudgetHold>,
    /// The key that made this Responses answer has been recorded as its owner.
    owner_told: bool,
}

impl Completion {
    /// Poe's usage for the answer as estimated when it gave none: what the row charges, and
    /// what a stored JSON answer's hits then save.
    pub(crate) fn estimated_usage(&self, o: &Observed) -> super::tap::Usage {
        let prompt = estimated_tokens(self.info.request_text_bytes) as u64;
        let completion = estimated_tokens(o.text_bytes) as u64;
        super::tap::Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cache_read_tokens: 0,
        }
    }

    pub fn new(
        info: RequestInfo,
        acct: Arc<Accounting>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        acct.metrics.in_flight.inc();
        if info.stream {
            acct.metrics.streams_in_flight.inc();
        }
        Completion {
            info,
            acct,
            _permit: permit,
            _hold: None,
            owner_told: false,
        }
    }

    /// A Responses answer is whole (`response.completed` came): its key is recorded as its
    /// owner now, not at the body's end, since the client may continue it at once (the
    /// body may linger after its last event).
    pub fn answer_whole(&mut self, observed: &Observed) {
        if !self.owner_told {
            self.owner_told = true;
            self.tell_owner(observed);
        }
    }

    /// Records that this request's gateway key made the Responses answer `observed` saw.
    fn tell_owner(&self, observed: &Observed) {
        if let (Some(id), Some(key_id), Some(charger)) = (
            observed.response_id.as_deref(),
            &self.info.key_id,
            &self.acct.charger,
        ) && let Some(keys) = &charger.keys
        {
            keys.made_response(id, key_id);
        }
    }

    /// Holds `hold` until this request has been accounted.
    pub fn holding(mut self, hold: Option<super::keys::BudgetHold>) -> Self {
        self._hold = hold;
        self
    }

    /// Whether the request has a span (traces are on) to record what the body showed.
    pub fn traced(&self) -> bool {
        !self.info.span.is_none()
    }

    pub fn finish(mut self, observed: &Observed, outcome: Outcome) {
        let m = &self.acct.metrics;
        m.in_flight.dec();
        if self.info.stream {
            m.streams_in_flight.dec();
        }
        let unlisted = self.info.unlisted;
        if !self.owner_told {
            self.tell_owner(observed);
        }
        let row = usage_row(&mut self.info, observed, &outcome);
        let bot = if unlisted {
            std::borrow::Cow::Borrowed(UNLISTED)
        } else {
            crate::metrics::bot_label(&row.bot)
        };
        let bot = &*bot;
        // The code's digits from http's table, so no allocation per request.
        let code = http::StatusCode::from_u16(row.status);
        let status = match &code {
            Ok(c) => std::borrow::Cow::Borrowed(c.as_str()),
            Err(_) => std::borrow::Cow::Owned(row.status.to_string()),
        };
        m.requests
            .with_label_values(&[bot, &status, key_label(row.key_id.as_deref())])
            .inc();
        if let Some(t) = row.prompt_tokens {
            m.prompt_tokens
                .with_label_values(&[bot])
                .inc_by(t.max(0) as u64);
        }
        if let Some(t) = row.completion_tokens {
            m.completion_tokens
                .with_label_values(&[bot])
                .inc_by(t.max(0) as u64);
        }
        let s = usize::from(row.stream);
        m.duration_by_stream[s].observe(row.latency_ms / 1000.0);
        if let Some(ttfb) = row.ttfb_ms {
            m.ttfb_by_stream[s].observe(ttfb / 1000.0);
        }
        let reason = match &outcome {
            Outcome::Incomplete(r) => r.as_str(),
            _ => "",
        };
        record_span(&self.info.span, &row, observed, &outcome);
        let request_body = self
            .info
            .request_body
            .as_ref()
            .map(|b| String::from_utf8_lossy(&b[..b.len().min(64 * 1024)]).into_owned());
        self.acct
            .close(row, reason, observed.bytes, request_body.as_deref());
    }
}

impl Accounting {
    /// The end of every request, answered or not: its access line, its charge to a budget,
    /// and its ledger row.
    pub(crate) fn close(
        &self,
        mut row: UsageRow,
        reason: &str,
        bytes: u64,
        request_body: Option<&str>,
    ) {
        log_access(&row, reason, bytes, request_body);
        if let Some(a) = &self.charger {
            a.charge_now(&mut row);
        }
        self.ledger.record(row);
    }
}

/// The GenAI and gateway attributes known once the response has ended.
fn record_span(span: &tracing::Span, row: &UsageRow, o: &Observed, outcome: &Outcome) {
    if span.is_none() {
        return;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    span.record("gen_ai.response.model", row.bot.as_str());
    if let Some(t) = row.prompt_tokens {
        span.record("gen_ai.usage.input_tokens", t);
    }
    if let Some(t) = row.completion_tokens {
        span.record("gen_ai.usage.output_tokens", t);
    }
    if !o.finish_reasons.is_empty() {
        let reasons: Vec<opentelemetry::StringValue> =
            o.finish_reasons.iter().map(|r| r.clone().into()).collect();
        span.set_attribute(
            "gen_ai.response.finish_reasons",
            opentelemetry::Value::Array(reasons.into()),
        );
    }
    span.record("http.response.status_code", row.status as i64);
    span.record("poe_gateway.attempts", row.attempts as i64);
    span.record("poe_gateway.cache_hit", row.cache_hit);
    span.record("poe_gateway.outcome", row.outcome);
    if let Some(ttfb) = row.ttfb_ms {
        span.record("poe_gateway.ttfb_ms", ttfb);
    }
    if row.status >= 400 {
        span.record("error.type", row.status.to_string().as_str());
    } else if let Outcome::Incomplete(_) | Outcome::Cancelled = outcome {
        span.record("error.type", row.outcome);
    }
    // The OpenTelemetry layer ends a span at its last exit, not when it is dropped: the
    // request's span was last entered while the response head was made, so a stream's span
    // would end there. Entered once more here, it ends with the body.
    drop(span.enter());
}

/// One access line per request: every request that ends writes one, a refused one too. Never
/// bodies (but `request_body`, which only `log.bodies = true` sets), never keys: only the
/// key's id. Strings go as `&str`, not `%`: a `Display` field is formatted, then escaped, on
/// every line.
fn log_access(row: &UsageRow, reason: &str, bytes: u64, request_body: Option<&str>) {
    tracing::info!(
        target: "poe_gateway::access",
        request_id = row.request_id.as_str(),
        key_id = row.key_id.as_deref().unwrap_or(""),
        model = row.model.as_str(),
        alias = row.alias.as_deref().unwrap_or(""),
        bot = row.bot.as_str(),
        stream = row.stream,
        api = row.api.as_str(),
        status = row.status,
        attempts = row.attempts,
        outcome = row.outcome,
        reason,
        cache_hit = row.cache_hit,
        latency_ms = row.latency_ms,
        ttfb_ms = row.ttfb_ms,
        prompt_tokens = row.prompt_tokens,
        completion_tokens = row.completion_tokens,
        tokens_estimated = row.tokens_estimated,
        bytes,
        request_body,
        "request finished"
    );
}

/// The ledger row for a finished request. Without Poe's usage (a stream that broke or was
/// cancelled, or an answer that came without it), the tokens are estimated, a token per 4
/// bytes, and flagged as estimated: the prompt from the request's strings (keys included,
/// `data:` attachments not), the completion from the text received. Poe charges a cut-off
/// request's prompt in full, and a budget must too. The request's names move into the row:
/// the request is over.
fn usage_row(i: &mut RequestInfo, o: &Observed, outcome: &Outcome) -> UsageRow {
    let (prompt, completion, total, estimated) = match o.usage {
        // Poe's prompt count, and the streamed text for the output it did not report.
        Some(u) if o.output_unreported() => {
            let completion = tokens(u.completion_tokens).max(estimated_tokens(o.text_bytes));
            let prompt = tokens(u.prompt_tokens);
            (
                Some(prompt),
                Some(completion),
                Some(prompt + completion),
                true,
            )
        }
        Some(u) => (
            Some(tokens(u.prompt_tokens)),
            Some(tokens(u.completion_tokens)),
            Some(tokens(u.total_tokens)),
            false,
        ),
        // A hit of an answer that came without usage saves what its miss was charged: an
        // estimate (it recorded no tokens, and so saved $0).
        None if (200..300).contains(&i.status) => {
            let prompt = estimated_tokens(i.request_text_bytes);
            let completion = estimated_tokens(o.text_bytes);
            (
                Some(prompt),
                Some(completion),
                Some(prompt + completion),
                true,
            )
        }
        None => (None, None, None, false),
    };
    let (prompt, completion, total, estimated) = match i.abandoned {
        0 => (prompt, completion, total, estimated),
        n => {
            let extra = i64::from(n) * estimated_tokens(i.request_text_bytes);
            (
                Some(prompt.unwrap_or(0) + extra),
                Some(completion.unwrap_or(0)),
                Some(total.unwrap_or(0) + extra),
                true,
            )
        }
    };
    // The prompt cache's share of the prompt, when Poe reported usage: reads on every API
    // (capped at the prompt, of which they are a part), writes on the Messages API only. A
    // hit of the gateway's own cache called no bot, so no bot's cache was read: none, whichever
    // tier answered (a stored answer may keep its usage's counts, the shared tier does not).
    let cache_read = o
        .usage
        .filter(|_| !i.cache_hit)
        .map_or(0, |u| tokens(u.cache_read_tokens.min(u.prompt_tokens)));
    let writes = o
        .messages_usage
        .as_deref()
        .filter(|_| o.usage.is_some() && !i.cache_hit);
    let cache_write = writes.map_or(0, |m| tokens(m.cache_creation.unwrap_or(0)));
    let cache_write_1h = writes.map_or(0, |m| tokens(m.cache_creation_1h.unwrap_or(0)));
    UsageRow {
        ts_ms: now_ms(),
        request_id: i.request_id.to_string(),
        key_id: i.key_id.as_deref().map(String::from),
        alias: i.alias.take(),
        model: std::mem::take(&mut i.model),
        bot: std::mem::take(&mut i.bot),
        stream: i.stream,
        status: i.status,
        outcome: outcome.as_str(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: total,
        tokens_estimated: estimated,
        cost_usd: None,
        cache_hit: i.cache_hit,
        saved_usd: None,
        attempts: i.attempts as i32,
        latency_ms: i.started.elapsed().as_secs_f64() * 1000.0,
        api: i.api,
        ttfb_ms: o
            .first_byte
            .map(|t| t.duration_since(i.started).as_secs_f64() * 1000.0),
        cache_read_tokens: cache_read,
        cache_write_tokens: cache_write,
        cache_write_1h_tokens: cache_write_1h.min(cache_write),
        charged: false,
    }
}
