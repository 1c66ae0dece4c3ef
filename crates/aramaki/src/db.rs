//! The database: one code base over SQLite and PostgreSQL through sqlx's `Any`
//! driver, with a portable schema (see `migrations/`).
//!
//! SQLite gets two pools: a single-connection writer (SQLite admits one writer
//! at a time; queueing in-process avoids `SQLITE_BUSY` and keeps commit order
//! equal to `seq` order) and a reader pool. PostgreSQL uses one pool for both.

use std::str::FromStr;
use std::time::Duration;

use jiff::Timestamp;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL must start with sqlite: or postgres://")]
    UnsupportedUrl,
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Pools for reading and writing, and which backend they talk to.
#[derive(Debug, Clone)]
pub struct Db {
    read: AnyPool,
    write: AnyPool,
    backend: Backend,
}

pub type Tx = sqlx::Transaction<'static, sqlx::Any>;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

impl Db {
    /// Connects to `url` (creating a SQLite file if needed) and applies the
    /// versioned migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(DbError::UnsupportedUrl);
        };
        let options = AnyConnectOptions::from_str(url).map_err(DbError::Connect)?;
        let db = match backend {
            Backend::Sqlite => {
                let write = sqlite_pool(1)
                    .connect_with(options.clone())
                    .await
                    .map_err(DbError::Connect)?;
                // WAL is a property of the file: set once, before readers open it.
                sqlx::query("PRAGMA journal_mode = WAL")
                    .execute(&write)
                    .await?;
                let read = sqlite_pool(max_connections.max(2))
                    .connect_with(options)
                    .await
                    .map_err(DbError::Connect)?;
                Db {
                    read,
                    write,
                    backend,
                }
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options)
                    .await
                    .map_err(DbError::Connect)?;
                Db {
                    read: pool.clone(),
                    write: pool,
                    backend,
                }
            }
        };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), DbError> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&self.write).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool for queries that only read.
    pub fn reader(&self) -> &AnyPool {
        &self.read
    }

    /// Starts a write transaction. On PostgreSQL it also takes the timeline
    /// lock lazily (see [`Db::lock_timeline`]).
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        self.write.begin().await
    }

    /// A write transaction that will append to the timeline and change
    /// other rows: it takes the timeline lock first, so that all such
    /// transactions lock in one order (timeline, then rows) and two of them
    /// can never deadlock on PostgreSQL.
    pub async fn begin_recording(&self) -> Result<Tx, sqlx::Error> {
        let mut tx = self.write.begin().await?;
        self.lock_timeline(&mut tx).await?;
        Ok(tx)
    }

    /// Serialises event appends on PostgreSQL so that `seq` order equals
    /// commit order and a subscriber following `seq` never skips an event
    /// that commits late. SQLite's single writer already guarantees it.
    pub async fn lock_timeline(&self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        if self.backend == Backend::Postgres {
            tx.execute("SELECT pg_advisory_xact_lock(7310561)").await?;
        }
        Ok(())
    }

    /// Readiness: can the database answer a query?
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.read)
            .await
            .map(|_| ())
    }

    pub fn pool_stats(&self) -> PoolStats {
        PoolStats {
            size: self.read.size()
                + if self.backend == Backend::Sqlite {
                    self.write.size()
                } else {
                    0
                },
            idle: self.read.num_idle() as u32
                + if self.backend == Backend::Sqlite {
                    self.write.num_idle() as u32
                } else {
                    0
                },
        }
    }

    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    pub size: u32,
    pub idle: u32,
}

fn sqlite_pool(max: u32) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                // NORMAL is durable in WAL mode except for the last commits
                // before a power loss; a bigger page cache avoids a read system
                // call per page on large timelines. (mmap was measured: it
                // slows appends, as the growing file is remapped.)
                for pragma in [
                    "PRAGMA synchronous = NORMAL",
                    "PRAGMA foreign_keys = ON",
                    "PRAGMA busy_timeout = 10000",
                    "PRAGMA cache_size = -32768",
                    "PRAGMA temp_store = MEMORY",
                ] {
                    conn.execute(pragma).await?;
                }
                Ok(())
            })
        })
}

/// Times are stored as microseconds since the Unix epoch, UTC.
pub fn to_micros(t: Timestamp) -> i64 {
    t.as_microsecond()
}

pub fn from_micros(micros: i64) -> Timestamp {
    Timestamp::from_microsecond(micros).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Builds SQL with numbered `$n` placeholders, which both backends accept.
#[derive(Debug, Default)]
pub struct Sql {
    text: String,
    binds: Vec<Bind>,
}

#[derive(Debug, Clone)]
pub enum Bind {
    Text(String),
    OptText(Option<String>),
    Int(i64),
}

impl Sql {
    pub fn new(text: &str) -> Sql {
        Sql {
            text: text.to_owned(),
            binds: Vec::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn bind(&mut self, value: impl Into<Bind>) -> &mut Self {
        self.binds.push(value.into());
        self.text.push_str(&format!("${}", self.binds.len()));
        self
    }

    /// Appends `(p1, p2, …)` bound to `values`.
    pub fn bind_list<I, V>(&mut self, values: I) -> &mut Self
    where
        I: IntoIterator<Item = V>,
        V: Into<Bind>,
    {
        self.text.push('(');
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.bind(v);
        }
        self.text.push(')');
        self
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn query(&self) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
        let mut q = sqlx::query(&self.text);
        for b in &self.binds {
            q = match b {
                Bind::Text(s) => q.bind(s.as_str()),
                Bind::OptText(s) => q.bind(s.as_deref()),
                Bind::Int(i) => q.bind(*i),
            };
        }
        q
    }
}

impl From<String> for Bind {
    fn from(v: String) -> Bind {
        Bind::Text(v)
    }
}
impl From<&str> for Bind {
    fn from(v: &str) -> Bind {
        Bind::Text(v.to_owned())
    }
}
impl From<&String> for Bind {
    fn from(v: &String) -> Bind {
        Bind::Text(v.clone())
    }
}
impl From<i64> for Bind {
    fn from(v: i64) -> Bind {
        Bind::Int(v)
    }
}
impl From<Option<String>> for Bind {
    fn from(v: Option<String>) -> Bind {
        Bind::OptText(v)
    }
}

/// Escapes `%`, `_` and `\` for a `LIKE … ESCAPE '\'` pattern.
pub fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A new time-ordered identifier.
pub fn new_id() -> uuid::Uuid {
    uuid::Uuid::now_v7()
}

/// Is this error a unique-constraint violation (on either backend)?
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.is_unique_violation()
                || db.message().contains("UNIQUE constraint failed")
                || db.code().as_deref() == Some("23505")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_numbers_placeholders_in_order() {
        let mut sql = Sql::new("SELECT * FROM t WHERE a = ");
        sql.bind("x").push(" AND b IN ").bind_list([1i64, 2, 3]);
        assert_eq!(
            sql.text(),
            "SELECT * FROM t WHERE a = $1 AND b IN ($2, $3, $4)"
        );
    }

    #[test]
    fn like_patterns_are_escaped() {
        assert_eq!(like_escape("50%_a\\b"), "50\\%\\_a\\\\b");
    }

    #[tokio::test]
    async fn sqlite_connections_use_wal_and_normal_sync() {
        use sqlx::Row;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let db = Db::connect(&url, 2).await.unwrap();
        for pool in [&db.read, &db.write] {
            let mode: String = sqlx::query("PRAGMA journal_mode")
                .fetch_one(pool)
                .await
                .unwrap()
                .get(0);
            assert_eq!(mode, "wal");
            let sync: i64 = sqlx::query("PRAGMA synchronous")
                .fetch_one(pool)
                .await
                .unwrap()
                .get(0);
            assert_eq!(sync, 1, "NORMAL");
            let fk: i64 = sqlx::query("PRAGMA foreign_keys")
                .fetch_one(pool)
                .await
                .unwrap()
                .get(0);
            assert_eq!(fk, 1);
        }
    }

    #[test]
    fn micros_round_trip() {
        let t: Timestamp = "2026-11-23T10:00:00.123456Z".parse().unwrap();
        assert_eq!(from_micros(to_micros(t)), t);
    }
}
