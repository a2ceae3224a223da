//! The server's own small SQLite database (`<data_dir>/lockstep.db`): accounts,
//! devices, pairing tickets, invites and the push deduplication index. Kafka holds the
//! changes themselves; nothing here is needed to read them. With the accounts and the dedup
//! index in PostgreSQL (`database.url`, see `store`), only the node's own leftovers are here.
//!
//! One connection behind a mutex, used from `spawn_blocking`, so no async task
//! ever blocks on SQLite. Reads that a push waits for under its user's lock have
//! connections of their own ([`Db::read`]); the write-ahead log is copied back into the
//! database file by a thread of its own, on another connection (see [`Checkpointer`]).

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use rusqlite::Connection;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("accounts database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("accounts database (postgresql): {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// PostgreSQL is unreachable or refused us (at start, or no pooled connection in time).
    #[error("accounts database (postgresql): {0}")]
    Connect(String),
    /// A column of another type than the code reads: a bug, or a schema that drifted.
    #[error("accounts database: {0}")]
    Column(String),
    #[error("accounts database task failed: {0}")]
    Task(String),
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
}

impl DbError {
    /// Whether the same call may succeed if tried again: the database was unreachable, busy, or
    /// chose this transaction as a deadlock's or a lock wait's victim. Anything else (a bug, a
    /// schema that drifted, a constraint) is not.
    pub fn is_retryable(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            DbError::Connect(_) => true,
            DbError::Sqlite(rusqlite::Error::SqliteFailure(failure, _)) => {
                matches!(failure.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            }
            DbError::Postgres(error) => match error.code() {
                // No SQLSTATE: the connection broke (I/O, closed) rather than a statement failing.
                None => error.is_closed() || error.as_db_error().is_none(),
                Some(state) => [
                    SqlState::LOCK_NOT_AVAILABLE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::QUERY_CANCELED,
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::TOO_MANY_CONNECTIONS,
                ]
                .contains(state),
            },
            _ => false,
        }
    }
}

pub(crate) const MIGRATIONS: &str = "
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL,
    -- every offset below this one is in pushed_changes
    dedup_indexed_through INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(user_id),
    name TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS devices_by_user ON devices(user_id);
CREATE TABLE IF NOT EXISTS pairing_tickets (
    ticket_hash BLOB PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(user_id),
    issued_by_device TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    redeemed_at_ms INTEGER
);
-- Issuing a ticket sweeps the expired ones, and revoking a device drops the tickets it issued:
-- without these, both scanned every ticket of the last `pairing_ticket_ttl` (pairing 100,000
-- devices took quadratic time, issue 20's W3).
CREATE INDEX IF NOT EXISTS pairing_tickets_by_expiry ON pairing_tickets(expires_at_ms);
CREATE INDEX IF NOT EXISTS pairing_tickets_by_issuer ON pairing_tickets(issued_by_device);
-- single-use codes for CreateAccount (accounts/invites.rs); the code itself is never stored
CREATE TABLE IF NOT EXISTS invites (
    invite_id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused
    code_hash BLOB NOT NULL UNIQUE,
    note TEXT NOT NULL DEFAULT '',
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    claimed_until_ms INTEGER,                      -- a CreateAccount holds it until then
    used_at_ms INTEGER,
    used_by_user TEXT,                             -- cleared when that account is deleted
    revoked_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS log_incidents (
    user_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    detected_at_ms INTEGER NOT NULL,
    expected_end INTEGER NOT NULL,
    found_start INTEGER NOT NULL,
    found_end INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (user_id, generation)
);
CREATE TABLE IF NOT EXISTS push_targets (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,           -- web_push | webhook
    endpoint TEXT NOT NULL,       -- a secret: never logged
    p256dh BLOB,
    auth BLOB,
    app_id TEXT,
    pushkey TEXT,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pushed_changes (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    change_id TEXT NOT NULL,
    kafka_offset INTEGER NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (user_id, device_id, change_id)
) WITHOUT ROWID;
-- A change being written through one node (gateway::dedup, used when several nodes share the
-- store): the attempt that inserted the row produces it; others wait for its index entry, or take
-- the row over once it expired (and re-read the topic first).
CREATE TABLE IF NOT EXISTS push_reservations (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    change_id TEXT NOT NULL,
    digest BLOB NOT NULL,
    holder TEXT NOT NULL,            -- <node id>/<process id>: one attempt per process and change
    expires_at_ms INTEGER NOT NULL,  -- database clock
    PRIMARY KEY (user_id, device_id, change_id)
) WITHOUT ROWID;
";

/// The data directory (0700) and the database (0600) are the server's alone: they hold token
/// and ticket hashes and push targets' endpoints. SQLite gives its `-wal` and `-shm` files the
/// database's mode. A directory the server does not own (a mount point) is left as it is.
#[cfg(unix)]
fn restrict_to_owner(data_dir: &Path, database: &Path) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Err(error) = std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)) {
        tracing::warn!(path = %data_dir.display(), %error, "cannot make the data directory private (0700)");
    }
    let created = std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(database);
    let restricted = created.and_then(|_| std::fs::set_permissions(database, std::fs::Permissions::from_mode(0o600)));
    if let Err(error) = restricted {
        tracing::warn!(path = %database.display(), %error, "cannot make the database private (0600)");
    }
}

#[cfg(not(unix))]
fn restrict_to_owner(_data_dir: &Path, _database: &Path) {}

#[derive(Clone)]
pub struct Db {
    connection: Arc<Mutex<Connection>>,
    readers: Arc<Readers>,
    /// Ends the checkpointer when the last clone goes.
    _checkpointer: Arc<Checkpointer>,
}

/// How often the checkpointer copies the write-ahead log into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// The write-ahead log's size (pages of 4 KiB) past which a commit on the connection
/// checkpoints by itself: a backstop, reached only if the checkpointer falls behind.
const AUTOCHECKPOINT_BACKSTOP_PAGES: i64 = 10_000;

/// Copies the write-ahead log back into the database file every [`CHECKPOINT_EVERY`], on a
/// connection and a thread of its own (a PASSIVE checkpoint: it never blocks the connection).
///
/// SQLite's own checkpoint runs inside the commit that grows the log past 1,000 pages, on the
/// committing connection, and ends with an fsync of the database file. Here that connection is
/// the server's only one, behind its mutex: a push's dedup lookup waited for the fsync (10–12 ms
/// every two seconds under W2's load; 84 ms once on this thread since). Durability is the
/// same: a commit is durable against a killed process once it is in the log (WAL + NORMAL);
/// the checkpoint only moves it.
struct Checkpointer {
    _stop: mpsc::Sender<()>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Self, DbError> {
        let connection = Connection::open(path)?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.busy_timeout(Duration::from_secs(5))?;
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("lockstep-sqlite-checkpoint".into())
            .spawn(move || {
                // Every sender gone (the last `Db` clone dropped) ends the loop.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
                    if let Err(error) = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!(%error, "cannot checkpoint the database's write-ahead log yet; retrying");
                    }
                }
            })
            .map_err(|error| DbError::Task(format!("cannot start the database's checkpointer: {error}")))?;
        Ok(Self { _stop: stop })
    }
}

/// How many read-only connections [`Db::read`] spreads over.
const READERS: usize = 2;

/// Read-only connections (`query_only`) beside the server's connection. In WAL mode a reader
/// never waits for the writer: it reads the last commit from the log. The server's connection
/// can be held for hundreds of milliseconds by one commit's write to the log when the disk is
/// busy (`perf trace` under the benchmark's W2, after W1's writes to Kafka: a `pwrite` of 4 KiB
/// held 111–263 ms, each time during the checkpointer's fsync; why the kernel holds it, likely
/// the file system's journal commit, was not traced).
/// A push's dedup lookup, made under its user's lock, waited for it, and so did every push of
/// that user behind it.
struct Readers {
    connections: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl Readers {
    fn open(path: &Path) -> Result<Self, DbError> {
        let connections = (0..READERS)
            .map(|_| {
                let connection = Connection::open(path)?;
                connection.pragma_update(None, "query_only", true)?;
                connection.busy_timeout(Duration::from_secs(5))?;
                Ok(Mutex::new(connection))
            })
            .collect::<Result<_, DbError>>()?;
        Ok(Self { connections, next: AtomicUsize::new(0) })
    }

    /// A free connection if there is one, else the next in turn (waiting for it).
    fn run<R>(&self, work: impl FnOnce(&mut Connection) -> Result<R, DbError>) -> Result<R, DbError> {
        for connection in &self.connections {
            if let Ok(mut guard) = connection.try_lock() {
                return work(&mut guard);
            }
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        work(&mut lockstep_kafka::locks::lock(&self.connections[turn]))
    }
}

impl Db {
    pub fn open(data_dir: &Path) -> Result<Self, DbError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|source| DbError::DataDir { path: data_dir.display().to_string(), source })?;
        let path = data_dir.join("lockstep.db");
        restrict_to_owner(data_dir, &path);
        let mut connection = Connection::open(&path)?;
        // `lockstep invite` writes to this database while the server runs. A deferred
        // transaction that read first and then writes would fail at once (SQLITE_BUSY, no
        // busy wait) had the other process committed in between; IMMEDIATE takes the write
        // lock at BEGIN, waiting up to the busy timeout. One connection per process: no cost.
        connection.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        // WAL + NORMAL survives a killed process (the kill -9 case); FULL would
        // also survive power loss at the cost of an fsync per commit.
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.pragma_update(None, "wal_autocheckpoint", AUTOCHECKPOINT_BACKSTOP_PAGES)?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.execute_batch(MIGRATIONS)?;
        add_columns(&connection)?;
        // The key directory's tables (their PostgreSQL twins are beside them in `store::schema`).
        connection.execute_batch(crate::store::schema::SQLITE_KEYS)?;
        let readers = Readers::open(&path)?;
        let checkpointer = Checkpointer::start(&path)?;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
            readers: Arc::new(readers),
            _checkpointer: Arc::new(checkpointer),
        })
    }

    /// Runs `work` on a blocking thread with the connection.
    pub async fn call<R, F>(&self, work: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, DbError> + Send + 'static,
    {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = lockstep_kafka::locks::lock(&connection);
            work(&mut guard)
        })
        .await
        .map_err(|error| DbError::Task(error.to_string()))?
    }

    /// Runs `work` on a blocking thread with a read-only connection: it sees every commit made
    /// before it starts, and never waits for the server's connection (see [`Readers`]). A write
    /// fails (`query_only`).
    pub async fn read<R, F>(&self, work: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, DbError> + Send + 'static,
    {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.run(work))
            .await
            .map_err(|error| DbError::Task(error.to_string()))?
    }
}

/// Columns added after the first release, for databases created before them.
pub(crate) const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    // The highest log end Kafka acknowledged (log_guard); starts at what the dedup index covers.
    ("users", "log_high_mark", "INTEGER NOT NULL DEFAULT 0"),
    ("users", "log_generation", "INTEGER NOT NULL DEFAULT 0"),
    ("devices", "log_generation", "INTEGER NOT NULL DEFAULT 0"),
    // Set when the account's deletion began; the row goes once Kafka's copy is gone.
    ("users", "deleting_at_ms", "INTEGER"),
    // The log generation the dedup index belongs to (gateway::dedup resets it when behind).
    ("users", "dedup_generation", "INTEGER NOT NULL DEFAULT 0"),
];

fn add_columns(connection: &Connection) -> Result<(), DbError> {
    for (table, column, definition) in ADDED_COLUMNS {
        let exists: bool = connection.query_row(
            &format!("SELECT count(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
            [column],
            |row| row.get(0),
        )?;
        if !exists {
            connection.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {definition}"))?;
            if *column == "log_high_mark" {
                connection.execute_batch("UPDATE users SET log_high_mark = dedup_indexed_through")?;
            }
            if *column == "dedup_generation" {
                // The log guard reset the index itself at each incident until now: it is current.
                connection.execute_batch("UPDATE users SET dedup_generation = log_generation")?;
            }
        }
    }
    Ok(())
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod sharing_tests {
    use super::*;

    /// The server and `lockstep invite` share the database: a transaction that reads, then
    /// writes, must not fail because the other process wrote in between.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_process_writing_meanwhile_does_not_fail_a_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let (server, operator) = (Db::open(dir.path()).unwrap(), Db::open(dir.path()).unwrap());
        let (read_tx, read_rx) = std::sync::mpsc::channel::<()>();
        let reading = server.call(move |connection| {
            let transaction = connection.transaction()?;
            let users: i64 = transaction.query_row("SELECT COUNT(*) FROM users", [], |row| row.get(0))?;
            read_tx.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
            transaction.execute("INSERT INTO users (user_id, created_at_ms) VALUES ('u1', ?1)", [users])?;
            transaction.commit()?;
            Ok(())
        });
        let writing = async {
            tokio::task::spawn_blocking(move || read_rx.recv().unwrap()).await.unwrap();
            operator
                .call(|connection| {
                    connection.execute(
                        "INSERT INTO invites (code_hash, created_at_ms, expires_at_ms) VALUES (x'00', 0, 1)",
                        [],
                    )?;
                    Ok(())
                })
                .await
        };
        let (read_then_write, other_write) = tokio::join!(reading, writing);
        read_then_write.unwrap();
        other_write.unwrap();
    }

    /// The write-ahead log reaches the database file without any commit checkpointing it: the
    /// connection's own checkpoint is only a backstop far above what is written here.
    #[tokio::test]
    async fn the_checkpointer_copies_the_log_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let file = dir.path().join("lockstep.db");
        let before = std::fs::metadata(&file).unwrap().len();
        // 2 MiB in 512 commits: about 520 pages, far below the backstop's 10,000.
        db.call(|connection| {
            connection.execute_batch("CREATE TABLE filler (bytes BLOB NOT NULL)")?;
            for _ in 0..512 {
                connection.execute("INSERT INTO filler (bytes) VALUES (zeroblob(4096))", [])?;
            }
            Ok(())
        })
        .await
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let grown = std::fs::metadata(&file).unwrap().len() - before;
            if grown >= 2 << 20 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the database file grew by {grown} bytes only");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A read runs while the server's connection is held in the middle of a write transaction
    /// (as a commit stuck on the disk holds it), sees what was committed before, not what the
    /// open transaction wrote, and cannot write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_does_not_wait_for_the_servers_connection() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.call(|connection| {
            connection.execute("INSERT INTO users (user_id, created_at_ms) VALUES ('committed', 0)", [])?;
            Ok(())
        })
        .await
        .unwrap();
        let (holding, held) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let writer = db.call(move |connection| {
            let transaction = connection.transaction()?;
            transaction.execute("INSERT INTO users (user_id, created_at_ms) VALUES ('open', 0)", [])?;
            holding.send(()).unwrap();
            // Held until the read below is done; a read that waited for this connection
            // would never end (the test's timeout fails it).
            released.recv_timeout(Duration::from_secs(30)).unwrap();
            transaction.commit()?;
            Ok(())
        });
        let reading = async {
            tokio::task::spawn_blocking(move || held.recv().unwrap()).await.unwrap();
            let users = tokio::time::timeout(
                Duration::from_secs(10),
                db.read(|connection| {
                    let mut statement = connection.prepare("SELECT user_id FROM users ORDER BY user_id")?;
                    let users = statement.query_map([], |row| row.get::<_, String>(0))?;
                    Ok(users.collect::<Result<Vec<_>, _>>()?)
                }),
            )
            .await
            .expect("the read waited for the server's connection")
            .unwrap();
            let write = db
                .read(|connection| {
                    connection.execute("INSERT INTO users (user_id, created_at_ms) VALUES ('reader', 0)", [])?;
                    Ok(())
                })
                .await;
            release.send(()).unwrap();
            (users, write)
        };
        let (written, (users, write)) = tokio::join!(writer, reading);
        written.unwrap();
        assert_eq!(users, vec!["committed".to_string()]);
        assert!(write.is_err(), "a read-only connection wrote");
    }

    /// The statements that run on every ticket issued, redeemed or device revoked search an
    /// index instead of scanning every ticket of the last ten minutes, or every device.
    #[tokio::test]
    async fn the_ticket_sweeps_search_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let plans = db
            .call(|connection| {
                let mut plans = Vec::new();
                for statement in [
                    "DELETE FROM pairing_tickets WHERE expires_at_ms < 1",
                    "DELETE FROM pairing_tickets WHERE issued_by_device = 'd' AND redeemed_at_ms IS NULL",
                    crate::accounts::REDEEM_TICKET,
                ] {
                    let mut query = connection.prepare(&format!("EXPLAIN QUERY PLAN {statement}"))?;
                    let parameters = vec![rusqlite::types::Value::Null; query.parameter_count()];
                    let rows =
                        query.query_map(rusqlite::params_from_iter(parameters), |row| row.get::<_, String>(3))?;
                    plans.push(rows.collect::<Result<Vec<_>, _>>()?.join("; "));
                }
                Ok(plans)
            })
            .await
            .unwrap();
        assert!(plans[0].contains("INDEX pairing_tickets_by_expiry"), "{plans:?}");
        assert!(plans[1].contains("INDEX pairing_tickets_by_issuer"), "{plans:?}");
        // The issuer by its primary key, not a list of every device.
        assert!(!plans[2].contains("SCAN"), "{plans:?}");
        assert!(plans[2].contains("SEARCH devices USING INDEX sqlite_autoindex_devices_1"), "{plans:?}");
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_data_directory_and_database_are_the_owners_alone() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let db = Db::open(&data_dir).unwrap();
        drop(db);
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data_dir), 0o700);
        for name in ["lockstep.db", "lockstep.db-wal", "lockstep.db-shm"] {
            let path = data_dir.join(name);
            if path.exists() {
                assert_eq!(mode(&path), 0o600, "{name}");
            }
        }
        // An existing, looser database is tightened on the next open.
        std::fs::set_permissions(data_dir.join("lockstep.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(Db::open(&data_dir).unwrap());
        assert_eq!(mode(&data_dir.join("lockstep.db")), 0o600);
    }
}
