//! The push deduplication index: which (device, change id) is at which
//! offset, so that a retried change is answered with its first offset
//! instead of being appended again — also after a restart or a crash.
//!
//! Kafka is the truth; this index trails it. Each user row remembers the
//! offset below which every change is indexed. A push that cannot prove its
//! records were the next ones (a failure, a gap) leaves that mark alone, and
//! the next push first re-reads the topic from the mark (`Gateway::reindex`).

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

#[derive(Clone)]
pub struct DedupIndex {
    db: Db,
}

impl DedupIndex {
    pub fn new(db: Db) -> Self {
        Self { db }
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

    /// Stores entries (ignoring ones already there) and, when `advance` is
    /// `Some((from, to))`, moves the user's mark from `from` to `to` — only if
    /// it still is at `from`.
    pub async fn record(
        &self,
        user_id: &str,
        entries: Vec<IndexEntry>,
        advance: Option<(i64, i64)>,
    ) -> Result<(), DbError> {
        let user = user_id.to_string();
        self.db
            .call(move |connection| {
                let transaction = connection.transaction()?;
                {
                    let mut insert = transaction.prepare_cached(
                        "INSERT OR IGNORE INTO pushed_changes (user_id, device_id, change_id, kafka_offset, digest) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?;
                    for entry in &entries {
                        insert.execute(params![user, entry.device_id, entry.change_id, entry.offset, entry.digest.as_slice()])?;
                    }
                    // Kafka acknowledged these offsets: the log must never end below them (log_guard).
                    if let Some(end) = entries.iter().map(|entry| entry.offset + 1).max() {
                        transaction.execute(
                            "UPDATE users SET log_high_mark = MAX(log_high_mark, ?2) WHERE user_id = ?1",
                            params![user, end],
                        )?;
                    }
                    if let Some((from, to)) = advance {
                        transaction.execute(
                            "UPDATE users SET dedup_indexed_through = ?3 WHERE user_id = ?1 AND dedup_indexed_through = ?2",
                            params![user, from, to],
                        )?;
                    }
                }
                transaction.commit()?;
                Ok(())
            })
            .await
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
