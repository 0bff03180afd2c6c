//! State that several replicas share through Redis: rate limiters, budget spend and the
//! holds of requests in flight, and a second cache tier. Without `POE_GATEWAY_REDIS_URL` none of this exists and every replica keeps its
//! own state in-process, which is right for a single gateway.
//!
//! Every operation is one round trip and atomic on the server (a Lua script or a single
//! command), so replicas agree to within one request. Every call has a short timeout: a Redis
//! that hangs must not hang requests. A failure is reported to the caller, which applies the
//! policy's `fail_open`/`fail_closed`; this module logs the first failure and the recovery
//! (not every request) and keeps `poe_gateway_redis_up` current.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};

use crate::config::RedisPolicy;
use crate::metrics::Metrics;

/// Generic cell-rate algorithm on the server's clock (`TIME`), so replicas with skewed clocks
/// still share one schedule. KEYS[1]: the limiter; ARGV: emission interval and tolerance in
/// microseconds. Returns -1 when admitted, else the wait in microseconds.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then return math.ceil(allow_at - now) end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return -1
";

/// Adds to a spend counter only if it exists: a missing counter is seeded from the ledger on
/// the next budget check, and the ledger already holds this charge's row by then.
const CHARGE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
end
return false
";

/// Seeds a spend counter from the ledger unless another replica already has; returns the
/// counter either way.
const SEED: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return redis.call('GET', KEYS[1])
";

/// A budget check and hold in one step, so replicas see each other's requests in flight.
/// KEYS[1]: the spend counter; KEYS[2]: the holds (hash, hold id to USD); KEYS[3]: their
/// expiry (sorted set, hold id to ms on the server's clock). ARGV: budget, this request's
/// estimate, what the calling replica has charged that the counter has not yet, hold id,
/// hold lifetime (ms). Holds past their expiry (a replica that died with requests in
/// flight) are dropped first. Returns `{'unseeded'}` when the counter is missing, else
/// `{verdict, counter, held, requests held}` with the verdict `spent`, `held` or `ok` (the
/// hold is then added). Figures go back as text: Redis truncates Lua numbers to integers.
const HOLD: &str = r"
local counter = redis.call('GET', KEYS[1])
if not counter then return {'unseeded'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
if #gone > 0 then
  redis.call('HDEL', KEYS[2], unpack(gone))
  redis.call('ZREM', KEYS[3], unpack(gone))
end
local budget = tonumber(ARGV[1])
local spent = tonumber(counter) + tonumber(ARGV[3])
local held, n = 0, 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  held = held + tonumber(v)
  n = n + 1
end
local verdict = 'ok'
if spent >= budget then
  verdict = 'spent'
elseif n > 0 and spent + held >= budget then
  verdict = 'held'
else
  local ttl = tonumber(ARGV[5])
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[2])
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {verdict, counter, tostring(held), n}
";

/// Keeps a replica's holds alive: KEYS[1] the holds, KEYS[2] their expiry; ARGV[1] the
/// lifetime (ms), the rest hold ids. Ids already gone (released, or expired) stay gone.
const REFRESH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[2], 'XX', now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 0
";

/// How long a hold lives in Redis unless its replica renews it: what a replica that died
/// with requests in flight keeps held against their keys' budgets.
pub const HOLD_TTL: Duration = Duration::from_secs(60);
/// How often a replica renews the holds of its requests in flight.
const HOLD_RENEW: Duration = Duration::from_secs(20);

/// What [`SharedState::hold`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum HoldVerdict {
    /// No replica has seeded the counter.
    Unseeded,
    /// The budget is spent: `counter` plus the caller's own uncounted charges reach it.
    Spent { counter: f64 },
    /// What is left is taken by `requests` holds worth `held`.
    Held {
        counter: f64,
        held: f64,
        requests: u32,
    },
    /// Held: the request may go on.
    Admitted { counter: f64, hold: SharedHold },
}

/// A hold in Redis, released by [`SharedState::release`].
#[derive(Debug, Clone, PartialEq)]
pub struct SharedHold {
    id: String,
    holds: String,
    expiry: String,
}

/// Why a shared-state call failed; the caller's policy decides what the request gets.
#[derive(Debug, thiserror::Error)]
#[error("redis unavailable: {0}")]
pub struct Unavailable(String);

impl Unavailable {
    pub(crate) fn new(why: &str) -> Unavailable {
        Unavailable(why.to_string())
    }
}

pub struct SharedState {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    up: AtomicBool,
    /// While Redis fails: until when (ms since `epoch`) calls skip it and report it down at
    /// once, rather than each waiting out `timeout`. 0 while it answers. One for the limits
    /// and budgets, one for the cache tier: a large cache entry slow to move must not rest
    /// the budgets.
    rest_until_ms: [AtomicU64; 2],
    epoch: tokio::time::Instant,
    metrics: Arc<Metrics>,
    pub(crate) cache_tier: bool,
    /// The runtime every Redis call runs on (see [`SharedState::call`]).
    runtime: Option<tokio::runtime::Handle>,
    /// Names this replica's holds apart from every other's.
    replica: String,
    next_hold: AtomicU64,
    /// This replica's holds in Redis, renewed every [`HOLD_RENEW`] while their requests run.
    live_holds: std::sync::Mutex<std::collections::HashMap<String, SharedHold>>,
}

/// The calls that write (through a script or `SET`), refused by a read-only replica and by a
/// Redis out of memory: those whose success says Redis is back.
const WRITES: [&str; 4] = ["rate", "hold", "charge", "spend"];

/// How long calls skip Redis after a failure; then one call tries it again.
const REST: Duration = Duration::from_secs(2);

/// Whether a call may go to Redis: always while it answers; while it fails, only once its
/// rest is over, and then only one call (the others keep skipping it) until that call has
/// answered or failed.
fn may_call(rest_until_ms: &AtomicU64, now_ms: u64) -> bool {
    let until = rest_until_ms.load(Ordering::Relaxed);
    if until == 0 {
        return true;
    }
    now_ms >= until
        && rest_until_ms
            .compare_exchange(
                until,
                now_ms + REST.as_millis() as u64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
}

impl SharedState {
    /// Connects lazily: the gateway starts even while Redis is down, and the policy covers
    /// requests until it is up.
    pub fn new(policy: &RedisPolicy, metrics: Arc<Metrics>) -> Result<Option<SharedState>, String> {
        let Some(url) = &policy.url else {
            return Ok(None);
        };
        // The URL may hold a password: errors name the setting, never the value.
        let client = redis::Client::open(url.as_str()).map_err(|e| {
            format!(
                "redis.url (POE_GATEWAY_REDIS_URL) is not usable: {:?}",
                e.kind()
            )
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(policy.timeout))
            .set_response_timeout(Some(policy.timeout))
            // One quick retry per call; later calls try again, so recovery needs no restart.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(100));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("redis: {:?}", e.kind()))?;
        metrics.redis_up.set(1);
        Ok(Some(SharedState {
            conn,
            prefix: policy.key_prefix.clone(),
            timeout: policy.timeout,
            up: AtomicBool::new(true),
            rest_until_ms: [AtomicU64::new(0), AtomicU64::new(0)],
            epoch: tokio::time::Instant::now(),
            metrics,
            cache_tier: policy.cache,
            runtime: tokio::runtime::Handle::try_current().ok(),
            replica: uuid::Uuid::new_v4().simple().to_string(),
            next_hold: AtomicU64::new(0),
            live_holds: std::sync::Mutex::default(),
        }))
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(':');
            }
            k.push_str(p);
        }
        k
    }

    /// `<prefix>spend:<key id>:<period start>`: one counter per key and budget period.
    fn spend_key(&self, key_id: &str, period_start_ms: i64) -> String {
        self.key(&["spend", key_id, &period_start_ms.to_string()])
    }

    /// Runs one call with the timeout, and keeps the up/down state and metrics. A call that
    /// finds the connection broken is made once more: the first failure is what makes the
    /// connection manager reconnect, so without the retry every outage would cost one more
    /// failed request after Redis is back.
    ///
    /// The second try may repeat a command that did run (its answer was what got lost). That
    /// is harmless for reads, seeds (`SET NX`) and deletes, and costs a rate limiter at most one
    /// extra slot; a charge is never repeated (see `charge`).
    async fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        op: &'static str,
        cmd: redis::Cmd,
    ) -> Result<T, Unavailable> {
        self.call(op, cmd, true).await
    }

    /// Runs a call on the runtime the gateway was built on (the process's main one), not the
    /// caller's. The connection manager connects, and reconnects, on whichever runtime makes
    /// the call that needs it, and the connection's driver task lives there. A serving
    /// thread's runtime is dropped at shutdown before the ledger's last batch is charged, so
    /// a connection made there died with it and that batch never reached the counters.
    async fn call<T: redis::FromRedisValue + Send + 'static>(
        &self,
        op: &'static str,
        cmd: redis::Cmd,
        retry: bool,
    ) -> Result<T, Unavailable> {
        let tier = usize::from(op.starts_with("cache"));
        let rest = &self.rest_until_ms[tier];
        if !may_call(rest, self.now_ms()) {
            return Err(Unavailable(format!(
                "{op}: redis failed within the last {}s",
                REST.as_secs()
            )));
        }
        let mut conn = self.conn.clone();
        let attempt = async move {
            match cmd.query_async(&mut conn).await {
                Err(e)
                    if retry
                        && (e.is_io_error()
                            || e.is_connection_dropped()
                            || e.is_connection_refusal()) =>
                {
                    cmd.query_async(&mut conn).await
                }
                r => r,
            }
        };
        let attempt = async {
            match &self.runtime {
                Some(rt) => {
                    let mut task = AbortOnDrop(rt.spawn(attempt));
                    match (&mut task.0).await {
                        Ok(r) => r,
                        // Only when that runtime is shutting down.
                        Err(_) => Err(redis::RedisError::from(std::io::Error::other(
                            "the gateway is stopping",
                        ))),
                    }
                }
                None => attempt.await,
            }
        };
        // A Redis that cannot be reached, or answers the budgets and limits with errors
        // (READONLY after a failover, NOAUTH, OOM), is down: calls rest, the metric says so
        // and it is logged. A read-only replica still answers reads, so taking only the lost
        // connection as down left budgets read from a counter no charge could reach. The
        // cache tier's error replies (a value over a memory limit) fail that one call.
        let (result, down) = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(v)) => (Ok(v), false),
            Ok(Err(e)) => {
                let lost = e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout();
                (Err(Unavailable(format!("{op}: {e}"))), lost || tier == 0)
            }
            Err(_) => (
                Err(Unavailable(format!(
                    "{op}: no answer within {:?}",
                    self.timeout
                ))),
                true,
            ),
        };
        let until = if down {
            self.now_ms() + REST.as_millis() as u64
        } else {
            0
        };
        rest.store(until, Ordering::Relaxed);
        match &result {
            // Only a call that writes proves Redis usable again: a read-only replica still
            // answers reads, and one out of memory still deletes, and each such answer made
            // Redis "up" until the next write failed (an error line and a recovery line a
            // second, and budgets checked against a counter no charge reached).
            Ok(_) if !WRITES.contains(&op) => {}
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    self.metrics.redis_up.set(1);
                    tracing::warn!("redis is answering again; shared limits and budgets resume");
                }
            }
            Err(e) => {
                self.metrics.redis_errors.with_label_values(&[op]).inc();
                if !down {
                    tracing::debug!(error = %e, "a redis call failed");
                } else if self.up.swap(false, Ordering::Relaxed) {
                    self.metrics.redis_up.set(0);
                    tracing::error!(error = %e, "redis is unreachable or failing; limits and budgets follow redis.*_on_error");
                }
            }
        }
        result
    }

    fn now_ms(&self) -> u64 {
        // At least 1: 0 means "answering".
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    /// One GCRA step on a shared limiter: `Ok(None)` admitted, `Ok(Some(wait))` refused.
    pub async fn rate(
        &self,
        limiter: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<Option<Duration>, Unavailable> {
        let key = self.key(&["rate", limiter]);
        let interval_us = interval.as_micros() as u64;
        let tolerance_us = interval_us * u64::from(burst.max(1) - 1);
        let cmd = eval(GCRA, &key)
            .arg(interval_us)
            .arg(tolerance_us)
            .to_owned();
        let wait: i64 = self.run("rate", cmd).await?;
        Ok((wait >= 0).then(|| Duration::from_micros(wait as u64)))
    }

    /// Seeds a key's spend counter with what the ledger holds, unless another replica got
    /// there first; returns the counter.
    pub async fn seed_spend(
        &self,
        key_id: &str,
        period_start_ms: i64,
        usd: f64,
        ttl: Duration,
    ) -> Result<f64, Unavailable> {
        let key = self.spend_key(key_id, period_start_ms);
        let cmd = eval(SEED, &key)
            .arg(usd)
            .arg(ttl.as_millis().max(1) as u64)
            .to_owned();
        self.run("spend", cmd).await
    }

    /// Checks a key's budget against its counter and every replica's holds, and holds
    /// `estimate` for this request when there is room (see [`HOLD`]). `uncounted`: what
    /// this replica has charged that has not reached the counter yet.
    pub async fn hold(
        &self,
        key_id: &str,
        period_start_ms: i64,
        budget: f64,
        estimate: f64,
        uncounted: f64,
    ) -> Result<HoldVerdict, Unavailable> {
        let n = self.next_hold.fetch_add(1, Ordering::Relaxed);
        let hold = SharedHold {
            id: format!("{}:{n}", self.replica),
            holds: self.key(&["held", key_id, &period_start_ms.to_string()]),
            expiry: self.key(&["held-until", key_id, &period_start_ms.to_string()]),
        };
        let cmd = redis::cmd("EVAL")
            .arg(HOLD)
            .arg(3)
            .arg(self.spend_key(key_id, period_start_ms))
            .arg(&hold.holds)
            .arg(&hold.expiry)
            .arg(budget)
            .arg(estimate)
            .arg(uncounted)
            .arg(&hold.id)
            .arg(HOLD_TTL.as_millis() as u64)
            .to_owned();
        // Repeated once after a lost connection, like a read: should the first try have
        // been made, its hold is one no request releases or renews, and it lapses after
        // `HOLD_TTL`.
        let answer: Vec<String> = self.run("hold", cmd).await?;
        let num = |i: usize| -> Result<f64, Unavailable> {
            answer
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| Unavailable::new("hold: an answer not understood"))
        };
        Ok(match answer.first().map(String::as_str) {
            Some("unseeded") => HoldVerdict::Unseeded,
            Some("spent") => HoldVerdict::Spent { counter: num(1)? },
            Some("held") => HoldVerdict::Held {
                counter: num(1)?,
                held: num(2)?,
                requests: num(3)? as u32,
            },
            Some("ok") => {
                self.live_holds
                    .lock()
                    .expect("live holds lock")
                    .insert(hold.id.clone(), hold.clone());
                HoldVerdict::Admitted {
                    counter: num(1)?,
                    hold,
                }
            }
            _ => return Err(Unavailable::new("hold: an answer not understood")),
        })
    }

    /// Ends a hold (its request was charged, or ended otherwise). A hold this fails to end
    /// lapses after [`HOLD_TTL`].
    pub async fn release(&self, hold: SharedHold) {
        self.live_holds
            .lock()
            .expect("live holds lock")
            .remove(&hold.id);
        let cmd = redis::cmd("EVAL")
            .arg("redis.call('HDEL', KEYS[1], ARGV[1]) redis.call('ZREM', KEYS[2], ARGV[1]) return 0")
            .arg(2)
            .arg(&hold.holds)
            .arg(&hold.expiry)
            .arg(&hold.id)
            .to_owned();
        let _: Result<i64, _> = self.run("release", cmd).await;
    }

    /// Releases a hold from a synchronous drop: on the runtime the calls run on.
    pub fn release_later(self: &Arc<Self>, hold: SharedHold) {
        let me = Arc::clone(self);
        let release = async move { me.release(hold).await };
        match (&self.runtime, tokio::runtime::Handle::try_current()) {
            (Some(rt), _) => drop(rt.spawn(release)),
            (None, Ok(rt)) => drop(rt.spawn(release)),
            // No runtime left (the process is ending): the hold lapses.
            (None, Err(_)) => {}
        }
    }

    /// Renews this replica's holds every [`HOLD_RENEW`], so a long stream's hold outlives
    /// [`HOLD_TTL`] while one of a replica that died does not. Ends with the state.
    pub fn start_renewing(self: &Arc<Self>) {
        let Some(rt) = self.runtime.clone() else {
            return;
        };
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(HOLD_RENEW);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else {
                    return;
                };
                me.renew().await;
            }
        });
    }

    async fn renew(&self) {
        let mut by_key: std::collections::HashMap<(String, String), Vec<String>> =
            std::collections::HashMap::new();
        for h in self.live_holds.lock().expect("live holds lock").values() {
            by_key
                .entry((h.holds.clone(), h.expiry.clone()))
                .or_default()
                .push(h.id.clone());
        }
        for ((holds, expiry), ids) in by_key {
            let cmd = redis::cmd("EVAL")
                .arg(REFRESH)
                .arg(2)
                .arg(holds)
                .arg(expiry)
                .arg(HOLD_TTL.as_millis() as u64)
                .arg(ids)
                .to_owned();
            let _: Result<i64, _> = self.run("renew", cmd).await;
        }
    }

    /// Adds to a key's spend in the period if a replica has seeded it; `Ok(false)` when none
    /// has. Tried once: a failed charge may or may not have been applied, so the caller does
    /// not repeat it but drops the counter (`forget_spend`) for a fresh seed from the ledger,
    /// once the ledger has the rows. A charge that found no counter is dropped the same way:
    /// a replica may be seeding it from a ledger read made before those rows were written.
    pub async fn charge(
        &self,
        key_id: &str,
        period_start_ms: i64,
        usd: f64,
    ) -> Result<bool, Unavailable> {
        let key = self.spend_key(key_id, period_start_ms);
        let added: Option<f64> = self
            .call("charge", eval(CHARGE, &key).arg(usd).to_owned(), false)
            .await?;
        Ok(added.is_some())
    }

    /// Drops a key's spend counter, so the next budget check seeds it from the ledger again.
    pub async fn forget_spend(
        &self,
        key_id: &str,
        period_start_ms: i64,
    ) -> Result<(), Unavailable> {
        let key = self.spend_key(key_id, period_start_ms);
        let _: i64 = self
            .run("forget", redis::cmd("DEL").arg(&key).to_owned())
            .await?;
        Ok(())
    }

    /// `<prefix>cache:<scope>:<digest>`: the digest is already a hash of the request, and the
    /// scope (a key id, `open`, or `shared`) lets a purge find one caller's entries.
    fn cache_key(&self, scope: &str, digest: &[u8; 32]) -> String {
        self.key(&["cache", scope, &hex::encode(digest)])
    }

    /// A cached answer from the shared tier, as stored by [`SharedState::cache_put`].
    pub async fn cache_get(
        &self,
        scope: &str,
        digest: &[u8; 32],
    ) -> Result<Option<Bytes>, Unavailable> {
        let k = self.cache_key(scope, digest);
        let v: Option<Vec<u8>> = self
            .run("cache_get", redis::cmd("GET").arg(k).to_owned())
            .await?;
        Ok(v.map(Bytes::from))
    }

    pub async fn cache_put(
        &self,
        scope: &str,
        digest: &[u8; 32],
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), Unavailable> {
        let k = self.cache_key(scope, digest);
        let ms = ttl.as_millis().max(1) as u64;
        let cmd = redis::cmd("SET")
            .arg(k)
            .arg(value)
            .arg("PX")
            .arg(ms)
            .to_owned();
        self.run::<()>("cache_put", cmd).await
    }

    /// Removes the shared tier's entries: one scope's, or all of them.
    pub async fn cache_purge(&self, scope: Option<&str>) -> Result<u64, Unavailable> {
        let pattern = match scope {
            Some(s) => format!("{}:*", self.key(&["cache", s])),
            None => format!("{}:*", self.key(&["cache"])),
        };
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            let scan = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .to_owned();
            let (next, keys): (u64, Vec<String>) = self.run("cache_purge", scan).await?;
            if !keys.is_empty() {
                let unlink = redis::cmd("UNLINK").arg(&keys).to_owned();
                removed += self.run::<u64>("cache_purge", unlink).await?;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}

/// A task aborted when its awaiting call is dropped (a request that ends, a timeout): a call
/// nobody waits for has no reason to hold a slot on the connection.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `EVAL script 1 key`: the script travels with each call (a few hundred bytes), which keeps a
/// restarted Redis, whose script cache is empty, from failing the first calls.
fn eval(script: &str, key: &str) -> redis::Cmd {
    redis::cmd("EVAL").arg(script).arg(1).arg(key).to_owned()
}

/// A stable, non-reversible name for an upstream key, the same on every replica.
pub fn limiter_id(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    format!("upstream:{}", hex::encode(&digest[..16]))
}
