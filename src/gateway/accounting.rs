//! Pricing and budget charging, done by the ledger writer on each batch, off the request path:
//! the price needs Poe's catalogue, which a request must never wait for. The one exception is
//! a gateway key with a budget: its rows are priced and charged as the request ends
//! ([`Accountant::charge_now`]), from the catalogue already in memory.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::alias::Aliases;
use super::keys::KeyRing;
use super::models::{CacheWrites, Models, Price, PriceOverride};
use crate::ledger::{Api, BatchHook, UsageRow};
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// How often a missing catalogue is fetched again for pricing when Poe is unreachable.
const CATALOGUE_RETRY: Duration = Duration::from_secs(60);

pub struct Accountant {
    pub(crate) models: Arc<Models>,
    pub(crate) upstream: Arc<Upstream>,
    pub(crate) aliases: Arc<Aliases>,
    /// `[pricing]` overrides, by lower-cased bot name: they win over Poe's catalogue.
    pub(crate) overrides: HashMap<String, PriceOverride>,
    pub(crate) keys: Option<Arc<KeyRing>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl Accountant {
    /// The price of a bot: Poe's catalogue, with the policy's `[pricing]` fields over it;
    /// `None` if neither prices it.
    pub fn price(&self, bot: &str) -> Option<Price> {
        let poe = self.models.snapshot().and_then(|c| c.price(bot));
        if self.overrides.is_empty() {
            return poe;
        }
        // Claude Code names the bot by its Anthropic id; the override names the Poe bot.
        let o = self.overrides.get(&bot.to_ascii_lowercase()).or_else(|| {
            super::models::poe_id_of_anthropic_model(bot).and_then(|p| self.overrides.get(&p))
        });
        match o {
            Some(o) => Some(o.over(poe)),
            None => poe,
        }
    }

    /// Reads Poe's catalogue if none has been read yet (at most one try a minute, each
    /// bounded to 10 s), so rows can be priced. Callers that come while a read is under way
    /// wait for it, not only the first: requests let through before the prices are known
    /// would each be held at nothing against their key's budget.
    pub(crate) async fn ensure_catalogue(&self) {
        if self.models.loaded() {
            return;
        }
        // Held across the read, on purpose: only until a catalogue is first read (or while
        // Poe cannot give one, at most 10 s a minute).
        let mut last = self.last_fetch.lock().await;
        if self.models.loaded() || last.is_some_and(|t| t.elapsed() < CATALOGUE_RETRY) {
            return;
        }
        *last = Some(Instant::now());
        let fetch = self.models.get(&self.upstream, &self.aliases);
        match tokio::time::timeout(Duration::from_secs(10), fetch).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "model catalogue unavailable; pricing from [pricing] only")
            }
            Err(_) => {
                tracing::warn!("model catalogue fetch timed out; pricing from [pricing] only")
            }
        }
    }

    /// Prices a row of a key whose budget this process tracks, and charges it to the key's
    /// spend at once, as its request ends (before the response's last bytes go out). The
    /// writer takes rows only every 200 ms: a client sending one request after another would
    /// otherwise be let through with its last requests' cost missing from the check. A row
    /// that cannot be priced yet (no catalogue read) is left to the writer, like every other.
    pub fn charge_now(&self, row: &mut UsageRow) {
        let Some(keys) = &self.keys else {
            return;
        };
        if !row.key_id.as_deref().is_some_and(|k| keys.tracks_spend(k)) {
            return;
        }
        self.price_row(row);
        if let (Some(cost), Some(key_id)) = (row.cost_usd.filter(|c| *c > 0.0), &row.key_id) {
            row.charged = keys.charge_now(key_id, cost, row.ts_ms);
        }
    }

    /// Sets the row's cost (and what a hit saved), unless it has one already: a row priced
    /// as its request ended ([`charge_now`](Self::charge_now)), or one that says itself it
    /// cost nothing (a client gone during a retry's backoff).
    fn price_row(&self, row: &mut UsageRow) {
        if row.cost_usd.is_some() {
            return;
        }
        // Failed calls cost nothing; a cache hit costs nothing but saves its price. A request
        // cancelled before Poe's head (499) is priced: Poe was called. One cancelled before
        // any attempt (queued for the limiter) is not: Poe never was. A failed request whose
        // row has tokens carries the prompts of attempts given up on before their head
        // (`RequestInfo::abandoned`), which Poe charges.
        let never_sent = row.attempts == 0 && !row.cache_hit;
        if (row.status >= 400 && row.outcome != "cancelled" && row.prompt_tokens.is_none())
            || row.outcome == "rejected"
            || never_sent
        {
            row.cost_usd = Some(0.0);
            return;
        }
        let (prompt, completion) = (
            row.prompt_tokens.unwrap_or(0),
            row.completion_tokens.unwrap_or(0),
        );
        let priced = self.price(&row.bot).map(|p| match row.api {
            // Claude's: Anthropic's cache shares stand in for prices nobody gave.
            Api::Messages => p.cost_with_cache(
                prompt,
                completion,
                row.cache_read_tokens,
                CacheWrites {
                    total: row.cache_write_tokens,
                    hour: row.cache_write_1h_tokens,
                },
            ),
            Api::Chat | Api::Responses => {
                p.cost_with_known_cache(prompt, completion, row.cache_read_tokens)
            }
        });
        if row.cache_hit {
            row.cost_usd = Some(0.0);
            row.saved_usd = priced;
        } else {
            row.cost_usd = priced;
        }
    }
}

impl BatchHook for Accountant {
    fn before_write<'a>(
        &'a self,
        rows: &'a mut [UsageRow],
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            self.ensure_catalogue().await;
            for row in rows.iter_mut() {
                self.price_row(row);
                if let Some(cost) = row.cost_usd.filter(|c| *c > 0.0) {
                    self.metrics
                        .cost_usd
                        .with_label_values(&[&crate::metrics::bot_label(&row.bot)])
                        .inc_by(cost);
                }
            }
            if let Some(keys) = &self.keys {
                let charges = rows.iter().filter_map(|row| {
                    let cost = row.cost_usd.filter(|c| *c > 0.0)?;
                    Some((row.key_id.as_deref()?, cost, row.ts_ms, row.charged))
                });
                keys.charge(charges).await;
            }
        })
    }

    fn after_write(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Some(keys) = &self.keys {
                keys.forget_stale().await;
            }
        })
    }
}
