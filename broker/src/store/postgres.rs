//! The PostgreSQL side of [`super::Store`]: a bounded pool of tokio-postgres connections, and
//! statements driven from the blocking thread of a [`super::Store::call`].

use std::{error::Error as StdError, time::Duration};

use bytes::BytesMut;
use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use tokio::runtime::Handle;
use tokio_postgres::{
    NoTls,
    types::{FromSql, IsNull, ToSql, Type, to_sql_checked},
};

use super::{Conn, Row, Value};
use crate::{db::DbError, settings::redact_url};

/// How long a call waits for a pooled connection, and how long opening one may take.
const POOL_WAIT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool of at most `max_connections`, with one connection opened now: an unreachable server
/// or a bad URL fails the start with a readable error.
pub(super) async fn connect(url: &str, max_connections: usize) -> Result<Pool, DbError> {
    let shown = redact_url(url);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(DbError::Connect(format!("database.url {shown} is not a postgres:// or postgresql:// URL")));
    }
    let mut config = deadpool_postgres::Config::new();
    config.url = Some(url.to_owned());
    config.manager = Some(ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let mut pool_config = PoolConfig::new(max_connections.max(1));
    pool_config.timeouts =
        Timeouts { wait: Some(POOL_WAIT), create: Some(CONNECT_TIMEOUT), recycle: Some(CONNECT_TIMEOUT) };
    config.pool = Some(pool_config);
    let pool = config
        .create_pool(Some(Runtime::Tokio1), NoTls)
        .map_err(|error| DbError::Connect(format!("database.url {shown} is not usable: {error}")))?;
    let first = pool
        .get()
        .await
        .map_err(|error| DbError::Connect(format!("cannot connect to PostgreSQL at {shown}: {}", describe(&error))))?;
    drop(first);
    tracing::info!(url = %shown, max_connections, "accounts database: postgresql");
    Ok(pool)
}

/// An error and its causes on one line ("error connecting to server: Connection refused").
fn describe(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub(super) async fn call<R, F>(pool: &Pool, work: F) -> Result<R, DbError>
where
    R: Send + 'static,
    F: FnOnce(&mut Conn<'_>) -> Result<R, DbError> + Send + 'static,
{
    let mut client =
        pool.get().await.map_err(|error| DbError::Connect(format!("no database connection: {}", describe(&error))))?;
    let runtime = Handle::current();
    tokio::task::spawn_blocking(move || {
        let client: &mut tokio_postgres::Client = &mut client;
        work(&mut Conn::Postgres(Connection { client, runtime }))
    })
    .await
    .map_err(|error| DbError::Task(error.to_string()))?
}

/// Runs `work` while this connection's transaction holds the advisory lock `(namespace, key)`:
/// one holder at a time across every node on this database. The lock ends with the transaction,
/// which is rolled back (nothing was written), also when `work` fails, or when the caller's
/// future is dropped mid-way (tokio-postgres sends the ROLLBACK before the connection's next
/// use). Waiting for the lock is bounded by `wait` (`lock_timeout`). Three round trips besides
/// `work`: BEGIN, the lock, ROLLBACK.
pub(super) async fn with_advisory_lock<R, E, Fut>(
    pool: &Pool,
    (namespace, key): (i32, i32),
    wait: Duration,
    work: Fut,
) -> Result<R, E>
where
    Fut: std::future::Future<Output = Result<R, E>>,
    E: From<DbError>,
{
    let mut client =
        pool.get().await.map_err(|error| DbError::Connect(format!("no database connection: {}", describe(&error))))?;
    let transaction = client.transaction().await.map_err(DbError::from)?;
    // Numbers only in this text: nothing a caller passes can change the statement.
    let lock = format!(
        "SET LOCAL lock_timeout = '{}ms'; SELECT pg_advisory_xact_lock({namespace}, {key})",
        wait.as_millis().max(1)
    );
    transaction.batch_execute(&lock).await.map_err(DbError::from)?;
    let outcome = work.await;
    transaction.rollback().await.map_err(DbError::from)?;
    outcome
}

pub struct Connection<'a> {
    client: &'a mut tokio_postgres::Client,
    runtime: Handle,
}

impl Connection<'_> {
    pub(super) fn transaction(&mut self) -> Result<Transaction<'_>, DbError> {
        let transaction = self.runtime.block_on(self.client.transaction())?;
        Ok(Transaction { transaction, runtime: self.runtime.clone() })
    }

    pub(super) fn executor(&self) -> Executor<'_> {
        Executor { client: Client::Plain(self.client), runtime: &self.runtime }
    }
}

pub struct Transaction<'a> {
    transaction: tokio_postgres::Transaction<'a>,
    runtime: Handle,
}

impl Transaction<'_> {
    pub(super) fn commit(self) -> Result<(), DbError> {
        Ok(self.runtime.block_on(self.transaction.commit())?)
    }

    pub(super) fn executor(&self) -> Executor<'_> {
        Executor { client: Client::Transaction(&self.transaction), runtime: &self.runtime }
    }
}

enum Client<'a> {
    Plain(&'a tokio_postgres::Client),
    Transaction(&'a tokio_postgres::Transaction<'a>),
}

#[doc(hidden)]
pub struct Executor<'a> {
    client: Client<'a>,
    runtime: &'a Handle,
}

/// `?1` (SQLite's numbered parameter) as `$1`.
fn dollar_placeholders(sql: &str) -> String {
    let mut translated = String::with_capacity(sql.len());
    let mut characters = sql.chars().peekable();
    while let Some(character) = characters.next() {
        if character == '?' && characters.peek().is_some_and(char::is_ascii_digit) {
            translated.push('$');
        } else {
            translated.push(character);
        }
    }
    translated
}

impl Executor<'_> {
    pub(super) fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let sql = dollar_placeholders(sql);
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|value| value as &(dyn ToSql + Sync)).collect();
        Ok(match &self.client {
            Client::Plain(client) => self.runtime.block_on(client.execute(&sql, &params))?,
            Client::Transaction(transaction) => self.runtime.block_on(transaction.execute(&sql, &params))?,
        })
    }

    pub(super) fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let sql = dollar_placeholders(sql);
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|value| value as &(dyn ToSql + Sync)).collect();
        let rows = match &self.client {
            Client::Plain(client) => self.runtime.block_on(client.query(&sql, &params))?,
            Client::Transaction(transaction) => self.runtime.block_on(transaction.query(&sql, &params))?,
        };
        rows.iter()
            .map(|row| (0..row.len()).map(|index| row.try_get::<_, Value>(index)).collect::<Result<Vec<_>, _>>())
            .map(|values| values.map(Row).map_err(DbError::from))
            .collect()
    }

    pub(super) fn batch(&self, sql: &str) -> Result<(), DbError> {
        match &self.client {
            Client::Plain(client) => self.runtime.block_on(client.batch_execute(sql))?,
            Client::Transaction(transaction) => self.runtime.block_on(transaction.batch_execute(sql))?,
        }
        Ok(())
    }
}

type BoxError = Box<dyn StdError + Sync + Send>;

/// Integers go out as the parameter's type (every integer column is BIGINT; `LIMIT` too).
impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(int) => match *ty {
                Type::INT8 => int.to_sql(ty, out),
                Type::INT4 => i32::try_from(*int)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*int)?.to_sql(ty, out),
                Type::BOOL => (*int != 0).to_sql(ty, out),
                _ => Err(format!("an integer cannot be sent as {ty}").into()),
            },
            Value::Text(text) => text.as_str().to_sql(ty, out),
            Value::Blob(blob) => blob.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i64::from(i32::from_sql(ty, raw)?)),
            Type::INT2 => Value::Int(i64::from(i16::from_sql(ty, raw)?)),
            Type::BOOL => Value::Int(i64::from(bool::from_sql(ty, raw)?)),
            Type::BYTEA => Value::Blob(Vec::<u8>::from_sql(ty, raw)?),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => Value::Text(String::from_sql(ty, raw)?),
            _ => return Err(format!("a column of type {ty} is not read by this server").into()),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(Value::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_become_dollars_and_passwords_are_hidden() {
        assert_eq!(dollar_placeholders("SELECT ?1, ?12 WHERE a = '?'"), "SELECT $1, $12 WHERE a = '?'");
        assert_eq!(
            redact_url("postgres://lockstep:s3cret@db:5432/lockstep"),
            "postgres://lockstep:***@db:5432/lockstep"
        );
        assert_eq!(redact_url("postgres://db/lockstep"), "postgres://db/lockstep");
    }
}
