//! The exact-match response cache: non-stream answers and whole streams, per tenant.
//!
//! - **Key.** SHA-256 of the tenant scope and the canonical request after alias resolution:
//!   object keys sorted at every level, `stream_options` and `user` left out, the stream flag
//!   kept. The scope is the caller's key id (or passthrough-key hash); `cache.shared` drops it.
//! - **What is stored.** Complete 200 answers only: a stream only once it ended with `[DONE]`,
//!   never an error, a broken or cancelled stream, or a media bot's answer (its URLs expire).
//! - **Streams are recorded, not buffered.** The tap hands each upstream frame to a
//!   [`Recorder`] as it forwards it; the recording is stored when the stream completes.
//!   Recordings are of upstream bytes, so a replay can honour either `include_usage` choice.
//! - **Expiry** is checked on tokio time at look-up, so a per-request
//!   `x-poe-gateway-cache-ttl` works and tests can pause time. An expired entry nobody asks
//!   for again is evicted like any other, in its turn.
//! - **Eviction.** Least recently used first, within `max_bytes` (see the builder for why not
//!   moka's default, and for how evictions are counted).
//! - **Coalescing.** Concurrent identical non-stream requests make one upstream call: the first
//!   leads, the others wait for its answer. A leader nobody waits for streams its answer.
//! - **Shared tier.** With Redis (`redis.cache`), entries are also written there, and a local
//!   miss looks there before calling Poe, so one replica's answer serves every replica. Redis
//!   being down only costs the shared hits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;

use super::models::Models;
use super::tap::Usage;
use super::{Caller, ChatRequest};
use crate::config::{CacheMode, CachePolicy};
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::shared_state::SharedState;

pub type CacheKey = [u8; 32];

/// Hashes a [`CacheKey`] (or any other SHA-256 digest: the key ring's look-ups are keyed by
/// one too) from its first 8 bytes and a per-process secret instead of running SipHash over
/// all 32: moka hashes a key several times per operation, and SipHash was about 5 % of a
/// stored miss's CPU time (perf). The
/// secret, mixed in before the finaliser, keeps bucket positions unpredictable, so requests
/// crafted to share digest bits still cannot pile into one bucket.
#[derive(Clone)]
pub struct KeyHash {
    seed: u64,
}

impl KeyHash {
    pub(crate) fn new() -> KeyHash {
        KeyHash {
            seed: fastrand::u64(..),
        }
    }
}

impl std::hash::BuildHasher for KeyHash {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher {
            seed: self.seed,
            word: 0,
        }
    }
}

pub struct KeyHasher {
    seed: u64,
    word: u64,
}

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut w = [0u8; 8];
        let n = bytes.len().min(8);
        w[..n].copy_from_slice(&bytes[..n]);
        self.word ^= u64::from_le_bytes(w);
    }

    /// The length an array is hashed with first: the same for every key.
    fn write_usize(&mut self, _: usize) {}

    fn finish(&self) -> u64 {
        // splitmix64's finaliser: every input bit moves every output bit.
        let mut z = self.word ^ self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// What the `x-cache` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Bypass,
}

impl CacheStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

/// Whether a non-stream answer may be stored: JSON by its type, and one object from its
/// first byte to its last. A proxy's HTML page, or an answer cut short that still came with
/// a length of its own, is passed on once but not replayed for `cache.ttl` (the SDKs return
/// the one as text and fail on the other). Not a parse: every stored miss pays for this.
fn looks_whole_json(content_type: Option<&http::HeaderValue>, body: &[u8]) -> bool {
    let json = content_type.is_some_and(|ct| {
        let ct = ct.as_bytes();
        let essence = ct.split(|b| *b == b';').next().unwrap_or(ct).trim_ascii();
        essence.eq_ignore_ascii_case(b"application/json")
            || essence.len() > 5 && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json")
    });
    let body = body.trim_ascii();
    json && body.first() == Some(&b'{') && body.last() == Some(&b'}')
}

/// The header a request's answer is stored for a shorter time with.
const TTL_HEADER: &str = "x-poe-gateway-cache-ttl";

/// A client's per-request cache wishes (`Cache-Control`, `x-poe-gateway-cache-ttl`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheDirectives {
    /// Do not answer from the cache (a fresh answer is still stored).
    pub no_cache: bool,
    /// Neither read nor store.
    pub no_store: bool,
    /// A shorter lifetime for what this request stores.
    pub ttl: Option<Duration>,
}

impl CacheDirectives {
    /// The directives of a request's headers; a 400 for an `x-poe-gateway-cache-ttl` that
    /// is not a lifetime (ignored, it stored the answer for the whole `cache.ttl`, the
    /// opposite of what its client meant).
    pub fn from_headers(h: &HeaderMap) -> Result<CacheDirectives, GatewayError> {
        let mut d = CacheDirectives::default();
        for v in h.get_all(http::header::CACHE_CONTROL) {
            for part in v.to_str().unwrap_or("").split(',') {
                match part.trim().to_ascii_lowercase().as_str() {
                    "no-cache" => d.no_cache = true,
                    "no-store" => d.no_store = true,
                    _ => {}
                }
            }
        }
        if let Some(v) = h.get(TTL_HEADER) {
            let text = v.to_str().unwrap_or("").trim();
            let ttl = match text.parse::<u64>() {
                Ok(secs) => Some(Duration::from_secs(secs)),
                Err(_) => humantime::parse_duration(text).ok(),
            };
            d.ttl = Some(ttl.ok_or_else(|| {
                GatewayError::bad_param(
                    TTL_HEADER,
                    format!(
                        "the {TTL_HEADER} header must be a number of seconds (or a duration \
                         such as 10m); got {:?}",
                        String::from_utf8_lossy(&v.as_bytes()[..v.len().min(64)])
                    ),
                )
            })?);
        }
        Ok(d)
    }
}

/// A stored answer.
#[derive(Debug)]
pub struct Entry {
    pub scope: Option<Arc<str>>,
    pub stream: bool,
    pub content_type: Option<http::HeaderValue>,
    /// The upstream frames as received (a non-stream answer is one frame).
    pub frames: Arc<[Bytes]>,
    pub bytes: usize,
    pub usage: Option<Usage>,
    pub bot: String,
    pub expires_at: Instant,
}

/// What an entry costs in memory besides its body, measured (`entry_weights_match_their_memory`):
/// moka's own records for the key (its table, its access queue), the entry and its
/// allocations, the key. With 256 bytes here a cache of small answers held 1.7 times its
/// `max_bytes`. (Measured with TinyLFU's frequency sketch and moka's TTL queue; the cache
/// keeps neither now, so this errs high.)
const ENTRY_OVERHEAD: usize = 720;
/// And each frame of a stored stream: its `Bytes` handle.
const FRAME_OVERHEAD: usize = 32;

/// What the cache will do for one request.
#[derive(Debug, Clone)]
pub struct Plan {
    pub key: CacheKey,
    scope: Option<Arc<str>>,
    pub read: bool,
    pub store: bool,
    ttl: Duration,
}

/// A non-stream answer shared by a coalesced call with the requests that waited for it.
#[derive(Debug)]
pub struct Shared {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub bot: String,
    pub usage: Option<Usage>,
    /// The leader's upstream attempts. An error it already retried is not for the
    /// followers' SDKs to retry again (`x-should-retry`).
    pub attempts: u32,
    /// A 200 that is an answer: not an error object (Poe's way to fail with a 200), which is
    /// shared as it came but is no hit.
    pub answer: bool,
}

/// What a coalesced call's followers see of it: nothing yet, its answer, or that it failed.
/// A sender dropped while `Pending` means the leader was cancelled (its client went away).
#[derive(Clone)]
pub enum Progress {
    Pending,
    Answered(Arc<Shared>),
    Failed,
}

type Waiters = watch::Receiver<Progress>;

/// How the leader a follower waited for ended.
pub enum Waited {
    Answered(Arc<Shared>),
    /// The leader's call failed before Poe answered (its own error, not Poe's answer): the
    /// follower makes its own call.
    Failed,
    /// The leader was cancelled before its answer: the followers coalesce again, so one of
    /// them makes the call for the rest instead of each calling Poe at once.
    Cancelled,
}

pub enum Coalesced {
    /// This request makes the call; publish its answer through the guard.
    Leader(LeaderGuard),
    /// Another identical request is in flight: wait for its answer.
    Follower(Waiters),
}

pub struct ResponseCache {
    // The sync flavour: an insert is visible at once and needs no task, and nothing here
    // awaits while holding an entry.
    store: moka::sync::Cache<CacheKey, Arc<Entry>, KeyHash>,
    policy: CachePolicy,
    models: Arc<Models>,
    metrics: Arc<Metrics>,
    in_flight: Arc<Mutex<HashMap<CacheKey, Waiters, KeyHash>>>,
    /// The Redis tier behind this one, when configured.
    shared: Option<Arc<SharedState>>,
    /// Entries put into `store`, and those the gateway took out itself (expired at look-up,
    /// purged). Whatever else left was evicted for room: see [`ResponseCache::evictions`].
    stored: AtomicU64,
    removed: AtomicU64,
}

impl ResponseCache {
    pub fn new(policy: &CachePolicy, models: Arc<Models>, metrics: Arc<Metrics>) -> ResponseCache {
        ResponseCache::with_shared(policy, models, metrics, None)
    }

    pub fn with_shared(
        policy: &CachePolicy,
        models: Arc<Models>,
        metrics: Arc<Metrics>,
        shared: Option<Arc<SharedState>>,
    ) -> ResponseCache {
        let store = moka::sync::Cache::builder()
            .max_capacity(policy.max_bytes.0)
            .weigher(|_: &CacheKey, e: &Arc<Entry>| {
                (e.bytes + ENTRY_OVERHEAD + FRAME_OVERHEAD * e.frames.len()).min(u32::MAX as usize)
                    as u32
            })
            // Least recently used goes first. moka's default (TinyLFU) admits a newcomer to a
            // full cache only if it has been asked for more often than what it would evict, so
            // once the cache had filled, a new answer was dropped and the repeat of its
            // request missed again; users expect the second identical request to hit. It
            // also keeps no frequency sketch, which every lookup and insert touched.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            // No eviction listener and no moka TTL: with a listener moka takes a lock per key
            // (an entry in a map of its own, made and dropped) on every insert and eviction,
            // and a full cache evicts on every stored miss; a TTL adds a second queue to keep
            // in order. The entry's own expiry is checked at look-up, and evictions are counted
            // from what went in and what the gateway took out (`evictions`).
            .build_with_hasher(KeyHash::new());
        ResponseCache {
            store,
            policy: policy.clone(),
            models,
            metrics,
            in_flight: Arc::new(Mutex::new(HashMap::with_hasher(KeyHash::new()))),
            shared,
            stored: AtomicU64::new(0),
            removed: AtomicU64::new(0),
        }
    }

    /// Decides whether and how the cache takes part in a request. `None` means bypass.
    pub fn plan(&self, caller: &Caller, req: &ChatRequest, bots: &[String]) -> Option<Plan> {
        let d = req.cache_directives();
        // A Responses request asks Poe to store its answer (`store` defaults to true) for
        // later requests to build on (`previous_response_id`): it always goes to Poe.
        if req.endpoint() != super::Endpoint::ChatCompletions {
            return None;
        }
        let eligible = match self.policy.mode {
            CacheMode::Off => false,
            CacheMode::All => true,
            CacheMode::Deterministic => req.temperature() == Some(0.0) || req.has_seed(),
        };
        if !eligible || d.no_store {
            return None;
        }
        let scope = if self.policy.shared {
            None
        } else {
            Some(caller.key_id.clone().unwrap_or_else(|| Arc::from("open")))
        };
        let key = cache_key(scope.as_deref(), req, bots)?;
        let ttl = d.ttl.map_or(self.policy.ttl, |t| t.min(self.policy.ttl));
        Some(Plan {
            key,
            scope,
            read: !d.no_cache,
            store: !ttl.is_zero(),
            ttl,
        })
    }

    /// A live entry for the plan, if there is one. A hit is counted here; a miss is counted
    /// by the caller ([`count_miss`](Self::count_miss)) once it is one: a non-stream request
    /// that finds nothing may still be answered by an identical one in flight.
    pub async fn get(&self, plan: &Plan) -> Option<Arc<Entry>> {
        if !plan.read {
            return None;
        }
        match self.store.get(&plan.key) {
            Some(e) if e.expires_at > Instant::now() => {
                self.metrics.cache_hits.inc();
                Some(e)
            }
            Some(_) => {
                self.remove(&plan.key);
                None
            }
            None => {
                let e = self.get_shared(plan).await?;
                self.metrics.cache_hits.inc();
                self.metrics.cache_shared_hits.inc();
                Some(e)
            }
        }
    }

    /// Counts a cacheable request that went to Poe.
    pub fn count_miss(&self) {
        self.metrics.cache_misses.inc();
    }

    /// Counts a request answered by an identical one in flight (a coalesced follower).
    pub fn count_shared_answer(&self) {
        self.metrics.cache_hits.inc();
    }

    /// Looks in the Redis tier after a local miss, and keeps what it finds locally.
    async fn get_shared(&self, plan: &Plan) -> Option<Arc<Entry>> {
        let shared = self.shared.as_ref()?;
        let scope = plan.scope.as_deref().unwrap_or(SHARED_SCOPE);
        let raw = shared.cache_get(scope, &plan.key).await.ok()??;
        let entry = Arc::new(decode(raw, plan.scope.clone())?);
        self.put(plan.key, entry.clone());
        Some(entry)
    }

    /// Joins an in-flight identical non-stream call, or becomes the one that makes it.
    pub fn coalesce(&self, key: CacheKey) -> Coalesced {
        let mut map = self.in_flight.lock().expect("coalesce lock");
        if let Some(rx) = map.get(&key)
            && rx.has_changed().is_ok()
        {
            return Coalesced::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(Progress::Pending);
        map.insert(key, rx);
        Coalesced::Leader(LeaderGuard {
            key,
            tx: Some(tx),
            map: self.in_flight.clone(),
        })
    }

    /// A recorder for an answer about to stream from upstream, when the plan stores.
    pub fn recorder(self: &Arc<Self>, plan: &Plan, stream: bool, bot: &str) -> Option<Recorder> {
        plan.store.then(|| Recorder {
            cache: self.clone(),
            plan: plan.clone(),
            stream,
            bot: bot.to_string(),
            content_type: None,
            data: BytesMut::new(),
            frame_lens: Vec::new(),
            too_big: false,
        })
    }

    /// Drops every entry, or one scope's (a key id), here and in the shared tier.
    pub async fn purge(&self, scope: Option<&str>) {
        self.purge_local(scope);
        if let Some(shared) = &self.shared
            && let Err(e) = shared.cache_purge(scope).await
        {
            tracing::warn!(error = %e, "the shared cache tier was not purged");
        }
    }

    /// Removes the entries one by one, so each is counted as taken out rather than evicted
    /// (an admin's purge is rare; a walk of the table is affordable there).
    fn purge_local(&self, scope: Option<&str>) {
        for (key, entry) in self.store.iter() {
            if scope.is_none_or(|s| entry.scope.as_deref() == Some(s)) {
                self.remove(&key);
            }
        }
    }

    fn put(&self, key: CacheKey, entry: Arc<Entry>) {
        self.store.insert(key, entry);
        // Counted after the insert, so that `evictions` never sees it stored but not live.
        self.stored.fetch_add(1, Ordering::Relaxed);
    }

    fn remove(&self, key: &CacheKey) {
        // `remove` answers `Some` to only one of two callers racing for the same entry.
        if self.store.remove(key).is_some() {
            self.removed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Entries evicted for room so far: stored, less those still held and those the gateway
    /// took out. An answer stored over an identical one (two identical streams at once) is
    /// counted too. Settles moka's pending work first, for an exact count of what is held.
    pub fn evictions(&self) -> u64 {
        // Read in this order, a change in between can only make the figure low for now,
        // never high (the counter it feeds cannot go back).
        let stored = self.stored.load(Ordering::Relaxed);
        self.store.run_pending_tasks();
        let live = self.store.entry_count();
        let removed = self.removed.load(Ordering::Relaxed);
        stored.saturating_sub(live + removed)
    }

    /// Bytes held (for the gauge).
    pub fn weighted_size(&self) -> u64 {
        self.store.weighted_size()
    }

    /// Settles pending inserts and evictions (tests and metrics read exact figures).
    pub async fn sync(&self) {
        self.store.run_pending_tasks();
    }

    fn is_media(&self, bot: &str, body: &[u8]) -> bool {
        // Built once: building a searcher costs more than one search with it.
        static POE_CDN: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"poecdn.net"));
        if POE_CDN.find(body).is_some() {
            return true;
        }
        // Before Poe's catalogue has been read (the ledger's writer reads it within moments
        // of the first request) a bot's output is unknown: an image bot's answer, whose CDN
        // links expire, must not be stored for want of it.
        self.models
            .snapshot()
            .is_none_or(|cat| cat.makes_media(bot))
    }

    /// Stores an entry (the caller has checked it is not a media answer).
    fn insert(self: &Arc<Self>, plan: Plan, entry: Entry) {
        let entry = Arc::new(entry);
        self.put(plan.key, entry.clone());
        if let Some(shared) = self.shared.clone() {
            let ttl = entry.expires_at.saturating_duration_since(Instant::now());
            if !ttl.is_zero() {
                tokio::spawn(async move {
                    let scope = plan.scope.as_deref().unwrap_or(SHARED_SCOPE);
                    // A failure is counted by the shared state; this replica still has it.
                    let _ = shared
                        .cache_put(scope, &plan.key, &encode(&entry, ttl), ttl)
                        .await;
                });
            }
        }
    }
}

/// Publishes the leader's answer to its followers, or its failure ([`LeaderGuard::fail`]).
/// Dropped with neither (the leader was cancelled), its followers elect a new leader.
pub struct LeaderGuard {
    key: CacheKey,
    tx: Option<watch::Sender<Progress>>,
    map: Arc<Mutex<HashMap<CacheKey, Waiters, KeyHash>>>,
}

impl LeaderGuard {
    /// Are other requests waiting for this answer? (The map keeps one receiver itself.)
    pub fn has_followers(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.receiver_count() > 1)
    }

    pub fn publish(mut self, shared: Arc<Shared>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Progress::Answered(shared));
        }
    }

    /// The call failed without an answer to share: each follower makes its own.
    pub fn fail(mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Progress::Failed);
        }
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.map.lock().expect("coalesce lock").remove(&self.key);
    }
}

/// Waits for the leader to answer, fail, or go away.
pub async fn wait_for_leader(mut rx: Waiters) -> Waited {
    let settled = |p: &Progress| match p {
        Progress::Answered(s) => Some(Waited::Answered(s.clone())),
        Progress::Failed => Some(Waited::Failed),
        Progress::Pending => None,
    };
    loop {
        if let Some(w) = settled(&rx.borrow_and_update()) {
            return w;
        }
        if rx.changed().await.is_err() {
            // Sent just before the sender went: still read it.
            return settled(&rx.borrow()).unwrap_or(Waited::Cancelled);
        }
    }
}

/// Records an answer's upstream frames as they stream past, for storing once complete.
pub struct Recorder {
    cache: Arc<ResponseCache>,
    plan: Plan,
    stream: bool,
    bot: String,
    content_type: Option<http::HeaderValue>,
    /// The answer so far, copied: see [`Recorder::push`].
    data: BytesMut,
    /// Where upstream's frames ended, for a stream's paced replay.
    frame_lens: Vec<u32>,
    too_big: bool,
}

impl Recorder {
    pub fn set_content_type(&mut self, ct: Option<http::HeaderValue>) {
        self.content_type = ct;
    }

    /// Copies the frame. Frames are slices of hyper's connection buffers: a handle kept to
    /// each, as a stream arriving a token a frame is, pinned a 2–16 KiB buffer per frame
    /// while the answer was recorded (16 such streams of 6.5 MB in all held 142 MB). The
    /// stored entry needs its own copy anyway (see [`Recorder::commit`]), so this is the one
    /// copy it makes.
    pub fn push(&mut self, frame: &Bytes) {
        if self.too_big {
            return;
        }
        if self.data.len() + frame.len() > self.cache.policy.max_entry_bytes.0 as usize {
            self.too_big = true;
            self.data = BytesMut::new();
            self.frame_lens = Vec::new();
            return;
        }
        self.data.extend_from_slice(frame);
        self.frame_lens.push(frame.len() as u32);
    }

    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// The answer completed: store it (unless it was too big or is a media answer).
    ///
    /// Entries own their bytes (copied as recorded, one allocation sliced back into the
    /// frames), never slices of hyper's buffers, which would each pin a whole 8–16 KiB buffer
    /// while weighing only its own bytes, and the cache would outgrow `max_bytes` many times
    /// over.
    pub fn commit(self, usage: Option<Usage>) {
        if self.too_big {
            return;
        }
        let all = self.data;
        let bytes = all.len();
        if !self.stream && !looks_whole_json(self.content_type.as_ref(), &all) {
            return;
        }
        if self.cache.is_media(&self.bot, &all) {
            return;
        }
        // Grown by doubling as a stream came in: an entry keeps no more than an eighth
        // unused, or the cache's real size would stray from the `max_bytes` it counts.
        let mut all = if all.capacity() - all.len() > all.len() / 8 {
            Bytes::copy_from_slice(&all)
        } else {
            all.freeze()
        };
        let frames: Arc<[Bytes]> = if self.stream {
            // Frame boundaries are kept, so a paced replay sends what upstream sent.
            self.frame_lens
                .iter()
                .map(|len| all.split_to(*len as usize))
                .collect()
        } else {
            // One frame for a JSON body, so a hit is a single write.
            Arc::from(vec![all])
        };
        let content_type = self.content_type.and_then(|ct| owned_content_type(&ct));
        let entry = Entry {
            scope: self.plan.scope.clone(),
            stream: self.stream,
            content_type,
            frames,
            bytes,
            usage,
            bot: self.bot,
            expires_at: Instant::now() + self.plan.ttl,
        };
        self.cache.insert(self.plan, entry);
    }
}

/// An entry's own copy of the answer's Content-Type (see [`Recorder::commit`]); Poe's two
/// usual values are shared statics rather than an allocation per entry.
fn owned_content_type(ct: &http::HeaderValue) -> Option<http::HeaderValue> {
    const USUAL: [&str; 2] = ["application/json", "text/event-stream"];
    match USUAL.iter().find(|u| ct.as_bytes() == u.as_bytes()) {
        Some(u) => Some(http::HeaderValue::from_static(u)),
        None => http::HeaderValue::from_bytes(ct.as_bytes()).ok(),
    }
}

/// The Redis scope of entries that serve every caller (`cache.shared`).
const SHARED_SCOPE: &str = "shared";
const WIRE_MAGIC: &[u8; 4] = b"PGC1";

/// An entry for the shared tier: a small header, then the frames back to back, so a decoded
/// entry's frames are slices of the one buffer Redis returned.
fn encode(e: &Entry, ttl: Duration) -> Vec<u8> {
    let ct = e.content_type.as_ref().map_or(&b""[..], |v| v.as_bytes());
    let mut out = Vec::with_capacity(64 + ct.len() + e.bot.len() + 4 * e.frames.len() + e.bytes);
    out.extend_from_slice(WIRE_MAGIC);
    let expires = crate::ledger::now_ms() as u64 + ttl.as_millis() as u64;
    out.extend_from_slice(&expires.to_le_bytes());
    out.push(u8::from(e.stream) | (u8::from(e.usage.is_some()) << 1));
    let u = e.usage.unwrap_or_default();
    for n in [u.prompt_tokens, u.completion_tokens, u.total_tokens] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    for field in [ct, e.bot.as_bytes()] {
        out.extend_from_slice(&(field.len() as u32).to_le_bytes());
        out.extend_from_slice(field);
    }
    out.extend_from_slice(&(e.frames.len() as u32).to_le_bytes());
    for f in e.frames.iter() {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
    }
    for f in e.frames.iter() {
        out.extend_from_slice(f);
    }
    out
}

/// Reads what [`encode`] wrote; `None` for anything else or an entry already expired.
fn decode(mut raw: Bytes, scope: Option<Arc<str>>) -> Option<Entry> {
    fn take(raw: &mut Bytes, n: usize) -> Option<Bytes> {
        (raw.len() >= n).then(|| raw.split_to(n))
    }
    fn u32_at(raw: &mut Bytes) -> Option<usize> {
        let b = take(raw, 4)?;
        Some(u32::from_le_bytes(b[..].try_into().ok()?) as usize)
    }
    fn u64_at(raw: &mut Bytes) -> Option<u64> {
        let b = take(raw, 8)?;
        Some(u64::from_le_bytes(b[..].try_into().ok()?))
    }
    if take(&mut raw, 4)?[..] != WIRE_MAGIC[..] {
        return None;
    }
    let expires = u64_at(&mut raw)?;
    let left = expires.checked_sub(crate::ledger::now_ms() as u64)?;
    let flags = take(&mut raw, 1)?[0];
    let usage = Usage {
        prompt_tokens: u64_at(&mut raw)?,
        completion_tokens: u64_at(&mut raw)?,
        total_tokens: u64_at(&mut raw)?,
        // Not in the format, which older replicas share: a non-stream hit from this tier
        // counts no prompt-cache reads (a stream's are read again as it replays).
        cache_read_tokens: 0,
    };
    let n = u32_at(&mut raw)?;
    let ct = take(&mut raw, n)?;
    let n = u32_at(&mut raw)?;
    let bot = String::from_utf8(take(&mut raw, n)?.to_vec()).ok()?;
    let count = u32_at(&mut raw)?;
    let mut lens = Vec::with_capacity(count.min(raw.len() / 4));
    for _ in 0..count {
        lens.push(u32_at(&mut raw)?);
    }
    let mut frames = Vec::with_capacity(lens.len());
    let mut bytes = 0;
    for len in lens {
        bytes += len;
        frames.push(take(&mut raw, len)?);
    }
    if !raw.is_empty() || left == 0 {
        return None;
    }
    Some(Entry {
        scope,
        stream: flags & 1 != 0,
        content_type: (!ct.is_empty())
            .then(|| http::HeaderValue::from_maybe_shared(ct).ok())
            .flatten(),
        frames: frames.into(),
        bytes,
        usage: (flags & 2 != 0).then_some(usage),
        bot,
        // A lifetime too long for an `Instant` (where its range is narrower than Linux's) is
        // corrupt data, not a reason to panic.
        expires_at: Instant::now().checked_add(Duration::from_millis(left))?,
    })
}

/// SHA-256 over the scope and the canonical request. `None` if the body is not an object.
fn cache_key(scope: Option<&str>, req: &ChatRequest, bots: &[String]) -> Option<CacheKey> {
    // One buffer, hashed once: many tiny hash updates cost more than the hashing itself.
    let mut buf = Vec::with_capacity(req.body().len() + 64);
    buf.extend_from_slice(b"poe-gateway-cache-v1\0");
    buf.extend_from_slice(scope.unwrap_or("").as_bytes());
    buf.push(0);
    // After alias resolution: an alias and its bot name are the same request.
    let model = bots.join("|").to_ascii_lowercase();
    super::canonical::write_request(req.body(), &model, &mut buf)?;
    Some(Sha256::digest(&buf).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(body: &str, bots: &[&str], scope: Option<&str>) -> CacheKey {
        let req = ChatRequest::parse(Bytes::copy_from_slice(body.as_bytes())).unwrap();
        let bots: Vec<String> = bots.iter().map(|s| s.to_string()).collect();
        cache_key(scope, &req, &bots).unwrap()
    }

    #[test]
    fn key_hash_spreads_digests_and_is_seeded() {
        use std::hash::BuildHasher;
        let (a, b) = (KeyHash::new(), KeyHash::new());
        let mut seen = std::collections::HashSet::new();
        let mut low_bits = std::collections::HashSet::new();
        for i in 0u32..4096 {
            let k: CacheKey = Sha256::digest(i.to_le_bytes()).into();
            assert!(
                seen.insert(a.hash_one(k)),
                "no two of 4096 digests share a hash"
            );
            low_bits.insert(a.hash_one(k) & 0xfff);
        }
        // 4096 balls in 4096 bins fill about 63 % of them; a poor mix fills far fewer.
        assert!(low_bits.len() > 2300, "{}", low_bits.len());
        let k: CacheKey = Sha256::digest(b"x").into();
        assert_ne!(
            a.hash_one(k),
            b.hash_one(k),
            "each cache has its own secret"
        );
    }

    #[test]
    fn canonical_key() {
        let a = key(
            r#"{"model":"claude","messages":[{"role":"user","content":"x"}],"temperature":0,"user":"u1","stream_options":{"include_usage":true}}"#,
            &["claude-sonnet-4.5"],
            Some("k1"),
        );
        let b = key(
            r#"{"temperature":0,"messages":[{"content":"x","role":"user"}],"model":"CLAUDE-SONNET-4.5"}"#,
            &["claude-sonnet-4.5"],
            Some("k1"),
        );
        assert_eq!(
            a, b,
            "key order, user, stream_options and alias do not matter"
        );
        let other_scope = key(
            r#"{"model":"claude","messages":[{"role":"user","content":"x"}],"temperature":0}"#,
            &["claude-sonnet-4.5"],
            Some("k2"),
        );
        assert_ne!(a, other_scope);
        let streamed = key(
            r#"{"model":"claude","messages":[{"role":"user","content":"x"}],"temperature":0,"stream":true}"#,
            &["claude-sonnet-4.5"],
            Some("k1"),
        );
        assert_ne!(a, streamed, "the stream flag is part of the key");
    }

    #[tokio::test]
    async fn committed_entries_own_their_bytes() {
        let policy = CachePolicy {
            mode: CacheMode::All,
            ..CachePolicy::default()
        };
        let cache = Arc::new(ResponseCache::new(
            &policy,
            Arc::new(Models::read_already(Vec::new())),
            Arc::new(Metrics::new()),
        ));
        let req = ChatRequest::parse(Bytes::from_static(
            br#"{"model":"a","messages":[{"role":"user","content":"x"}],"stream":true}"#,
        ))
        .unwrap();
        let caller = Caller::server(Arc::from("t"));
        let plan = cache.plan(&caller, &req, &["a".to_string()]).unwrap();
        // Frames as hyper hands them over: small slices of a big connection buffer.
        let buffer = Bytes::from(vec![b'x'; 16 * 1024]);
        let mut r = cache.recorder(&plan, true, "a").unwrap();
        r.set_content_type(Some(http::HeaderValue::from_static("text/event-stream")));
        r.push(&buffer.slice(0..10));
        r.push(&buffer.slice(100..120));
        // Nor does the recording, while the answer comes in (a stream's frames each
        // pinned a buffer until its end).
        assert!(
            buffer.is_unique(),
            "the recording pins the connection buffer"
        );
        r.commit(None);
        let e = cache.get(&plan).await.expect("stored");
        let inside = |p: *const u8| {
            let start = buffer.as_ptr() as usize;
            (start..start + buffer.len()).contains(&(p as usize))
        };
        assert_eq!(e.frames.len(), 2);
        assert!(
            e.frames.iter().all(|f| !inside(f.as_ptr())),
            "an entry pins the connection buffer"
        );
        // One allocation of the body's size, sliced back into the frames.
        assert_eq!(
            e.frames[0].as_ptr() as usize + 10,
            e.frames[1].as_ptr() as usize
        );
        assert_eq!(e.bytes, 30);
    }

    /// What an entry costs in memory, against what the weigher counts: stored JSON answers
    /// and stored streams of Poe's usual sizes. Ignored by default: it reads the process's
    /// RSS, which other tests running beside it would disturb. `benches/run.sh memory` runs
    /// it alone.
    #[tokio::test]
    #[ignore]
    async fn entry_weights_match_their_memory() {
        fn rss() -> u64 {
            let s = std::fs::read_to_string("/proc/self/statm").unwrap();
            s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
        }
        let policy = CachePolicy {
            mode: CacheMode::All,
            max_bytes: crate::config::ByteSize(1 << 40),
            ..CachePolicy::default()
        };
        let caller = Caller::server(Arc::from("t"));
        let n = 100_000;
        // Each cache is kept to the end, so no case reuses memory an earlier one freed.
        let mut caches = Vec::new();
        // (stream, frames, bytes per frame): Poe's JSON answer, a short and a long stream.
        for (stream, frames, size) in [(false, 1, 330), (true, 12, 190), (true, 200, 150)] {
            let cache = Arc::new(ResponseCache::new(
                &policy,
                Arc::new(Models::read_already(Vec::new())),
                Arc::new(Metrics::new()),
            ));
            let frame = Bytes::from(vec![b'x'; size]);
            let ct = if stream {
                "text/event-stream"
            } else {
                "application/json"
            };
            let before = rss();
            for i in 0..n {
                let req = ChatRequest::parse(Bytes::from(format!(
                    r#"{{"model":"a","messages":[{{"role":"user","content":"x {i}"}}],"temperature":0,"stream":{stream}}}"#
                )))
                .unwrap();
                let plan = cache.plan(&caller, &req, &["gpt-5".to_string()]).unwrap();
                let mut r = cache.recorder(&plan, stream, "gpt-5").unwrap();
                r.set_content_type(Some(http::HeaderValue::from_static(ct)));
                (0..frames).for_each(|_| r.push(&frame));
                r.commit(None);
            }
            cache.store.run_pending_tasks();
            let (rss, weight) = ((rss() - before) / n, cache.store.weighted_size() / n);
            eprintln!(
                "{frames} frames of {size} bytes: {rss} bytes of RSS per entry, weighed {weight}"
            );
            let off = (weight as f64 / rss as f64 - 1.0).abs();
            assert!(off < 0.15, "the weigher is {:.0} % off", off * 100.0);
            caches.push(cache);
        }
    }

    #[test]
    fn directives() {
        let mut h = HeaderMap::new();
        h.insert("cache-control", "No-Cache, max-age=0".parse().unwrap());
        h.insert("x-poe-gateway-cache-ttl", "600".parse().unwrap());
        let d = CacheDirectives::from_headers(&h).unwrap();
        assert!(d.no_cache && !d.no_store);
        assert_eq!(d.ttl, Some(Duration::from_secs(600)));
    }

    #[tokio::test]
    async fn shared_tier_encoding_round_trips_and_rejects_garbage() {
        let frames: Vec<Bytes> = vec![
            Bytes::from_static(b"data: {}\n\n"),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ];
        let e = Entry {
            scope: Some(Arc::from("key_1")),
            stream: true,
            content_type: Some(http::HeaderValue::from_static("text/event-stream")),
            frames: frames.clone().into(),
            bytes: frames.iter().map(|f| f.len()).sum(),
            usage: Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
                total_tokens: 10,
                cache_read_tokens: 0,
            }),
            bot: "gpt-5".into(),
            expires_at: Instant::now() + Duration::from_secs(60),
        };
        let wire = Bytes::from(encode(&e, Duration::from_secs(60)));
        let d = decode(wire.clone(), e.scope.clone()).expect("decodes");
        assert_eq!(&d.frames[..], &frames[..]);
        assert_eq!(d.usage, e.usage);
        assert_eq!(d.bot, "gpt-5");
        assert!(d.stream);
        assert_eq!(d.content_type, e.content_type);
        assert_eq!(d.bytes, e.bytes);
        // Every truncation, and trailing bytes, are refused rather than misread.
        for n in 0..wire.len() {
            assert!(
                decode(wire.slice(..n), None).is_none(),
                "prefix of {n} bytes"
            );
        }
        let mut longer = wire.to_vec();
        longer.push(0);
        assert!(decode(Bytes::from(longer), None).is_none());
        // An entry already past its expiry is a miss.
        assert!(decode(Bytes::from(encode(&e, Duration::ZERO)), None).is_none());
    }
}
