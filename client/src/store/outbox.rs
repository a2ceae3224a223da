//! The outbox: local changes the server has not acknowledged yet, in order.
//!
//! A change has one identity on the wire. It is sealed (encrypted, with its
//! random nonce) once, before its first push, and the sealed form is stored
//! with it: every retry sends exactly the same bytes, so the server recognises
//! a retry whose first answer was lost (the device was killed, the call timed
//! out) as the same change instead of a different one under a reused id.

use rusqlite::{Connection, params};

use super::{Result, Store, StoreError, from_json, to_json};
use crate::{
    crypto::Binding,
    ids,
    record::{ChangePayload, RecordState},
};

/// A change as it travels: what the server sees besides ids and collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub op: i32,
    pub hlc: u64,
    pub key_epoch: u32,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub seq: i64,
    pub change_id: String,
    pub record_id: String,
    pub collection: String,
    pub op: i32,
    pub hlc: u64,
    pub payload: ChangePayload,
    /// Sealed before its first push; `None` until then.
    pub sealed: Option<Sealed>,
}

/// Queues a change carrying `state` under a new change id.
pub(super) fn queue(
    tx: &Connection,
    record_id: &str,
    collection: &str,
    op: i32,
    hlc: u64,
    state: &RecordState,
) -> Result<()> {
    tx.execute(
        "INSERT INTO outbox (change_id, record_id, collection, op, hlc, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![ids::new_id(), record_id, collection, op, hlc as i64, to_json(state)],
    )?;
    Ok(())
}

type Row = (i64, String, String, String, i32, i64, String, Option<i64>, Option<Vec<u8>>, Option<Vec<u8>>);

fn entry(row: Row) -> Result<OutboxEntry> {
    let (seq, change_id, record_id, collection, op, hlc, state, key_epoch, nonce, ciphertext) = row;
    let sealed = match (key_epoch, nonce, ciphertext) {
        (Some(key_epoch), Some(nonce), Some(ciphertext)) => Some(Sealed {
            op,
            hlc: hlc as u64,
            key_epoch: u32::try_from(key_epoch).map_err(|_| StoreError::Corrupt("outbox key epoch".into()))?,
            nonce,
            ciphertext,
        }),
        _ => None,
    };
    Ok(OutboxEntry {
        seq,
        change_id,
        record_id,
        collection,
        op,
        hlc: hlc as u64,
        payload: ChangePayload::new(from_json(&state)?),
        sealed,
    })
}

impl Store {
    /// The oldest pending changes that the server has not rejected.
    pub fn outbox_batch(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        let mut statement = self.conn.prepare_cached(
            "SELECT seq, change_id, record_id, collection, op, hlc, state, key_epoch, nonce, ciphertext FROM outbox
             WHERE rejected IS NULL ORDER BY seq LIMIT ?1",
        )?;
        let rows = statement.query_map([limit as i64], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
                row.get(7)?,
                row.get(8)?,
                row.get(9)?,
            ))
        })?;
        rows.map(|row| entry(row?)).collect()
    }

    /// Like [`Store::outbox_batch`], each change with its sealed form: the
    /// changes not sealed yet are sealed now and stored so, in one
    /// transaction, before anything is sent.
    pub fn sealed_outbox_batch(&mut self, limit: usize) -> Result<Vec<(OutboxEntry, Sealed)>> {
        let entries = self.outbox_batch(limit)?;
        if entries.iter().all(|entry| entry.sealed.is_some()) {
            return Ok(entries
                .into_iter()
                .filter_map(|entry| entry.sealed.clone().map(|sealed| (entry, sealed)))
                .collect());
        }
        let account = self.account()?;
        let tx = self.conn.transaction()?;
        let mut sealed_entries = Vec::with_capacity(entries.len());
        for entry in entries {
            let sealed = match &entry.sealed {
                Some(sealed) => sealed.clone(),
                None => {
                    let binding = Binding {
                        user_id: &account.user_id,
                        record_id: &entry.record_id,
                        collection: &entry.collection,
                        op: entry.op,
                        key_epoch: account.key_epoch,
                    };
                    let (nonce, ciphertext) = account
                        .keyring()
                        .seal(&binding, &entry.payload.encode())
                        .map_err(|error| StoreError::Corrupt(error.to_string()))?;
                    tx.execute(
                        "UPDATE outbox SET key_epoch = ?2, nonce = ?3, ciphertext = ?4 WHERE seq = ?1",
                        params![entry.seq, account.key_epoch, nonce, ciphertext],
                    )?;
                    Sealed { op: entry.op, hlc: entry.hlc, key_epoch: account.key_epoch, nonce, ciphertext }
                }
            };
            sealed_entries.push((entry, sealed));
        }
        tx.commit()?;
        Ok(sealed_entries)
    }

    pub fn outbox_len(&self) -> Result<i64> {
        Ok(self.conn.query_row("SELECT count(*) FROM outbox WHERE rejected IS NULL", [], |row| row.get(0))?)
    }

    /// Removes the changes the server acknowledged (and only those).
    pub fn outbox_done(&mut self, seqs: &[i64]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut statement = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
            for seq in seqs {
                statement.execute([seq])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Keeps a change the server refused for good, out of later pushes; `status` shows it.
    pub fn outbox_reject(&mut self, seq: i64, reason: &str) -> Result<()> {
        self.conn.execute("UPDATE outbox SET rejected = ?2 WHERE seq = ?1", params![seq, reason])?;
        Ok(())
    }

    /// Local changes the server refused for good: (record id, reason), oldest first.
    pub fn rejected(&self) -> Result<Vec<(String, String)>> {
        let mut statement =
            self.conn.prepare("SELECT record_id, rejected FROM outbox WHERE rejected IS NOT NULL ORDER BY seq")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
