//! What happens when a request's response ends: the access-log line and the in-flight count.
//! Later layers (ledger, metrics, cache fill) hang off the same hook.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::tap::{Observed, Outcome};

/// Counters shared by every request; lock-free so the hot path never waits on them.
#[derive(Debug, Default)]
pub struct Stats {
    pub in_flight: AtomicI64,
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
    pub status: u16,
    pub attempts: u32,
    pub started: Instant,
}

/// Runs exactly once per request, when its response body ends in any way.
pub struct Completion {
    info: RequestInfo,
    stats: Arc<Stats>,
    /// The upstream concurrency slot, held until the body ends.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Completion {
    pub fn new(info: RequestInfo, stats: Arc<Stats>, permit: Option<OwnedSemaphorePermit>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Completion {
            info,
            stats,
            _permit: permit,
        }
    }

    pub fn finish(self, observed: &Observed, outcome: Outcome) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let i = &self.info;
        let elapsed = i.started.elapsed();
        let ttfb_ms = observed
            .first_byte
            .map(|t| t.duration_since(i.started).as_secs_f64() * 1000.0);
        let usage = observed.usage.unwrap_or_default();
        let reason = match &outcome {
            Outcome::Incomplete(r) => r.as_str(),
            _ => "",
        };
        // One access line per request. Never bodies, never keys: only the key's id.
        tracing::info!(
            target: "poe_gateway::access",
            request_id = %i.request_id,
            key_id = i.key_id.as_deref().unwrap_or(""),
            model = %i.model,
            alias = i.alias.as_deref().unwrap_or(""),
            bot = %i.bot,
            stream = i.stream,
            status = i.status,
            attempts = i.attempts,
            outcome = outcome.as_str(),
            reason,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            ttfb_ms,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            bytes = observed.bytes,
            "request finished"
        );
    }
}
