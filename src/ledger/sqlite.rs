//! SQLite storage: WAL mode, one writer connection and one reader, used from blocking threads.
//! A ledger file deleted or replaced under the gateway is noticed and opened again ([`Watched`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::report::{Columns, Group, ReportQuery, Totals};
use super::store::{self, Dialect, KEY_COLUMNS, USAGE_COLUMNS};
use super::{KeyRecord, LedgerError, Period, UsageRow};

/// One row's `INSERT`. (A multi-row `INSERT` of 50 rows was measured slower: 172k against
/// 217k rows/s in `cargo bench --bench report`.)
static INSERT_ONE: LazyLock<String> = LazyLock::new(|| {
    let ph: Vec<String> = (1..=store::USAGE_COLUMN_COUNT)
        .map(|i| Dialect::Sqlite.ph(i))
        .collect();
    format!(
        "INSERT INTO usage ({USAGE_COLUMNS}) VALUES ({})",
        ph.join(", ")
    )
});

/// Binds one row's columns, in `USAGE_COLUMNS` order, straight from the row (no `dyn ToSql`
/// slice per row).
fn bind_usage(stmt: &mut rusqlite::Statement<'_>, r: &UsageRow) -> rusqlite::Result<()> {
    stmt.raw_bind_parameter(1, r.ts_ms)?;
    stmt.raw_bind_parameter(2, &r.request_id)?;
    stmt.raw_bind_parameter(3, &r.key_id)?;
    stmt.raw_bind_parameter(4, &r.alias)?;
    stmt.raw_bind_parameter(5, &r.model)?;
    stmt.raw_bind_parameter(6, &r.bot)?;
    stmt.raw_bind_parameter(7, r.stream)?;
    stmt.raw_bind_parameter(8, r.status)?;
    stmt.raw_bind_parameter(9, r.outcome)?;
    stmt.raw_bind_parameter(10, r.prompt_tokens)?;
    stmt.raw_bind_parameter(11, r.completion_tokens)?;
    stmt.raw_bind_parameter(12, r.total_tokens)?;
    stmt.raw_bind_parameter(13, r.tokens_estimated)?;
    stmt.raw_bind_parameter(14, r.cost_usd)?;
    stmt.raw_bind_parameter(15, r.cache_hit)?;
    stmt.raw_bind_parameter(16, r.saved_usd)?;
    stmt.raw_bind_parameter(17, r.attempts)?;
    stmt.raw_bind_parameter(18, r.latency_ms)?;
    stmt.raw_bind_parameter(19, r.ttfb_ms)?;
    stmt.raw_bind_parameter(20, r.api.as_str())?;
    stmt.raw_bind_parameter(21, r.cache_read_tokens)?;
    stmt.raw_bind_parameter(22, r.cache_write_tokens)?;
    Ok(())
}

/// A connection, or none while a ledger file that went away could not be opened again.
type Slot = Arc<Mutex<Option<Connection>>>;

#[derive(Clone)]
pub struct Sqlite {
    write: Slot,
    /// Reports read here so a long query never holds up the writer (WAL lets both run).
    read: Slot,
    /// The ledger file that `serve` writes, watched for being deleted or replaced under it.
    /// `None` for an in-memory ledger and a read-only one.
    file: Option<Arc<Watched>>,
    /// The additive migrations' columns the schema has: all, but in a read-only ledger of an
    /// older schema.
    columns: Columns,
}

impl Sqlite {
    pub async fn open(path: &str) -> Result<Sqlite, LedgerError> {
        let path = PathBuf::from(path);
        tokio::task::spawn_blocking(move || {
            let (write, read, ids) = open_pair(&path)?;
            Ok(Sqlite {
                write: Arc::new(Mutex::new(Some(write))),
                read: Arc::new(Mutex::new(Some(read))),
                file: Some(Arc::new(Watched::new(path, ids))),
                columns: Columns::ALL,
            })
        })
        .await
        .map_err(|e| LedgerError::Other(e.to_string()))?
    }

    /// An existing ledger file, opened read-only (see [`super::Store::open_existing`]).
    pub async fn open_existing(path: &str) -> Result<Sqlite, LedgerError> {
        let path = path.to_string();
        tokio::task::spawn_blocking(move || {
            if !Path::new(&path).is_file() {
                return Err(LedgerError::Other(format!("no ledger file at {path}")));
            }
            let c = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            c.busy_timeout(std::time::Duration::from_secs(5))?;
            let has_table: bool = c.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'poe_gateway_migrations')",
                [],
                |r| r.get(0),
            )?;
            let applied: Option<i64> = if has_table {
                c.query_row("SELECT MAX(version) FROM poe_gateway_migrations", [], |r| {
                    r.get(0)
                })?
            } else {
                None
            };
            store::check_readable(applied, Dialect::Sqlite)?;
            let columns = Columns {
                api: c.query_row(store::HAS_API_COLUMN, [], |r| r.get(0))?,
                cache_tokens: c.query_row(store::HAS_CACHE_COLUMNS, [], |r| r.get(0))?,
                key_expiry: c.query_row(store::HAS_KEY_EXPIRY, [], |r| r.get(0))?,
            };
            let c = Arc::new(Mutex::new(Some(c)));
            Ok(Sqlite {
                write: c.clone(),
                read: c,
                file: None,
                columns,
            })
        })
        .await
        .map_err(|e| LedgerError::Other(e.to_string()))?
    }

    /// An in-memory database (one connection: a second would be a different database).
    pub fn memory() -> Result<Sqlite, LedgerError> {
        let conn = Connection::open_in_memory()?;
        migrate(&conn)?;
        let conn = Arc::new(Mutex::new(Some(conn)));
        Ok(Sqlite {
            write: conn.clone(),
            read: conn,
            file: None,
            columns: Columns::ALL,
        })
    }

    /// How many times the ledger file was found deleted or replaced and opened again.
    pub fn reopened(&self) -> u64 {
        self.file
            .as_ref()
            .map_or(0, |f| f.reopened.load(Ordering::Relaxed))
    }

    /// Runs `f` on the writer (`write`) or the reader, on a blocking thread, once the ledger
    /// file has been checked to be the one the connections have open.
    async fn with<T, F>(&self, write: bool, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut write = write;
            if let Some(file) = &this.file {
                file.check(&this.write, &this.read)?;
                // The reader is copying the whole file back to its path: read on the writer.
                write |= file.copying.load(Ordering::Acquire);
            }
            let slot = if write { &this.write } else { &this.read };
            let mut c = slot
                .lock()
                .map_err(|_| LedgerError::Other("sqlite lock poisoned".into()))?;
            match c.as_mut() {
                Some(c) => f(c),
                None => Err(match &this.file {
                    Some(f) => f.not_open(),
                    None => LedgerError::Other("the SQLite ledger is closed".into()),
                }),
            }
        })
        .await
        .map_err(|e| LedgerError::Other(e.to_string()))?
    }

    pub async fn insert_usage(&self, rows: Arc<Vec<UsageRow>>) -> Result<(), LedgerError> {
        self.with(true, move |c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(&INSERT_ONE)?;
                for r in rows.iter() {
                    bind_usage(&mut stmt, r)?;
                    stmt.raw_execute()?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    pub async fn report_rows(&self, q: &ReportQuery) -> Result<Vec<Group>, LedgerError> {
        let q = q.clone();
        let columns = self.columns;
        self.with(false, move |c| {
            let sql = super::report::sql(Dialect::Sqlite, &q, columns);
            let mut stmt = c.prepare_cached(&sql)?;
            let map = |r: &rusqlite::Row<'_>| {
                Ok(Group {
                    group: r.get(0)?,
                    totals: Totals {
                        requests: r.get(1)?,
                        prompt_tokens: r.get(2)?,
                        completion_tokens: r.get(3)?,
                        total_tokens: r.get(4)?,
                        cost_usd: r.get(5)?,
                        cache_hits: r.get(6)?,
                        saved_usd: r.get(7)?,
                        errors: r.get(8)?,
                        unpriced: r.get(9)?,
                        estimated: r.get(10)?,
                        cache_read_tokens: r.get(11)?,
                        cache_write_tokens: r.get(12)?,
                    },
                })
            };
            let rows = match &q.key_id {
                Some(k) => stmt.query_map(params![q.since_ms, q.until_ms, k], map)?,
                None => stmt.query_map(params![q.since_ms, q.until_ms], map)?,
            };
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn spent_since(&self, key_id: &str, since_ms: i64) -> Result<f64, LedgerError> {
        let key_id = key_id.to_string();
        self.with(false, move |c| {
            Ok(c.query_row(
                "SELECT COALESCE(SUM(cost_usd), 0.0) FROM usage WHERE key_id = ?1 AND ts_ms >= ?2",
                params![key_id, since_ms],
                |r| r.get(0),
            )?)
        })
        .await
    }

    pub async fn create_key(&self, rec: &KeyRecord) -> Result<bool, LedgerError> {
        let rec = rec.clone();
        self.with(true, move |c| {
            // The write lock is taken first (`IMMEDIATE`), so two processes on one file check
            // the name one after the other; a deferred transaction would fail the second.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let made = tx.execute(
                &format!(
                    "INSERT INTO gateway_keys ({KEY_COLUMNS}) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10 \
                     WHERE NOT EXISTS (SELECT 1 FROM gateway_keys WHERE name = ?2 AND revoked_ms IS NULL)"
                ),
                params![
                    rec.id,
                    rec.name,
                    rec.hash,
                    rec.created_ms,
                    rec.revoked_ms,
                    rec.budget_usd,
                    rec.period.as_str(),
                    rec.rpm,
                    store::models_to_text(&rec.models),
                    rec.expires_ms,
                ],
            )?;
            tx.commit()?;
            Ok(made == 1)
        })
        .await
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, LedgerError> {
        let cols = store::key_columns(Dialect::Sqlite, self.columns);
        self.with(false, move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {cols} FROM gateway_keys ORDER BY created_ms, id"
            ))?;
            let rows = stmt.query_map([], key_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, LedgerError> {
        let hash = hash.to_string();
        let cols = store::key_columns(Dialect::Sqlite, self.columns);
        // The writer connection: a key created a moment ago must be found at once.
        self.with(true, move |c| {
            Ok(c.query_row(
                &format!("SELECT {cols} FROM gateway_keys WHERE hash = ?1"),
                params![hash],
                key_row,
            )
            .optional()?)
        })
        .await
    }

    pub async fn rotate_key(
        &self,
        which: &str,
        new_hash: &str,
    ) -> Result<Option<KeyRecord>, LedgerError> {
        let (which, new_hash) = (which.to_string(), new_hash.to_string());
        self.with(true, move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let found = tx
                .query_row(
                    &format!(
                        "SELECT {KEY_COLUMNS} FROM gateway_keys WHERE (id = ?1 OR name = ?1) AND revoked_ms IS NULL"
                    ),
                    params![which],
                    key_row,
                )
                .optional()?;
            if let Some(k) = &found {
                tx.execute(
                    "UPDATE gateway_keys SET hash = ?2 WHERE id = ?1",
                    params![k.id, new_hash],
                )?;
            }
            tx.commit()?;
            Ok(found)
        })
        .await
    }

    pub async fn revoke_key(
        &self,
        which: &str,
        now_ms: i64,
    ) -> Result<Vec<KeyRecord>, LedgerError> {
        let which = which.to_string();
        self.with(true, move |c| {
            // The write lock first, as for a create: a deferred transaction that read first
            // failed at once ("database is locked") when another process on the file was
            // writing, and the key stayed active.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let found = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT {KEY_COLUMNS} FROM gateway_keys WHERE (id = ?1 OR name = ?1) AND revoked_ms IS NULL"
                ))?;
                stmt.query_map(params![which], key_row)?
                    .collect::<Result<Vec<_>, _>>()?
            };
            tx.execute(
                "UPDATE gateway_keys SET revoked_ms = ?2 WHERE (id = ?1 OR name = ?1) AND revoked_ms IS NULL",
                params![which, now_ms],
            )?;
            tx.commit()?;
            Ok(found
                .into_iter()
                .map(|mut k| {
                    k.revoked_ms = Some(now_ms);
                    k
                })
                .collect())
        })
        .await
    }
}

/// Opens the writer (creating the file and its directory, and migrating) and the reader, and
/// notes which files they have open.
fn open_pair(path: &Path) -> Result<(Connection, Connection, Ids), LedgerError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| LedgerError::Other(format!("cannot create {}: {e}", dir.display())))?;
    }
    let write = Connection::open(path)?;
    configure(&write)?;
    migrate(&write)?;
    let read = Connection::open(path)?;
    configure(&read)?;
    // Both files exist by now: the migration's transactions opened the write-ahead log.
    let (db, wal) = Ids::now(path);
    Ok((
        write,
        read,
        Ids {
            db: db.id(),
            wal: wal.id(),
            open: true,
        },
    ))
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, LedgerError> {
    m.lock()
        .map_err(|_| LedgerError::Other("sqlite lock poisoned".into()))
}

/// `PATH-wal`: SQLite's write-ahead log beside the database (and `PATH-shm`, its index).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// A file's identity: its device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// What is at a path now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    File(FileId),
    Missing,
    /// It could not be looked at (or not on this platform): nothing is concluded.
    Unknown,
}

impl Seen {
    fn at(path: &Path) -> Seen {
        match std::fs::metadata(path) {
            Ok(m) => file_id(&m).map_or(Seen::Unknown, Seen::File),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Seen::Missing,
            Err(_) => Seen::Unknown,
        }
    }

    fn id(self) -> Option<FileId> {
        match self {
            Seen::File(id) => Some(id),
            _ => None,
        }
    }
}

#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    Some(FileId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> Option<FileId> {
    None
}

/// The files the connections have open: the database and its write-ahead log.
#[derive(Clone, Copy, Debug)]
struct Ids {
    db: Option<FileId>,
    wal: Option<FileId>,
    /// The connections are open (false only after a reopen closed them and then failed).
    open: bool,
}

impl Ids {
    /// The database file and its `-wal` at the path now: one `stat` each.
    fn now(path: &Path) -> (Seen, Seen) {
        (Seen::at(path), Seen::at(&beside(path, "-wal")))
    }

    /// What happened to the files the connections have open, if anything. A file that could
    /// not be looked at is taken as unchanged.
    fn changed(&self, db: Seen, wal: Seen) -> Option<Change> {
        match (self.db, db) {
            (Some(_), Seen::Missing) => return Some(Change::Gone),
            (Some(had), Seen::File(now)) if had != now => return Some(Change::Replaced),
            _ => {}
        }
        match (self.wal, wal) {
            (Some(_), Seen::Missing) => Some(Change::LogGone),
            (Some(had), Seen::File(now)) if had != now => Some(Change::LogGone),
            _ => None,
        }
    }
}

/// What became of the ledger file the connections have open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// Nothing is at the path: the file was deleted, or moved away (a rotation); from the
    /// path the two look the same.
    Gone,
    /// Something else is at the path (a restored backup renamed into place, or worse).
    Replaced,
    /// The file is in place but its write-ahead log (`-wal`) was deleted or replaced.
    LogGone,
}

/// What is at `path`, in words, for the log.
fn what_is_at(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => "another file".into(),
        Ok(m) if m.is_dir() => "a directory".into(),
        Ok(_) => "something that is not a regular file".into(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "nothing".into(),
        Err(e) => format!("something that cannot be looked at ({e})"),
    }
}

/// How long the old file's write-ahead log is waited for when it is checkpointed during a
/// reopen (another process reading it holds the checkpoint back). Every ledger call may be
/// waiting meanwhile, so this is short; a log still busy after it is handled without it.
const CHECKPOINT_WAIT: Duration = Duration::from_millis(100);

/// How long after a failed reopen the next is tried; calls meanwhile go on with the
/// connections they have.
const REOPEN_RETRY: Duration = Duration::from_secs(1);

/// How long a statement waits for another process's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The state of a reopen that has not succeeded yet.
#[derive(Default)]
struct Outage {
    /// The change has been logged, and the reason it could not be dealt with yet.
    logged: bool,
    /// No new attempt before this.
    retry_at: Option<Instant>,
}

/// The ledger file of a `sqlite://PATH` ledger. SQLite keeps a file open by its inode: one
/// deleted or moved away under a running gateway (a cleanup, a log rotation, a restore that
/// swaps the file) would take every row written after it, unseen, and a restart would open
/// whatever is at the path. So every call first looks at the path (a `stat` of the file and
/// one of its `-wal`) and, when they are not the files the connections have open, puts the
/// ledger back at the path: a file gone from the path is written back there from the open
/// connections (all of it: keys, usage and spend), a file put in its place is adopted.
struct Watched {
    path: PathBuf,
    /// The files the connections have open; held only to read or swap them, never across a
    /// checkpoint or a copy.
    ids: Mutex<Ids>,
    /// Held by the one thread putting the ledger back (others go on with the connections
    /// they have), and the state of an attempt that failed.
    reopen: Mutex<Outage>,
    /// The reader connection is busy copying the whole database: reads use the writer
    /// meanwhile, so budget checks do not wait for the copy.
    copying: AtomicBool,
    reopened: AtomicU64,
}

impl Watched {
    fn new(path: PathBuf, ids: Ids) -> Watched {
        Watched {
            path,
            ids: Mutex::new(ids),
            reopen: Mutex::new(Outage::default()),
            copying: AtomicBool::new(false),
            reopened: AtomicU64::new(0),
        }
    }

    /// Checks the path before a call; puts the ledger back when it changed. Fails only when
    /// the connections are closed (a reopen closed them, then could not open the path).
    fn check(&self, write: &Slot, read: &Slot) -> Result<(), LedgerError> {
        let (db, wal) = Ids::now(&self.path);
        let ids = *lock(&self.ids)?;
        let Some(change) = ids.changed(db, wal).or((!ids.open).then_some(Change::Gone)) else {
            return Ok(());
        };
        let still = |ids: Ids| {
            if ids.open {
                Ok(())
            } else {
                Err(self.not_open())
            }
        };
        // Another thread is at it: the connections it has not swapped yet still work.
        let Ok(mut outage) = self.reopen.try_lock() else {
            return still(ids);
        };
        if outage.retry_at.is_some_and(|at| Instant::now() < at) {
            return still(*lock(&self.ids)?);
        }
        let path = self.path.display().to_string();
        if !outage.logged {
            let what = match change {
                Change::Gone => "was deleted or moved away".to_string(),
                Change::Replaced => format!("was replaced by {}", what_is_at(&self.path)),
                Change::LogGone => "lost its write-ahead log (-wal): deleted or replaced".into(),
            };
            tracing::error!(
                path = %path,
                "the SQLite ledger file {path} {what} while the gateway was running; putting the ledger back at {path}",
            );
        }
        match self.put_back(write, read) {
            Ok(()) => {
                self.reopened.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %path, "the SQLite ledger is open at {path} again");
                *outage = Outage::default();
                Ok(())
            }
            Err(why) => {
                if !outage.logged {
                    tracing::error!(
                        path = %path,
                        "the SQLite ledger cannot be put back at {path} yet: {why}; the gateway goes on with the file it has open and tries again every {}s (logged once until it succeeds)",
                        REOPEN_RETRY.as_secs()
                    );
                }
                outage.logged = true;
                outage.retry_at = Some(Instant::now() + REOPEN_RETRY);
                still(*lock(&self.ids)?)
            }
        }
    }

    fn not_open(&self) -> LedgerError {
        let path = self.path.display();
        LedgerError::Other(format!(
            "the SQLite ledger at {path} went away and could not be opened again yet"
        ))
    }

    /// One attempt to put the ledger back at the path (with the `reopen` lock held).
    fn put_back(&self, write: &Slot, read: &Slot) -> Result<(), String> {
        let (db, wal) = Ids::now(&self.path);
        let ids = *lock(&self.ids).map_err(|e| e.to_string())?;
        let Some(change) = ids.changed(db, wal) else {
            return if ids.open {
                Ok(())
            } else {
                self.switch(write, read, &ids)
            };
        };
        self.directory_writable()?;
        match change {
            Change::Replaced => {
                // Adopt the file now at the path, once it is one SQLite can open.
                let m = std::fs::metadata(&self.path).map_err(|e| e.to_string())?;
                if !m.is_file() {
                    return Err(format!(
                        "{} is {}",
                        self.path.display(),
                        what_is_at(&self.path)
                    ));
                }
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&self.path)
                    .map_err(|e| format!("{} cannot be opened: {e}", self.path.display()))?;
                self.switch(write, read, &ids)
            }
            Change::Gone => self.write_back(write, read, &ids, false),
            Change::LogGone => {
                // The file is in place and its log is gone: copying the open log into it
                // is enough, unless another process keeps the checkpoint from finishing.
                let mut r = lock(read).map_err(|e| e.to_string())?;
                let mut w = lock(write).map_err(|e| e.to_string())?;
                if w.as_ref().is_some_and(checkpointed) {
                    return self.swap(&mut w, &mut r, &ids, None);
                }
                drop((w, r));
                self.write_back(write, read, &ids, true)
            }
        }
    }

    /// The path's directory exists (made, as at start) and a file can be made in it.
    fn directory_writable(&self) -> Result<(), String> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let probe = beside(&self.path, &format!(".probe-{}", std::process::id()));
        std::fs::File::create(&probe)
            .map_err(|e| format!("cannot write in {}: {e}", dir.display()))?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    /// Writes the open database to the path: the whole of it is copied from the reader
    /// (`VACUUM INTO`, which reads the open `-wal` too) to `PATH.copy` while the writer goes
    /// on (reads use the writer meanwhile); then, with both connections held, the usage rows
    /// and key changes committed since are added to the copy, the copy is put at the path,
    /// and the ledger is opened on it (see [`Watched::swap`] for `replace`).
    fn write_back(
        &self,
        write: &Slot,
        read: &Slot,
        ids: &Ids,
        replace: bool,
    ) -> Result<(), String> {
        let copy = beside(&self.path, ".copy");
        let copy_text = copy
            .to_str()
            .ok_or("the ledger path is not UTF-8")?
            .to_string();
        let _ = std::fs::remove_file(&copy);
        let fail = |e: String| {
            let _ = std::fs::remove_file(beside(&self.path, ".copy"));
            e
        };
        let mut r = lock(read).map_err(|e| e.to_string())?;
        let Some(reader) = r.as_ref() else {
            return Err("the ledger's connections are closed".into());
        };
        self.copying.store(true, Ordering::Release);
        let copied = reader.execute("VACUUM INTO ?1", [&copy_text]);
        let mut w = lock(write).map_err(|e| e.to_string())?;
        self.copying.store(false, Ordering::Release);
        copied.map_err(|e| {
            fail(format!(
                "copying the open ledger to {copy_text} failed: {e}"
            ))
        })?;
        let Some(writer) = w.as_ref() else {
            return Err(fail("the ledger's connections are closed".into()));
        };
        catch_up(writer, &copy_text)
            .map_err(|e| fail(format!("completing the copy {copy_text} failed: {e}")))?;
        // A file moved away keeps the rows its log held, as far as no other process holds
        // that back; the copy has them all either way.
        checkpointed(writer);
        self.swap(&mut w, &mut r, ids, Some((&copy, replace)))
            .map_err(fail)
    }

    /// Closes the connections (both held) and opens the ledger at the path.
    fn switch(&self, write: &Slot, read: &Slot, ids: &Ids) -> Result<(), String> {
        let mut r = lock(read).map_err(|e| e.to_string())?;
        let mut w = lock(write).map_err(|e| e.to_string())?;
        if let Some(writer) = w.as_ref() {
            checkpointed(writer);
        }
        self.swap(&mut w, &mut r, ids, None)
    }

    /// Closes the connections (both held), puts `copy` at the path if given, and opens the
    /// ledger there. `replace`: the copy replaces what is at the path (the open file itself,
    /// whose log is gone); otherwise it goes there only if the path is still empty.
    fn swap(
        &self,
        w: &mut Option<Connection>,
        r: &mut Option<Connection>,
        ids: &Ids,
        copy: Option<(&Path, bool)>,
    ) -> Result<(), String> {
        // Both old connections are closed before anything is put at the path: closing the
        // last one deletes `PATH-wal` and `PATH-shm` by name, which must not be the new
        // file's.
        *r = None;
        *w = None;
        lock(&self.ids).map_err(|e| e.to_string())?.open = false;
        // The old log, if still at the path, belongs to the old file: the new one must not
        // read it. What it held is in the old file (checkpointed) or in the copy.
        let wal_path = beside(&self.path, "-wal");
        if ids.wal.is_some() && Seen::at(&wal_path).id() == ids.wal {
            let _ = std::fs::remove_file(&wal_path);
            let _ = std::fs::remove_file(beside(&self.path, "-shm"));
        }
        if let Some((copy, replace)) = copy {
            let placed = if replace {
                std::fs::rename(copy, &self.path)
            } else {
                // A link fails if a file appeared at the path meanwhile (a restore): that
                // file is adopted on the next attempt instead.
                std::fs::hard_link(copy, &self.path).and_then(|()| std::fs::remove_file(copy))
            };
            placed.map_err(|e| {
                format!(
                    "putting the copy {} at {} failed: {e}",
                    copy.display(),
                    self.path.display()
                )
            })?;
        }
        let (new_w, new_r, new_ids) = open_pair(&self.path).map_err(|e| e.to_string())?;
        *w = Some(new_w);
        *r = Some(new_r);
        *lock(&self.ids).map_err(|e| e.to_string())? = new_ids;
        Ok(())
    }
}

/// Copies the open log into the open file, waiting at most [`CHECKPOINT_WAIT`] for other
/// processes' readers; whether all of it went in.
fn checkpointed(c: &Connection) -> bool {
    let _ = c.busy_timeout(CHECKPOINT_WAIT);
    let done = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok(r.get::<_, i64>(0)? == 0 && r.get::<_, i64>(1)? == r.get::<_, i64>(2)?)
        })
        .unwrap_or(false);
    let _ = c.busy_timeout(BUSY_TIMEOUT);
    done
}

/// Adds to the copy at `copy` what the writer committed after the copy's snapshot: usage rows
/// (only ever added, with increasing ids) and the keys (few; created or revoked).
fn catch_up(writer: &Connection, copy: &str) -> rusqlite::Result<()> {
    writer.execute("ATTACH DATABASE ?1 AS fresh", [copy])?;
    let done = writer.execute_batch(
        "BEGIN;
         INSERT INTO fresh.usage SELECT * FROM main.usage
             WHERE id > (SELECT COALESCE(MAX(id), 0) FROM fresh.usage);
         INSERT OR REPLACE INTO fresh.gateway_keys SELECT * FROM main.gateway_keys;
         COMMIT;",
    );
    if done.is_err() {
        let _ = writer.execute_batch("ROLLBACK");
    }
    let detached = writer.execute_batch("DETACH DATABASE fresh");
    done.and(detached)
}

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    let period: String = r.get(6)?;
    Ok(KeyRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        hash: r.get(2)?,
        created_ms: r.get(3)?,
        revoked_ms: r.get(4)?,
        expires_ms: r.get(9)?,
        budget_usd: r.get(5)?,
        period: Period::parse(&period).unwrap_or(Period::Total),
        rpm: r.get(7)?,
        models: store::models_from_text(r.get(8)?),
    })
}

fn configure(c: &Connection) -> Result<(), LedgerError> {
    // WAL: readers never block the writer, and a committed batch survives the process dying.
    // synchronous=NORMAL in WAL mode is durable against a process crash (kill -9); only a
    // power loss can take the last transactions.
    // The wait for a lock first: switching a new file to WAL needs it, and another process
    // may be opening the same file at that moment.
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    // Switching to WAL fails at once (no busy wait) while another connection is opening the
    // same new file; WAL is a property of the file, so the first to switch serves all.
    for attempt in 0.. {
        let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if mode.eq_ignore_ascii_case("wal") {
            break;
        }
        match c.pragma_update(None, "journal_mode", "WAL") {
            Ok(()) => break,
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::DatabaseBusy && attempt < 50 =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
    c.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(())
}

fn migrate(c: &Connection) -> Result<(), LedgerError> {
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS poe_gateway_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)",
    )?;
    let applied: Option<i64> =
        c.query_row("SELECT MAX(version) FROM poe_gateway_migrations", [], |r| {
            r.get(0)
        })?;
    store::check_schema_version(applied, Dialect::Sqlite)?;
    for (version, sql) in store::migrations(Dialect::Sqlite) {
        // The check and the change in one write transaction, taken up front: two processes
        // opening a new file at once (`serve` and `keys create`) take turns, and the second
        // finds the version applied instead of failing on "table already exists".
        c.execute_batch("BEGIN IMMEDIATE")?;
        let step = (|| {
            let done: Option<i64> = c
                .query_row(
                    "SELECT version FROM poe_gateway_migrations WHERE version = ?1",
                    params![version],
                    |r| r.get(0),
                )
                .optional()?;
            if done.is_none() {
                c.execute_batch(&sql)?;
                c.execute(
                    "INSERT INTO poe_gateway_migrations (version, applied_ms) VALUES (?1, ?2)",
                    params![version, super::now_ms()],
                )?;
            }
            Ok::<_, rusqlite::Error>(())
        })();
        match step {
            Ok(()) => c.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = c.execute_batch("ROLLBACK");
                return Err(e.into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_opening_a_new_file_at_once_all_succeed() {
        let dir = std::env::temp_dir().join(format!("poe-gw-mig-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ledger.db");
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let runs: Vec<_> = (0..4)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    // Every thread reaches the barrier, whatever fails first.
                    let c = Connection::open(&path).map_err(LedgerError::from);
                    barrier.wait();
                    let c = c.map_err(|e| e.to_string())?;
                    configure(&c).map_err(|e| format!("configure: {e}"))?;
                    migrate(&c).map_err(|e| format!("migrate: {e}"))
                })
            })
            .collect();
        for r in runs {
            r.join().unwrap().unwrap();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_schema_newer_than_the_binary_is_refused() {
        let c = Connection::open_in_memory().unwrap();
        migrate(&c).unwrap();
        migrate(&c).unwrap();
        c.execute(
            "INSERT INTO poe_gateway_migrations (version, applied_ms) VALUES (999, 0)",
            [],
        )
        .unwrap();
        let e = migrate(&c).unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
    }

    /// The key index leaves out rows with no key (migration 2), and the budget check and
    /// per-key reports, which all ask for `key_id = ?`, still search it instead of the table.
    #[test]
    fn per_key_queries_use_the_partial_key_index() {
        let c = Connection::open_in_memory().unwrap();
        migrate(&c).unwrap();
        let sql: String = c
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'usage_key_ts'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(sql.contains("WHERE key_id IS NOT NULL"), "{sql}");
        let plan = |q: &str| -> String {
            let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {q}")).unwrap();
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            rows.join("; ")
        };
        let budget = plan(
            "SELECT COALESCE(SUM(cost_usd), 0.0) FROM usage WHERE key_id = 'k' AND ts_ms >= 5",
        );
        assert!(budget.contains("COVERING INDEX usage_key_ts"), "{budget}");
        let q = ReportQuery {
            since_ms: 0,
            until_ms: 10,
            key_id: Some("k".into()),
            group_by: None,
        };
        let report = super::super::report::sql(Dialect::Sqlite, &q, Columns::ALL)
            .replace("?1", "0")
            .replace("?2", "10")
            .replace("?3", "'k'");
        let report = plan(&report);
        assert!(report.contains("usage_key_ts"), "{report}");
    }
}
