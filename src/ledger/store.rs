//! The storage behind the ledger: SQLite (embedded default) or Postgres (shared by replicas),
//! one interface. SQL differs only where the dialects do: types, placeholders, day buckets.

use std::sync::Arc;

use super::report::{self, Report, ReportQuery};
use super::{KeyRecord, LedgerError, UsageRow, postgres::Postgres, sqlite::Sqlite};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The `i`th (1-based) bind placeholder.
    pub(crate) fn ph(self, i: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{i}"),
            Dialect::Postgres => format!("${i}"),
        }
    }
}

/// Refuses a ledger whose schema is newer than this binary's migrations: an older gateway
/// would write rows a newer one's columns or indexes do not expect.
pub(crate) fn check_schema_version(applied: Option<i64>, d: Dialect) -> Result<(), LedgerError> {
    let known = migrations(d).iter().map(|(v, _)| *v).max().unwrap_or(0);
    match applied {
        Some(v) if v > known => Err(LedgerError::Other(format!(
            "the ledger's schema is at version {v}, newer than this poe-gateway knows ({known}): run a newer poe-gateway"
        ))),
        _ => Ok(()),
    }
}

/// For a reader that does not migrate (`poe-gateway usage`): the ledger must have a schema,
/// and not one newer than this binary's. `applied` is `None` with no migrations table.
pub(crate) fn check_readable(applied: Option<i64>, d: Dialect) -> Result<(), LedgerError> {
    match applied {
        None => Err(LedgerError::Other(
            "this database holds no poe-gateway ledger yet: `poe-gateway serve` creates it".into(),
        )),
        v => check_schema_version(v, d),
    }
}

/// Versioned migrations, applied in order at start; each runs once.
pub(crate) fn migrations(d: Dialect) -> Vec<(i64, String)> {
    let (id, int, big, boolean, real) = match d {
        Dialect::Sqlite => (
            "INTEGER PRIMARY KEY",
            "INTEGER",
            "INTEGER",
            "INTEGER",
            "REAL",
        ),
        Dialect::Postgres => (
            "BIGSERIAL PRIMARY KEY",
            "INTEGER",
            "BIGINT",
            "BOOLEAN",
            "DOUBLE PRECISION",
        ),
    };
    vec![
        (
            1,
            format!(
                "CREATE TABLE usage (
                    id {id},
                    ts_ms {big} NOT NULL,
                    request_id TEXT NOT NULL,
                    key_id TEXT,
                    alias TEXT,
                    model TEXT NOT NULL,
                    bot TEXT NOT NULL,
                    stream {boolean} NOT NULL,
                    status {int} NOT NULL,
                    outcome TEXT NOT NULL,
                    prompt_tokens {big},
                    completion_tokens {big},
                    total_tokens {big},
                    tokens_estimated {boolean} NOT NULL,
                    cost_usd {real},
                    cache_hit {boolean} NOT NULL,
                    saved_usd {real},
                    attempts {int} NOT NULL,
                    latency_ms {real} NOT NULL,
                    ttfb_ms {real}
                );
                CREATE INDEX usage_ts ON usage (ts_ms);
                -- Covers the budget check (one key's spend since a time) without table reads.
                CREATE INDEX usage_key_ts ON usage (key_id, ts_ms, cost_usd);
                CREATE TABLE gateway_keys (
                    id TEXT PRIMARY KEY,
                    name TEXT NOT NULL,
                    hash TEXT NOT NULL UNIQUE,
                    created_ms {big} NOT NULL,
                    revoked_ms {big},
                    budget_usd {real},
                    period TEXT NOT NULL,
                    rpm {int},
                    models TEXT
                );"
            ),
        ),
        (
            2,
            match d {
                // Rows without a key (open and passthrough modes) are never looked up by key,
                // so the key index leaves them out: one B-tree insert fewer for each such row
                // (most of a row's SQLite cost is its B-tree inserts). `key_id = ?` implies
                // NOT NULL, so budget checks and per-key reports still use it. SQLite rebuilds
                // the index once, at start, before the gateway serves.
                Dialect::Sqlite => "DROP INDEX IF EXISTS usage_key_ts;
                    CREATE INDEX usage_key_ts ON usage (key_id, ts_ms, cost_usd) WHERE key_id IS NOT NULL;"
                    .to_string(),
                // Not on Postgres: migrations run in a transaction, so the rebuild would lock
                // the shared table against every replica's inserts and budget checks for as
                // long as it takes on a large ledger. The full index answers the same queries.
                Dialect::Postgres => "SELECT 1".to_string(),
            },
        ),
        (
            API_COLUMN_MIGRATION,
            // The API each row came in on ([`super::Api`]). Nullable, with no default: rows
            // from before it (chat completions, and since sessions before it also Responses
            // and Messages requests) and rows written beside it by older replicas have none,
            // and read as `unknown`. Adding a nullable column rewrites no row, so the change
            // holds its lock for a moment.
            "ALTER TABLE usage ADD COLUMN api TEXT".to_string(),
        ),
        (
            CACHE_COLUMNS_MIGRATION,
            // The prompt cache's share of each row's prompt ([`super::UsageRow`]'s
            // `cache_read_tokens` and `cache_write_tokens`). Nullable, like `api`, for the same
            // reasons: rows from before, and rows of older replicas, have none (reported as 0).
            format!(
                "ALTER TABLE usage ADD COLUMN cache_read_tokens {big};
                 ALTER TABLE usage ADD COLUMN cache_write_tokens {big}"
            ),
        ),
        (
            KEY_EXPIRY_MIGRATION,
            // When a key stops working ([`super::KeyRecord`]'s `expires_ms`); none for keys
            // made before, and for keys made by older binaries, which never expire. Additive:
            // an older replica on this ledger still starts, and lets an expired key in (the
            // README says so).
            format!("ALTER TABLE gateway_keys ADD COLUMN expires_ms {big}"),
        ),
    ]
}

/// A migration that only adds what older binaries neither read nor write (a nullable
/// column) is recorded under its number negated. `MAX(version)`, the number every binary
/// checks against the migrations it knows, then does not rise, so an older gateway still
/// starts on the ledger: the old replicas of a rolling upgrade (restarted, or scaled up)
/// and a rollback. A migration older binaries could not live with takes the next positive
/// number, and they refuse it as before.
pub(crate) const API_COLUMN_MIGRATION: i64 = -3;
/// The `cache_read_tokens` and `cache_write_tokens` columns: additive too, so recorded
/// negated (see [`API_COLUMN_MIGRATION`]).
pub(crate) const CACHE_COLUMNS_MIGRATION: i64 = -4;
/// The keys' `expires_ms` column: additive too (see [`API_COLUMN_MIGRATION`]).
pub(crate) const KEY_EXPIRY_MIGRATION: i64 = -5;

pub(crate) const USAGE_COLUMNS: &str = "ts_ms, request_id, key_id, alias, model, bot, stream, status, outcome, \
     prompt_tokens, completion_tokens, total_tokens, tokens_estimated, cost_usd, cache_hit, saved_usd, \
     attempts, latency_ms, ttfb_ms, api, cache_read_tokens, cache_write_tokens";
pub(crate) const USAGE_COLUMN_COUNT: usize = 22;
/// Whether a ledger has the `api` column ([`API_COLUMN_MIGRATION`]): one read without
/// migrating (`poe-gateway usage`) may not, and its rows then read as `unknown`.
pub(crate) const HAS_API_COLUMN: &str =
    "SELECT EXISTS (SELECT 1 FROM poe_gateway_migrations WHERE version = -3)";
/// Whether a ledger has the prompt-cache columns ([`CACHE_COLUMNS_MIGRATION`]); without
/// them (a ledger read without migrating), reports count no cache tokens.
pub(crate) const HAS_CACHE_COLUMNS: &str =
    "SELECT EXISTS (SELECT 1 FROM poe_gateway_migrations WHERE version = -4)";
/// Whether a ledger has the keys' `expires_ms` column ([`KEY_EXPIRY_MIGRATION`]); without it
/// (a ledger read without migrating), no key expires.
pub(crate) const HAS_KEY_EXPIRY: &str =
    "SELECT EXISTS (SELECT 1 FROM poe_gateway_migrations WHERE version = -5)";
/// A key's columns, in [`super::KeyRecord`]'s order, as written.
pub(crate) const KEY_COLUMNS: &str =
    "id, name, hash, created_ms, revoked_ms, budget_usd, period, rpm, models, expires_ms";

/// A key's columns to read: [`KEY_COLUMNS`], or with a typed `NULL` for `expires_ms` in a
/// ledger read without migrating that lacks it.
pub(crate) fn key_columns(d: Dialect, has: super::report::Columns) -> &'static str {
    match (has.key_expiry, d) {
        (true, _) => KEY_COLUMNS,
        (false, Dialect::Sqlite) => {
            "id, name, hash, created_ms, revoked_ms, budget_usd, period, rpm, models, NULL"
        }
        (false, Dialect::Postgres) => {
            "id, name, hash, created_ms, revoked_ms, budget_usd, period, rpm, models, NULL::BIGINT"
        }
    }
}

/// The ledger's storage. Cheap to clone.
#[derive(Clone)]
pub enum Store {
    Sqlite(Sqlite),
    Postgres(Postgres),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            Store::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Whether `url` is a database URL the ledger takes, without opening it (`check`).
    pub fn check_url(url: &str) -> Result<(), LedgerError> {
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        match url.strip_prefix("sqlite://") {
            Some("") => Err(LedgerError::Other(
                "database URL sqlite:// names no file: use sqlite://PATH".into(),
            )),
            Some(_) => Ok(()),
            // Parsed as `serve` will, so `check` passes only a URL that can connect.
            None if postgres => url
                .parse::<tokio_postgres::Config>()
                .map(drop)
                .map_err(|e| LedgerError::Other(format!("database URL {}: {e}", redact_url(url)))),
            None if url == "sqlite::memory:" => Ok(()),
            None => Err(LedgerError::BadUrl(redact_url(url))),
        }
    }

    /// For `sqlite://PATH`, whether `serve` could write its ledger there: an existing file
    /// opens for writing (nothing is changed), and the nearest existing directory on the path
    /// takes a new file (one is made and removed at once), as SQLite's WAL needs its `-wal`
    /// and `-shm` files beside the ledger. `poe-gateway check` runs this, so a unit's
    /// `ExecStartPre` catches a read-only or foreign-owned state directory.
    pub fn check_writable(url: &str) -> Result<(), LedgerError> {
        let Some(path) = url.strip_prefix("sqlite://").map(std::path::Path::new) else {
            return Ok(());
        };
        let fail = |what: &std::path::Path, e: std::io::Error| {
            LedgerError::Other(format!(
                "the SQLite ledger at {} cannot be written: {}: {e}",
                path.display(),
                what.display()
            ))
        };
        if path.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| fail(path, e))?;
        }
        let mut dir = path.parent();
        while let Some(d) = dir {
            let d = if d.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                d
            };
            if d.is_dir() {
                let probe = d.join(format!(".poe-gateway-check-{}", std::process::id()));
                return std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&probe)
                    .map(|_| {
                        let _ = std::fs::remove_file(&probe);
                    })
                    .map_err(|e| fail(d, e));
            }
            dir = d.parent();
        }
        Ok(())
    }

    /// Opens `sqlite://PATH`, `sqlite::memory:` or `postgres://...`, and runs migrations.
    pub async fn open(url: &str) -> Result<Store, LedgerError> {
        Store::check_url(url)?;
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Store::Postgres(Postgres::open(url).await?));
        }
        if url == "sqlite::memory:" {
            return Ok(Store::Sqlite(Sqlite::memory()?));
        }
        if let Some(path) = url.strip_prefix("sqlite://") {
            return Ok(Store::Sqlite(Sqlite::open(path).await?));
        }
        Err(LedgerError::BadUrl(redact_url(url)))
    }

    /// Opens an existing ledger to read it (reports), without creating or migrating
    /// anything: a mistyped SQLite path is an error rather than a new, empty ledger, and a
    /// report run from an operator's machine never changes a shared database's schema.
    pub async fn open_existing(url: &str) -> Result<Store, LedgerError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Store::Postgres(Postgres::open_existing(url).await?));
        }
        if let Some(path) = url.strip_prefix("sqlite://") {
            return Ok(Store::Sqlite(Sqlite::open_existing(path).await?));
        }
        // `sqlite::memory:` would be a new, empty ledger: nothing to read.
        Err(LedgerError::BadUrl(redact_url(url)))
    }

    /// An in-memory SQLite store (tests, embedding).
    pub fn memory() -> Result<Store, LedgerError> {
        Ok(Store::Sqlite(Sqlite::memory()?))
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// How many times a SQLite ledger's file was found deleted or replaced under the gateway
    /// and opened again at its path (0 for Postgres).
    pub fn reopened(&self) -> u64 {
        match self {
            Store::Sqlite(s) => s.reopened(),
            Store::Postgres(_) => 0,
        }
    }

    /// Writes `rows` in one transaction. An `Arc` so the SQLite insert, which runs on a
    /// blocking thread, shares the batch instead of copying it; of a `Vec`, because turning a
    /// `Vec` into an `Arc<[_]>` copies every row.
    pub async fn insert_usage(&self, rows: &Arc<Vec<UsageRow>>) -> Result<(), LedgerError> {
        if rows.is_empty() {
            return Ok(());
        }
        match self {
            Store::Sqlite(s) => s.insert_usage(rows.clone()).await,
            Store::Postgres(s) => s.insert_usage(rows).await,
        }
    }

    pub async fn report(&self, q: &ReportQuery) -> Result<Report, LedgerError> {
        let groups = dispatch!(self, s => s.report_rows(q).await)?;
        Ok(report::assemble(q, groups))
    }

    /// USD spent by `key_id` since `since_ms` (unpriced rows count as 0).
    pub async fn spent_since(&self, key_id: &str, since_ms: i64) -> Result<f64, LedgerError> {
        dispatch!(self, s => s.spent_since(key_id, since_ms).await)
    }

    /// Stores a new key, unless an active key already has its name (`Ok(false)`): checked
    /// and inserted as one step, across processes on one ledger too.
    pub async fn create_key(&self, rec: &KeyRecord) -> Result<bool, LedgerError> {
        dispatch!(self, s => s.create_key(rec).await)
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, LedgerError> {
        dispatch!(self, s => s.list_keys().await)
    }

    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, LedgerError> {
        dispatch!(self, s => s.key_by_hash(hash).await)
    }

    /// Gives the active key whose id or name is `which` a new secret (its hash): the same key,
    /// budget and history, the old secret refused from now on. Returns the key as it was
    /// (with the old hash, for caches to drop), or `None` when no active key is named so.
    pub async fn rotate_key(
        &self,
        which: &str,
        new_hash: &str,
    ) -> Result<Option<KeyRecord>, LedgerError> {
        dispatch!(self, s => s.rotate_key(which, new_hash).await)
    }

    /// Revokes the active keys whose id or name is `which`; returns them.
    pub async fn revoke_key(
        &self,
        which: &str,
        now_ms: i64,
    ) -> Result<Vec<KeyRecord>, LedgerError> {
        dispatch!(self, s => s.revoke_key(which, now_ms).await)
    }
}

/// A database URL for messages: the password, if any, is replaced, whether it is in the
/// URL's user part (`user:pass@`), in a query parameter (`?password=...`, `sslpassword=`) or
/// in a libpq keyword string (`host=... password=...`).
pub fn redact_url(url: &str) -> String {
    let url = match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => url.to_string(),
            },
            None => url.to_string(),
        },
        // Not a URL at all (`postgres:/u:pw@host`, `u:pw@host`): whatever lies between the
        // first `:` and the last `@` may be a password.
        None => match (url.find(':'), url.rfind('@')) {
            (Some(c), Some(a)) if c < a => format!("{}***{}", &url[..=c], &url[a..]),
            _ => url.to_string(),
        },
    };
    redact_password_params(&url)
}

/// Replaces the value of every `...password=value` in `text`: up to the next `&` or space,
/// or the closing quote of a quoted value.
fn redact_password_params(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(i) = lower[at..].find("password") {
        let key_end = at + i + "password".len();
        let rest = &text[key_end..];
        let after_spaces = rest.len() - rest.trim_start().len();
        if !rest.trim_start().starts_with('=') {
            out.push_str(&text[at..key_end]);
            at = key_end;
            continue;
        }
        let value_start = key_end + after_spaces + 1;
        let value = &text[value_start..];
        let value = &value[value.len() - value.trim_start().len()..];
        let value_start = text.len() - value.len();
        let value_end = match value.strip_prefix('\'') {
            Some(quoted) => value_start + 1 + quoted.find('\'').map_or(quoted.len(), |j| j + 1),
            None => value_start + value.find(['&', ' ']).unwrap_or(value.len()),
        };
        out.push_str(&text[at..value_start]);
        out.push_str("***");
        at = value_end;
    }
    out.push_str(&text[at..]);
    out
}

pub(crate) fn models_to_text(models: &Option<Vec<String>>) -> Option<String> {
    models.as_ref().map(|m| m.join(","))
}

pub(crate) fn models_from_text(text: Option<String>) -> Option<Vec<String>> {
    text.map(|t| {
        t.split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/poe"),
            "postgres://app:***@db:5432/poe"
        );
        assert_eq!(redact_url("sqlite://./x.db"), "sqlite://./x.db");
        assert_eq!(
            redact_url("postgres://poe@db/poe?password=s3cret&sslmode=require"),
            "postgres://poe@db/poe?password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://db/poe?user=u&PASSWORD=s3cret"),
            "postgres://db/poe?user=u&PASSWORD=***"
        );
        assert_eq!(
            redact_url("host=db password = 's3 cret' sslpassword=k3y user=u"),
            "host=db password = *** sslpassword=*** user=u"
        );
        assert_eq!(redact_url("mysql://x?pass=1"), "mysql://x?pass=1");
        // Mistyped separators: the password is still cut.
        for (typo, shown) in [
            ("postgres:/u:hunter2pw@db/poe", "postgres:***@db/poe"),
            ("postgres//u:hunter2pw@db/poe", "postgres//u:***@db/poe"),
            ("u:hunter2pw@db/poe", "u:***@db/poe"),
        ] {
            assert_eq!(redact_url(typo), shown);
            let e = Store::check_url(typo).unwrap_err().to_string();
            assert!(!e.contains("hunter2pw"), "{e}");
        }
        // A postgres:// URL that does not parse is refused by `check` as by `serve`, its
        // password not shown.
        let e = Store::check_url("postgres://u:hunter2pw@db/poe?sslmode=bogus")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode") && !e.contains("hunter2pw"), "{e}");
        Store::check_url("postgres://u:pw@db:5432/poe?sslmode=require").unwrap();
    }
}
