//! The push deduplication index: which (device, change id) is at which
//! offset, so that a retried change is answered with its first offset
//! instead of being appended again — also after a restart or a crash.
//!
//! Kafka is the truth; this index trails it. Each user row remembers the
//! offset below which every change is indexed. A push that cannot prove its
//! records were the next ones (a failure, a gap) leaves that mark alone, and
//! the next push first re-reads the topic from the mark (`Gateway::reindex`).
//!
//! A push's index entries are written behind it ([`DedupIndex::submit`]): one
//! writer task commits every entry submitted meanwhile, by any user's pushes, in
//! one transaction, in submission order. A user's next push need not wait for the
//! commit, only for the submission; a change stays "in flight" (gateway) until its
//! entry is committed, so a retry never misses it.
//!
//! The index is in the store's database: the data directory's SQLite with one node (the same
//! file, connection and group commit as ever), PostgreSQL when several nodes share it
//! (`database.url`), where every node sees every entry and mark. What a node keeps in memory
//! (in flight, in doubt) covers its own attempts only; across nodes, `reservation` does.
//!
//! The index belongs to one log generation (`users.dedup_generation`): after a loss
//! (`log_guard`) the first push to see the new generation, on any node, drops the entries and
//! re-reads the log ([`DedupIndex::reset_for_generation`]).

use std::{collections::HashMap, sync::Arc, time::Duration};

use lockstep_proto::v1::Change;
use sha2::{Digest as _, Sha256};

use super::reservation::Reservations;
use crate::{
    db::DbError,
    store::{Conn, Sql, Store, Value},
    values,
};

/// A fingerprint of a change's content, to tell a retry from a reused id.
pub type Digest = [u8; 16];

#[allow(clippy::too_many_arguments)]
fn digest(
    record_id: &str,
    collection: &str,
    op: i32,
    hlc: i64,
    key_epoch: u32,
    nonce: &[u8],
    ciphertext: &[u8],
) -> Digest {
    let mut hasher = Sha256::new();
    for part in [record_id.as_bytes(), collection.as_bytes()] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.update(op.to_le_bytes());
    hasher.update(hlc.to_le_bytes());
    hasher.update(key_epoch.to_le_bytes());
    for part in [nonce, ciphertext] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let full = hasher.finalize();
    let mut short = [0u8; 16];
    short.copy_from_slice(&full[..16]);
    short
}

pub fn digest_of_change(change: &Change) -> Digest {
    digest(
        &change.record_id,
        &change.collection,
        change.op,
        change.hlc as i64,
        change.key_epoch,
        &change.nonce,
        &change.ciphertext,
    )
}

#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub device_id: String,
    pub change_id: String,
    pub offset: i64,
    pub digest: Digest,
}

/// Pushes' writes waiting for the writer; a push submitting past this waits.
const WRITE_QUEUE: usize = 1024;
/// The most writes committed in one transaction.
const MAX_GROUP: usize = 256;

/// Why submitted entries were not committed (every write of the group shares it).
#[derive(Debug, Clone, thiserror::Error)]
#[error("dedup index write: {0}")]
pub struct WriteFailed(String);

/// One push's entries and mark move ([`DedupIndex::record`]'s arguments).
struct Write {
    user_id: String,
    entries: Vec<IndexEntry>,
    advance: Option<(i64, i64)>,
    /// The holder whose reservations of these entries' changes are done with (several nodes).
    release_for: Option<Arc<str>>,
}

type Committed = tokio::sync::oneshot::Sender<Result<(), WriteFailed>>;

/// Where the index lives: the store's database (SQLite in the data directory with one node,
/// PostgreSQL shared by every node with `database.url`); see `store` and `reservation`.
#[derive(Clone)]
pub struct DedupIndex {
    store: Store,
    writes: tokio::sync::mpsc::Sender<(Write, Committed)>,
    /// Set when several nodes share the store: changes are reserved before they are produced.
    reservations: Option<Reservations>,
}

impl DedupIndex {
    /// Starts the writer task: call within the runtime.
    pub fn new(store: Store) -> Self {
        let (writes, queue) = tokio::sync::mpsc::channel(WRITE_QUEUE);
        tokio::spawn(commit_in_groups(store.clone(), queue));
        Self { store, writes, reservations: None }
    }

    /// Reserves each change in the store before producing it, as `holder`, for `lease`
    /// (see `reservation`): for several nodes on one store.
    pub fn with_reservations(mut self, holder: &str, lease: Duration) -> Self {
        self.reservations = Some(Reservations::new(self.store.clone(), holder, lease));
        self
    }

    pub fn reservations(&self) -> Option<&Reservations> {
        self.reservations.as_ref()
    }

    /// The offsets and digests of those of `change_ids` already written by the device.
    pub async fn lookup(
        &self,
        user_id: &str,
        device_id: &str,
        change_ids: Vec<String>,
    ) -> Result<HashMap<String, (i64, Digest)>, DbError> {
        let (user, device) = (user_id.to_string(), device_id.to_string());
        // Read beside the writer: a push makes this lookup under its user's lock.
        self.store
            .read(move |connection| lookup_many(connection, &user, &device, change_ids.iter().map(String::as_str)))
            .await
    }

    pub async fn indexed_through(&self, user_id: &str) -> Result<i64, DbError> {
        Ok(self.mark(user_id).await?.0)
    }

    /// The user's mark (every offset below it is indexed) and the log generation the index
    /// belongs to.
    pub async fn mark(&self, user_id: &str) -> Result<(i64, i64), DbError> {
        let user = user_id.to_string();
        self.store
            .read(move |connection| {
                connection
                    .query_opt(
                        "SELECT dedup_indexed_through, dedup_generation FROM users WHERE user_id = ?1",
                        values![user],
                    )?
                    .map_or(Ok((0, 0)), |row| Ok((row.get(0)?, row.get(1)?)))
            })
            .await
    }

    /// The log lost changes (`log_guard`): the index's offsets point into the old log. Drops the
    /// user's entries and sets the mark to `log_start`, once per generation whichever node sees
    /// it first. Returns whether this call reset it.
    pub async fn reset_for_generation(&self, user_id: &str, generation: i64, log_start: i64) -> Result<bool, DbError> {
        let user = user_id.to_string();
        self.store
            .call(move |connection| {
                let transaction = connection.transaction()?;
                let reset = transaction.execute(
                    "UPDATE users SET dedup_generation = ?2, dedup_indexed_through = ?3
                     WHERE user_id = ?1 AND dedup_generation < ?2",
                    values![&user, generation, log_start],
                )? > 0;
                if reset {
                    transaction.execute("DELETE FROM pushed_changes WHERE user_id = ?1", values![&user])?;
                }
                transaction.commit()?;
                Ok(reset)
            })
            .await
    }

    /// Queues entries (ignoring ones already there) and, when `advance` is
    /// `Some((from, to))`, a move of the user's mark from `from` to `to` — only
    /// if it still is at `from`. Returns once queued, which fixes the order of
    /// this write among all others; the returned future ends when it is committed.
    /// With reservations, the entries' reservations held by this node go in the same
    /// transaction: a change is never unreserved before it is indexed.
    pub async fn submit(
        &self,
        user_id: &str,
        entries: Vec<IndexEntry>,
        advance: Option<(i64, i64)>,
    ) -> impl std::future::Future<Output = Result<(), WriteFailed>> + Send + 'static {
        let (committed, outcome) = tokio::sync::oneshot::channel();
        let release_for = self.reservations.as_ref().map(|reservations| reservations.holder().clone());
        let write = Write { user_id: user_id.to_string(), entries, advance, release_for };
        let queued = self.writes.send((write, committed)).await.is_ok();
        async move {
            if !queued {
                return Err(WriteFailed("the writer has stopped".into()));
            }
            outcome.await.unwrap_or_else(|_| Err(WriteFailed("the writer stopped before committing".into())))
        }
    }

    /// [`Self::submit`], waiting for the commit.
    pub async fn record(
        &self,
        user_id: &str,
        entries: Vec<IndexEntry>,
        advance: Option<(i64, i64)>,
    ) -> Result<(), WriteFailed> {
        self.submit(user_id, entries, advance).await.await
    }

    pub async fn set_indexed_through(&self, user_id: &str, through: i64) -> Result<(), DbError> {
        let user = user_id.to_string();
        self.store
            .call(move |connection| {
                connection.execute(
                    "UPDATE users SET dedup_indexed_through =
                     CASE WHEN dedup_indexed_through > ?2 THEN dedup_indexed_through ELSE ?2 END
                     WHERE user_id = ?1",
                    values![user, through],
                )?;
                Ok(())
            })
            .await
    }
}

/// The (offset, digest) the index holds for one change, if any.
pub(super) fn lookup_one(
    connection: &impl Sql,
    user_id: &str,
    device_id: &str,
    change_id: &str,
) -> Result<Option<(i64, Digest)>, DbError> {
    let Some(row) = connection.query_opt(
        "SELECT kafka_offset, digest FROM pushed_changes WHERE user_id = ?1 AND device_id = ?2 AND change_id = ?3",
        values![user_id, device_id, change_id],
    )?
    else {
        return Ok(None);
    };
    Ok(Some((row.get(0)?, digest_from(&row.get::<Vec<u8>>(1)?))))
}

/// The (offset, digest) the index holds for those of `change_ids` it has: one statement per
/// [`ROWS_PER_STATEMENT`] ids.
pub(super) fn lookup_many<'a>(
    connection: &impl Sql,
    user_id: &str,
    device_id: &str,
    change_ids: impl IntoIterator<Item = &'a str>,
) -> Result<HashMap<String, (i64, Digest)>, DbError> {
    let change_ids: Vec<&str> = change_ids.into_iter().collect();
    let mut found = HashMap::with_capacity(change_ids.len());
    for chunk in change_ids.chunks(ROWS_PER_STATEMENT) {
        let mut params = vec![Value::from(user_id), Value::from(device_id)];
        let mut places = Vec::with_capacity(chunk.len());
        for change_id in chunk {
            params.push(Value::from(*change_id));
            places.push(format!("?{}", params.len()));
        }
        let sql = format!(
            "SELECT change_id, kafka_offset, digest FROM pushed_changes
             WHERE user_id = ?1 AND device_id = ?2 AND change_id IN ({})",
            places.join(", ")
        );
        for row in connection.query(&sql, &params)? {
            found.insert(row.get::<String>(0)?, (row.get::<i64>(1)?, digest_from(&row.get::<Vec<u8>>(2)?)));
        }
    }
    Ok(found)
}

/// A stored digest (16 bytes; anything else matches no change).
pub(super) fn digest_from(stored: &[u8]) -> Digest {
    let mut digest = [0u8; 16];
    if stored.len() == 16 {
        digest.copy_from_slice(stored);
    }
    digest
}

/// The writer: takes every write queued meanwhile (up to [`MAX_GROUP`]) and
/// commits them in one transaction, in order; each learns the outcome.
async fn commit_in_groups(store: Store, mut queue: tokio::sync::mpsc::Receiver<(Write, Committed)>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
        let (writes, waiting): (Vec<Write>, Vec<Committed>) = group.drain(..).unzip();
        let outcome = store
            .call(move |connection| write_group(connection, &writes))
            .await
            .map_err(|error| WriteFailed(error.to_string()));
        metrics::histogram!(crate::admin::DEDUP_GROUP_WRITES).record(waiting.len() as f64);
        for committed in waiting {
            // A push that went away no longer waits: nothing to tell it.
            let _ = committed.send(outcome.clone());
        }
    }
}

fn write_group(connection: &mut Conn<'_>, writes: &[Write]) -> Result<(), DbError> {
    let transaction = connection.transaction()?;
    // One user's writes keep their order; users go in one order, so that two nodes' groups in
    // PostgreSQL take the rows of the users they share in the same order (no deadlock).
    let mut by_user: Vec<&Write> = writes.iter().collect();
    by_user.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    for user_writes in by_user.chunk_by(|a, b| a.user_id == b.user_id) {
        let user_id = &user_writes[0].user_id;
        // A user's entries in a few multi-row statements, whichever write they came with (an
        // entry's insert does not depend on the mark): a round trip per chunk, not two per entry.
        let entries: Vec<(&IndexEntry, Option<&str>)> = user_writes
            .iter()
            .flat_map(|write| write.entries.iter().map(|entry| (entry, write.release_for.as_deref())))
            .collect();
        for chunk in entries.chunks(ROWS_PER_STATEMENT) {
            insert_entries(&transaction, user_id, chunk)?;
            release_reservations(&transaction, user_id, chunk)?;
        }
        // Kafka acknowledged these offsets: the log must never end below them (log_guard).
        if let Some(end) = entries.iter().map(|(entry, _)| entry.offset + 1).max() {
            transaction.execute(
                "UPDATE users SET log_high_mark = CASE WHEN log_high_mark > ?2 THEN log_high_mark ELSE ?2 END
                 WHERE user_id = ?1",
                values![user_id, end],
            )?;
        }
        // The marks move in the writes' order: each only from where the one before left it.
        for (from, to) in user_writes.iter().filter_map(|write| write.advance) {
            transaction.execute(
                "UPDATE users SET dedup_indexed_through = ?3 WHERE user_id = ?1 AND dedup_indexed_through = ?2",
                values![user_id, from, to],
            )?;
        }
    }
    transaction.commit()
}

/// Rows per multi-row statement of the writer (5 parameters each: far below either engine's
/// limit on parameters).
const ROWS_PER_STATEMENT: usize = 200;

/// The entries of `user_id` (ignoring ones already there), in one statement.
fn insert_entries(
    transaction: &impl Sql,
    user_id: &str,
    entries: &[(&IndexEntry, Option<&str>)],
) -> Result<(), DbError> {
    let mut params = vec![Value::from(user_id)];
    let mut rows = Vec::with_capacity(entries.len());
    for (entry, _) in entries {
        let at = params.len() + 1;
        rows.push(format!("(?1, ?{at}, ?{}, ?{}, ?{})", at + 1, at + 2, at + 3));
        params.push(Value::from(entry.device_id.as_str()));
        params.push(Value::from(entry.change_id.as_str()));
        params.push(Value::from(entry.offset));
        params.push(Value::from(entry.digest.as_slice()));
    }
    transaction.execute(
        &format!(
            "INSERT INTO pushed_changes (user_id, device_id, change_id, kafka_offset, digest) VALUES {}
             ON CONFLICT DO NOTHING",
            rows.join(", ")
        ),
        &params,
    )?;
    Ok(())
}

/// Drops the reservations of the entries that came with one (several nodes), each only if its
/// holder still holds it: in the transaction that indexes them, so a change is never unreserved
/// before it is indexed.
fn release_reservations(
    transaction: &impl Sql,
    user_id: &str,
    entries: &[(&IndexEntry, Option<&str>)],
) -> Result<(), DbError> {
    let mut params = vec![Value::from(user_id)];
    let mut rows = Vec::new();
    for (entry, holder) in entries {
        let Some(holder) = holder else { continue };
        let at = params.len() + 1;
        rows.push(format!("(device_id = ?{at} AND change_id = ?{} AND holder = ?{})", at + 1, at + 2));
        params.push(Value::from(entry.device_id.as_str()));
        params.push(Value::from(entry.change_id.as_str()));
        params.push(Value::from(*holder));
    }
    if rows.is_empty() {
        return Ok(());
    }
    transaction
        .execute(&format!("DELETE FROM push_reservations WHERE user_id = ?1 AND ({})", rows.join(" OR ")), &params)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{both_backends, db::Db, store::testing::TestStore};

    fn entry(change_id: &str, offset: i64) -> IndexEntry {
        IndexEntry { device_id: "d".into(), change_id: change_id.into(), offset, digest: [offset as u8; 16] }
    }

    async fn index_with_user() -> (DedupIndex, Db, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.call(|connection| {
            connection.execute("INSERT INTO users (user_id, created_at_ms) VALUES ('u', 0)", [])?;
            Ok(())
        })
        .await
        .unwrap();
        (DedupIndex::new(Store::sqlite(db.clone()).unwrap()), db, dir)
    }

    #[tokio::test]
    async fn writes_queued_while_one_commits_are_committed_together_in_order() {
        let (index, db, _dir) = index_with_user().await;
        // Hold the connection: the writer's first group waits, the rest queue behind it.
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let holding = {
            let db = db.clone();
            tokio::spawn(async move {
                db.call(move |_| {
                    held.recv().ok();
                    Ok(())
                })
                .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut committed = Vec::new();
        // Three pushes of one user, each moving the mark on from where the last left it.
        for (number, from) in [0_i64, 2, 4].into_iter().enumerate() {
            let entries = vec![entry(&format!("c{number}a"), from), entry(&format!("c{number}b"), from + 1)];
            committed.push(index.submit("u", entries, Some((from, from + 2))).await);
        }
        // A move from a mark that is not there is ignored (a push after a failed one).
        committed.push(index.submit("u", vec![entry("late", 9)], Some((7, 10))).await);
        hold.send(()).unwrap();
        holding.await.unwrap().unwrap();
        for outcome in futures::future::join_all(committed).await {
            outcome.unwrap();
        }
        assert_eq!(index.indexed_through("u").await.unwrap(), 6, "the mark followed the chain, not the stray move");
        let found =
            index.lookup("u", "d", vec!["c0a".into(), "c2b".into(), "late".into(), "never".into()]).await.unwrap();
        assert_eq!(found.get("c0a").map(|(offset, _)| *offset), Some(0));
        assert_eq!(found.get("c2b").map(|(offset, _)| *offset), Some(5));
        assert_eq!(found.get("late").map(|(offset, _)| *offset), Some(9), "entries are facts, kept without the move");
        assert!(!found.contains_key("never"));
        let high_mark: i64 = db
            .call(|connection| Ok(connection.query_row("SELECT log_high_mark FROM users", [], |row| row.get(0))?))
            .await
            .unwrap();
        assert_eq!(high_mark, 10, "what Kafka acknowledged is the log's floor");
    }

    #[tokio::test]
    async fn a_failed_group_fails_every_write_in_it() {
        let (index, db, _dir) = index_with_user().await;
        db.call(|connection| {
            connection.execute_batch("DROP TABLE pushed_changes")?;
            Ok(())
        })
        .await
        .unwrap();
        let first = index.submit("u", vec![entry("a", 0)], Some((0, 1))).await;
        let second = index.submit("u", vec![], Some((1, 2))).await;
        assert!(first.await.is_err());
        let _ = second.await;
        assert_eq!(index.indexed_through("u").await.unwrap(), 0, "a failed group moves no mark");
    }

    both_backends!(the_index_and_its_mark_are_in_the_store, |test: TestStore| async move {
        let store = test.store.clone();
        test.insert_user("u").await;
        let index = DedupIndex::new(store.clone());
        index.record("u", vec![entry("a", 0), entry("b", 1)], Some((0, 2))).await.unwrap();
        // A second copy of an entry (a re-read of the log) is ignored, not an error.
        index.record("u", vec![entry("a", 0)], None).await.unwrap();
        index.set_indexed_through("u", 1).await.unwrap();
        assert_eq!(index.mark("u").await.unwrap(), (2, 0), "the mark never goes back");
        let found = index.lookup("u", "d", vec!["a".into(), "b".into(), "c".into()]).await.unwrap();
        assert_eq!(found.get("b"), Some(&(1, [1u8; 16])));
        assert!(!found.contains_key("c"));
        // The log lost changes (generation 1, starting at 5 now): the index is dropped once.
        assert!(index.reset_for_generation("u", 1, 5).await.unwrap());
        assert!(!index.reset_for_generation("u", 1, 5).await.unwrap(), "another node already reset it");
        assert_eq!(index.mark("u").await.unwrap(), (5, 1));
        assert!(index.lookup("u", "d", vec!["a".into()]).await.unwrap().is_empty());
        // A node whose guard still has the old generation resets nothing.
        assert!(!index.reset_for_generation("u", 0, 0).await.unwrap());
    });
}
