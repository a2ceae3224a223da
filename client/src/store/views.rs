//! What the store shows about itself: problems, orphans, status, digest.

use super::{Orphan, Problem, Result, Status, Store, get_meta};
use crate::record::UNFILED;

impl Store {
    pub fn problems(&self) -> Result<Vec<Problem>> {
        let mut statement = self.conn.prepare(
            "SELECT offset, record_id, collection, origin_device_id, kind, detail, seen_at_ms FROM problems ORDER BY offset",
        )?;
        let rows = statement.query_map([], |row| {
            Ok(Problem {
                offset: row.get(0)?,
                record_id: row.get(1)?,
                collection: row.get(2)?,
                origin_device_id: row.get(3)?,
                kind: row.get(4)?,
                detail: row.get(5)?,
                seen_at_ms: row.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Live records whose parent is deleted or unknown here.
    pub fn orphans(&self) -> Result<Vec<Orphan>> {
        let mut orphans = Vec::new();
        for record in self.list(None, false)? {
            let Some(parent) = record.state.parent() else { continue };
            if parent == UNFILED {
                continue;
            }
            let parent_is = match self.get(parent)? {
                Some(parent) if parent.state.is_live() => continue,
                Some(_) => "deleted",
                None => "missing",
            };
            orphans.push(Orphan {
                record_id: record.record_id.clone(),
                collection: record.collection.clone(),
                parent: parent.to_string(),
                parent_is,
            });
        }
        Ok(orphans)
    }

    pub fn status(&self) -> Result<Status> {
        let account = self.account()?;
        let count = |sql: &str| -> Result<i64> { Ok(self.conn.query_row(sql, [], |row| row.get(0))?) };
        let number = |key: &str| -> Result<Option<i64>> { Ok(get_meta(&self.conn, key)?.and_then(|v| v.parse().ok())) };
        let mut live = 0;
        let mut deleted = 0;
        for record in self.list(None, true)? {
            if record.state.is_live() {
                live += 1;
            } else if record.state.is_deleted() {
                deleted += 1;
            }
        }
        let cursor = self.cursor()?;
        let log_end_seen = number("log_end_seen")?;
        Ok(Status {
            user_id: account.user_id,
            device_id: account.device_id,
            device_name: account.device_name,
            server: account.server,
            cursor,
            log_end_seen,
            lag_at_last_sync: log_end_seen.map(|end| (end - cursor.unwrap_or(0)).max(0)),
            outbox: self.outbox_len()?,
            outbox_rejected: count("SELECT count(*) FROM outbox WHERE rejected IS NOT NULL")?,
            records: live,
            deleted_records: deleted,
            problems: count("SELECT count(*) FROM problems")?,
            deferred: count("SELECT count(*) FROM deferred")?,
            last_sync_ms: number("last_sync_ms")?,
            resyncs: number("resyncs")?.unwrap_or(0),
            resync: match self.pending_resync()? {
                Some(pending) => Some(pending),
                None => self.last_resync()?,
            },
            server_problem: get_meta(&self.conn, "server_problem")?,
            key_epoch: account.key_epoch,
            server_key_epoch: self.server_key_epoch()?,
            revoked_devices: count("SELECT count(*) FROM revoked_devices")?,
            protected: self.is_protected(),
        })
    }

    /// A content digest of the visible records (ids, collections, fields), equal
    /// on every device that holds the same data.
    pub fn digest(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for record in self.list(None, false)? {
            let visible = serde_json::to_string(&record.state.visible()).expect("json values serialize");
            hash.update(format!("{}\0{}\0{}\n", record.record_id, record.collection, visible));
        }
        Ok(hex::encode(hash.finalize()))
    }
}
