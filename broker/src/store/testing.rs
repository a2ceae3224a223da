//! Stores for the broker's unit tests, one per backend: every test of the shared state runs
//! against SQLite and PostgreSQL (a server of its own, from the test kit's starter).

#[path = "../../../testkit/src/postgres.rs"]
#[allow(dead_code)]
mod postgres_server;

pub use postgres_server::Postgres;

use super::{Sql as _, Store};
use crate::db::Db;

/// A store and what must live as long as it (its directory, its PostgreSQL server).
pub struct TestStore {
    pub store: Store,
    pub dir: tempfile::TempDir,
    /// Kept running while the store lives.
    pub postgres: Option<std::sync::Arc<Postgres>>,
    pub url: Option<String>,
}

impl TestStore {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::sqlite(Db::open(dir.path()).unwrap()).unwrap();
        Self { store, dir, postgres: None, url: None }
    }

    pub async fn postgres() -> Self {
        let postgres = tokio::task::spawn_blocking(Postgres::start).await.unwrap().unwrap();
        let url = postgres.new_database().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::postgres(&url, (4, 2), Db::open(dir.path()).unwrap()).await.unwrap();
        Self { store, dir, postgres: Some(std::sync::Arc::new(postgres)), url: Some(url) }
    }

    /// A row for `user_id` in `users`, as an account's creation writes it (for tests of the
    /// per-user state: the dedup index, reservations).
    pub async fn insert_user(&self, user_id: &str) {
        let user_id = user_id.to_owned();
        self.store
            .call(move |connection| {
                connection
                    .execute("INSERT INTO users (user_id, created_at_ms) VALUES (?1, 0)", crate::values![&user_id])?;
                Ok(())
            })
            .await
            .unwrap();
    }

    /// The same database opened again (a restart).
    pub async fn reopen(&self) -> Store {
        match &self.url {
            None => Store::sqlite(Db::open(self.dir.path()).unwrap()).unwrap(),
            Some(url) => Store::postgres(url, (4, 2), Db::open(self.dir.path()).unwrap()).await.unwrap(),
        }
    }
}

/// Runs an async test body once per backend: `both_backends!(name, |store: TestStore| async { … })`
/// makes `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let store = $crate::store::testing::TestStore::sqlite().await;
                ($body)(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let store = $crate::store::testing::TestStore::postgres().await;
                // A body that uses only some fields of `store` drops the rest at once (closures
                // capture fields): the server lives until the body ends.
                let server = store.postgres.clone();
                ($body)(store).await;
                drop(server);
            }
        }
    };
}
