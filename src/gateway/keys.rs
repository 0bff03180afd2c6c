//! Gateway-issued keys (`auth.mode = "keys"`): look-up, per-key RPM, budgets and model lists.
//!
//! Keys are stored as SHA-256 hashes only. A presented key is hashed and found by its hash, so
//! the secret itself is never compared (the hash comparison is constant-time as well). Records
//! are cached for a few seconds: a revocation through the admin API takes effect at once on
//! this replica, and one made elsewhere (the CLI, another replica) within `CACHE_TTL`.
//!
//! The store (the ledger's database) can fail or hang. Then every key look-up would fail or
//! wait with it, and a team's whole gateway would stop. So a look-up waits at most
//! `LOOKUP_TIMEOUT`; after a failure the store is left alone for `STORE_BACKOFF`; and
//! meanwhile keys the store confirmed within `LAST_KNOWN_WINDOW` before the outage began are
//! answered from memory. Keys in use are confirmed every `CACHE_TTL`, so they keep working;
//! a revocation made elsewhere within that window waits for the store to come back. Other
//! keys get a 503.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::cache::KeyHash;
use super::limits::TokioClock;
use crate::config::FailurePolicy;
use crate::error::GatewayError;
use crate::ledger::{KeyRecord, Period, Store, now_ms};
use crate::shared_state::{HoldVerdict, SharedHold, SharedState, Unavailable};

const CACHE_TTL: Duration = Duration::from_secs(5);
/// How recently before an outage the store must have confirmed a key for it to be answered
/// from memory during the outage.
const LAST_KNOWN_WINDOW: Duration = Duration::from_secs(10 * 60);
/// How long a confirmed record is kept at all: the longest outage keys in use outlive.
const LAST_KNOWN_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest a look-up waits for the store: a database that hangs must not hang requests.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed look-up, the store is left alone this long (no request waits on it).
const STORE_BACKOFF: Duration = Duration::from_secs(5);
/// What a store call given [`LOOKUP_TIMEOUT`] came to; a failure as the text to log. (A
/// wrapping future would grow every request's future: the budget check's state is in it.)
fn looked_up<T, E: std::fmt::Display>(
    answer: Result<Result<T, E>, tokio::time::error::Elapsed>,
) -> Result<T, String> {
    match answer {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer in {}s", LOOKUP_TIMEOUT.as_secs())),
    }
}

#[derive(Debug, Clone, Copy)]
struct Outage {
    /// The first failure.
    since: tokio::time::Instant,
    /// The store is left alone until then.
    until: tokio::time::Instant,
}

/// Prefix of every gateway key, so secret scanners and people can tell what one is.
pub const KEY_PREFIX: &str = "pgw_";
/// What every key id starts with (ids are shown in reports and revoke keys too).
const KEY_ID_PREFIX: &str = "key_";
/// How a passthrough caller's id starts: `pt_` and a hash of its Poe key.
pub const PASSTHROUGH_ID_PREFIX: &str = "pt_";

type KeyLimiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

pub struct KeyRing {
    store: Store,
    /// Key records by the SHA-256 of the key (`None`: no such key), for [`CACHE_TTL`]. Keyed
    /// by the digest's bytes, not its hex: a look-up on every request then needs no string
    /// made and no SipHash over 64 characters.
    cache: moka::future::Cache<KeyDigest, Option<Arc<KeyRecord>>, KeyHash>,
    /// Records of keys that were found, and when the store last confirmed each: the answer
    /// while the store fails.
    last_known: moka::sync::Cache<KeyDigest, (Arc<KeyRecord>, tokio::time::Instant), KeyHash>,
    /// While the store fails; `None` while it answers.
    store_down: Mutex<Option<Outage>>,
    /// Per-key RPM limiters, made on first use with the key's own quota.
    limiters: Mutex<HashMap<String, (u32, Arc<KeyLimiter>)>>,
    /// Spend in the current budget period, per key id.
    spend: Mutex<HashMap<String, Spend>>,
    /// Shared spend counters (key id, period start) that missed a charge (Redis failed, or
    /// the counter was gone): each is dropped and seeded from the ledger again, or it would
    /// stay short of the ledger for the rest of the period. The flag says whether the ledger
    /// has the rows that missed it yet; a counter is dropped only after that, or a replica
    /// could seed it again from a read made before them. Until it is dropped, budget checks
    /// do not trust it.
    stale: Mutex<HashMap<(String, i64), bool>>,
    clock: TokioClock,
    /// Replicas share RPM and spend through Redis when it is configured.
    shared: Option<Arc<SharedState>>,
    limits_on_error: FailurePolicy,
    budgets_on_error: FailurePolicy,
    /// The Responses answers made with each gateway key (response id to key id): every key
    /// shares the server's Poe account, which would continue any key's stored conversation
    /// for whoever names its id. Kept in this process only (see [`RESPONSES_KEPT`]).
    responses: moka::sync::Cache<Box<str>, Arc<str>>,
    /// What the admitted requests of each key with a budget may cost, until each is charged
    /// (see [`BudgetHold`]).
    held: Mutex<HashMap<Arc<str>, Held>>,
}

/// The estimated cost of a key's requests in flight, and how many they are.
#[derive(Debug, Default)]
struct Held {
    usd: f64,
    requests: u32,
}

/// A request's estimated cost, held against its key's budget from its admission until its
/// ledger row has been charged (the hold goes with the request's response and is dropped
/// after it is accounted) or it ends some other way. A budget check counts the holds of the
/// key's other requests: without them, any number of parallel requests passed a check that
/// only the spend of finished ones could fail (20 streams on a $0.05 key spent $0.36).
/// Boxed, so a request's future grows by a pointer.
pub struct BudgetHold(Box<HoldInner>);

struct HoldInner {
    ring: Arc<KeyRing>,
    key_id: Arc<str>,
    usd: f64,
    /// The same hold in Redis, where every replica's checks count it; released on drop.
    _shared: Option<SharedHoldGuard>,
}

/// A hold in Redis, released when dropped.
struct SharedHoldGuard {
    state: Arc<SharedState>,
    hold: Option<SharedHold>,
}

impl Drop for SharedHoldGuard {
    fn drop(&mut self) {
        if let Some(hold) = self.hold.take() {
            self.state.release_later(hold);
        }
    }
}

/// What the shared budget check found.
enum SharedCheck {
    /// No Redis, or Redis is down and budgets fail open: this replica checks on its own.
    Unshared,
    Admitted(SharedHoldGuard),
    Refused(GatewayError),
}

/// The refusal of a key whose budget is spent.
fn spent_error(period: Period, budget: f64, spent: f64) -> GatewayError {
    GatewayError::QuotaExceeded(format!(
        "this key has used its budget of ${} {} (spent ${spent:.4})",
        usd(budget),
        period_words(period),
    ))
}

/// The refusal of a key whose budget's rest is held by its requests in flight: not spent
/// yet, as those requests may cost less than held, so a 429 the SDKs retry.
fn held_error(period: Period, budget: f64, spent: f64, held: f64, n: u32) -> GatewayError {
    GatewayError::RateLimited {
        message: format!(
            "this key's budget of ${} {} is taken up: ${spent:.4} spent, and an estimated \
             ${held:.4} held by its {n} request{} in flight; retry when {} finish{}",
            usd(budget),
            period_words(period),
            if n == 1 { "" } else { "s" },
            if n == 1 { "it" } else { "they" },
            if n == 1 { "es" } else { "" },
        ),
        retry_after: Some(BUDGET_HELD_RETRY),
    }
}

fn period_words(period: Period) -> &'static str {
    match period {
        Period::Day => "for today (UTC)",
        Period::Month => "for this month (UTC)",
        Period::Total => "in total",
    }
}

impl std::fmt::Debug for BudgetHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetHold")
            .field("key_id", &self.0.key_id)
            .field("usd", &self.0.usd)
            .finish()
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        let HoldInner {
            ring, key_id, usd, ..
        } = &*self.0;
        let mut held = ring.held.lock().expect("held lock");
        if let Some(h) = held.get_mut(key_id) {
            h.requests = h.requests.saturating_sub(1);
            if h.requests == 0 {
                // Emptied, not left at a float's remainder.
                held.remove(key_id);
            } else {
                h.usd = (h.usd - usd).max(0.0);
            }
        }
    }
}

/// How many Responses answers' owners are kept, and for how long: about what Poe keeps
/// them for. An answer made before a restart, or by another replica, cannot be continued
/// with `previous_response_id` through this gateway (the request is refused as for an
/// unknown id; the client sends the conversation instead).
const RESPONSES_KEPT: (u64, Duration) = (200_000, Duration::from_secs(30 * 24 * 3600));

/// The wait a request refused for its key's requests in flight is told to retry after.
const BUDGET_HELD_RETRY: Duration = Duration::from_secs(1);

/// How long a spend counter lives before the next check seeds it from the ledger again. A
/// counter can miss charges in ways no replica can repair: the one that knew died first (its
/// charge refused during a failover, then SIGTERM), or a seed read the ledger just before a
/// batch landed. Seeded afresh each minute, it is right again within one.
const SPEND_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Spend {
    period: Period,
    period_start: i64,
    usd: f64,
    /// Charged as requests ended ([`KeyRing::charge_now`]) and not yet passed on by the
    /// ledger writer, which adds them to the shared counter with its next batch: a budget
    /// check adds this to Redis's figure (or, without Redis, to the ledger's), so this
    /// replica's own last requests are never missing from it.
    unshared: f64,
    /// When `usd` was last read from the ledger (without Redis; see [`SPEND_RESYNC`]).
    synced: tokio::time::Instant,
}

/// How often, without Redis, a key's spend is read from the ledger again while it is in use.
/// Other processes on one ledger spend the same budget (replicas on one Postgres database,
/// two gateways on one SQLite file, MCP over stdio beside a gateway): read once per period,
/// each one allowed the whole budget.
const SPEND_RESYNC: Duration = Duration::from_secs(5);

/// What `keys create` asks for.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    #[serde(default)]
    pub budget_usd: Option<f64>,
    #[serde(default)]
    pub period: Option<Period>,
    #[serde(default, deserialize_with = "whole_number")]
    pub rpm: Option<u32>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// When the key stops working: unix seconds (a JSON number or string), `YYYY-MM-DD`
    /// (UTC midnight) or RFC 3339.
    #[serde(default)]
    pub expires_at: Option<When>,
    /// Or how long from now it works: `90d`, `12h`, `30m`.
    #[serde(default)]
    pub expires_in: Option<String>,
}

/// A time as JSON gives it: a number of unix seconds, or text.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum When {
    Seconds(i64),
    Text(String),
}

/// The largest budget a key may have, in USD: far past any team's, and small enough to print
/// (`1e300` was taken, and listed with 300 digits).
const MAX_BUDGET_USD: f64 = 1e9;

/// The latest expiry a key may have: the end of the year 9999, as RFC 3339 can write it.
const LAST_EXPIRY_MS: i64 = 253_402_300_799_000;

/// When a key made at `now_ms` expires, from `expires_at` or `expires_in` (not both).
fn expiry(new: &NewKey, now_ms: i64) -> Result<Option<i64>, GatewayError> {
    let at = match (&new.expires_at, &new.expires_in) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(GatewayError::bad_param(
                "expires_at",
                "give `expires_at` or `expires_in`, not both",
            ));
        }
        (None, Some(span)) => {
            let span = humantime::parse_duration(span.trim()).map_err(|e| {
                GatewayError::bad_param(
                    "expires_in",
                    format!("`expires_in` must be a duration such as 90d or 12h: {e}"),
                )
            })?;
            now_ms.saturating_add(i64::try_from(span.as_millis()).unwrap_or(i64::MAX))
        }
        (Some(When::Seconds(secs)), None) => secs.saturating_mul(1000),
        (Some(When::Text(text)), None) => {
            // An age reads as a time before now in reports; here it would be a mistake.
            if humantime::parse_duration(text.trim()).is_ok() {
                return Err(GatewayError::bad_param(
                    "expires_at",
                    format!(
                        "`expires_at` is a time; for a duration such as {text:?} use `expires_in`"
                    ),
                ));
            }
            crate::ledger::report::parse_when(text, now_ms)
                .map_err(|e| GatewayError::bad_param("expires_at", format!("`expires_at`: {e}")))?
        }
    };
    if at <= now_ms || at > LAST_EXPIRY_MS {
        return Err(GatewayError::bad_param(
            if new.expires_in.is_some() {
                "expires_in"
            } else {
                "expires_at"
            },
            "a key's expiry must be in the future, and no later than the year 9999",
        ));
    }
    Ok(Some(at))
}

/// A unix-millisecond time as RFC 3339 (UTC, whole seconds), for messages and listings.
pub fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// The id of the key `which` names, by id or by name, among `keys` (as `keys revoke` takes
/// them). A name several keys have had (revoked ones keep theirs) must be given as an id.
/// Failing those, a passthrough caller's id (`pt_...`) is taken as it is, and so is `open`
/// (the open mode's cache scope) when `open_scope`: they are no key's.
pub fn key_id_of(keys: &[KeyRecord], which: &str, open_scope: bool) -> Result<String, String> {
    let which = which.trim();
    if which.is_empty() {
        return Err("the key is empty: give its id or name".into());
    }
    if keys.iter().any(|k| k.id == which) {
        return Ok(which.to_string());
    }
    let shown: String = which
        .chars()
        .take(100)
        .filter(|c| !c.is_control())
        .collect();
    let named: Vec<&KeyRecord> = keys.iter().filter(|k| k.name == which).collect();
    match named.as_slice() {
        [one] => Ok(one.id.clone()),
        [] if which.starts_with(PASSTHROUGH_ID_PREFIX) || (open_scope && which == "open") => {
            Ok(which.to_string())
        }
        [] => Err(format!("no key has the id or name `{shown}`")),
        several => Err(format!(
            "{} keys have been named `{shown}`: give one of their ids ({})",
            several.len(),
            several
                .iter()
                .map(|k| k.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// A dollar amount as people write it: cents, or as many places as a smaller amount needs
/// (a budget of $0.001 is not "$0.00").
pub fn usd(v: f64) -> String {
    // -0 reads as 0 (`$-0.00` otherwise).
    let v = if v == 0.0 { 0.0 } else { v };
    // Cents when that is the figure exactly ($20.00, $0.50); else the figure as given
    // ($0.025 was shown as $0.03).
    if v == 0.0 || (v.abs() >= 0.01 && ((v * 100.0).round() / 100.0 - v).abs() < 1e-9) {
        return format!("{v:.2}");
    }
    // The shortest decimal that reads back as the same number, never in exponent form.
    format!("{v}")
}

/// The largest per-key `rpm`.
const MAX_RPM: u32 = 1_000_000;

/// A count given as any JSON number with no fractional part: `82` or `82.0`. JSON Schema
/// (and so the OpenAPI document) calls both integers, and some clients write every number
/// as a float.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    let Some(n) = <Option<serde_json::Number> as serde::Deserialize>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = match (n.as_u64(), n.as_f64()) {
        (Some(u), _) => Some(u),
        (None, Some(f)) if f.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&f) => {
            Some(f as u64)
        }
        _ => None,
    };
    whole
        .and_then(|u| u32::try_from(u).ok())
        .map(Some)
        .ok_or_else(|| {
            // The range `rpm` takes (the one field read this way), checked after.
            D::Error::custom(format!(
                "must be a whole number from 1 to {MAX_RPM}, not {n}"
            ))
        })
}

/// SHA-256 of a key, hex (what the ledger stores).
pub fn hash_key(key: &str) -> String {
    hex::encode(key_digest(key))
}

pub(crate) type KeyDigest = [u8; 32];

pub(crate) fn key_digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// A new random key: the prefix and 256 bits from the OS generator, as hex.
pub fn generate_key() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("{KEY_PREFIX}{}{}", a.simple(), b.simple())
}

/// Creates and stores a key; returns the record and the key (shown once, never stored).
pub async fn create_key(store: &Store, new: NewKey) -> Result<(KeyRecord, String), GatewayError> {
    let name = new.name.trim().to_string();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(GatewayError::bad_param(
            "name",
            "`name` must be 1 to 200 characters, none of them control characters",
        ));
    }
    // Revocation takes an id or a name, so a name must not read as an id; and a name that
    // reads as a gateway key is most likely one pasted in the wrong field, which listings
    // would then show to every admin.
    if name.starts_with(KEY_ID_PREFIX) || name.starts_with(KEY_PREFIX) {
        return Err(GatewayError::bad_param(
            "name",
            format!(
                "`name` must not start with `{KEY_ID_PREFIX}` (key ids do) or `{KEY_PREFIX}` (keys do)"
            ),
        ));
    }
    if new
        .budget_usd
        .is_some_and(|b| !b.is_finite() || !(0.0..=MAX_BUDGET_USD).contains(&b))
    {
        return Err(GatewayError::bad_param(
            "budget_usd",
            format!("`budget_usd` must be a number from 0 to {MAX_BUDGET_USD}"),
        ));
    }
    // Stored as a 32-bit signed integer on Postgres: past that it would wrap.
    if new.rpm.is_some_and(|r| r == 0 || r > MAX_RPM) {
        return Err(GatewayError::bad_param(
            "rpm",
            format!("`rpm` must be between 1 and {MAX_RPM}"),
        ));
    }
    let created_ms = now_ms();
    let expires_ms = expiry(&new, created_ms)?;
    let models = match new.models {
        None => None,
        Some(m) => {
            let m: Vec<String> = m.iter().map(|s| s.trim().to_string()).collect();
            // An empty list would read as "every model", the opposite of what was meant; a
            // comma would split one name into two once stored (the list is kept joined).
            if m.is_empty() || m.iter().any(|s| s.is_empty() || s.contains(',')) {
                return Err(GatewayError::bad_param(
                    "models",
                    "`models` must be a non-empty list of model names without commas (leave it out to allow every model)",
                ));
            }
            Some(m)
        }
    };
    let key = generate_key();
    let rec = KeyRecord {
        id: format!(
            "{KEY_ID_PREFIX}{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        ),
        name,
        hash: hash_key(&key),
        created_ms,
        revoked_ms: None,
        expires_ms,
        budget_usd: new.budget_usd,
        period: new.period.unwrap_or(Period::Month),
        rpm: new.rpm,
        models,
    };
    // Two active keys of one name could not be told apart in reports or revoked one at a
    // time. (A revoked key's name may be reused.) The store checks and inserts in one step:
    // requests for one name at once, through one gateway or several, made several keys.
    let made = store
        .create_key(&rec)
        .await
        .map_err(|e| GatewayError::internal("storing the key", &e))?;
    if !made {
        return Err(GatewayError::bad_param(
            "name",
            format!(
                "an active key is already named {:?}; revoke it first or choose another name",
                rec.name
            ),
        ));
    }
    Ok((rec, key))
}

/// Gives the active key named `which` (id or name) a new secret; returns the key's record
/// (with the new hash) and the new key, shown once. The id, budget, limits, spend and
/// reports stay the key's: a leaked key is replaced without starting the member over.
/// `Ok(None)`: no active key is named so. The old secret stops working at once on the
/// gateway that rotates it (after [`KeyRing::invalidate`] of the old hash), and within the
/// key cache's lifetime on others.
pub async fn rotate_key(
    store: &Store,
    which: &str,
) -> Result<Option<(KeyRecord, KeyRecord, String)>, GatewayError> {
    let key = generate_key();
    let hash = hash_key(&key);
    let old = store
        .rotate_key(which.trim(), &hash)
        .await
        .map_err(|e| GatewayError::internal("rotating the key", &e))?;
    Ok(old.map(|old| {
        let new = KeyRecord {
            hash,
            ..old.clone()
        };
        (old, new, key)
    }))
}

impl KeyRing {
    pub fn new(store: Store, clock: TokioClock) -> KeyRing {
        KeyRing::with_shared(
            store,
            clock,
            None,
            FailurePolicy::FailOpen,
            FailurePolicy::FailClosed,
        )
    }

    pub fn with_shared(
        store: Store,
        clock: TokioClock,
        shared: Option<Arc<SharedState>>,
        limits_on_error: FailurePolicy,
        budgets_on_error: FailurePolicy,
    ) -> KeyRing {
        KeyRing {
            shared,
            limits_on_error,
            budgets_on_error,
            store,
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(CACHE_TTL)
                .build_with_hasher(KeyHash::new()),
            last_known: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(LAST_KNOWN_TTL)
                .build_with_hasher(KeyHash::new()),
            store_down: Mutex::new(None),
            limiters: Mutex::new(HashMap::new()),
            spend: Mutex::new(HashMap::new()),
            stale: Mutex::new(HashMap::new()),
            clock,
            responses: moka::sync::Cache::builder()
                .max_capacity(RESPONSES_KEPT.0)
                .time_to_live(RESPONSES_KEPT.1)
                .build(),
            held: Mutex::default(),
        }
    }

    /// Notes that the gateway key `key_id` made the Responses answer `response_id`.
    /// Passthrough callers' rows (their own Poe keys, which Poe tells apart) are not kept.
    pub fn made_response(&self, response_id: &str, key_id: &Arc<str>) {
        if key_id.starts_with(KEY_ID_PREFIX) {
            self.responses.insert(response_id.into(), key_id.clone());
        }
    }

    /// Refuses a `previous_response_id` that `rec` did not make through this gateway, as Poe
    /// refuses an unknown one: a 400 naming the parameter.
    pub fn check_previous_response(
        &self,
        rec: &KeyRecord,
        response_id: &str,
    ) -> Result<(), GatewayError> {
        match self.responses.get(response_id) {
            Some(owner) if *owner == *rec.id => Ok(()),
            _ => Err(GatewayError::bad_param(
                "previous_response_id",
                format!(
                    "Previous response with id '{}' not found: a gateway key continues only \
                     the responses made with it through this gateway process",
                    response_id
                        .chars()
                        .take(100)
                        .map(|c| if c.is_control() { '?' } else { c })
                        .collect::<String>()
                ),
            )),
        }
    }

    /// The active key record for a presented key, or a 401.
    pub async fn authenticate(&self, presented: &str) -> Result<Arc<KeyRecord>, GatewayError> {
        let invalid = || GatewayError::Unauthorized("invalid gateway key".into());
        if !presented.starts_with(KEY_PREFIX) {
            return Err(invalid());
        }
        let digest = key_digest(presented);
        // The usual case, a key seen within the last few seconds, is a plain look-up: the
        // loader below (a future and a boxed call in moka) is only made on a miss.
        let found = match self.cache.get(&digest).await {
            Some(found) => found,
            None if self.store_resting() => Some(self.last_known(&digest)?),
            None => {
                let store = self.store.clone();
                let last_known = self.last_known.clone();
                let loaded = self
                    .cache
                    .try_get_with(digest, async move {
                        let hash = hex::encode(digest);
                        let rec = looked_up(
                            tokio::time::timeout(LOOKUP_TIMEOUT, store.key_by_hash(&hash)).await,
                        )?;
                        // Only a record whose stored hash is this key's is ever cached, so a
                        // hit (the full digest matched) needs no second comparison.
                        let rec = rec
                            .filter(|r| bool::from(r.hash.as_bytes().ct_eq(hash.as_bytes())))
                            .map(Arc::new);
                        match &rec {
                            Some(r) => {
                                last_known.insert(digest, (r.clone(), tokio::time::Instant::now()))
                            }
                            // Gone from the store (rotated to a new secret, by the CLI or
                            // another replica): not to be let in from memory in an outage.
                            None => last_known.invalidate(&digest),
                        }
                        Ok::<_, String>(rec)
                    })
                    .await;
                match loaded {
                    Ok(found) => {
                        self.store_answered();
                        found
                    }
                    Err(e) => {
                        self.store_failed(&e);
                        Some(self.last_known(&digest)?)
                    }
                }
            }
        };
        let rec = found.ok_or_else(invalid)?;
        if rec.revoked_ms.is_some() {
            return Err(GatewayError::Unauthorized(
                "this gateway key has been revoked".into(),
            ));
        }
        // Checked on every request, the cached and outage copies of the record included.
        if let Some(at) = rec.expires_ms
            && now_ms() >= at
        {
            return Err(GatewayError::Unauthorized(format!(
                "this gateway key expired at {}",
                rfc3339_ms(at)
            )));
        }
        Ok(rec)
    }

    /// Forgets a cached record (after a revocation through this process).
    pub async fn invalidate(&self, hash: &str) {
        let mut digest = KeyDigest::default();
        if hex::decode_to_slice(hash, &mut digest).is_ok() {
            self.cache.invalidate(&digest).await;
            self.last_known.invalidate(&digest);
        }
    }

    /// Whether the store failed within the last [`STORE_BACKOFF`].
    fn store_resting(&self) -> bool {
        let down = self.store_down.lock().expect("store_down lock");
        down.is_some_and(|o| tokio::time::Instant::now() < o.until)
    }

    /// Leaves the store alone for a while; logs the first failure of an outage only.
    fn store_failed(&self, why: &dyn std::fmt::Display) {
        let now = tokio::time::Instant::now();
        let until = now + STORE_BACKOFF;
        let mut down = self.store_down.lock().expect("store_down lock");
        let first = down.is_none();
        let since = down.map_or(now, |o| o.since);
        *down = Some(Outage { since, until });
        drop(down);
        if first {
            tracing::error!(
                error = %why,
                "the key store (the ledger's database) failed: keys it confirmed in the 10 \
                 minutes before are answered from memory, others get 503, until it answers again"
            );
        }
    }

    fn store_answered(&self) {
        if self
            .store_down
            .lock()
            .expect("store_down lock")
            .take()
            .is_some()
        {
            tracing::warn!("the key store answers again");
        }
    }

    /// A key's record from memory, while the store fails: one the store confirmed shortly
    /// before the outage began.
    fn last_known(&self, digest: &KeyDigest) -> Result<Arc<KeyRecord>, GatewayError> {
        let since = self
            .store_down
            .lock()
            .expect("store_down lock")
            .map_or_else(tokio::time::Instant::now, |o| o.since);
        match self.last_known.get(digest) {
            Some((rec, confirmed))
                if since.saturating_duration_since(confirmed) <= LAST_KNOWN_WINDOW =>
            {
                Ok(rec)
            }
            _ => Err(GatewayError::StateUnavailable(
                "the gateway cannot check this key now (its key store is not answering); \
                 try again shortly"
                    .into(),
            )),
        }
    }

    /// Per-key requests per minute; a 429 with the wait when the key is over. With Redis the
    /// limit holds across replicas; while Redis is down, `redis.limits_on_error` decides.
    pub async fn check_rpm(&self, rec: &KeyRecord) -> Result<(), GatewayError> {
        let Some(rpm) = rec.rpm else {
            return Ok(());
        };
        let over = |wait: Duration| GatewayError::RateLimited {
            message: format!("rate limit of {rpm} requests per minute reached for this key"),
            retry_after: Some(wait.max(Duration::from_millis(1))),
        };
        if let Some(shared) = &self.shared {
            let interval = Duration::from_secs(60) / rpm.max(1);
            match shared.rate(&format!("key:{}", rec.id), interval, rpm).await {
                Ok(None) => return Ok(()),
                Ok(Some(wait)) => return Err(over(wait)),
                Err(e) if self.limits_on_error == FailurePolicy::FailClosed => {
                    // Redis's failure itself is logged once, by `SharedState`.
                    tracing::debug!(error = %e, "per-key rate limits are unavailable");
                    return Err(GatewayError::StateUnavailable(
                        "per-key rate limits are unavailable (shared state is down); retry shortly"
                            .into(),
                    ));
                }
                // fail_open: this replica's own limiter stands in until Redis is back.
                Err(_) => {}
            }
        }
        let limiter = {
            let mut map = self.limiters.lock().expect("key limiter lock");
            let entry = map
                .entry(rec.id.clone())
                .or_insert_with(|| (rpm, limiter(rpm, &self.clock)));
            if entry.0 != rpm {
                *entry = (rpm, limiter(rpm, &self.clock));
            }
            entry.1.clone()
        };
        limiter.check().map_err(|not_until| {
            over(not_until.wait_time_from(governor::clock::Clock::now(&self.clock)))
        })
    }

    /// May this key use `model`: named in its list as asked (an alias the admin allowed,
    /// with its whole chain), or resolving only to bots its list names? Any one bot of a
    /// fallback chain is not enough: the chain would call the others too. A list naming
    /// `claude-sonnet-4.5` allows `claude-sonnet-4-5-20250929`, the same bot's Anthropic id,
    /// and the other way round.
    pub fn check_model(
        &self,
        rec: &KeyRecord,
        asked: &str,
        bots: &[String],
    ) -> Result<(), GatewayError> {
        let Some(allowed) = &rec.models else {
            return Ok(());
        };
        // An Anthropic model id is the Poe bot it stands for (Poe's Messages API takes both).
        let listed = |name: &str| allowed.iter().any(|m| super::models::same_bot(m, name));
        let ok = listed(asked) || (!bots.is_empty() && bots.iter().all(|b| listed(b)));
        if ok {
            Ok(())
        } else {
            Err(GatewayError::Forbidden(format!(
                "this key may not use model `{asked}`; allowed: {}",
                allowed.join(", ")
            )))
        }
    }

    /// Refuses the call when the key's budget for the current period is spent, or when what
    /// is left of it is held by the key's requests in flight; otherwise holds `estimate`
    /// (USD) for this request until it is charged. Checked before the call and charged as it
    /// ends, so a key overshoots by at most what its requests in flight cost beyond their
    /// estimates, and one request beyond the budget. With Redis the spend is one counter and
    /// the holds one set for all replicas; while Redis is down (and `budgets_on_error` is
    /// `fail_open`) each replica checks its own.
    pub async fn check_budget(
        self: &Arc<Self>,
        rec: &KeyRecord,
        estimate: f64,
    ) -> Result<Option<BudgetHold>, GatewayError> {
        let Some(budget) = rec.budget_usd else {
            return Ok(None);
        };
        let start = rec.period.start_ms(now_ms());
        let estimate = if estimate.is_finite() {
            estimate.max(0.0)
        } else {
            budget
        };
        let shared = match self.shared_hold(rec, start, budget, estimate).await? {
            SharedCheck::Admitted(hold) => Some(hold),
            SharedCheck::Refused(e) => return Err(e),
            SharedCheck::Unshared => None,
        };
        let key_id: Arc<str> = Arc::from(rec.id.as_str());
        if shared.is_none() {
            let spent = self.local_spend(rec, start).await?;
            if spent >= budget {
                return Err(spent_error(rec.period, budget, spent));
            }
            let held = self.held.lock().expect("held lock");
            if let Some(h) = held.get(&key_id)
                && h.requests > 0
                && spent + h.usd >= budget
            {
                return Err(held_error(rec.period, budget, spent, h.usd, h.requests));
            }
        }
        // Kept here too when Redis holds it: should Redis fail while the request runs, the
        // checks that fall back to this replica's view still count it.
        let mut held = self.held.lock().expect("held lock");
        let h = held.entry(key_id.clone()).or_default();
        h.usd += estimate;
        h.requests += 1;
        Ok(Some(BudgetHold(Box::new(HoldInner {
            ring: Arc::clone(self),
            key_id,
            usd: estimate,
            _shared: shared,
        }))))
    }

    /// The budget check and hold in Redis, with the counter seeded from the ledger on first
    /// use. `Unshared`: no Redis, or Redis is down and the policy is `fail_open`.
    async fn shared_hold(
        &self,
        rec: &KeyRecord,
        start: i64,
        budget: f64,
        estimate: f64,
    ) -> Result<SharedCheck, GatewayError> {
        let Some(shared) = &self.shared else {
            return Ok(SharedCheck::Unshared);
        };
        let uncounted = || {
            self.spend
                .lock()
                .expect("spend lock")
                .get(&rec.id)
                .filter(|s| s.period_start == start)
                .map_or(0.0, |s| s.unshared)
        };
        let hold = || shared.hold(&rec.id, start, budget, estimate, uncounted());
        let verdict = match self.forget_if_stale(shared, &rec.id, start).await {
            Err(e) => Err(e),
            Ok(()) => match hold().await {
                Ok(HoldVerdict::Unseeded) => {
                    let from_db = self.ledger_spend(rec, start).await?;
                    match shared.seed_spend(&rec.id, start, from_db, SPEND_TTL).await {
                        Ok(_) => hold().await,
                        Err(e) => Err(e),
                    }
                }
                other => other,
            },
        };
        let verdict = match verdict {
            Ok(HoldVerdict::Unseeded) => Err(Unavailable::new(
                "hold: the spend counter went away while it was seeded",
            )),
            other => other,
        };
        match verdict {
            Ok(verdict) => {
                let counter = match &verdict {
                    HoldVerdict::Spent { counter }
                    | HoldVerdict::Held { counter, .. }
                    | HoldVerdict::Admitted { counter, .. } => *counter,
                    HoldVerdict::Unseeded => unreachable!("mapped to an error above"),
                };
                // Remember the period, so charges know where to go; and the figure, for a
                // fail_open fallback.
                let unshared = {
                    let mut map = self.spend.lock().expect("spend lock");
                    let s = map.entry(rec.id.clone()).or_insert(Spend {
                        period: rec.period,
                        period_start: start,
                        usd: counter,
                        unshared: 0.0,
                        synced: tokio::time::Instant::now(),
                    });
                    if s.period_start != start {
                        s.period = rec.period;
                        s.period_start = start;
                        s.unshared = 0.0;
                    }
                    s.usd = counter;
                    s.unshared
                };
                let spent = counter + unshared;
                Ok(match verdict {
                    HoldVerdict::Admitted { hold, .. } => SharedCheck::Admitted(SharedHoldGuard {
                        state: Arc::clone(shared),
                        hold: Some(hold),
                    }),
                    HoldVerdict::Held { held, requests, .. } => {
                        SharedCheck::Refused(held_error(rec.period, budget, spent, held, requests))
                    }
                    _ => SharedCheck::Refused(spent_error(rec.period, budget, spent)),
                })
            }
            Err(e) if self.budgets_on_error == FailurePolicy::FailClosed => {
                tracing::debug!(error = %e, "budgets are unavailable");
                Err(GatewayError::StateUnavailable(
                    "budgets are unavailable (shared state is down); redis.budgets_on_error = \
                     \"fail_closed\" refuses calls from keys with a budget until Redis is back"
                        .into(),
                ))
            }
            Err(_) => Ok(SharedCheck::Unshared),
        }
    }

    /// Drops a key's shared counter if it missed a charge and the ledger has the rows it
    /// missed; an error while it cannot be dropped (Redis refuses, or the rows are still
    /// being written), which the budget check treats as Redis being down.
    async fn forget_if_stale(
        &self,
        shared: &SharedState,
        key_id: &str,
        start: i64,
    ) -> Result<(), Unavailable> {
        let entry = (key_id.to_string(), start);
        let written = self.stale.lock().expect("stale lock").get(&entry).copied();
        match written {
            None => Ok(()),
            Some(false) => Err(Unavailable::new(
                "spend: the counter missed a charge the ledger is still writing",
            )),
            Some(true) => {
                shared.forget_spend(key_id, start).await?;
                self.forgotten(&entry);
                Ok(())
            }
        }
    }

    /// Called once the ledger has written the rows of the batches charged so far: the
    /// counters that missed one of those charges are dropped, to be seeded again from it.
    pub async fn forget_stale(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let ready: Vec<(String, i64)> = {
            let mut stale = self.stale.lock().expect("stale lock");
            stale.values_mut().for_each(|written| *written = true);
            stale.keys().cloned().collect()
        };
        for entry in ready {
            if shared.forget_spend(&entry.0, entry.1).await.is_ok() {
                self.forgotten(&entry);
            }
        }
    }

    /// A stale counter was dropped: it is no longer, unless a charge missed it again
    /// meanwhile (then its rows are not written yet, and it waits for them).
    fn forgotten(&self, entry: &(String, i64)) {
        let mut stale = self.stale.lock().expect("stale lock");
        if stale.get(entry) == Some(&true) {
            stale.remove(entry);
        }
    }

    /// This replica's own view of the spend: the ledger's history, plus what it has charged,
    /// read from the ledger again every [`SPEND_RESYNC`] while in use.
    async fn local_spend(&self, rec: &KeyRecord, start: i64) -> Result<f64, GatewayError> {
        let known = {
            let mut map = self.spend.lock().expect("spend lock");
            map.get_mut(&rec.id)
                .filter(|s| s.period_start == start)
                .map(|s| {
                    let stale = s.synced.elapsed() >= SPEND_RESYNC;
                    if stale {
                        // Claimed: the requests that come meanwhile do not all read it too.
                        s.synced = tokio::time::Instant::now();
                    }
                    (s.usd, stale)
                })
        };
        match known {
            Some((usd, false)) => return Ok(usd),
            Some((usd, true)) => {
                // A failed re-read keeps what this replica knows; it is no reason to refuse.
                let Ok(from_db) = self.ledger_spend(rec, start).await else {
                    return Ok(usd);
                };
                let mut map = self.spend.lock().expect("spend lock");
                return Ok(
                    match map.get_mut(&rec.id).filter(|s| s.period_start == start) {
                        Some(s) => {
                            // The ledger lacks this replica's last charges (`unshared`), and a
                            // batch on its way to it: never below what was known.
                            s.usd = s.usd.max(from_db + s.unshared);
                            s.usd
                        }
                        None => usd.max(from_db),
                    },
                );
            }
            None => {}
        }
        // First use in this period (or since start): the ledger has the history.
        let from_db = self.ledger_spend(rec, start).await?;
        let mut map = self.spend.lock().expect("spend lock");
        let fresh = Spend {
            period: rec.period,
            period_start: start,
            usd: from_db,
            unshared: 0.0,
            synced: tokio::time::Instant::now(),
        };
        let entry = map.entry(rec.id.clone()).or_insert(fresh);
        if entry.period_start != start {
            *entry = fresh;
        }
        Ok(entry.usd)
    }

    async fn ledger_spend(&self, rec: &KeyRecord, start: i64) -> Result<f64, GatewayError> {
        let unavailable = || {
            GatewayError::StateUnavailable(
                "the gateway cannot check this key's budget now (its ledger is not \
                 answering); try again shortly"
                    .into(),
            )
        };
        if self.store_resting() {
            return Err(unavailable());
        }
        let spent = tokio::time::timeout(LOOKUP_TIMEOUT, self.store.spent_since(&rec.id, start));
        match looked_up(spent.await) {
            Ok(usd) => {
                self.store_answered();
                Ok(usd)
            }
            Err(why) => {
                self.store_failed(&why);
                Err(unavailable())
            }
        }
    }

    /// Whether this process tracks the key's spend: the key has a budget, checked in the
    /// current period. Only such keys are charged.
    pub fn tracks_spend(&self, key_id: &str) -> bool {
        self.spend.lock().expect("spend lock").contains_key(key_id)
    }

    /// Charges one finished request's cost (USD, finish time) to its key's spend at once, as
    /// the request ends, so that the key's next budget check sees it. Returns whether it was
    /// charged (the key's spend is tracked, in the request's period); the writer's
    /// [`charge`](Self::charge) then only passes it on to the shared counter.
    pub fn charge_now(&self, key_id: &str, usd: f64, ts_ms: i64) -> bool {
        let mut map = self.spend.lock().expect("spend lock");
        match map.get_mut(key_id) {
            // Only into the period the request ended in: one that ended just past the
            // boundary is left to the writer, by when the entry may have been seeded afresh
            // for the new period from a ledger that did not have the row yet.
            Some(s) if s.period.start_ms(ts_ms) == s.period_start => {
                s.usd += usd;
                s.unshared += usd;
                true
            }
            _ => false,
        }
    }

    /// Adds a batch of finished requests' costs (key id, USD, finish time, already charged
    /// by [`charge_now`](Self::charge_now)) to their keys' running spend: this replica's, and
    /// the shared counters when there are any, with one Redis call per key and period rather
    /// than one per request. Only keys with a budget have an entry to charge.
    pub async fn charge<'a>(&self, charges: impl IntoIterator<Item = (&'a str, f64, i64, bool)>) {
        let mut shared_sums: HashMap<(&'a str, i64), f64> = HashMap::new();
        {
            let mut map = self.spend.lock().expect("spend lock");
            for (key_id, usd, ts_ms, charged) in charges {
                if let Some(s) = map.get_mut(key_id)
                    && ts_ms >= s.period_start
                {
                    if charged {
                        // On its way to the shared counter now, whether Redis takes it or not
                        // (a failed charge has the counter seeded from the ledger again).
                        s.unshared = (s.unshared - usd).max(0.0);
                    } else {
                        s.usd += usd;
                    }
                    *shared_sums.entry((key_id, s.period_start)).or_default() += usd;
                }
            }
        }
        if let Some(shared) = &self.shared {
            for ((key_id, period_start), usd) in shared_sums {
                // A failure is counted and logged there. The ledger rows have the cost, and
                // the counter is seeded from them again once they are written.
                if !matches!(shared.charge(key_id, period_start, usd).await, Ok(true)) {
                    self.stale
                        .lock()
                        .expect("stale lock")
                        .insert((key_id.to_string(), period_start), false);
                }
            }
        }
    }
}

fn limiter(rpm: u32, clock: &TokioClock) -> Arc<KeyLimiter> {
    let quota = Quota::per_minute(NonZeroU32::new(rpm.max(1)).expect("rpm >= 1"));
    Arc::new(RateLimiter::direct_with_clock(quota, clock.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_prefixed() {
        let a = generate_key();
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), KEY_PREFIX.len() + 64);
        assert_ne!(a, generate_key());
        assert_eq!(hash_key(&a).len(), 64);
    }

    /// While the store fails, a key is answered from memory only if the store confirmed it
    /// shortly before the failure: one last seen long before may have been revoked since.
    #[tokio::test(start_paused = true)]
    async fn only_keys_confirmed_shortly_before_an_outage_outlive_it() {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let ring = KeyRing::new(store.clone(), TokioClock::new());
        let new = |name: &str| NewKey {
            name: name.into(),
            ..NewKey::default()
        };
        let (_, old) = create_key(&store, new("old")).await.unwrap();
        let (_, recent) = create_key(&store, new("recent")).await.unwrap();
        ring.authenticate(&old).await.unwrap();
        tokio::time::advance(Duration::from_secs(11 * 60)).await;
        ring.authenticate(&recent).await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;

        // The store fails now (as a look-up that failed would record it).
        ring.cache.invalidate_all();
        ring.store_failed(&"down");
        assert!(ring.authenticate(&recent).await.is_ok());
        let e = ring.authenticate(&old).await.unwrap_err();
        assert_eq!(e.status(), 503, "{e}");
        // Keys in use go on being answered through a long outage.
        tokio::time::advance(Duration::from_secs(60 * 60)).await;
        ring.store_failed(&"still down");
        assert!(ring.authenticate(&recent).await.is_ok());
    }

    #[test]
    fn dollar_amounts_keep_their_places() {
        assert_eq!(usd(20.0), "20.00");
        assert_eq!(usd(0.0), "0.00");
        assert_eq!(usd(0.001), "0.001");
        assert_eq!(usd(0.0000001), "0.0000001");
        // Not rounded to cents when it is no whole number of them.
        assert_eq!(usd(0.025), "0.025");
        assert_eq!(usd(0.5), "0.50");
        assert_eq!(usd(12.345), "12.345");
        assert_eq!(usd(-0.0), "0.00");
    }

    /// A cost is counted at once only in the period its request ended in. One that ended past
    /// the boundary is the writer's to pass on: the new period's figure is seeded from the
    /// ledger, and counting it here too would charge it twice, or into the wrong period.
    #[tokio::test]
    async fn a_charge_counts_only_in_the_period_its_request_ended_in() {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let ring = Arc::new(KeyRing::new(store, TokioClock::new()));
        let rec = KeyRecord {
            id: "k1".into(),
            name: "team".into(),
            hash: String::new(),
            created_ms: 0,
            revoked_ms: None,
            expires_ms: None,
            budget_usd: Some(1.0),
            period: Period::Month,
            rpm: None,
            models: None,
        };
        assert!(
            !ring.charge_now("k1", 0.4, now_ms()),
            "not tracked before a check"
        );
        drop(ring.check_budget(&rec, 0.0).await.unwrap());
        let now = now_ms();
        let start = Period::Month.start_ms(now);
        assert!(ring.charge_now("k1", 0.4, now));
        // Ended in the next month, or in the last one (a request begun before the boundary).
        assert!(!ring.charge_now("k1", 0.4, start + 32 * 86_400_000));
        assert!(!ring.charge_now("k1", 0.4, start - 1));
        drop(
            ring.check_budget(&rec, 0.0)
                .await
                .expect("0.4 of 1.0 spent"),
        );
        assert!(ring.charge_now("k1", 0.7, now));
        let e = ring.check_budget(&rec, 0.0).await.unwrap_err();
        assert!(e.to_string().contains("spent $1.1000"), "{e}");
    }
}
