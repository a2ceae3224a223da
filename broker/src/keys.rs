//! Key directory: each device's X25519 public key and the account's key epochs.
//!
//! Data flow step: beside *device → gateway*. The server stores what devices
//! give it — public keys, their proofs, and epoch keys sealed to one device
//! each — and never holds a key that opens anything. What it decides:
//! - which epoch is current per user (the highest started; 1 before any
//!   rotation), so that the gateway refuses pushes under an older one;
//! - that a new epoch is exactly the next one and carries a sealed copy for
//!   its starter and for active devices only (a device left out — one its
//!   starter knows is revoked whatever this server says, or one paired
//!   meanwhile — is listed as missing the epoch; the server's list is no
//!   authority on who may read);
//! - which copies a recipient reported it cannot open: those are forgotten,
//!   so that the epoch is missing again and a later share replaces them;
//! - whether a rotation is due: a device was revoked after the current epoch
//!   started (counted, since revocations are never undone).

#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
};

use crate::{
    accounts::AuthedDevice,
    db::{DbError, now_ms},
    store::{LOCK_USER, Sql, Store},
    values,
};
use lockstep_kafka::locks::{read, write};

/// An X25519 public key.
pub const PUBLIC_KEY_BYTES: usize = 32;
/// HMAC-SHA256 proof that a key's registrant holds the account key.
pub const PROOF_BYTES: usize = 32;
/// Ephemeral public key (32) ‖ nonce (24) ‖ sealed epoch key and proof (64) ‖ tag (16).
pub const SEALED_KEY_BYTES: usize = 136;
/// Epochs returned per GetEpochKeys, and missing epochs listed per device.
pub const MAX_EPOCHS_PER_REQUEST: usize = 64;
/// Sealed copies in one StartKeyEpoch or ShareEpochKeys.
pub const MAX_SEALED_KEYS_PER_REQUEST: usize = 1024;
/// The highest epoch an account can reach (the wire field is a u32; this leaves room).
pub const MAX_EPOCH: u32 = 1 << 30;

/// The tables that hold rows of a user (all keyed by `user_id` too): what
/// deleting an account deletes.
pub const TABLES_BY_USER: [&str; 3] = ["sealed_epoch_keys", "key_epochs", "device_keys"];

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// A malformed request: nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// The request does not fit the account's state (another epoch, another
    /// device set, a stale epoch): the device must refresh and try again.
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A device's registered key and the epochs (after the first) it lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeyEntry {
    pub device_id: String,
    /// Empty while the device has not registered a key.
    pub public_key: Vec<u8>,
    pub proof: Vec<u8>,
    pub missing_epochs: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeys {
    pub current_epoch: u32,
    pub devices: Vec<DeviceKeyEntry>,
    pub rotation_due: bool,
}

/// One sealed copy of an epoch key, for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedKey {
    pub device_id: String,
    pub epoch: u32,
    pub sealed: Vec<u8>,
    pub sealed_by_device_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochKeys {
    pub current_epoch: u32,
    pub sealed_keys: Vec<SealedKey>,
    pub more: bool,
    pub rotation_due: bool,
}

#[derive(Clone)]
pub struct KeyDirectory {
    db: Store,
    /// The current epoch per user, read from the database once.
    current: Arc<RwLock<HashMap<Arc<str>, u32>>>,
}

fn check_sealed(index: usize, sealed: &SealedKey) -> Result<(), KeysError> {
    if sealed.device_id.is_empty() || sealed.device_id.len() > 64 {
        return Err(KeysError::Invalid(format!("sealed_keys[{index}].device_id is missing or too long")));
    }
    if sealed.sealed.len() != SEALED_KEY_BYTES {
        return Err(KeysError::Invalid(format!(
            "sealed_keys[{index}].sealed must have {SEALED_KEY_BYTES} bytes, not {}",
            sealed.sealed.len()
        )));
    }
    if sealed.epoch < 2 || sealed.epoch > MAX_EPOCH {
        return Err(KeysError::Invalid(format!(
            "sealed_keys[{index}].epoch must be between 2 and {MAX_EPOCH} (epoch 1 is the account key)"
        )));
    }
    Ok(())
}

fn check_count(count: usize) -> Result<(), KeysError> {
    if count == 0 {
        return Err(KeysError::Invalid("sealed_keys is empty".into()));
    }
    if count > MAX_SEALED_KEYS_PER_REQUEST {
        return Err(KeysError::Invalid(format!(
            "sealed_keys has {count} entries; at most {MAX_SEALED_KEYS_PER_REQUEST} per request"
        )));
    }
    Ok(())
}

fn current_in(tx: &impl Sql, user_id: &str) -> Result<u32, DbError> {
    let epoch: Option<u32> =
        tx.query_one("SELECT max(epoch) FROM key_epochs WHERE user_id = ?1", values![user_id])?.get(0)?;
    Ok(epoch.unwrap_or(1))
}

fn revoked_devices_in(tx: &impl Sql, user_id: &str) -> Result<i64, DbError> {
    tx.query_one("SELECT count(*) FROM devices WHERE user_id = ?1 AND revoked_at_ms IS NOT NULL", values![user_id])?
        .get(0)
}

fn rotation_due_in(tx: &impl Sql, user_id: &str) -> Result<bool, DbError> {
    let revoked = revoked_devices_in(tx, user_id)?;
    let covered: Option<i64> = tx
        .query_opt(
            "SELECT revoked_devices FROM key_epochs WHERE user_id = ?1 ORDER BY epoch DESC LIMIT 1",
            values![user_id],
        )?
        .map(|row| row.get(0))
        .transpose()?;
    Ok(revoked > covered.unwrap_or(0))
}

/// A registered public key and its proof.
type KeyAndProof = (Vec<u8>, Vec<u8>);

/// The user's active devices that registered a key: device id → (key, proof).
fn active_keys_in(tx: &impl Sql, user_id: &str) -> Result<HashMap<String, KeyAndProof>, DbError> {
    tx.query(
        "SELECT k.device_id, k.public_key, k.proof FROM device_keys k JOIN devices d ON d.device_id = k.device_id
         WHERE d.user_id = ?1 AND d.revoked_at_ms IS NULL",
        values![user_id],
    )?
    .iter()
    .map(|row| Ok((row.get(0)?, (row.get(1)?, row.get(2)?))))
    .collect()
}

fn missing_epochs_in(tx: &impl Sql, user_id: &str, device_id: &str) -> Result<Vec<u32>, DbError> {
    tx.query(
        "SELECT e.epoch FROM key_epochs e WHERE e.user_id = ?1
           AND NOT EXISTS (SELECT 1 FROM sealed_epoch_keys s WHERE s.device_id = ?2 AND s.epoch = e.epoch)
         ORDER BY e.epoch LIMIT ?3",
        values![user_id, device_id, MAX_EPOCHS_PER_REQUEST as i64],
    )?
    .iter()
    .map(|row| row.get(0))
    .collect()
}

fn insert_sealed(tx: &impl Sql, user_id: &str, by: &str, sealed: &SealedKey) -> Result<u64, DbError> {
    tx.execute(
        "INSERT INTO sealed_epoch_keys (device_id, epoch, user_id, sealed, sealed_by_device)
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        values![&sealed.device_id, sealed.epoch, user_id, &sealed.sealed, by],
    )
}

impl KeyDirectory {
    /// The key directory of `db` (its tables are made with the store's schema).
    pub async fn open(db: Store) -> Result<Self, KeysError> {
        Ok(Self { db, current: Arc::default() })
    }

    /// The user's current key epoch (1 before any rotation).
    pub async fn current_epoch(&self, user_id: &Arc<str>) -> Result<u32, KeysError> {
        if let Some(epoch) = read(&self.current).get(user_id) {
            return Ok(*epoch);
        }
        let user = user_id.to_string();
        let epoch = self.db.call(move |connection| current_in(connection, &user)).await?;
        // A rotation that finished meanwhile wrote a higher epoch: keep the higher.
        let mut current = write(&self.current);
        let entry = current.entry(user_id.clone()).or_insert(epoch);
        *entry = (*entry).max(epoch);
        Ok(*entry)
    }

    /// Refuses a push with a change under an epoch older than the current one
    /// (the device has not learned of the rotation yet). A newer epoch is not
    /// the server's business: no device holds a key for it, so nobody reads it.
    pub async fn check_push_epochs(
        &self,
        device: &AuthedDevice,
        epochs: impl Iterator<Item = u32>,
    ) -> Result<(), KeysError> {
        let current = self.current_epoch(&device.user_id).await?;
        for (index, epoch) in epochs.enumerate() {
            if epoch < current {
                return Err(KeysError::Precondition(format!(
                    "changes[{index}].key_epoch {epoch} is older than the account's current key epoch {current}: \
                     a device was revoked and the keys rotated; fetch the new epoch key (GetEpochKeys) and seal \
                     the change again"
                )));
            }
        }
        Ok(())
    }

    /// Registers the device's public key; the same key again changes nothing.
    pub async fn register(&self, device: &AuthedDevice, public_key: Vec<u8>, proof: Vec<u8>) -> Result<u32, KeysError> {
        if public_key.len() != PUBLIC_KEY_BYTES {
            return Err(KeysError::Invalid(format!(
                "public_key must have {PUBLIC_KEY_BYTES} bytes, not {}",
                public_key.len()
            )));
        }
        if proof.len() != PROOF_BYTES {
            return Err(KeysError::Invalid(format!("proof must have {PROOF_BYTES} bytes, not {}", proof.len())));
        }
        let (user, device_id) = (device.user_id.to_string(), device.device_id.to_string());
        self.db
            .call(move |connection| {
                let tx = connection.transaction()?;
                let existing: Option<(Vec<u8>, Vec<u8>)> = tx
                    .query_opt("SELECT public_key, proof FROM device_keys WHERE device_id = ?1", values![&device_id])?
                    .map(|row| Ok::<_, DbError>((row.get(0)?, row.get(1)?)))
                    .transpose()?;
                match existing {
                    Some((stored_key, stored_proof)) if stored_key == public_key && stored_proof == proof => {}
                    Some(_) => {
                        return Ok(Err(KeysError::Precondition(
                            "this device registered another public key already; a device's key never changes \
                             (pair the device again to get a new one)"
                                .into(),
                        )));
                    }
                    None => {
                        tx.execute(
                            "INSERT INTO device_keys (device_id, user_id, public_key, proof, registered_at_ms)
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                            values![&device_id, &user, public_key, proof, now_ms()],
                        )?;
                    }
                }
                let current = current_in(&tx, &user)?;
                tx.commit()?;
                Ok(Ok(current))
            })
            .await?
    }

    /// The user's active devices with their keys and what they lack.
    pub async fn list(&self, user_id: &str) -> Result<DeviceKeys, KeysError> {
        let user = user_id.to_string();
        Ok(self
            .db
            .call(move |connection| {
                let tx = connection.transaction()?;
                let rows = tx.query(
                    "SELECT d.device_id, k.public_key, k.proof FROM devices d
                     LEFT JOIN device_keys k ON k.device_id = d.device_id
                     WHERE d.user_id = ?1 AND d.revoked_at_ms IS NULL ORDER BY d.created_at_ms, d.device_id",
                    values![&user],
                )?;
                let mut devices = Vec::new();
                for row in rows {
                    let (device_id, public_key, proof): (String, Option<Vec<u8>>, Option<Vec<u8>>) =
                        (row.get(0)?, row.get(1)?, row.get(2)?);
                    let missing_epochs =
                        if public_key.is_some() { missing_epochs_in(&tx, &user, &device_id)? } else { Vec::new() };
                    devices.push(DeviceKeyEntry {
                        device_id,
                        public_key: public_key.unwrap_or_default(),
                        proof: proof.unwrap_or_default(),
                        missing_epochs,
                    });
                }
                Ok(DeviceKeys {
                    current_epoch: current_in(&tx, &user)?,
                    devices,
                    rotation_due: rotation_due_in(&tx, &user)?,
                })
            })
            .await?)
    }

    /// Starts `epoch`, which must be the current one + 1, with one sealed copy
    /// for the caller and for any of the other active devices that registered
    /// a key (those left out are listed as missing it, for a later share).
    pub async fn start_epoch(
        &self,
        device: &AuthedDevice,
        epoch: u32,
        sealed_keys: Vec<SealedKey>,
    ) -> Result<u32, KeysError> {
        check_count(sealed_keys.len())?;
        for (index, sealed) in sealed_keys.iter().enumerate() {
            check_sealed(index, sealed)?;
            if sealed.epoch != epoch {
                return Err(KeysError::Invalid(format!("sealed_keys[{index}].epoch is not the epoch being started")));
            }
        }
        let (user, by) = (device.user_id.to_string(), device.device_id.to_string());
        let started = self
            .db
            .call(move |connection| {
                let tx = connection.transaction()?;
                // Two devices starting the next epoch at once: one after the other.
                tx.execute(LOCK_USER, values![&user])?;
                let current = current_in(&tx, &user)?;
                if epoch != current + 1 {
                    return Ok(Err(KeysError::Precondition(format!(
                        "cannot start key epoch {epoch}: the account is at epoch {current} (another device may have \
                         rotated first: fetch its keys and check again)"
                    ))));
                }
                let active = active_keys_in(&tx, &user)?;
                if !active.contains_key(&by) {
                    return Ok(Err(KeysError::Precondition(
                        "this device has no registered public key: register it (RegisterDeviceKey) first".into(),
                    )));
                }
                let mut covered = HashSet::with_capacity(sealed_keys.len());
                for sealed in &sealed_keys {
                    if !active.contains_key(&sealed.device_id) {
                        return Ok(Err(KeysError::Precondition(format!(
                            "device {} is not an active device of this account with a registered key (revoked \
                             meanwhile?): list the device keys again",
                            sealed.device_id
                        ))));
                    }
                    if !covered.insert(sealed.device_id.as_str()) {
                        return Ok(Err(KeysError::Invalid(format!("two sealed keys for device {}", sealed.device_id))));
                    }
                }
                if !covered.contains(by.as_str()) {
                    return Ok(Err(KeysError::Invalid(
                        "the new epoch carries no sealed copy for the device that starts it".into(),
                    )));
                }
                let revoked = revoked_devices_in(&tx, &user)?;
                tx.execute(
                    "INSERT INTO key_epochs (user_id, epoch, started_by_device, started_at_ms, revoked_devices)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    values![&user, epoch, &by, now_ms(), revoked],
                )?;
                for sealed in &sealed_keys {
                    insert_sealed(&tx, &user, &by, sealed)?;
                }
                tx.commit()?;
                Ok(Ok(epoch))
            })
            .await??;
        let mut current = write(&self.current);
        let entry = current.entry(device.user_id.clone()).or_insert(started);
        *entry = (*entry).max(started);
        Ok(started)
    }

    /// Stores sealed copies of started epochs for active devices of the
    /// caller's account; a copy a device already has is kept.
    pub async fn share(&self, device: &AuthedDevice, sealed_keys: Vec<SealedKey>) -> Result<u32, KeysError> {
        check_count(sealed_keys.len())?;
        for (index, sealed) in sealed_keys.iter().enumerate() {
            check_sealed(index, sealed)?;
        }
        let (user, by) = (device.user_id.to_string(), device.device_id.to_string());
        self.db
            .call(move |connection| {
                let tx = connection.transaction()?;
                let current = current_in(&tx, &user)?;
                let active = active_keys_in(&tx, &user)?;
                let mut stored = 0;
                for (index, sealed) in sealed_keys.iter().enumerate() {
                    if sealed.epoch > current {
                        return Ok(Err(KeysError::Precondition(format!(
                            "sealed_keys[{index}].epoch {} has not started (current: {current})",
                            sealed.epoch
                        ))));
                    }
                    if !active.contains_key(&sealed.device_id) {
                        return Ok(Err(KeysError::Precondition(format!(
                            "device {} is not an active device of this account with a registered key",
                            sealed.device_id
                        ))));
                    }
                    stored += insert_sealed(&tx, &user, &by, sealed)? as u32;
                }
                tx.commit()?;
                Ok(Ok(stored))
            })
            .await?
    }

    /// The caller's sealed keys after `since_epoch`, oldest first. First
    /// forgets the caller's copies of `unopened` epochs (copies it reported it
    /// cannot open), so that those epochs are missing again and the next device
    /// to share seals a fresh copy; only the recipient can report its own.
    pub async fn get(
        &self,
        device: &AuthedDevice,
        since_epoch: u32,
        unopened: Vec<u32>,
    ) -> Result<EpochKeys, KeysError> {
        if unopened.len() > MAX_EPOCHS_PER_REQUEST {
            return Err(KeysError::Invalid(format!(
                "unopened_epochs has {} entries; at most {MAX_EPOCHS_PER_REQUEST} per request",
                unopened.len()
            )));
        }
        let (user, device_id) = (device.user_id.to_string(), device.device_id.to_string());
        Ok(self
            .db
            .call(move |connection| {
                let tx = connection.transaction()?;
                for epoch in &unopened {
                    tx.execute(
                        "DELETE FROM sealed_epoch_keys WHERE device_id = ?1 AND user_id = ?2 AND epoch = ?3",
                        values![&device_id, &user, *epoch],
                    )?;
                }
                let mut sealed_keys = tx
                    .query(
                        "SELECT epoch, sealed, sealed_by_device FROM sealed_epoch_keys
                         WHERE device_id = ?1 AND user_id = ?2 AND epoch > ?3 ORDER BY epoch LIMIT ?4",
                        values![&device_id, &user, since_epoch, MAX_EPOCHS_PER_REQUEST as i64 + 1],
                    )?
                    .iter()
                    .map(|row| {
                        Ok(SealedKey {
                            device_id: device_id.clone(),
                            epoch: row.get(0)?,
                            sealed: row.get(1)?,
                            sealed_by_device_id: row.get(2)?,
                        })
                    })
                    .collect::<Result<Vec<_>, DbError>>()?;
                let more = sealed_keys.len() > MAX_EPOCHS_PER_REQUEST;
                sealed_keys.truncate(MAX_EPOCHS_PER_REQUEST);
                let answer = EpochKeys {
                    current_epoch: current_in(&tx, &user)?,
                    sealed_keys,
                    more,
                    rotation_due: rotation_due_in(&tx, &user)?,
                };
                tx.commit()?;
                Ok(answer)
            })
            .await?)
    }
}
