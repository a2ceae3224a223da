//! Incoming changes that cannot apply yet, kept encrypted as delivered: a
//! clock further ahead than the bound (the local clock may catch up, or the
//! sender's clock was wrong and it stays visible), or a payload version this
//! client does not read yet (it will after an upgrade). The cursor moves on
//! past them, so they never block what follows, and every later apply retries
//! them: none is skipped for good.

use rusqlite::{Connection, params};

use super::{Applied, Incoming, ProblemKind, Result, Sealed, Store, Vault, account_in, file_problem, now_ms};
use crate::{
    crypto::Binding,
    hlc::Clock,
    record::{ChangePayload, PayloadError, PayloadReader},
    store::Account,
};

/// A deferred change, as `status` and `check` show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Deferred {
    pub offset: i64,
    pub record_id: String,
    pub collection: String,
    pub origin_device_id: String,
    /// `clock-ahead` or `unknown-version`.
    pub kind: String,
    pub reason: String,
    pub deferred_at_ms: i64,
}

/// Decrypts and reads a change the way this device reads every change.
pub fn open_change(
    account: &Account,
    record_id: &str,
    collection: &str,
    sealed: &Sealed,
    reader: PayloadReader,
) -> Result<ChangePayload, (ProblemKind, String)> {
    let binding =
        Binding { user_id: &account.user_id, record_id, collection, op: sealed.op, key_epoch: sealed.key_epoch };
    match account.keyring().open(&binding, &sealed.nonce, &sealed.ciphertext) {
        Ok(plaintext) => reader(&plaintext).map_err(|error| match error {
            PayloadError::UnknownVersion { .. } => (ProblemKind::UnknownVersion, error.to_string()),
            PayloadError::Malformed(_) => (ProblemKind::Malformed, error.to_string()),
        }),
        // The sync layer fetches missing epoch keys before it applies a batch;
        // a change under an epoch still missing after that is undecryptable.
        Err(error) => Err((ProblemKind::Undecryptable, error.to_string())),
    }
}

pub(super) fn insert(
    tx: &Connection,
    incoming: &Incoming,
    sealed: &Sealed,
    kind: ProblemKind,
    reason: &str,
) -> Result<()> {
    tx.execute(
        "INSERT INTO deferred (offset, record_id, collection, op, hlc, key_epoch, nonce, ciphertext,
                               origin_device_id, kind, reason, deferred_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (offset) DO UPDATE SET kind = ?10, reason = ?11",
        params![
            incoming.offset,
            incoming.record_id,
            incoming.collection,
            sealed.op,
            sealed.hlc as i64,
            sealed.key_epoch,
            sealed.nonce,
            sealed.ciphertext,
            incoming.origin_device_id,
            kind.as_str(),
            reason,
            now_ms()
        ],
    )?;
    Ok(())
}

/// Applies the deferred changes that can apply now and removes them; the
/// others stay (with their current reason). One that turns out never to apply
/// (it does not decrypt or parse) becomes a problem.
pub(super) fn retry(
    tx: &rusqlite::Transaction<'_>,
    vault: &Vault,
    clock: &mut Clock,
    reader: PayloadReader,
    applied: &mut Applied,
) -> Result<()> {
    let waiting: i64 = tx.query_row("SELECT count(*) FROM deferred", [], |row| row.get(0))?;
    if waiting == 0 {
        return Ok(());
    }
    let Some(account) = account_in(tx, vault)? else { return Ok(()) };
    let rows: Vec<(Incoming, Sealed)> = {
        let mut statement = tx.prepare(
            "SELECT offset, record_id, collection, op, hlc, key_epoch, nonce, ciphertext, origin_device_id
             FROM deferred ORDER BY offset",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                Incoming {
                    offset: row.get(0)?,
                    record_id: row.get(1)?,
                    collection: row.get(2)?,
                    origin_device_id: row.get(8)?,
                    content: Err((ProblemKind::ClockAhead, String::new())),
                    sealed: None,
                },
                Sealed {
                    op: row.get(3)?,
                    hlc: row.get::<_, i64>(4)? as u64,
                    key_epoch: row.get(5)?,
                    nonce: row.get(6)?,
                    ciphertext: row.get(7)?,
                },
            ))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    for (incoming, sealed) in rows {
        // The cleartext stamp is one of the payload's: if it is still too far
        // ahead, so is the payload, and there is nothing to decrypt yet.
        if clock.check(sealed.hlc).is_err() {
            continue;
        }
        let outcome =
            open_change(&account, &incoming.record_id, &incoming.collection, &sealed, reader).and_then(|payload| {
                match clock.observe(payload.state.max_hlc()) {
                    Ok(()) => Ok(payload),
                    Err(error) => Err((ProblemKind::ClockAhead, error.to_string())),
                }
            });
        match outcome {
            Ok(payload) => {
                if let Some((kind, detail)) = Store::merge_incoming(tx, &incoming, &payload.state, applied)? {
                    file_problem(tx, &incoming, kind, &detail)?;
                    applied.problems += 1;
                }
                applied.from_deferred += 1;
            }
            Err((kind, reason)) if kind.waits() => {
                tx.execute(
                    "UPDATE deferred SET kind = ?2, reason = ?3 WHERE offset = ?1",
                    params![incoming.offset, kind.as_str(), reason],
                )?;
                continue;
            }
            Err((kind, detail)) => {
                file_problem(tx, &incoming, kind, &detail)?;
                applied.problems += 1;
            }
        }
        tx.execute("DELETE FROM deferred WHERE offset = ?1", [incoming.offset])?;
    }
    Ok(())
}

impl Store {
    /// Retries the deferred changes now (each sync does, and so does every apply).
    pub fn retry_deferred(&mut self) -> Result<Applied> {
        let (settings, reader) = (self.clock, self.reader);
        let tx = self.conn.transaction()?;
        let mut clock = super::clock(&tx, settings)?;
        let mut applied = Applied::default();
        retry(&tx, &self.vault, &mut clock, reader, &mut applied)?;
        super::set_meta(&tx, "hlc", &clock.last().to_string())?;
        tx.commit()?;
        Ok(applied)
    }

    /// The changes waiting to apply, oldest first.
    pub fn deferred(&self) -> Result<Vec<Deferred>> {
        let mut statement = self.conn.prepare(
            "SELECT offset, record_id, collection, origin_device_id, kind, reason, deferred_at_ms
             FROM deferred ORDER BY offset",
        )?;
        let rows = statement.query_map([], |row| {
            Ok(Deferred {
                offset: row.get(0)?,
                record_id: row.get(1)?,
                collection: row.get(2)?,
                origin_device_id: row.get(3)?,
                kind: row.get(4)?,
                reason: row.get(5)?,
                deferred_at_ms: row.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
