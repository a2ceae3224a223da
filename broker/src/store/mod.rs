//! The server's shared state: users, devices, token hashes, pairing tickets, invites, push
//! targets, key epochs and sealed keys, log incidents, account erasure. Data flow step: beside
//! the gateway and delivery, which ask it who a device is and what it may do.
//!
//! Two backends behind one interface, [`Store`]:
//! - **SQLite** (default, one node): `<data_dir>/lockstep.db`, the file and behaviour of before;
//! - **PostgreSQL** (`[database] url = "postgres://…"`, several nodes): tokio-postgres through a
//!   small bounded pool (deadpool-postgres, `database.max_connections`).
//!
//! # Why one SQL layer, not a trait with an implementation per backend
//! Every operation is written once, as SQL both engines run, inside a closure that gets a
//! [`Conn`] ([`Store::call`]) — the shape the code had with rusqlite alone. A trait with one
//! method per operation would have two copies of every statement and every transaction, and
//! the copies would drift (the bug this layer exists to avoid: a rule enforced in one backend
//! only). What differs between the engines is kept small and in this module: placeholders
//! (`?1` becomes `$1`), values ([`Value`]: integers are 64-bit, `BIGINT` in PostgreSQL), and the
//! schema ([`schema`], both dialects side by side, with a test that compares their tables and
//! columns). SQL that only one engine knows is not used: `INSERT … ON CONFLICT DO NOTHING`
//! instead of `INSERT OR IGNORE`, `CASE` instead of the two-argument `MAX`, `RETURNING` instead
//! of `last_insert_rowid()`.
//!
//! A closure runs on a blocking thread (`spawn_blocking`), so no async task ever waits on a
//! database; with PostgreSQL it holds one pooled connection and drives its queries with
//! `Handle::block_on`. A transaction cannot outlive its closure, so none is ever held across an
//! unrelated await.
//!
//! # Atomic writes under concurrency
//! SQLite has one connection per process behind a mutex, and `BEGIN IMMEDIATE` against the
//! other process (`lockstep invite`). PostgreSQL runs transactions at READ COMMITTED, where a
//! conditional `UPDATE … WHERE <still unused> RETURNING` is re-checked against the row a
//! concurrent transaction committed: a pairing ticket or an invite is spent exactly once.
//! Checks that read other rows first (devices per account, the next key epoch) lock the
//! account's `users` row with [`LOCK_USER`], which serialises them per account in PostgreSQL and
//! costs nothing in SQLite (its write lock is taken at BEGIN already).
//!
//! # The push dedup index
//! The index (`pushed_changes`, `users.dedup_indexed_through`, `users.dedup_generation`, used by
//! `gateway::dedup`) and the reservations of changes being produced (`push_reservations`,
//! `gateway::reservation`, with PostgreSQL only) are in the store like the rest: with SQLite
//! alone the same file and connection as before; with PostgreSQL every node sees every entry.
//! What is still node-local with PostgreSQL: a `users` row per account in the data directory's
//! SQLite that the log guard reads an older copy of the log's high mark from (written when an
//! account is made and at start, [`Store::mirror_users_locally`]), and the token cache
//! (`Accounts` loads the active tokens at start; the events topic tells it of revocations).
//!
//! PostgreSQL statements are not prepared once and cached yet (each is parsed on every call, one
//! more round trip): deadpool-postgres has a statement cache, for when the numbers ask for it.

mod postgres;
pub mod schema;
#[cfg(test)]
pub(crate) mod testing;

use std::{path::Path, time::Duration};

use crate::db::{Db, DbError};
pub use crate::settings::redact_url;

/// Locks the account's `users` row until the transaction ends (PostgreSQL), so that checks of
/// other rows of the account (how many devices, which key epoch is next) are not raced by a
/// concurrent transaction on another node. Parameter `?1`: the user id.
pub const LOCK_USER: &str = "UPDATE users SET log_generation = log_generation WHERE user_id = ?1";

/// A lock name as the 32-bit key of a PostgreSQL advisory lock: FNV-1a, the same on every node
/// and every build (unlike `std`'s hasher).
fn lock_key(name: &str) -> i32 {
    let hash = name.bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193));
    hash as i32
}

/// One value of a row or a parameter: what both engines have in common.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

macro_rules! from_int {
    ($($type:ty),*) => {$(
        impl From<$type> for Value {
            fn from(value: $type) -> Self {
                Value::Int(i64::from(value))
            }
        }
    )*};
}
from_int!(i64, i32, u32, bool);

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_owned())
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::Text(value)
    }
}

impl From<&String> for Value {
    fn from(value: &String) -> Self {
        Value::Text(value.clone())
    }
}

impl From<&[u8]> for Value {
    fn from(value: &[u8]) -> Self {
        Value::Blob(value.to_vec())
    }
}

impl From<Vec<u8>> for Value {
    fn from(value: Vec<u8>) -> Self {
        Value::Blob(value)
    }
}

impl From<&Vec<u8>> for Value {
    fn from(value: &Vec<u8>) -> Self {
        Value::Blob(value.clone())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Self {
        value.map_or(Value::Null, Into::into)
    }
}

/// Parameters of a statement: `values![user, now]`.
#[macro_export]
macro_rules! values {
    ($($value:expr),* $(,)?) => {
        &[$($crate::store::Value::from($value)),*][..]
    };
}

/// A value read back as a Rust type.
pub trait FromValue: Sized {
    fn from_value(value: Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Int(int) => Some(int),
            _ => None,
        }
    }
}

impl FromValue for u32 {
    fn from_value(value: Value) -> Option<Self> {
        i64::from_value(value).and_then(|int| u32::try_from(int).ok())
    }
}

impl FromValue for bool {
    fn from_value(value: Value) -> Option<Self> {
        i64::from_value(value).map(|int| int != 0)
    }
}

impl FromValue for String {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Text(text) => Some(text),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Blob(blob) => Some(blob),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// One row of a result.
#[derive(Debug, Clone)]
pub struct Row(Vec<Value>);

impl Row {
    /// Column `index` as `T`; a missing column or another type is an error (a bug, not data).
    pub fn get<T: FromValue>(&self, index: usize) -> Result<T, DbError> {
        let value = self.0.get(index).cloned().ok_or_else(|| DbError::Column(format!("no column {index}")))?;
        let shown = format!("{value:?}");
        T::from_value(value)
            .ok_or_else(|| DbError::Column(format!("column {index} is {shown}, not a {}", std::any::type_name::<T>())))
    }
}

/// Statements on a connection or in a transaction, the same for both engines.
pub trait Sql {
    #[doc(hidden)]
    fn executor(&self) -> Executor<'_>;

    /// Runs a statement; the rows it changed.
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        self.executor().execute(sql, params)
    }

    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        self.executor().query(sql, params)
    }

    /// The first row, if any.
    fn query_opt(&self, sql: &str, params: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row; none is an error.
    fn query_one(&self, sql: &str, params: &[Value]) -> Result<Row, DbError> {
        self.query_opt(sql, params)?.ok_or_else(|| DbError::Column(format!("no row from {sql}")))
    }
}

#[doc(hidden)]
pub enum Executor<'a> {
    Sqlite(&'a rusqlite::Connection),
    Postgres(postgres::Executor<'a>),
}

impl Executor<'_> {
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        match self {
            Executor::Sqlite(connection) => {
                let mut statement = connection.prepare_cached(sql)?;
                Ok(statement.execute(rusqlite::params_from_iter(params.iter()))? as u64)
            }
            Executor::Postgres(postgres) => postgres.execute(sql, params),
        }
    }

    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match self {
            Executor::Sqlite(connection) => {
                let mut statement = connection.prepare_cached(sql)?;
                let columns = statement.column_count();
                let mut rows = statement.query(rusqlite::params_from_iter(params.iter()))?;
                let mut found = Vec::new();
                while let Some(row) = rows.next()? {
                    let mut values = Vec::with_capacity(columns);
                    for index in 0..columns {
                        values.push(match row.get_ref(index)? {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(int) => Value::Int(int),
                            rusqlite::types::ValueRef::Text(text) => {
                                Value::Text(String::from_utf8_lossy(text).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(blob) => Value::Blob(blob.to_vec()),
                            rusqlite::types::ValueRef::Real(real) => {
                                return Err(DbError::Column(format!("unexpected real {real} in {sql}")));
                            }
                        });
                    }
                    found.push(Row(values));
                }
                Ok(found)
            }
            Executor::Postgres(postgres) => postgres.query(sql, params),
        }
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(int) => ValueRef::Integer(*int),
            Value::Text(text) => ValueRef::Text(text.as_bytes()),
            Value::Blob(blob) => ValueRef::Blob(blob),
        }))
    }
}

/// A connection, for the length of one [`Store::call`].
pub enum Conn<'a> {
    Sqlite(&'a mut rusqlite::Connection),
    Postgres(postgres::Connection<'a>),
}

impl Conn<'_> {
    /// Begins a transaction; dropped without [`Tx::commit`], it rolls back.
    pub fn transaction(&mut self) -> Result<Tx<'_>, DbError> {
        Ok(match self {
            Conn::Sqlite(connection) => Tx::Sqlite(connection.transaction()?),
            Conn::Postgres(connection) => Tx::Postgres(connection.transaction()?),
        })
    }

    /// Runs several statements (a migration).
    pub fn execute_batch(&self, sql: &str) -> Result<(), DbError> {
        match self {
            Conn::Sqlite(connection) => Ok(connection.execute_batch(sql)?),
            Conn::Postgres(connection) => connection.executor().batch(sql),
        }
    }

    /// Which engine this is (for the rare statement that needs to know).
    pub fn is_postgres(&self) -> bool {
        matches!(self, Conn::Postgres(_))
    }
}

impl Sql for Conn<'_> {
    fn executor(&self) -> Executor<'_> {
        match self {
            Conn::Sqlite(connection) => Executor::Sqlite(connection),
            Conn::Postgres(connection) => Executor::Postgres(connection.executor()),
        }
    }
}

pub enum Tx<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(postgres::Transaction<'a>),
}

impl Tx<'_> {
    pub fn commit(self) -> Result<(), DbError> {
        match self {
            Tx::Sqlite(transaction) => Ok(transaction.commit()?),
            Tx::Postgres(transaction) => transaction.commit(),
        }
    }
}

impl Sql for Tx<'_> {
    fn executor(&self) -> Executor<'_> {
        match self {
            Tx::Sqlite(transaction) => Executor::Sqlite(transaction),
            Tx::Postgres(transaction) => Executor::Postgres(transaction.executor()),
        }
    }
}

/// Where the shared state lives.
#[derive(Clone)]
enum Backend {
    Sqlite,
    /// The statements' pool, and the pool of the advisory locks ([`Store::serialised`]): a lock
    /// holds its connection while its work runs, which must not starve the statements.
    Postgres(deadpool_postgres::Pool, deadpool_postgres::Pool),
}

/// The shared state's database (with the push dedup index), and the node-local SQLite beside it.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    /// SQLite in the data directory: the whole store with [`Backend::Sqlite`], leftovers read by the
    /// log guard with PostgreSQL (see the module doc).
    local: Db,
}

impl Store {
    /// The store `settings` name: PostgreSQL if `database.url` is set, else SQLite in `data_dir`.
    /// PostgreSQL must be reachable: an error says why not, with the URL's password hidden.
    pub async fn open(data_dir: &Path, settings: &crate::settings::DatabaseSettings) -> Result<Self, DbError> {
        let local = Db::open(data_dir)?;
        match &settings.url {
            None => Self::sqlite(local),
            Some(url) => Self::postgres(url, (settings.max_connections, settings.lock_connections), local).await,
        }
    }

    /// SQLite only: the shared state, dedup index included, in `local`.
    pub fn sqlite(local: Db) -> Result<Self, DbError> {
        Ok(Self { backend: Backend::Sqlite, local })
    }

    /// The shared state and the dedup index in PostgreSQL at `url` (migrated if needed).
    /// `connections`: the statements' pool and the advisory locks' (see [`Backend::Postgres`]).
    pub async fn postgres(url: &str, connections: (usize, usize), local: Db) -> Result<Self, DbError> {
        let pool = postgres::connect(url, connections.0).await?;
        let locks = postgres::connect(url, connections.1).await?;
        let store = Self { backend: Backend::Postgres(pool, locks), local };
        store.call(schema::migrate_postgres).await?;
        Ok(store)
    }

    /// The node-local SQLite database (the whole store with SQLite alone).
    pub fn local(&self) -> &Db {
        &self.local
    }

    /// Whether several nodes may share this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(..))
    }

    pub fn engine(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres(..) => "postgresql",
        }
    }

    /// Runs `work` on a blocking thread with a connection (one of the pool's, for PostgreSQL).
    pub async fn call<R, F>(&self, work: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Conn<'_>) -> Result<R, DbError> + Send + 'static,
    {
        match &self.backend {
            Backend::Sqlite => self.local.call(move |connection| work(&mut Conn::Sqlite(connection))).await,
            Backend::Postgres(pool, _) => postgres::call(pool, work).await,
        }
    }

    /// Runs `work`, which only reads, on a blocking thread: with SQLite on a read-only connection
    /// that never waits for the server's writes (`Db::read`), with PostgreSQL as [`Store::call`].
    pub async fn read<R, F>(&self, work: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Conn<'_>) -> Result<R, DbError> + Send + 'static,
    {
        match &self.backend {
            Backend::Sqlite => self.local.read(move |connection| work(&mut Conn::Sqlite(connection))).await,
            Backend::Postgres(pool, _) => postgres::call(pool, work).await,
        }
    }

    /// Runs `work` as the only holder of the lock named `(namespace, name)` among every node on
    /// this store: a PostgreSQL transaction-scoped advisory lock (see `postgres::with_advisory_lock`;
    /// three round trips, and one pooled connection held while `work` runs). With SQLite (one
    /// node) it runs `work` at once: the caller serialises within the process. Names hash to 32
    /// bits (FNV-1a): two names that collide only wait for each other. `wait` bounds the wait
    /// for the lock.
    pub async fn serialised<R, E, Fut>(&self, namespace: i32, name: &str, wait: Duration, work: Fut) -> Result<R, E>
    where
        Fut: std::future::Future<Output = Result<R, E>>,
        E: From<DbError>,
    {
        match &self.backend {
            Backend::Sqlite => work.await,
            Backend::Postgres(_, locks) => {
                postgres::with_advisory_lock(locks, (namespace, lock_key(name)), wait, work).await
            }
        }
    }

    /// With PostgreSQL: gives `user_id` its row in the node-local SQLite, which the log guard still
    /// reads (see the module doc). Nothing to do with SQLite alone.
    pub async fn mirror_user_locally(&self, user_id: &str) -> Result<(), DbError> {
        if !self.is_shared() {
            return Ok(());
        }
        let user = user_id.to_owned();
        self.local
            .call(move |connection| {
                connection.execute(
                    "INSERT INTO users (user_id, created_at_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    rusqlite::params![user, crate::db::now_ms()],
                )?;
                Ok(())
            })
            .await
    }

    /// At start, with PostgreSQL: [`Store::mirror_user_locally`] for every account. Returns how
    /// many accounts there are.
    pub async fn mirror_users_locally(&self) -> Result<usize, DbError> {
        if !self.is_shared() {
            return Ok(0);
        }
        let users: Vec<String> = self
            .call(|connection| {
                connection
                    .query("SELECT user_id FROM users WHERE deleting_at_ms IS NULL", &[])?
                    .iter()
                    .map(|row| row.get(0))
                    .collect()
            })
            .await?;
        let count = users.len();
        self.local
            .call(move |connection| {
                let transaction = connection.transaction()?;
                {
                    let mut insert = transaction.prepare_cached(
                        "INSERT INTO users (user_id, created_at_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    )?;
                    let now = crate::db::now_ms();
                    for user in &users {
                        insert.execute(rusqlite::params![user, now])?;
                    }
                }
                transaction.commit()?;
                Ok(())
            })
            .await?;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::{Sql, lock_key, testing::TestStore};

    #[test]
    fn lock_keys_are_fnv1a_and_the_same_everywhere() {
        assert_eq!(lock_key("") as u32, 0x811c_9dc5);
        assert_eq!(lock_key("a") as u32, 0xe40c_292c);
        assert_ne!(lock_key("device-1"), lock_key("device-2"));
    }

    /// Two "nodes" (two stores on one PostgreSQL database): work under one name never overlaps,
    /// work under other names does not wait for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serialised_work_under_one_name_never_overlaps_across_stores() {
        let first = TestStore::postgres().await;
        let second = first.reopen().await;
        let inside = Arc::new(AtomicUsize::new(0));
        let most_inside = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for round in 0..8 {
            let store = if round % 2 == 0 { first.store.clone() } else { second.clone() };
            let (inside, most_inside) = (inside.clone(), most_inside.clone());
            tasks.spawn(async move {
                store
                    .serialised(7107, "device-1", Duration::from_secs(10), async {
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most_inside.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, crate::db::DbError>(())
                    })
                    .await
            });
        }
        // Another name takes a lock of its own.
        let other = second
            .serialised(7107, "device-2", Duration::from_secs(10), async { Ok::<_, crate::db::DbError>(7) })
            .await
            .unwrap();
        assert_eq!(other, 7);
        while let Some(done) = tasks.join_next().await {
            done.unwrap().unwrap();
        }
        assert_eq!(most_inside.load(Ordering::SeqCst), 1, "one holder at a time");
        // An error inside ends the transaction too: the lock is free again.
        let failed = first
            .store
            .serialised(7107, "device-1", Duration::from_secs(10), async {
                Err::<(), _>(crate::db::DbError::Task("boom".into()))
            })
            .await;
        assert!(failed.is_err());
        let again = tokio::time::timeout(
            Duration::from_secs(10),
            second.serialised(7107, "device-1", Duration::from_secs(5), async { Ok::<_, crate::db::DbError>(()) }),
        )
        .await;
        assert!(matches!(again, Ok(Ok(()))), "{again:?}");
    }
    /// The locks have connections of their own: with every one of them held (acks waiting on
    /// Kafka), statements still get theirs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_locks_leave_the_statements_their_connections() {
        let test = TestStore::postgres().await;
        let url = test.url.clone().expect("a PostgreSQL store");
        let dir = tempfile::tempdir().unwrap();
        let store = super::Store::postgres(&url, (1, 1), crate::db::Db::open(dir.path()).unwrap()).await.unwrap();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (entered, inside) = tokio::sync::oneshot::channel::<()>();
        let holder = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .serialised(7107, "device-1", Duration::from_secs(10), async {
                        let _ = entered.send(());
                        let _ = released.await;
                        Ok::<_, crate::db::DbError>(())
                    })
                    .await
            })
        };
        inside.await.unwrap();
        // The one lock connection is held: a statement needs the other pool.
        let answered = tokio::time::timeout(
            Duration::from_secs(20),
            store.call(|connection| connection.query_one("SELECT 1", &[])?.get::<i64>(0)),
        )
        .await;
        assert!(matches!(answered, Ok(Ok(1))), "{answered:?}");
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
    }
}
