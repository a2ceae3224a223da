//! What this device knows of the account's revocations and epochs, from the
//! log itself rather than from the server's say-so.
//!
//! - A revocation is a **control record**: a record in the reserved
//!   collection [`REVOCATIONS_COLLECTION`], id `revoked:<device id>`, fields
//!   `device_id`, `public_key` (URL-safe base64 of the X25519 key the device
//!   registered, `""` if it had none) and `revoked_in_epoch` (the newest epoch
//!   the device may hold). It is sealed like any change, so the server can
//!   neither read nor forge it. Every device applies it to `revoked_devices`,
//!   which only grows: a later change to the record (even a delete) never
//!   takes a revocation back.
//! - `epoch_starts` keeps, per epoch, the first offset where a change under it
//!   opened: once the log shows epoch N started, a later change under an older
//!   epoch is written by a device that was left out of N (a revoked one, with a
//!   server that let it in). It is flagged ([`ProblemKind::StaleEpoch`]), never
//!   applied.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Map, Value, json};

use super::{Incoming, ProblemKind, Result, Store, StoreError, load_record};
use crate::record::RecordState;

/// The reserved collection of revocation control records.
pub const REVOCATIONS_COLLECTION: &str = "_lockstep.revocations";
/// Collections whose names start with this are the client's own, not the user's.
pub const RESERVED_PREFIX: &str = "_lockstep.";

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS revoked_devices (
    device_id TEXT PRIMARY KEY, public_key TEXT NOT NULL, revoked_in_epoch INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS revoked_devices_by_key ON revoked_devices (public_key);
CREATE TABLE IF NOT EXISTS epoch_starts (epoch INTEGER PRIMARY KEY, offset INTEGER NOT NULL);
";

/// A device this account revoked, as its control record says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RevokedDevice {
    pub device_id: String,
    /// The key it registered (empty if none).
    pub public_key: Vec<u8>,
    /// The newest epoch it may hold: an epoch after it must exist.
    pub revoked_in_epoch: u32,
}

impl RevokedDevice {
    fn fields(&self) -> Map<String, Value> {
        let fields = json!({
            "device_id": self.device_id,
            "public_key": URL_SAFE_NO_PAD.encode(&self.public_key),
            "revoked_in_epoch": self.revoked_in_epoch,
        });
        fields.as_object().cloned().unwrap_or_default()
    }

    /// Reads a control record's state; `None` if it is not one.
    fn from_state(state: &RecordState) -> Option<Self> {
        let field = |name: &str| state.fields.get(name).map(|field| &field.value);
        let device_id = field("device_id")?.as_str()?.to_string();
        let public_key = URL_SAFE_NO_PAD.decode(field("public_key")?.as_str()?).ok()?;
        if !(public_key.is_empty() || public_key.len() == 32) || device_id.is_empty() {
            return None;
        }
        let revoked_in_epoch = u32::try_from(field("revoked_in_epoch")?.as_u64()?).ok()?;
        Some(Self { device_id, public_key, revoked_in_epoch })
    }
}

fn insert_revoked(tx: &Connection, revoked: &RevokedDevice) -> Result<()> {
    // Only grows: a second record for the same device keeps the higher epoch and any key.
    tx.execute(
        "INSERT INTO revoked_devices (device_id, public_key, revoked_in_epoch) VALUES (?1, ?2, ?3)
         ON CONFLICT (device_id) DO UPDATE SET
           public_key = CASE WHEN public_key = '' THEN excluded.public_key ELSE public_key END,
           revoked_in_epoch = max(revoked_in_epoch, excluded.revoked_in_epoch)",
        params![revoked.device_id, URL_SAFE_NO_PAD.encode(&revoked.public_key), revoked.revoked_in_epoch],
    )?;
    Ok(())
}

/// The epoch in force just before `offset`: the newest one whose first change came earlier.
fn epoch_in_force(tx: &Connection, offset: i64) -> Result<u32> {
    let epoch: Option<u32> =
        tx.query_row("SELECT max(epoch) FROM epoch_starts WHERE offset < ?1", [offset], |row| row.get(0))?;
    Ok(epoch.unwrap_or(1))
}

/// Before an incoming change applies: a problem if it is under an epoch older
/// than the one in force at its offset; else, for a change that opened (so the
/// epoch is authentic), notes where its epoch started.
pub(super) fn check_epoch(tx: &Connection, incoming: &Incoming) -> Result<Option<(ProblemKind, String)>> {
    let Some(sealed) = &incoming.sealed else { return Ok(None) };
    let in_force = epoch_in_force(tx, incoming.offset)?;
    if sealed.key_epoch < in_force {
        return Ok(Some((
            ProblemKind::StaleEpoch,
            format!(
                "written under key epoch {} after epoch {in_force} started (a device left out of the rotation, \
                 e.g. a revoked one, wrote it): not applied",
                sealed.key_epoch
            ),
        )));
    }
    if incoming.content.is_ok() {
        tx.execute(
            "INSERT INTO epoch_starts (epoch, offset) VALUES (?1, ?2)
             ON CONFLICT (epoch) DO UPDATE SET offset = min(offset, excluded.offset)",
            params![sealed.key_epoch, incoming.offset],
        )?;
    }
    Ok(None)
}

/// After an incoming change merged: a control record updates `revoked_devices`.
pub(super) fn note_control_record(tx: &Connection, incoming: &Incoming, state: &RecordState) -> Result<()> {
    if incoming.collection != REVOCATIONS_COLLECTION {
        return Ok(());
    }
    match RevokedDevice::from_state(state) {
        Some(revoked) => insert_revoked(tx, &revoked),
        None => {
            tracing::warn!(offset = incoming.offset, "ignoring a revocation record without its fields");
            Ok(())
        }
    }
}

impl Store {
    /// Records that `revoked` is revoked: this device refuses to seal epoch
    /// keys to it from now on, and a control record telling every device so is
    /// queued (sealed and pushed with the outbox; after the rotation that
    /// follows, under the new epoch).
    pub fn record_revocation(&mut self, revoked: &RevokedDevice) -> Result<()> {
        let settings = self.clock;
        let tx = self.conn.transaction()?;
        insert_revoked(&tx, revoked)?;
        let record_id = format!("revoked:{}", revoked.device_id);
        crate::ids::validate_record_id(&record_id).map_err(StoreError::Invalid)?;
        let existing = load_record(&tx, "records", &record_id)?.map(|(_, state)| state);
        let fields = revoked.fields();
        Self::local_change(
            settings,
            &tx,
            &record_id,
            REVOCATIONS_COLLECTION,
            super::OP_UPSERT,
            |state, stamp| state.set(&fields, stamp),
            existing,
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn revoked_devices(&self) -> Result<Vec<RevokedDevice>> {
        let mut statement = self
            .conn
            .prepare("SELECT device_id, public_key, revoked_in_epoch FROM revoked_devices ORDER BY device_id")?;
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, u32>(2)?)))?;
        let mut revoked = Vec::new();
        for row in rows {
            let (device_id, public_key, revoked_in_epoch) = row?;
            let public_key = URL_SAFE_NO_PAD
                .decode(&public_key)
                .map_err(|_| StoreError::Corrupt(format!("revoked device {device_id}: public key")))?;
            revoked.push(RevokedDevice { device_id, public_key, revoked_in_epoch });
        }
        Ok(revoked)
    }

    /// Whether a device is revoked, by its id or by its public key (a revoked
    /// key registered again under another id is refused too).
    pub fn is_revoked(&self, device_id: &str, public_key: &[u8]) -> Result<bool> {
        let key = if public_key.is_empty() { None } else { Some(URL_SAFE_NO_PAD.encode(public_key)) };
        let found: Option<i64> = self
            .conn
            .query_row(
                "SELECT 1 FROM revoked_devices WHERE device_id = ?1 OR (?2 IS NOT NULL AND public_key = ?2)",
                params![device_id, key],
                |row| row.get(0),
            )
            .optional()?;
        Ok(found.is_some())
    }

    /// The newest epoch a revoked device may hold: an epoch after it must exist.
    pub fn revoked_in_epoch(&self) -> Result<Option<u32>> {
        Ok(self.conn.query_row("SELECT max(revoked_in_epoch) FROM revoked_devices", [], |row| row.get(0))?)
    }
}

/// Refuses user writes to the client's reserved collections.
pub(super) fn check_user_collection(collection: &str) -> Result<()> {
    if collection.starts_with(RESERVED_PREFIX) {
        return Err(StoreError::Invalid(format!(
            "collection {collection:?}: names starting with {RESERVED_PREFIX:?} are reserved for the client"
        )));
    }
    Ok(())
}
