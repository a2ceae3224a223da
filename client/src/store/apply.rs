//! Applying what the server delivered: one batch, one transaction, the
//! cursor moved with it. A batch that skips offsets is refused whole; a change
//! that cannot apply yet waits in `deferred`; one that never will is a problem.

use rusqlite::{Connection, Transaction, params};

use super::{
    Applied, Incoming, ProblemKind, Result, Store, StoreError, clock, deferred, load_record, now_ms, revocations,
    save_record, set_meta, to_json,
};
use crate::{hlc::ClockError, record::RecordState};

pub(super) fn file_problem(tx: &Connection, incoming: &Incoming, kind: ProblemKind, detail: &str) -> Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO problems (offset, record_id, collection, origin_device_id, kind, detail, seen_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            incoming.offset,
            incoming.record_id,
            incoming.collection,
            incoming.origin_device_id,
            kind.as_str(),
            detail,
            now_ms()
        ],
    )?;
    Ok(())
}

/// The first place where `batch` does not continue from `cursor` offset by
/// offset: (expected, found). Offsets before the cursor are a redelivery (at
/// least once), harmless to merge again; offsets after it are missing changes.
fn find_gap(cursor: Option<i64>, batch: &[Incoming]) -> Option<(i64, i64)> {
    if let (Some(cursor), Some(first)) = (cursor, batch.first())
        && first.offset > cursor
    {
        return Some((cursor, first.offset));
    }
    batch.windows(2).find(|pair| pair[1].offset != pair[0].offset + 1).map(|pair| (pair[0].offset + 1, pair[1].offset))
}

impl Store {
    /// Merges a batch of consecutive incoming changes and moves the cursor past
    /// them, in one transaction. A batch that does not continue from the cursor
    /// is refused whole (`StoreError::Gap`, filed as a problem): the cursor
    /// stays where it is. Changes that cannot apply yet go to `deferred`, and
    /// those deferred before are retried first.
    pub fn apply(&mut self, batch: &[Incoming]) -> Result<Applied> {
        let Some(last) = batch.last() else { return Ok(Applied::default()) };
        let cursor = self.cursor()?;
        if let Some((expected, found)) = find_gap(cursor, batch) {
            let at = batch.iter().find(|incoming| incoming.offset == found).unwrap_or(last);
            let detail = format!("expected offset {expected}, the server sent {found}: the batch was not applied");
            file_problem(&self.conn, at, ProblemKind::Gap, &detail)?;
            return Err(StoreError::Gap { expected, found });
        }
        let settings = self.clock;
        let reader = self.reader;
        let tx = self.conn.transaction()?;
        let mut clock = clock(&tx, settings)?;
        let mut applied = Applied::default();
        deferred::retry(&tx, &self.vault, &mut clock, reader, &mut applied)?;
        for incoming in batch {
            applied.changes += 1;
            let problem = match (revocations::check_epoch(&tx, incoming)?, &incoming.content) {
                (Some(stale), _) => Some(stale),
                (None, Err((kind, detail))) => Some((*kind, detail.clone())),
                (None, Ok(payload)) => match clock.observe(payload.state.max_hlc()) {
                    Err(error @ ClockError::TooFarAhead { .. }) => Some((ProblemKind::ClockAhead, error.to_string())),
                    Ok(()) => Self::merge_incoming(&tx, incoming, &payload.state, &mut applied)?,
                },
            };
            let Some((kind, detail)) = problem else { continue };
            match &incoming.sealed {
                Some(sealed) if kind.waits() => {
                    deferred::insert(&tx, incoming, sealed, kind, &detail)?;
                    applied.deferred += 1;
                }
                _ => {
                    file_problem(&tx, incoming, kind, &detail)?;
                    applied.problems += 1;
                }
            }
        }
        set_meta(&tx, "hlc", &clock.last().to_string())?;
        // A redelivery of offsets already applied never moves the cursor back.
        let next = cursor.map_or(last.offset + 1, |cursor| cursor.max(last.offset + 1));
        set_meta(&tx, "cursor", &next.to_string())?;
        tx.commit()?;
        Ok(applied)
    }

    pub(super) fn merge_incoming(
        tx: &Transaction<'_>,
        incoming: &Incoming,
        state: &RecordState,
        applied: &mut Applied,
    ) -> Result<Option<(ProblemKind, String)>> {
        let local = load_record(tx, "records", &incoming.record_id)?;
        if let Some((collection, _)) = &local
            && *collection != incoming.collection
        {
            return Ok(Some((
                ProblemKind::CollectionConflict,
                format!("this device holds the record in collection {collection}"),
            )));
        }
        let mut record = local.map(|(_, state)| state).unwrap_or_default();
        if record.merge(state) {
            applied.changed_records += 1;
            save_record(tx, &incoming.record_id, &incoming.collection, &record)?;
        }
        let mut mirror = load_record(tx, "mirror", &incoming.record_id)?.map(|(_, state)| state).unwrap_or_default();
        mirror.merge(state);
        tx.execute(
            "INSERT INTO mirror (record_id, collection, state, offset) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (record_id) DO UPDATE SET state = ?3, offset = ?4",
            params![incoming.record_id, incoming.collection, to_json(&mirror), incoming.offset],
        )?;
        revocations::note_control_record(tx, incoming, state)?;
        Ok(None)
    }
}
