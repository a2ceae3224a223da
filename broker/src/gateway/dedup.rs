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

use std::collections::HashMap;

use lockstep_proto::v1::Change;
use lockstep_schemas::ChangeEnvelope;
use rusqlite::params;
use sha2::{Digest as _, Sha256};

use crate::db::{Db, DbError};

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

pub fn digest_of_envelope(envelope: &ChangeEnvelope) -> Digest {
    let op = lockstep_proto::v1::Op::from(envelope.op.clone());
    digest(
        &envelope.record_id,
        &envelope.collection,
        op as i32,
        envelope.hlc,
        envelope.key_epoch,
        &envelope.nonce,
        &envelope.ciphertext,
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
}

type Committed = tokio::sync::oneshot::Sender<Result<(), WriteFailed>>;

#[derive(Clone)]
pub struct DedupIndex {
    db: Db,
    writes: tokio::sync::mpsc::Sender<(Write, Committed)>,
}

impl DedupIndex {
    /// Starts the writer task: call within the runtime.
    pub fn new(db: Db) -> Self {
        let (writes, queue) = tokio::sync::mpsc::channel(WRITE_QUEUE);
        tokio::spawn(commit_in_groups(db.clone(), queue));
        Self { db, writes }
    }

    /// The offsets and digests of those of `change_ids` already written by the device.
    pub async fn lookup(
        &self,
        user_id: &str,
        device_id: &str,
        change_ids: Vec<String>,
    ) -> Result<HashMap<String, (i64, Digest)>, DbError> {
        let (user, device) = (user_id.to_string(), device_id.to_string());
        self.db
            .call(move |connection| {
                let mut statement = connection.prepare_cached(
                    "SELECT kafka_offset, digest FROM pushed_changes WHERE user_id = ?1 AND device_id = ?2 AND change_id = ?3",
                )?;
                let mut found = HashMap::new();
                for change_id in change_ids {
                    let mut rows = statement.query(params![user, device, change_id])?;
                    if let Some(row) = rows.next()? {
                        let offset: i64 = row.get(0)?;
                        let stored: Vec<u8> = row.get(1)?;
                        let mut digest = [0u8; 16];
                        if stored.len() == 16 {
                            digest.copy_from_slice(&stored);
                        }
                        found.insert(change_id, (offset, digest));
                    }
                }
                Ok(found)
            })
            .await
    }

    pub async fn indexed_through(&self, user_id: &str) -> Result<i64, DbError> {
        let user = user_id.to_string();
        self.db
            .call(move |connection| {
                Ok(connection
                    .query_row("SELECT dedup_indexed_through FROM users WHERE user_id = ?1", [user], |row| row.get(0))
                    .unwrap_or(0))
            })
            .await
    }

    /// Queues entries (ignoring ones already there) and, when `advance` is
    /// `Some((from, to))`, a move of the user's mark from `from` to `to` — only
    /// if it still is at `from`. Returns once queued, which fixes the order of
    /// this write among all others; the returned future ends when it is committed.
    pub async fn submit(
        &self,
        user_id: &str,
        entries: Vec<IndexEntry>,
        advance: Option<(i64, i64)>,
    ) -> impl std::future::Future<Output = Result<(), WriteFailed>> + Send + 'static {
        let (committed, outcome) = tokio::sync::oneshot::channel();
        let write = Write { user_id: user_id.to_string(), entries, advance };
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
        self.db
            .call(move |connection| {
                connection.execute(
                    "UPDATE users SET dedup_indexed_through = MAX(dedup_indexed_through, ?2) WHERE user_id = ?1",
                    params![user, through],
                )?;
                Ok(())
            })
            .await
    }
}

/// The writer: takes every write queued meanwhile (up to [`MAX_GROUP`]) and
/// commits them in one transaction, in order; each learns the outcome.
async fn commit_in_groups(db: Db, mut queue: tokio::sync::mpsc::Receiver<(Write, Committed)>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
        let (writes, waiting): (Vec<Write>, Vec<Committed>) = group.drain(..).unzip();
        let outcome = db
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

fn write_group(connection: &mut rusqlite::Connection, writes: &[Write]) -> Result<(), DbError> {
    let transaction = connection.transaction()?;
    {
        let mut insert = transaction.prepare_cached(
            "INSERT OR IGNORE INTO pushed_changes (user_id, device_id, change_id, kafka_offset, digest) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut high_mark =
            transaction.prepare_cached("UPDATE users SET log_high_mark = MAX(log_high_mark, ?2) WHERE user_id = ?1")?;
        let mut advance = transaction.prepare_cached(
            "UPDATE users SET dedup_indexed_through = ?3 WHERE user_id = ?1 AND dedup_indexed_through = ?2",
        )?;
        for Write { user_id, entries, advance: moved } in writes {
            for entry in entries {
                insert.execute(params![
                    user_id,
                    entry.device_id,
                    entry.change_id,
                    entry.offset,
                    entry.digest.as_slice()
                ])?;
            }
            // Kafka acknowledged these offsets: the log must never end below them (log_guard).
            if let Some(end) = entries.iter().map(|entry| entry.offset + 1).max() {
                high_mark.execute(params![user_id, end])?;
            }
            if let Some((from, to)) = moved {
                advance.execute(params![user_id, from, to])?;
            }
        }
    }
    transaction.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        (DedupIndex::new(db.clone()), db, dir)
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
}
