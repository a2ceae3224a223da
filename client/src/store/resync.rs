//! Rebuilding from the log start without destroying anything.
//!
//! A Resync (history expired, or the log lost changes and the device repairs)
//! keeps every record: it clears only the mirror (what the device knows the
//! log holds) and moves the cursor to the log start. The device merges what
//! the log still has (merge is a join: replaying is safe) and, once caught up,
//! queues its full state of every record the log turned out to lack, so the
//! log gets back what it lost. A persisted marker makes a crash in the middle
//! resume the repair at the next sync.

use serde::{Deserialize, Serialize};

use super::{OP_DELETE, OP_UPSERT, Result, Store, from_json, get_meta, load_record, now_ms, outbox, set_meta};

/// Why the device rebuilds from the log start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResyncReason {
    /// The device's position expired from the log (retention).
    HistoryExpired,
    /// The server's log lost changes it had acknowledged (DATA_LOSS, repair).
    LogLost,
    /// The device's cursor is past the log end: the log is not the one it synced with.
    CursorPastLogEnd,
    /// A server that does not say why.
    Unspecified,
}

impl ResyncReason {
    pub fn describe(self) -> &'static str {
        match self {
            ResyncReason::HistoryExpired => "the server's history no longer reaches this device's position",
            ResyncReason::LogLost => "the server's log lost changes",
            ResyncReason::CursorPastLogEnd => "this device's position is past the end of the server's log",
            ResyncReason::Unspecified => "the server asked for a resync",
        }
    }
}

/// A rebuild in progress (`completed_at_ms` is `None`) or the last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncState {
    pub reason: ResyncReason,
    /// Where the rebuild started; `None` while the device waits for the
    /// server's Resync (it asked to repair).
    pub log_start: Option<i64>,
    pub started_at_ms: i64,
    pub completed_at_ms: Option<i64>,
    /// Records this device pushed again because the log lacked them.
    pub repushed: Option<u64>,
}

const PENDING: &str = "resync_pending";
const LAST: &str = "resync_last";

fn read(conn: &rusqlite::Connection, key: &str) -> Result<Option<ResyncState>> {
    get_meta(conn, key)?
        .map(|text| serde_json::from_str(&text).map_err(|error| super::StoreError::Corrupt(format!("{key}: {error}"))))
        .transpose()
}

fn write(conn: &rusqlite::Connection, key: &str, state: &ResyncState) -> Result<()> {
    set_meta(conn, key, &serde_json::to_string(state).expect("a resync state serializes"))
}

impl Store {
    pub fn pending_resync(&self) -> Result<Option<ResyncState>> {
        read(&self.conn, PENDING)
    }

    pub fn last_resync(&self) -> Result<Option<ResyncState>> {
        read(&self.conn, LAST)
    }

    /// The device must rebuild but the server has not said from where yet
    /// (DATA_LOSS, or a cursor past the log end): it subscribes with
    /// `repair = true` until the server's Resync arrives, across crashes too.
    pub fn request_repair(&mut self, reason: ResyncReason) -> Result<ResyncState> {
        let state = match self.pending_resync()? {
            Some(pending) => ResyncState { reason, log_start: None, ..pending },
            None => {
                ResyncState { reason, log_start: None, started_at_ms: now_ms(), completed_at_ms: None, repushed: None }
            }
        };
        write(&self.conn, PENDING, &state)?;
        Ok(state)
    }

    /// Starts (or restarts) a rebuild at `log_start`: the mirror goes, every
    /// record stays, the cursor moves to the log start.
    pub fn begin_resync(&mut self, reason: ResyncReason, log_start: i64) -> Result<ResyncState> {
        let tx = self.conn.transaction()?;
        let pending = read(&tx, PENDING)?;
        // An older server gives no reason: keep the one the device already knew.
        let reason = match (&pending, reason) {
            (Some(pending), ResyncReason::Unspecified) => pending.reason,
            _ => reason,
        };
        let state = ResyncState {
            reason,
            log_start: Some(log_start),
            started_at_ms: pending.map_or_else(now_ms, |pending| pending.started_at_ms),
            completed_at_ms: None,
            repushed: None,
        };
        tx.execute("DELETE FROM mirror", [])?;
        set_meta(&tx, "cursor", &log_start.to_string())?;
        write(&tx, PENDING, &state)?;
        let resyncs: i64 = get_meta(&tx, "resyncs")?.and_then(|value| value.parse().ok()).unwrap_or(0);
        set_meta(&tx, "resyncs", &(resyncs + 1).to_string())?;
        tx.commit()?;
        Ok(state)
    }

    /// Caught up after a rebuild: queues this device's whole state of every
    /// record the log lacks (the mirror, merged with what the outbox already
    /// carries, is not at least the record's state), then clears the marker.
    /// `None` when no rebuild is under way.
    pub fn finish_resync(&mut self) -> Result<Option<ResyncState>> {
        let Some(pending) = self.pending_resync()? else { return Ok(None) };
        if pending.log_start.is_none() {
            return Ok(None);
        }
        let tx = self.conn.transaction()?;
        let records: Vec<(String, String, String)> = {
            let mut statement = tx.prepare("SELECT record_id, collection, state FROM records ORDER BY record_id")?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut repushed = 0u64;
        {
            let mut queued = tx.prepare_cached("SELECT state FROM outbox WHERE record_id = ?1 AND rejected IS NULL")?;
            for (record_id, collection, state) in records {
                let state = from_json(&state)?;
                let mut covered = load_record(&tx, "mirror", &record_id)?.map(|(_, state)| state).unwrap_or_default();
                let pending_states = queued.query_map([&record_id], |row| row.get::<_, String>(0))?;
                for pending_state in pending_states {
                    covered.merge(&from_json(&pending_state?)?);
                }
                if !covered.merge(&state) {
                    continue;
                }
                let hlc = state.max_hlc();
                if hlc == 0 {
                    continue;
                }
                let op = if state.is_deleted() { OP_DELETE } else { OP_UPSERT };
                outbox::queue(&tx, &record_id, &collection, op, hlc, &state)?;
                repushed += 1;
            }
        }
        let done = ResyncState { completed_at_ms: Some(now_ms()), repushed: Some(repushed), ..pending };
        write(&tx, LAST, &done)?;
        tx.execute("DELETE FROM meta WHERE key = ?1", [PENDING])?;
        tx.commit()?;
        Ok(Some(done))
    }
}
