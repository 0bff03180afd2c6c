//! The usage ledger: one row per request, written off the request path.
//!
//! A request's completion hands its row to [`Ledger::record`], which only puts it on a bounded
//! queue (never waiting; a full queue is counted and logged). A writer task takes what has
//! queued every `BATCH_WINDOW` (sooner when `BATCH_MAX` rows wait or on a flush), prices it,
//! and writes it in transactions of up to `BATCH_MAX` rows. The writer is woken by the first
//! row after it has emptied the queue, not by every row: a wake-up per request would cost the
//! request a hop to another thread. A row is on disk well inside a second of its request finishing,
//! and SQLite runs in WAL mode, so a `kill -9` loses at most the last fraction of a second.
//!
//! The same [`Store`] holds gateway keys, and answers the usage reports.

mod postgres;
pub mod report;
mod sqlite;
mod store;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, oneshot};

pub use report::{GroupBy, Report, ReportQuery, Totals};
pub use store::{Store, redact_url};

/// Default database: SQLite next to the working directory, created on first use.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://./data/poe-gateway.db";
const QUEUE_CAPACITY: usize = 65_536;
const BATCH_MAX: usize = 1_000;
const BATCH_WINDOW: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "database URL {0:?} is not supported: use sqlite://PATH, sqlite::memory: or postgres://..."
    )]
    BadUrl(String),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {}", postgres_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Other(String),
}

/// A Postgres error as the server gave it: its message and SQLSTATE ("db error" alone said
/// nothing). The detail, which may quote row values, is left out.
fn postgres_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl LedgerError {
    /// The database answered and refused these rows (a value it cannot store): writing them
    /// again as they are cannot help. Anything else (no connection, a timeout, a full disk,
    /// a locked file) may pass on a later try.
    fn is_refusal(&self) -> bool {
        match self {
            // SQLSTATE class 22 (data exception) and 23 (integrity constraint violation).
            LedgerError::Postgres(e) => e
                .code()
                .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")),
            LedgerError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => matches!(
                f.code,
                rusqlite::ErrorCode::ConstraintViolation
                    | rusqlite::ErrorCode::TooBig
                    | rusqlite::ErrorCode::TypeMismatch
            ),
            _ => false,
        }
    }
}

/// One request, as accounted.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct UsageRow {
    /// Unix time in milliseconds when the request finished.
    pub ts_ms: i64,
    pub request_id: String,
    pub key_id: Option<String>,
    pub alias: Option<String>,
    /// The model the client asked for.
    pub model: String,
    /// The bot that answered (or was last tried).
    pub bot: String,
    pub stream: bool,
    pub status: u16,
    /// `completed`, `incomplete`, `cancelled` or `rejected`.
    pub outcome: &'static str,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    /// The completion tokens are an estimate (streamed text / 4), not Poe's count.
    pub tokens_estimated: bool,
    /// USD; `None` when the bot has no known price.
    pub cost_usd: Option<f64>,
    pub cache_hit: bool,
    /// For a cache hit: what the request would have cost.
    pub saved_usd: Option<f64>,
    pub attempts: i32,
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    /// The API the request came in on (`chat`, `responses` or `messages`).
    pub api: Api,
    /// Of `prompt_tokens`, those read from and written to the bot's prompt cache, as Poe
    /// reported them (0 where it did not): reads on every API, writes on the Messages API.
    /// Stored in nullable columns, empty in rows from before them.
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    /// Of `cache_write_tokens`, those written to be kept an hour, which cost more. Used for
    /// the price only; not stored.
    #[serde(skip)]
    pub cache_write_1h_tokens: i64,
    /// Priced and charged to its key's budget as the request ended: the writer passes the
    /// charge on to the shared counter but does not add it again. Not stored.
    #[serde(skip)]
    pub charged: bool,
}

/// The API a usage row's request came in on, stored in the ledger's `api` column by the
/// names [`Api::as_str`] gives. The names are part of the ledger's format (reports group by
/// them, operators query them): they do not change. Rows written before the column existed,
/// or by older replicas beside newer ones, have none and report as `unknown`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /v1/chat/completions` (and the MCP tools, which call it).
    #[default]
    Chat,
    /// `POST /v1/responses`, OpenAI's Responses API.
    Responses,
    /// `POST /v1/messages`, Anthropic's Messages API.
    Messages,
}

impl Api {
    /// The name stored in the ledger and shown in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Responses => "responses",
            Api::Messages => "messages",
        }
    }
}

/// A gateway key as stored: the key itself is never kept, only its SHA-256.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    #[serde(skip)]
    pub hash: String,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
    /// When the key stops working (unix milliseconds); `None`: never.
    pub expires_ms: Option<i64>,
    pub budget_usd: Option<f64>,
    pub period: Period,
    pub rpm: Option<u32>,
    /// Models (aliases or bots) the key may use; `None` means all.
    pub models: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Month,
    Total,
}

impl Period {
    pub fn as_str(&self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "day" => Some(Period::Day),
            "month" => Some(Period::Month),
            "total" => Some(Period::Total),
            _ => None,
        }
    }

    /// Start of the current period (UTC), in unix milliseconds.
    pub fn start_ms(&self, now_ms: i64) -> i64 {
        let Ok(now) = time::OffsetDateTime::from_unix_timestamp(now_ms.div_euclid(1000)) else {
            return 0;
        };
        let date = match self {
            Period::Total => return 0,
            Period::Day => now.date(),
            Period::Month => now.date().replace_day(1).unwrap_or(now.date()),
        };
        date.midnight().assume_utc().unix_timestamp() * 1000
    }
}

/// Called by the writer on each batch before it is written: prices the rows (cost needs the
/// model catalogue, which the request path must not wait for) and charges budgets.
pub trait BatchHook: Send + Sync + 'static {
    fn before_write<'a>(
        &'a self,
        rows: &'a mut [UsageRow],
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

    /// Called once every row taken so far is written (none is held for a retry).
    fn after_write(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }
}

/// Counters about the ledger itself.
#[derive(Debug, Default)]
pub struct LedgerStats {
    pub queued: AtomicU64,
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub write_errors: AtomicU64,
}

impl LedgerStats {
    pub fn depth(&self) -> u64 {
        let q = self.queued.load(Ordering::Relaxed);
        let done = self.written.load(Ordering::Relaxed) + self.write_errors.load(Ordering::Relaxed);
        q.saturating_sub(done)
    }
}

/// What the request path and the writer share.
#[derive(Default)]
struct Queue {
    state: Mutex<Pending>,
    /// Wakes the writer: the first row into an empty queue, a full batch, a flush, the end.
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    rows: Vec<UsageRow>,
    acks: Vec<oneshot::Sender<()>>,
    /// Every [`Ledger`] handle is gone, or [`Ledger::close`] was called: write what is left
    /// and stop.
    closed: bool,
    /// The writer has ended.
    stopped: bool,
    /// Told (dropped) when the writer ends.
    on_stop: Vec<oneshot::Sender<()>>,
}

impl Queue {
    /// The lock is only held to push or swap a vector, never across an await; a poisoned
    /// lock still holds valid rows.
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The handles' side of the queue: closes it when the last [`Ledger`] clone is dropped.
struct Closer(Arc<Queue>);

impl std::ops::Deref for Closer {
    type Target = Queue;
    fn deref(&self) -> &Queue {
        &self.0
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

/// The ledger handle: cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    queue: Arc<Closer>,
    store: Store,
    stats: Arc<LedgerStats>,
}

impl Ledger {
    /// Opens the store (running migrations) and starts the writer.
    pub async fn open(url: &str, hook: Option<Arc<dyn BatchHook>>) -> Result<Ledger, LedgerError> {
        let store = Store::open(url).await?;
        Ok(Ledger::start(store, hook))
    }

    /// Starts a writer over an open store.
    pub fn start(store: Store, hook: Option<Arc<dyn BatchHook>>) -> Ledger {
        let queue = Arc::new(Queue::default());
        let stats = Arc::new(LedgerStats::default());
        tokio::spawn(writer(
            store.clone(),
            stats.clone(),
            hook,
            Gone(queue.clone()),
        ));
        Ledger {
            queue: Arc::new(Closer(queue)),
            store,
            stats,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn stats(&self) -> &Arc<LedgerStats> {
        &self.stats
    }

    /// Queues a row without waiting. A full queue drops the row, counts it, and says so.
    pub fn record(&self, row: UsageRow) {
        let mut pending = self.queue.lock();
        let why = if pending.closed {
            "writer stopped"
        } else if pending.rows.len() >= QUEUE_CAPACITY {
            "queue full"
        } else {
            pending.rows.push(row);
            let n = pending.rows.len();
            drop(pending);
            self.stats.queued.fetch_add(1, Ordering::Relaxed);
            if n == 1 || n == BATCH_MAX {
                self.queue.wake.notify_one();
            }
            return;
        };
        drop(pending);
        let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // Logged on the first drop and then every thousandth, not once per row.
        if n == 1 || n.is_multiple_of(1000) {
            tracing::error!(dropped_total = n, why, "ledger row dropped");
        }
    }

    /// Waits until every row queued before this call is written (at once if the writer is
    /// gone, say with the runtime it ran on), or [`FLUSH_WAIT`] has passed: a report or a
    /// shutdown must not hang on a database that stopped answering.
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        {
            let mut pending = self.queue.lock();
            if pending.closed {
                return;
            }
            pending.acks.push(ack);
        }
        self.queue.wake.notify_one();
        if tokio::time::timeout(FLUSH_WAIT, done).await.is_err() {
            tracing::warn!(
                wait_s = FLUSH_WAIT.as_secs(),
                "the ledger did not finish writing in time; going on without it"
            );
        }
    }
}

impl Ledger {
    /// At shutdown: closes the queue (rows recorded later are refused, and counted as
    /// dropped) and waits, at most `wait`, for the writer to write what is queued and try the
    /// rows a failing database left it holding once more. What it cannot write is counted in
    /// `write_errors` and logged: by the writer, or here when the wait runs out first.
    pub async fn close(&self, wait: std::time::Duration) {
        let (tx, stopped) = oneshot::channel::<()>();
        {
            let mut p = self.queue.lock();
            if p.stopped {
                return;
            }
            p.closed = true;
            p.on_stop.push(tx);
        }
        self.queue.wake.notify_one();
        if tokio::time::timeout(wait, stopped).await.is_err() {
            let rows = self.stats.depth();
            self.stats.write_errors.fetch_add(rows, Ordering::Relaxed);
            tracing::error!(
                rows,
                wait_s = wait.as_secs(),
                "ledger rows lost at shutdown: the database did not take them in time"
            );
        }
    }
}

/// The longest [`Ledger::flush`] waits.
pub const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Held by the writer task. However the writer ends (a runtime shutting down drops it, even
/// before its first poll), later rows are refused as "writer stopped" and no flush waits.
struct Gone(Arc<Queue>);

impl Drop for Gone {
    fn drop(&mut self) {
        let mut p = self.0.lock();
        p.closed = true;
        p.stopped = true;
        p.acks.clear();
        p.on_stop.clear();
    }
}

async fn writer(
    store: Store,
    stats: Arc<LedgerStats>,
    hook: Option<Arc<dyn BatchHook>>,
    gone: Gone,
) {
    let queue = &*gone.0;
    // Rows a failing database could not take yet, oldest first, tried again each round.
    let mut held: Vec<UsageRow> = Vec::new();
    loop {
        if held.is_empty() {
            queue.wake.notified().await;
        } else {
            tokio::select! {
                _ = queue.wake.notified() => {}
                _ = tokio::time::sleep(HELD_RETRY) => {}
            }
        }
        let urgent = {
            let p = queue.lock();
            p.closed || !p.acks.is_empty() || p.rows.len() >= BATCH_MAX
        };
        if !urgent {
            // Let the batch fill for its window; a full batch or a flush ends the wait early.
            tokio::select! {
                _ = tokio::time::sleep(BATCH_WINDOW) => {}
                _ = queue.wake.notified() => {}
            }
        }
        let (rows, acks, closed) = {
            let mut p = queue.lock();
            // The next batch's room is made here, off the request path: a queue that starts
            // empty grows by doubling, copying its rows each time.
            let room = p.rows.len().min(BATCH_MAX);
            (
                std::mem::replace(&mut p.rows, Vec::with_capacity(room)),
                std::mem::take(&mut p.acks),
                p.closed,
            )
        };
        // The hook (budget charges) sees each row once, when it is first taken from the
        // queue, not again when a held row is retried.
        let mut fresh = Vec::new();
        for mut batch in into_batches(rows) {
            if let Some(h) = &hook {
                h.before_write(&mut batch).await;
            }
            fresh.push(batch);
        }
        let mut pending = into_batches(std::mem::take(&mut held));
        pending.extend(fresh);
        for batch in pending {
            held.extend(write_batch(&store, batch, &stats).await);
        }
        if held.is_empty()
            && let Some(h) = &hook
        {
            h.after_write().await;
        }
        if held.len() > QUEUE_CAPACITY {
            let lost = held.len() - QUEUE_CAPACITY;
            held.drain(..lost);
            stats.write_errors.fetch_add(lost as u64, Ordering::Relaxed);
            tracing::error!(
                rows = lost,
                "ledger rows lost: the database has been failing and the rows waiting for it are over the queue's capacity"
            );
        }
        for ack in acks {
            let _ = ack.send(());
        }
        if closed {
            if !held.is_empty() {
                stats
                    .write_errors
                    .fetch_add(held.len() as u64, Ordering::Relaxed);
                tracing::error!(
                    rows = held.len(),
                    "ledger rows lost at shutdown: the database did not take them"
                );
            }
            return;
        }
        // A row pushed while this batch was written found the queue empty and left a
        // wake-up, so the next loop picks it up.
    }
}

/// The queue's rows in batches of at most `BATCH_MAX`. Usually there is one, and it is the
/// queue's own `Vec`, uncopied; a longer queue (a writer that fell behind) is cut up with each
/// row moved once.
fn into_batches(rows: Vec<UsageRow>) -> Vec<Vec<UsageRow>> {
    if rows.len() <= BATCH_MAX {
        return if rows.is_empty() {
            Vec::new()
        } else {
            vec![rows]
        };
    }
    let mut rest = rows.into_iter();
    std::iter::from_fn(|| {
        let batch: Vec<UsageRow> = rest.by_ref().take(BATCH_MAX).collect();
        (!batch.is_empty()).then_some(batch)
    })
    .collect()
}

/// Writes one batch, retrying a failing database a few times. Returns the rows to hold for a
/// later round: all of them while the database is unreachable. When the database refuses the
/// batch (a value it cannot store), the rows are written one by one, so that one bad row does
/// not sink the others; the ones it refuses are counted lost.
async fn write_batch(store: &Store, batch: Vec<UsageRow>, stats: &LedgerStats) -> Vec<UsageRow> {
    let batch = Arc::new(batch);
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    let err = loop {
        match store.insert_usage(&batch).await {
            Ok(()) => {
                stats
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                return Vec::new();
            }
            Err(e) if attempt < WRITE_TRIES && !e.is_refusal() => {
                tracing::warn!(error = %e, rows = batch.len(), attempt, "ledger write failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) => break e,
        }
    };
    let rows = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
    if !err.is_refusal() {
        tracing::error!(error = %err, rows = rows.len(), "ledger write failed; holding the rows to try again");
        return rows;
    }
    let mut rest = rows.into_iter();
    while let Some(row) = rest.next() {
        match store.insert_usage(&Arc::new(vec![row.clone()])).await {
            Ok(()) => {
                stats.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.is_refusal() => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, request_id = %row.request_id, "the database refused a ledger row; it is lost");
            }
            Err(e) => {
                tracing::error!(error = %e, "ledger write failed; holding the rows to try again");
                let mut held = vec![row];
                held.extend(rest);
                return held;
            }
        }
    }
    Vec::new()
}

/// Tries of one batch within a round, before its rows are held for the next.
const WRITE_TRIES: u32 = 3;
/// How soon rows held back by a failing database are tried again.
const HELD_RETRY: Duration = Duration::from_secs(5);

/// Unix time now in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short queue is one batch (the same `Vec`); a long one is cut in order, none empty.
    #[test]
    fn a_queue_is_cut_into_batches_in_order() {
        let rows = |n: usize| -> Vec<UsageRow> {
            (0..n)
                .map(|i| UsageRow {
                    request_id: i.to_string(),
                    ..UsageRow::default()
                })
                .collect()
        };
        assert!(into_batches(Vec::new()).is_empty());
        let one = rows(BATCH_MAX);
        let at = one.as_ptr();
        let batches = into_batches(one);
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].as_ptr(), at, "the queue's rows were copied");
        let batches = into_batches(rows(2 * BATCH_MAX + 1));
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [BATCH_MAX, BATCH_MAX, 1]);
        let ids: Vec<String> = batches.concat().into_iter().map(|r| r.request_id).collect();
        assert_eq!(
            ids,
            (0..2 * BATCH_MAX + 1)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
        );
    }

    /// A writer that went away with its runtime must not leave `flush` waiting for ever.
    #[test]
    fn flush_returns_when_the_writer_is_gone() {
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ledger = first.block_on(async { Ledger::open("sqlite::memory:", None).await.unwrap() });
        drop(first);
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        second.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), ledger.flush())
                .await
                .expect("flush returned");
        });
    }

    /// Every row of a batch must land, each column in its place (sums per key and per bot
    /// would move if a binding were off).
    #[tokio::test]
    async fn a_batch_of_any_size_lands_column_by_column() {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let rows: Vec<UsageRow> = (0..123i64)
            .map(|i| UsageRow {
                ts_ms: 1_000 + i,
                request_id: format!("req-{i}"),
                key_id: Some(format!("key-{}", i % 3)),
                alias: None,
                model: format!("model-{}", i % 2),
                bot: format!("bot-{}", i % 2),
                stream: i % 2 == 0,
                status: if i % 10 == 0 { 502 } else { 200 },
                outcome: "completed",
                prompt_tokens: Some(i),
                completion_tokens: Some(2 * i),
                total_tokens: Some(3 * i),
                tokens_estimated: false,
                cost_usd: Some(i as f64 * 0.5),
                cache_hit: i % 4 == 0,
                saved_usd: None,
                attempts: 1,
                latency_ms: 10.0,
                ttfb_ms: Some(5.0),
                api: [Api::Chat, Api::Responses, Api::Messages][(i % 3) as usize],
                cache_read_tokens: i / 2,
                cache_write_tokens: i % 5,
                cache_write_1h_tokens: 0,
                charged: false,
            })
            .collect();
        let rows = Arc::new(rows);
        store.insert_usage(&rows).await.unwrap();

        let report = |group_by| ReportQuery {
            since_ms: 0,
            until_ms: i64::MAX,
            key_id: None,
            group_by,
        };
        let all = store.report(&report(None)).await.unwrap().totals;
        let n = 123i64;
        let sum: i64 = (0..n).sum();
        assert_eq!(all.requests, n);
        assert_eq!(all.prompt_tokens, sum);
        assert_eq!(all.completion_tokens, 2 * sum);
        assert_eq!(all.total_tokens, 3 * sum);
        assert_eq!(all.cost_usd, sum as f64 * 0.5);
        assert_eq!(all.cache_hits, (0..n).filter(|i| i % 4 == 0).count() as i64);
        assert_eq!(all.errors, (0..n).filter(|i| i % 10 == 0).count() as i64);
        assert_eq!(all.cache_read_tokens, (0..n).map(|i| i / 2).sum::<i64>());
        assert_eq!(all.cache_write_tokens, (0..n).map(|i| i % 5).sum::<i64>());

        let by_key = store.report(&report(Some(GroupBy::Key))).await.unwrap();
        for g in &by_key.groups {
            let k: i64 = g.group.strip_prefix("key-").unwrap().parse().unwrap();
            let want: i64 = (0..n).filter(|i| i % 3 == k).sum();
            assert_eq!(g.totals.prompt_tokens, want, "{}", g.group);
            let reads: i64 = (0..n).filter(|i| i % 3 == k).map(|i| i / 2).sum();
            assert_eq!(g.totals.cache_read_tokens, reads, "{}", g.group);
            assert_eq!(
                store.spent_since(&g.group, 0).await.unwrap(),
                want as f64 * 0.5
            );
        }
        assert_eq!(by_key.groups.len(), 3);
        // "model" groups by the bot that answered.
        let by_bot = store.report(&report(Some(GroupBy::Model))).await.unwrap();
        for g in &by_bot.groups {
            let b: i64 = g.group.strip_prefix("bot-").unwrap().parse().unwrap();
            let want: i64 = (0..n).filter(|i| i % 2 == b).sum();
            assert_eq!(g.totals.completion_tokens, 2 * want, "{}", g.group);
        }
        assert_eq!(by_bot.groups.len(), 2);
        // Row i came in on the API i % 3 names (chat, responses, messages).
        let by_api = store.report(&report(Some(GroupBy::Api))).await.unwrap();
        let names: Vec<&str> = by_api.groups.iter().map(|g| g.group.as_str()).collect();
        assert_eq!(names, ["chat", "messages", "responses"]);
        for (g, k) in by_api.groups.iter().zip([0, 2, 1]) {
            let want: i64 = (0..n).filter(|i| i % 3 == k).sum();
            assert_eq!(g.totals.total_tokens, 3 * want, "{}", g.group);
        }
        // The time bound reads `ts_ms`: rows 100..123 are at or past 1,100.
        let late = store
            .report(&ReportQuery {
                since_ms: 1_100,
                ..report(None)
            })
            .await
            .unwrap();
        assert_eq!(late.totals.requests, 23);
    }

    #[test]
    fn period_starts() {
        // 2026-11-22T16:50:00Z
        let now = 1_795_366_200_000;
        assert_eq!(Period::Total.start_ms(now), 0);
        assert_eq!(Period::Day.start_ms(now), 1_795_305_600_000);
        assert_eq!(Period::Month.start_ms(now), 1_793_491_200_000);
    }
}
