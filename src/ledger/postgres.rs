//! Postgres storage, for several replicas sharing one ledger. One pipelined client; it is
//! replaced when the connection drops, so a database restart heals without a gateway restart.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use super::report::{Columns, Group, ReportQuery, Totals};
use super::store::{self, Dialect, KEY_COLUMNS, USAGE_COLUMNS, redact_url};
use super::{KeyRecord, LedgerError, Period, UsageRow};

/// Serialises migrations across replicas starting at once.
const MIGRATION_LOCK: i64 = 0x706f_6567_7477; // "poegtw"

#[derive(Clone)]
pub struct Postgres {
    url: Arc<str>,
    client: Arc<RwLock<Arc<Client>>>,
    reconnect: Arc<tokio::sync::Mutex<()>>,
    /// The additive migrations' columns the schema has: all, but in a ledger of an older
    /// schema read without migrating.
    columns: Columns,
}

impl Postgres {
    pub async fn open(url: &str) -> Result<Postgres, LedgerError> {
        let client = connect(url).await?;
        migrate(&client).await?;
        Ok(Postgres {
            url: url.into(),
            client: Arc::new(RwLock::new(Arc::new(client))),
            reconnect: Arc::new(tokio::sync::Mutex::new(())),
            columns: Columns::ALL,
        })
    }

    /// An existing ledger, read without migrating (see [`super::Store::open_existing`]).
    pub async fn open_existing(url: &str) -> Result<Postgres, LedgerError> {
        let client = connect(url).await?;
        let has_table: bool = client
            .query_one(
                "SELECT to_regclass('poe_gateway_migrations') IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        let applied: Option<i64> = if has_table {
            client
                .query_one("SELECT MAX(version) FROM poe_gateway_migrations", &[])
                .await?
                .get(0)
        } else {
            None
        };
        store::check_readable(applied, Dialect::Postgres)?;
        let columns = Columns {
            api: client.query_one(store::HAS_API_COLUMN, &[]).await?.get(0),
            cache_tokens: client
                .query_one(store::HAS_CACHE_COLUMNS, &[])
                .await?
                .get(0),
            key_expiry: client.query_one(store::HAS_KEY_EXPIRY, &[]).await?.get(0),
        };
        Ok(Postgres {
            url: url.into(),
            client: Arc::new(RwLock::new(Arc::new(client))),
            reconnect: Arc::new(tokio::sync::Mutex::new(())),
            columns,
        })
    }

    async fn client(&self) -> Result<Arc<Client>, LedgerError> {
        let current = self.client.read().expect("pg client lock").clone();
        if !current.is_closed() {
            return Ok(current);
        }
        let _one_at_a_time = self.reconnect.lock().await;
        let current = self.client.read().expect("pg client lock").clone();
        if !current.is_closed() {
            return Ok(current);
        }
        let fresh = Arc::new(connect(&self.url).await?);
        *self.client.write().expect("pg client lock") = fresh.clone();
        Ok(fresh)
    }

    pub async fn insert_usage(&self, rows: &[UsageRow]) -> Result<(), LedgerError> {
        let client = self.client().await?;
        // One multi-row INSERT per batch: atomic, and one round trip.
        let statuses: Vec<i32> = rows.iter().map(|r| r.status as i32).collect();
        let apis: Vec<&str> = rows.iter().map(|r| r.api.as_str()).collect();
        let mut values = Vec::with_capacity(rows.len());
        let mut params: Vec<&(dyn ToSql + Sync)> =
            Vec::with_capacity(rows.len() * store::USAGE_COLUMN_COUNT);
        for (i, r) in rows.iter().enumerate() {
            let base = i * store::USAGE_COLUMN_COUNT;
            let ph: Vec<String> = (1..=store::USAGE_COLUMN_COUNT)
                .map(|j| Dialect::Postgres.ph(base + j))
                .collect();
            values.push(format!("({})", ph.join(", ")));
            params.extend_from_slice(&[
                &r.ts_ms,
                &r.request_id,
                &r.key_id,
                &r.alias,
                &r.model,
                &r.bot,
                &r.stream,
                &statuses[i],
                &r.outcome,
                &r.prompt_tokens,
                &r.completion_tokens,
                &r.total_tokens,
                &r.tokens_estimated,
                &r.cost_usd,
                &r.cache_hit,
                &r.saved_usd,
                &r.attempts,
                &r.latency_ms,
                &r.ttfb_ms,
                &apis[i],
                &r.cache_read_tokens,
                &r.cache_write_tokens,
            ]);
        }
        let sql = format!(
            "INSERT INTO usage ({USAGE_COLUMNS}) VALUES {}",
            values.join(", ")
        );
        client.execute(&sql, &params).await?;
        Ok(())
    }

    pub async fn report_rows(&self, q: &ReportQuery) -> Result<Vec<Group>, LedgerError> {
        let client = self.client().await?;
        let sql = super::report::sql(Dialect::Postgres, q, self.columns);
        let rows = match &q.key_id {
            Some(k) => client.query(&sql, &[&q.since_ms, &q.until_ms, k]).await?,
            None => client.query(&sql, &[&q.since_ms, &q.until_ms]).await?,
        };
        rows.iter()
            .map(|r| {
                Ok(Group {
                    group: r.try_get(0)?,
                    totals: Totals {
                        requests: r.try_get(1)?,
                        prompt_tokens: r.try_get(2)?,
                        completion_tokens: r.try_get(3)?,
                        total_tokens: r.try_get(4)?,
                        cost_usd: r.try_get(5)?,
                        cache_hits: r.try_get(6)?,
                        saved_usd: r.try_get(7)?,
                        errors: r.try_get(8)?,
                        unpriced: r.try_get(9)?,
                        estimated: r.try_get(10)?,
                        cache_read_tokens: r.try_get(11)?,
                        cache_write_tokens: r.try_get(12)?,
                    },
                })
            })
            .collect()
    }

    pub async fn spent_since(&self, key_id: &str, since_ms: i64) -> Result<f64, LedgerError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT COALESCE(SUM(cost_usd), 0)::DOUBLE PRECISION FROM usage WHERE key_id = $1 AND ts_ms >= $2",
                &[&key_id, &since_ms],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    pub async fn create_key(&self, rec: &KeyRecord) -> Result<bool, LedgerError> {
        // A connection of its own, for a transaction (the shared client serves every task):
        // keys are made rarely. Replicas making keys take one lock in turn, and each checks
        // the name after the one before it committed (read committed: a snapshot per
        // statement), so two active keys never share a name.
        let mut client = connect(&self.url).await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&KEY_NAME_LOCK])
            .await?;
        let rpm = rec.rpm.map(|r| r as i32);
        let made = tx
            .execute(
                &format!(
                    "INSERT INTO gateway_keys ({KEY_COLUMNS}) \
                     SELECT $1::TEXT, $2::TEXT, $3::TEXT, $4::BIGINT, $5::BIGINT, $6::DOUBLE PRECISION, $7::TEXT, $8::INTEGER, $9::TEXT, $10::BIGINT \
                     WHERE NOT EXISTS (SELECT 1 FROM gateway_keys WHERE name = $2 AND revoked_ms IS NULL)"
                ),
                &[
                    &rec.id,
                    &rec.name,
                    &rec.hash,
                    &rec.created_ms,
                    &rec.revoked_ms,
                    &rec.budget_usd,
                    &rec.period.as_str(),
                    &rpm,
                    &store::models_to_text(&rec.models),
                    &rec.expires_ms,
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(made == 1)
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, LedgerError> {
        let client = self.client().await?;
        let cols = store::key_columns(Dialect::Postgres, self.columns);
        let rows = client
            .query(
                &format!("SELECT {cols} FROM gateway_keys ORDER BY created_ms, id"),
                &[],
            )
            .await?;
        rows.iter().map(key_row).collect()
    }

    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, LedgerError> {
        let client = self.client().await?;
        let cols = store::key_columns(Dialect::Postgres, self.columns);
        let row = client
            .query_opt(
                &format!("SELECT {cols} FROM gateway_keys WHERE hash = $1"),
                &[&hash],
            )
            .await?;
        row.as_ref().map(key_row).transpose()
    }

    pub async fn rotate_key(
        &self,
        which: &str,
        new_hash: &str,
    ) -> Result<Option<KeyRecord>, LedgerError> {
        let client = self.client().await?;
        // One statement: the old row (its hash) is read from the `FROM` copy, which sees the
        // table as the statement began, while `SET` writes the new hash.
        let row = client
            .query_opt(
                &format!(
                    "UPDATE gateway_keys AS k SET hash = $2 FROM gateway_keys AS old \
                     WHERE old.id = k.id AND (k.id = $1 OR k.name = $1) AND k.revoked_ms IS NULL \
                     RETURNING {}",
                    KEY_COLUMNS
                        .split(", ")
                        .map(|c| format!("old.{c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                &[&which, &new_hash],
            )
            .await?;
        row.as_ref().map(key_row).transpose()
    }

    pub async fn revoke_key(
        &self,
        which: &str,
        now_ms: i64,
    ) -> Result<Vec<KeyRecord>, LedgerError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "UPDATE gateway_keys SET revoked_ms = $2 WHERE (id = $1 OR name = $1) AND revoked_ms IS NULL \
                     RETURNING {KEY_COLUMNS}"
                ),
                &[&which, &now_ms],
            )
            .await?;
        rows.iter().map(key_row).collect()
    }
}

fn key_row(r: &Row) -> Result<KeyRecord, LedgerError> {
    let period: String = r.try_get(6)?;
    let rpm: Option<i32> = r.try_get(7)?;
    Ok(KeyRecord {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        hash: r.try_get(2)?,
        created_ms: r.try_get(3)?,
        revoked_ms: r.try_get(4)?,
        expires_ms: r.try_get(9)?,
        budget_usd: r.try_get(5)?,
        period: Period::parse(&period).unwrap_or(Period::Total),
        rpm: rpm.map(|r| r.max(0) as u32),
        models: store::models_from_text(r.try_get(8)?),
    })
}

/// The advisory lock key creations take in turn (any fixed number; "poe_keys" in ASCII).
const KEY_NAME_LOCK: i64 = 0x706f_655f_6b65_7973;

/// Connects with bounds the URL does not set itself: a connect timeout, TCP keepalives that
/// notice a dead server within about a minute, and a statement timeout. Without them a
/// black-holed host held the writer (and every key look-up waiting on the reconnect) for the
/// operating system's TCP timeout, minutes, while the queue filled and dropped rows.
async fn connect(url: &str) -> Result<Client, LedgerError> {
    let cannot = |e: &dyn std::fmt::Display| {
        LedgerError::Other(format!("cannot connect to {}: {e}", redact_url(url)))
    };
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| cannot(&e))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| cannot(&with_reason(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
    let options = config.get_options().unwrap_or("");
    if !options.contains("statement_timeout") {
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                STATEMENT_TIMEOUT.as_millis()
            ))
            .await
            .map_err(|e| cannot(&with_reason(&e)))?;
    }
    Ok(client)
}

/// A Postgres error with the server's reason: its `Display` says only "db error" for one the
/// server sent (`database "x" does not exist`, `password authentication failed`).
fn with_reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {}", db.message()),
        None => e.to_string(),
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a migration waits for its table lock at a time, how often it tries, and the
/// pause between tries: inserts queue behind it for at most the wait.
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(2);
const MIGRATION_LOCK_TRIES: u32 = 30;
const MIGRATION_LOCK_PAUSE: Duration = Duration::from_secs(1);

async fn migrate(client: &Client) -> Result<(), LedgerError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS poe_gateway_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
            )
            .await?;
        let applied: Option<i64> = client
            .query_one("SELECT MAX(version) FROM poe_gateway_migrations", &[])
            .await?
            .get(0);
        store::check_schema_version(applied, Dialect::Postgres)?;
        for (version, sql) in store::migrations(Dialect::Postgres) {
            let done = client
                .query_opt("SELECT version FROM poe_gateway_migrations WHERE version = $1", &[&version])
                .await?;
            if done.is_some() {
                continue;
            }
            // A schema change waits for every session using the table (an analyst's open
            // transaction, a long report), and while it waits, every replica's inserts and
            // budget checks queue behind it. So it waits a moment at a time, and lets them
            // through between tries.
            let batch = format!(
                "BEGIN; SET LOCAL lock_timeout = '{}ms'; {sql}; INSERT INTO poe_gateway_migrations (version, applied_ms) VALUES ({version}, {}); COMMIT;",
                MIGRATION_LOCK_WAIT.as_millis(),
                super::now_ms()
            );
            let mut tries = 0;
            loop {
                match client.batch_execute(&batch).await {
                    Ok(()) => break,
                    Err(e)
                        if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
                            && tries < MIGRATION_LOCK_TRIES =>
                    {
                        tries += 1;
                        let _ = client.batch_execute("ROLLBACK").await;
                        tracing::warn!(
                            version,
                            tries,
                            "ledger migration: another session is using the usage table; trying again"
                        );
                        tokio::time::sleep(MIGRATION_LOCK_PAUSE).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok::<_, LedgerError>(())
    }
    .await;
    if result.is_err() {
        // A failed migration leaves its transaction aborted, and the unlock below would
        // fail with that instead of the real error.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result?;
    unlocked?;
    Ok(())
}
