//! Poe's model catalogue, fetched upstream and kept for `upstream.models_ttl`, with one entry
//! added per alias so `client.models.list()` shows the short names too.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::alias::Aliases;
use crate::error::GatewayError;
use crate::upstream::{Upstream, UpstreamError};

/// The Poe bot id an Anthropic model id stands for, when `name` is one and differs:
/// `claude-sonnet-4-5-20250929` is `claude-sonnet-4.5`, `claude-3-5-haiku-latest` is
/// `claude-haiku-3.5`, `claude-opus-4-20250514` is `claude-opus-4`. Poe's Messages API takes
/// both names for one bot; its catalogue (and so its prices) has only its own.
pub fn poe_id_of_anthropic_model(name: &str) -> Option<String> {
    let prefix = name.get(..7)?;
    if !prefix.eq_ignore_ascii_case("claude-") {
        return None;
    }
    let lower = name.to_ascii_lowercase();
    let mut parts: Vec<&str> = lower.split('-').skip(1).collect();
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase());
    if parts
        .last()
        .is_some_and(|p| *p == "latest" || (p.len() == 8 && number(p)))
    {
        parts.pop();
    }
    // `claude-opus-4-0` is Anthropic's alias of `claude-opus-4`.
    let version = |major: &str, minor: &str| {
        if minor == "0" {
            major.to_string()
        } else {
            format!("{major}.{minor}")
        }
    };
    let poe = match parts[..] {
        [major, minor, family] if number(major) && number(minor) && word(family) => {
            format!("claude-{family}-{}", version(major, minor))
        }
        [major, family] if number(major) && word(family) => format!("claude-{family}-{major}"),
        [family, major, minor] if word(family) && number(major) && number(minor) => {
            format!("claude-{family}-{}", version(major, minor))
        }
        [family, major] if word(family) && number(major) => format!("claude-{family}-{major}"),
        _ => return None,
    };
    (poe != lower).then_some(poe)
}

/// Whether two model names name one bot: the same name in any case, or an Anthropic model
/// id and the Poe bot it stands for (or two ids of one bot).
pub fn same_bot(a: &str, b: &str) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    let (pa, pb) = (poe_id_of_anthropic_model(a), poe_id_of_anthropic_model(b));
    pa.as_deref()
        .unwrap_or(a)
        .eq_ignore_ascii_case(pb.as_deref().unwrap_or(b))
}

/// Largest catalogue accepted (Poe's is a few hundred entries, well under this).
const CATALOGUE_LIMIT: usize = 32 * 1024 * 1024;

/// A merged catalogue: the JSON served on `GET /v1/models`, plus the ids for look-ups.
#[derive(Debug)]
pub struct Catalogue {
    pub body: Bytes,
    entries: Vec<Value>,
    /// Upstream bot ids (not aliases), for `did you mean`.
    pub bot_ids: Vec<String>,
    /// Each entry's place and price by lower-case id, built once per catalogue: the ledger
    /// prices every row and the cache checks every stored answer's bot, and a scan of Poe's
    /// few hundred entries (plus string-to-number parses) per request added up.
    by_id: HashMap<String, Known>,
}

#[derive(Debug)]
struct Known {
    index: usize,
    price: Option<Price>,
    /// The entry lists an output other than text (an image, video or audio bot).
    media: bool,
}

impl Catalogue {
    fn new(body: Bytes, entries: Vec<Value>, bot_ids: Vec<String>) -> Self {
        let mut by_id = HashMap::new();
        for (index, e) in entries.iter().enumerate() {
            if let Some(id) = e.get("id").and_then(Value::as_str) {
                // The first entry of an id wins.
                by_id
                    .entry(id.to_ascii_lowercase())
                    .or_insert_with(|| Known {
                        index,
                        price: parse_price(e),
                        media: makes_media(e),
                    });
            }
        }
        Catalogue {
            body,
            entries,
            bot_ids,
            by_id,
        }
    }

    fn known(&self, id: &str) -> Option<&Known> {
        if id.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_id.get(&id.to_ascii_lowercase())
        } else {
            self.by_id.get(id)
        }
    }

    /// The bot `id` names: its own entry, or for an Anthropic model id (what Claude Code
    /// and Anthropic's SDKs send, and Poe's Messages API takes) the Poe bot it stands for.
    fn named(&self, id: &str) -> Option<&Known> {
        self.known(id)
            .or_else(|| self.by_id.get(&poe_id_of_anthropic_model(id)?))
    }

    /// Whether the catalogue has the bot `id` names (an Anthropic model id included).
    pub fn lists(&self, id: &str) -> bool {
        self.named(id).is_some()
    }

    /// One entry by id, case-insensitively.
    pub fn entry(&self, id: &str) -> Option<&Value> {
        self.known(id).map(|k| &self.entries[k.index])
    }

    pub fn entries(&self) -> &[Value] {
        &self.entries
    }

    /// Whether the catalogue says the bot answers with media. Looked up for every stored
    /// cache miss, so it is worked out once per catalogue.
    pub fn makes_media(&self, bot: &str) -> bool {
        self.named(bot).is_some_and(|k| k.media)
    }

    /// Poe's price for a bot (USD per token / per request), when the catalogue has one.
    pub fn price(&self, bot: &str) -> Option<Price> {
        self.named(bot).and_then(|k| k.price)
    }

    /// The closest bot or alias name to `model`, if one is close and not the same name.
    pub fn suggest<'a>(&'a self, model: &str, aliases: &'a Aliases) -> Option<&'a str> {
        let wanted = model.to_ascii_lowercase();
        let names = self
            .bot_ids
            .iter()
            .map(String::as_str)
            .chain(aliases.iter().map(|(n, _)| n));
        let mut best: Option<(&str, f64)> = None;
        for name in names {
            let lower = name.to_ascii_lowercase();
            if lower == wanted {
                return None;
            }
            let score = strsim::normalized_damerau_levenshtein(&wanted, &lower);
            if score >= 0.6 && best.is_none_or(|(_, s)| score > s) {
                best = Some((name, score));
            }
        }
        best.map(|(n, _)| n)
    }
}

/// Whether an entry's `architecture.output_modalities` holds anything but `"text"`.
fn makes_media(entry: &Value) -> bool {
    entry
        .pointer("/architecture/output_modalities")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|m| m.as_str().is_some_and(|m| m != "text")))
}

/// A `[pricing."bot"]` table: USD per prompt token, per completion token, per request, and
/// per prompt token read from or written to the bot's prompt cache. A field left out keeps
/// Poe's catalogue price for it (0 when Poe has none), so a table that only adds a
/// per-request fee does not zero the token prices.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriceOverride {
    pub prompt: Option<f64>,
    pub completion: Option<f64>,
    pub request: Option<f64>,
    pub cache_read: Option<f64>,
    pub cache_write: Option<f64>,
}

impl PriceOverride {
    /// This table over Poe's price for the bot, field by field.
    pub fn over(&self, poe: Option<Price>) -> Price {
        let poe = poe.unwrap_or_default();
        Price {
            prompt: self.prompt.unwrap_or(poe.prompt),
            completion: self.completion.unwrap_or(poe.completion),
            request: self.request.unwrap_or(poe.request),
            cache_read: self.cache_read.or(poe.cache_read),
            cache_write: self.cache_write.or(poe.cache_write),
        }
    }
}

/// USD per prompt token, per completion token, and per request; and per prompt token read
/// from or written to a prompt cache, when Poe's catalogue (`input_cache_read`,
/// `input_cache_write`) or the policy says.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Price {
    pub prompt: f64,
    pub completion: f64,
    pub request: f64,
    pub cache_read: Option<f64>,
    pub cache_write: Option<f64>,
}

/// Anthropic's prices for its prompt cache, as parts of the prompt price: a read costs a
/// tenth, a (five-minute) write a quarter more. Used for a bot whose cache prices neither
/// Poe's catalogue nor the policy gives.
const CACHE_READ_SHARE: f64 = 0.1;
const CACHE_WRITE_SHARE: f64 = 1.25;
/// A write kept for an hour costs twice the prompt price: 1.6 times a five-minute write,
/// which is what a given `cache_write` price is taken to be.
const CACHE_WRITE_1H_SHARE: f64 = 2.0;

/// Tokens written to a prompt cache: all of them, and of those the ones kept for an hour.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheWrites {
    pub total: i64,
    pub hour: i64,
}

impl Price {
    pub fn cost(&self, prompt_tokens: i64, completion_tokens: i64) -> f64 {
        self.cost_with_cache(prompt_tokens, completion_tokens, 0, CacheWrites::default())
    }

    /// The cost of a request whose prompt (`prompt_tokens`, all of it) includes tokens
    /// read from and written to the bot's prompt cache, each at its own price.
    pub fn cost_with_cache(
        &self,
        prompt_tokens: i64,
        completion_tokens: i64,
        cache_read: i64,
        writes: CacheWrites,
    ) -> f64 {
        let (read, write) = (cache_read.max(0), writes.total.max(0));
        let hour = writes.hour.clamp(0, write);
        let uncached = (prompt_tokens.max(0) - read - write).max(0);
        let read_price = self.cache_read.unwrap_or(self.prompt * CACHE_READ_SHARE);
        let write_price = self.cache_write.unwrap_or(self.prompt * CACHE_WRITE_SHARE);
        let hour_price = self
            .cache_write
            .map_or(self.prompt * CACHE_WRITE_1H_SHARE, |w| {
                w * CACHE_WRITE_1H_SHARE / CACHE_WRITE_SHARE
            });
        self.prompt * uncached as f64
            + read_price * read as f64
            + write_price * (write - hour) as f64
            + hour_price * hour as f64
            + self.completion * completion_tokens.max(0) as f64
            + self.request
    }

    /// The cost of a chat completions or Responses API request, whose prompt includes
    /// `cached` tokens read from the bot's prompt cache. They are priced at a cache-read price
    /// only where Poe's catalogue or the policy gives one, and otherwise at the prompt price:
    /// vendors' discounts differ, and a guessed one could under-charge a budget.
    pub fn cost_with_known_cache(
        &self,
        prompt_tokens: i64,
        completion_tokens: i64,
        cached: i64,
    ) -> f64 {
        let cached = if self.cache_read.is_some() { cached } else { 0 };
        self.cost_with_cache(
            prompt_tokens,
            completion_tokens,
            cached,
            CacheWrites::default(),
        )
    }
}

pub struct Models {
    cache: moka::future::Cache<(), Arc<Catalogue>>,
    /// The last good catalogue, served when a refresh fails.
    last_good: RwLock<Option<Arc<Catalogue>>>,
}

impl Models {
    pub fn new(ttl: Duration) -> Self {
        Models {
            cache: moka::future::Cache::builder()
                .max_capacity(1)
                .time_to_live(ttl)
                .build(),
            last_good: RwLock::new(None),
        }
    }

    /// The last catalogue fetched, without waiting for anything.
    pub fn snapshot(&self) -> Option<Arc<Catalogue>> {
        self.last_good.read().expect("models lock").clone()
    }

    /// Models whose catalogue was read already, with these entries (for unit tests).
    #[cfg(test)]
    pub(crate) fn read_already(entries: Vec<Value>) -> Models {
        let models = Models::new(Duration::from_secs(60));
        let ids = entries
            .iter()
            .filter_map(|e| e["id"].as_str().map(String::from))
            .collect();
        *models.last_good.write().expect("models lock") =
            Some(Arc::new(Catalogue::new(Bytes::new(), entries, ids)));
        models
    }

    /// Whether a catalogue has been read, without cloning it.
    pub fn loaded(&self) -> bool {
        self.last_good.read().expect("models lock").is_some()
    }

    /// The merged catalogue; concurrent callers on a miss share one upstream fetch.
    pub async fn get(
        &self,
        upstream: &Upstream,
        aliases: &Aliases,
    ) -> Result<Arc<Catalogue>, GatewayError> {
        let fetched = self
            .cache
            .try_get_with((), async {
                let cat = Arc::new(fetch(upstream, aliases).await?);
                *self.last_good.write().expect("models lock") = Some(cat.clone());
                Ok::<_, GatewayError>(cat)
            })
            .await;
        match fetched {
            Ok(cat) => Ok(cat),
            Err(e) => match self.last_good.read().expect("models lock").clone() {
                Some(stale) => {
                    tracing::warn!(error = %e, "model catalogue refresh failed; serving the last good copy");
                    Ok(stale)
                }
                None => Err((*e).clone()),
            },
        }
    }
}

async fn fetch(upstream: &Upstream, aliases: &Aliases) -> Result<Catalogue, GatewayError> {
    let (head, body) = upstream
        .models(CATALOGUE_LIMIT)
        .await
        .map_err(|e| match e {
            UpstreamError::Timeout(d) => GatewayError::UpstreamTimeout(format!(
                "model catalogue: no answer from upstream within {}s",
                d.as_secs()
            )),
            e => GatewayError::UpstreamUnreachable(format!("model catalogue: {e}")),
        })?;
    if !head.status.is_success() {
        return Err(catalogue_refused(&head, &body));
    }
    let mut doc: Map<String, Value> = serde_json::from_slice(&body).map_err(|e| {
        GatewayError::UpstreamUnreachable(format!("model catalogue is not valid JSON: {e}"))
    })?;
    let mut entries = match doc.remove("data") {
        Some(Value::Array(a)) => a,
        _ => {
            return Err(GatewayError::UpstreamUnreachable(
                "model catalogue has no `data` list".into(),
            ));
        }
    };
    let bot_ids: Vec<String> = entries
        .iter()
        .filter_map(|e| e.get("id").and_then(Value::as_str).map(String::from))
        .collect();
    for (name, bots) in aliases.iter() {
        let entry = alias_entry(name, bots, &entries);
        // An alias named like a bot stands in the bot's place, once (it was listed twice,
        // and `/v1/models/{id}` showed the bot): requests of that name reach the alias.
        let same = entries.iter().position(|e| {
            e.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| id.eq_ignore_ascii_case(name))
        });
        match same {
            Some(i) => entries[i] = entry,
            None => entries.push(entry),
        }
    }
    let body = serde_json::to_vec(&json!({"object": "list", "data": entries}))
        .map_err(|e| GatewayError::Internal(format!("model catalogue: {e}")))?;
    Ok(Catalogue::new(Bytes::from(body), entries, bot_ids))
}

/// Poe refused the catalogue: its rate limit and overload answers keep their meaning (a 429
/// with its Retry-After, a 503) so clients back off as they would for Poe; anything else is
/// the gateway's upstream failing (502). Poe's own message is kept.
fn catalogue_refused(head: &http::response::Parts, body: &[u8]) -> GatewayError {
    let said = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string));
    let message = match said {
        Some(m) => format!("model catalogue: upstream answered {}: {m}", head.status),
        None => format!("model catalogue: upstream answered {}", head.status),
    };
    match head.status.as_u16() {
        429 => GatewayError::RateLimited {
            message,
            retry_after: super::retry::requested_wait(head.status, &head.headers),
        },
        503 | 529 => GatewayError::Overloaded(message),
        _ => GatewayError::UpstreamUnreachable(message),
    }
}

/// An entry's `pricing` (strings or numbers), when it has any.
fn parse_price(entry: &Value) -> Option<Price> {
    let pricing = entry.get("pricing")?;
    let num = |k: &str| -> Option<f64> {
        match pricing.get(k)? {
            Value::String(s) => s.trim().parse().ok(),
            Value::Number(n) => n.as_f64(),
            _ => None,
        }
    };
    let (prompt, completion, request) = (num("prompt"), num("completion"), num("request"));
    if prompt.is_none() && completion.is_none() && request.is_none() {
        return None;
    }
    Some(Price {
        prompt: prompt.unwrap_or(0.0),
        completion: completion.unwrap_or(0.0),
        request: request.unwrap_or(0.0),
        cache_read: num("input_cache_read"),
        cache_write: num("input_cache_write"),
    })
}

/// An alias looks like the bot it points at (modalities, pricing, context window), with its
/// own id and a note of what it stands for.
fn alias_entry(name: &str, bots: &[String], catalogue: &[Value]) -> Value {
    let target = bots.first().map(String::as_str).unwrap_or_default();
    let base = catalogue.iter().find(|e| {
        e.get("id")
            .and_then(Value::as_str)
            .is_some_and(|i| i.eq_ignore_ascii_case(target))
    });
    let mut entry = match base {
        Some(Value::Object(o)) => o.clone(),
        _ => Map::new(),
    };
    entry.insert("id".into(), json!(name));
    entry.insert("object".into(), json!("model"));
    entry.entry("created").or_insert(json!(0));
    entry.insert("owned_by".into(), json!("poe-gateway"));
    entry.insert("root".into(), json!(target));
    entry.insert(
        "description".into(),
        json!(if bots.len() > 1 {
            format!("poe-gateway alias: tries {} in order", bots.join(", "))
        } else {
            format!("poe-gateway alias for {target}")
        }),
    );
    entry.insert("alias_of".into(), json!(bots));
    Value::Object(entry)
}

/// A warning for an admin whose new key's model list names what is neither an alias nor a
/// bot in Poe's catalogue (case-insensitively, as requests are matched; an Anthropic model id
/// counts as the bot it stands for), or whose list could not be checked: `catalogue` is the
/// catalogue, or why it could not be read. `None` when every name is known.
///
/// A warning, not a refusal: Poe answers bots its catalogue does not list, and a catalogue
/// read before Poe added a bot would otherwise lock the bot out of every new key. A typo
/// (`gpt-5o`) is still shown to the admin at once, with the closest known name.
pub fn model_list_warning(
    catalogue: Result<&Catalogue, &GatewayError>,
    aliases: &Aliases,
    names: &[String],
) -> Option<String> {
    let catalogue = match catalogue {
        Ok(c) => c,
        Err(e) => {
            return Some(format!(
                "`models` was not checked: Poe's model catalogue could not be read ({e}); the key allows the names as given"
            ));
        }
    };
    // As the key stores them: trimmed (" gpt " was warned about, and stored as "gpt").
    let unknown: Vec<String> = names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty() && aliases.resolve(n).alias().is_none() && !catalogue.lists(n))
        .map(|n| match catalogue.suggest(n, aliases) {
            Some(near) => format!("`{n}` (did you mean `{near}`?)"),
            None => format!("`{n}`"),
        })
        .collect();
    if unknown.is_empty() {
        return None;
    }
    let (is, it) = if unknown.len() == 1 {
        ("is neither an alias nor a bot", "it")
    } else {
        ("are neither aliases nor bots", "them")
    };
    Some(format!(
        "`models`: {} {is} in Poe's model catalogue; the key allows {it} as given, and Poe refuses a bot it does not have. If this is a typo, revoke the key and create it again",
        unknown.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_model_ids_name_poe_bots() {
        let poe = |n: &str| poe_id_of_anthropic_model(n);
        for (anthropic, bot) in [
            ("claude-sonnet-4-5-20250929", "claude-sonnet-4.5"),
            ("claude-opus-4-1-20250805", "claude-opus-4.1"),
            ("Claude-Haiku-4-5", "claude-haiku-4.5"),
            ("claude-sonnet-4-20250514", "claude-sonnet-4"),
            ("claude-3-5-haiku-20241022", "claude-haiku-3.5"),
            ("claude-3-7-sonnet-latest", "claude-sonnet-3.7"),
            ("claude-3-opus-20240229", "claude-opus-3"),
            ("claude-opus-4-0", "claude-opus-4"),
        ] {
            assert_eq!(poe(anthropic).as_deref(), Some(bot), "{anthropic}");
        }
        for name in [
            "claude-sonnet-4.5",
            "claude-sonnet-4",
            "claude",
            "gpt-5",
            "claude-x-y-z",
            "cl",
        ] {
            assert_eq!(poe(name), None, "{name}");
        }
        let entries = vec![
            json!({"id": "Claude-Sonnet-4.5", "pricing": {"prompt": "0.000003", "completion": "0.000015"}}),
        ];
        let cat = Catalogue::new(Bytes::new(), entries, vec![]);
        assert!(cat.price("claude-sonnet-4-5-20250929").is_some());
        assert!(cat.lists("claude-sonnet-4-5"));
        assert!(!cat.lists("claude-opus-4-5"));
        // `GET /v1/models/{id}` answers only the catalogue's own ids.
        assert!(cat.entry("claude-sonnet-4-5").is_none());
    }

    #[test]
    fn entries_and_prices_are_found_by_id_in_any_case_and_the_first_entry_wins() {
        let entries = vec![
            json!({"id": "GPT-5", "pricing": {"prompt": "0.000001", "completion": 0.00001}}),
            json!({"id": "free-bot", "pricing": {}}),
            json!({"id": "gpt-5", "pricing": {"prompt": "9", "completion": "9"}}),
            json!({"id": "no-pricing"}),
        ];
        let cat = Catalogue::new(Bytes::new(), entries, vec![]);
        let want = Some(Price {
            prompt: 0.000001,
            completion: 0.00001,
            request: 0.0,
            cache_read: None,
            cache_write: None,
        });
        assert_eq!(cat.price("gpt-5"), want);
        assert_eq!(cat.price("Gpt-5"), want);
        assert_eq!(cat.price("free-bot"), None);
        assert_eq!(cat.price("no-pricing"), None);
        assert_eq!(cat.price("unknown"), None);
        // Entries are found the same way, the first of an id winning.
        assert_eq!(cat.entry("gpt-5").unwrap()["pricing"]["prompt"], "0.000001");
        assert_eq!(cat.entry("NO-PRICING").unwrap()["id"], "no-pricing");
        assert!(cat.entry("unknown").is_none());
    }

    /// Cached tokens are a part of the prompt: the rest of it is priced at the prompt price,
    /// they at the cache's. Chat and Responses take no guessed cache price; the Messages API
    /// falls back to Anthropic's.
    #[test]
    fn cached_prompt_tokens_are_priced_once() {
        let known = Price {
            prompt: 10.0,
            completion: 100.0,
            request: 1.0,
            cache_read: Some(2.0),
            cache_write: None,
        };
        assert_eq!(
            known.cost_with_known_cache(50, 3, 40),
            10.0 * 10.0 + 40.0 * 2.0 + 300.0 + 1.0
        );
        let unknown = Price {
            cache_read: None,
            ..known
        };
        assert_eq!(
            unknown.cost_with_known_cache(50, 3, 40),
            unknown.cost(50, 3)
        );
        assert_eq!(unknown.cost(50, 3), 50.0 * 10.0 + 300.0 + 1.0);
        // More cached tokens than prompt tokens do not make the rest negative.
        assert_eq!(known.cost_with_known_cache(5, 0, 40), 40.0 * 2.0 + 1.0);
        // Anthropic's shares, where the Messages API has no cache prices.
        let writes = |total, hour| CacheWrites { total, hour };
        assert_eq!(
            unknown.cost_with_cache(130, 0, 100, writes(20, 0)),
            10.0 * 10.0 + 100.0 * 1.0 + 20.0 * 12.5 + 1.0
        );
        // An hour's writes at twice the prompt price, or 1.6 times a given write price.
        assert_eq!(
            unknown.cost_with_cache(130, 0, 100, writes(20, 5)),
            10.0 * 10.0 + 100.0 * 1.0 + 15.0 * 12.5 + 5.0 * 20.0 + 1.0
        );
        let priced = Price {
            cache_write: Some(5.0),
            ..unknown
        };
        assert_eq!(
            priced.cost_with_cache(130, 0, 100, writes(20, 5)),
            10.0 * 10.0 + 100.0 * 1.0 + 15.0 * 5.0 + 5.0 * 8.0 + 1.0
        );
    }

    #[test]
    fn media_bots_are_told_by_their_output_modalities() {
        let arch = |outputs: Value| json!({"architecture": {"output_modalities": outputs}});
        let mut entries = vec![
            arch(json!(["text"])),
            arch(json!(["text", "image"])),
            arch(json!(["video"])),
            json!({}),
        ];
        for (e, id) in entries
            .iter_mut()
            .zip(["text-bot", "Image-Bot", "video-bot", "bare"])
        {
            e["id"] = json!(id);
        }
        let cat = Catalogue::new(Bytes::new(), entries, vec![]);
        assert!(!cat.makes_media("text-bot"));
        assert!(cat.makes_media("image-bot"));
        assert!(cat.makes_media("VIDEO-bot"));
        assert!(!cat.makes_media("bare"));
        assert!(!cat.makes_media("unknown"));
    }
}
