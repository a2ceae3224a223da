//! This device's key material beyond the account key: its X25519 private key
//! (meta `device_secret`), whether the server has its public key, and the
//! epoch keys it received. Learning a newer epoch unseals the outbox changes
//! sealed under an older one: they are sealed again under the newest epoch,
//! under new change ids (the server refuses the old epoch; a copy of the same
//! change that did land under the old id carries the same stamp, so merging
//! both changes nothing).

use rusqlite::{Connection, params};

use super::{Result, Store, StoreError, Vault, get_meta, now_ms, set_meta, vault::EpochKeyText};
use crate::{
    epochs::{DeviceSecret, EpochKey, EpochKeys},
    ids,
};

pub(super) fn epoch_keys_in(conn: &Connection, vault: &Vault) -> Result<EpochKeys> {
    let mut statement = conn.prepare_cached("SELECT epoch, key FROM epoch_keys ORDER BY epoch")?;
    let rows = statement.query_map([], |row| Ok((row.get::<_, u32>(0)?, row.get::<_, String>(1)?)))?;
    let mut keys = EpochKeys::default();
    for row in rows {
        let (epoch, text) = row?;
        let text = vault.epoch_key(epoch, text)?;
        if epoch < 2 {
            return Err(StoreError::Corrupt(format!("an epoch key for epoch {epoch}")));
        }
        keys.insert(epoch, EpochKey::from_base64(&text).map_err(|error| StoreError::Corrupt(error.to_string()))?);
    }
    Ok(keys)
}

impl Store {
    /// This device's X25519 private key, made on first use.
    pub fn device_secret(&mut self) -> Result<DeviceSecret> {
        if let Some(text) = self.vault.meta(&self.conn, "device_secret")? {
            return DeviceSecret::from_base64(&text).map_err(|error| StoreError::Corrupt(error.to_string()));
        }
        let secret = DeviceSecret::generate();
        let text = secret.to_base64();
        let tx = self.conn.transaction()?;
        let sealed = Self::reseal(&self.vault, &tx, |secrets| secrets.set_meta("device_secret", &text))?;
        if sealed.is_none() {
            set_meta(&tx, "device_secret", &text)?;
        }
        tx.commit()?;
        self.resealed(sealed);
        Ok(secret)
    }

    pub fn device_key_registered(&self) -> Result<bool> {
        Ok(get_meta(&self.conn, "device_key_registered")?.is_some())
    }

    pub fn note_device_key_registered(&mut self) -> Result<()> {
        set_meta(&self.conn, "device_key_registered", "1")
    }

    /// The account's current epoch as the server said at the last key sync.
    pub fn server_key_epoch(&self) -> Result<Option<u32>> {
        Ok(get_meta(&self.conn, "server_key_epoch")?.and_then(|value| value.parse().ok()))
    }

    pub fn note_server_key_epoch(&mut self, epoch: u32) -> Result<()> {
        set_meta(&self.conn, "server_key_epoch", &epoch.to_string())
    }

    /// Keeps epoch keys this device opened (`(epoch, key, sealed by)`); an epoch
    /// held already keeps its key. Returns the newest epoch held. Outbox changes
    /// sealed under an older epoch are unsealed, to be sealed again under it.
    pub fn add_epoch_keys(&mut self, keys: &[(u32, EpochKey, String)]) -> Result<u32> {
        if let Vault::Locked = self.vault {
            return Err(StoreError::Locked);
        }
        let protected = self.is_protected();
        let tx = self.conn.transaction()?;
        let mut added = zeroize::Zeroizing::new(Vec::new());
        for (epoch, key, sealed_by) in keys {
            if *epoch < 2 {
                return Err(StoreError::Invalid(format!("epoch {epoch} has no key of its own")));
            }
            let text = key.to_base64();
            // A protected store keeps the key in its sealed secrets only.
            let stored = if protected { "" } else { text.as_str() };
            let inserted = tx.execute(
                "INSERT OR IGNORE INTO epoch_keys (epoch, key, sealed_by_device, received_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![epoch, stored, sealed_by, now_ms()],
            )?;
            if inserted == 1 {
                added.push(EpochKeyText { epoch: *epoch, key: text.to_string() });
            }
        }
        let sealed = Self::reseal(&self.vault, &tx, |secrets| secrets.epoch_keys.append(&mut added))?;
        let newest: u32 = tx.query_row("SELECT coalesce(max(epoch), 1) FROM epoch_keys", [], |row| row.get(0))?;
        set_meta(&tx, "key_epoch", &newest.to_string())?;
        let stale: Vec<i64> = {
            let mut statement = tx.prepare(
                "SELECT seq FROM outbox WHERE rejected IS NULL AND key_epoch IS NOT NULL AND key_epoch < ?1",
            )?;
            statement.query_map([newest], |row| row.get(0))?.collect::<Result<_, _>>()?
        };
        for seq in stale {
            tx.execute(
                "UPDATE outbox SET change_id = ?2, key_epoch = NULL, nonce = NULL, ciphertext = NULL WHERE seq = ?1",
                params![seq, ids::new_id()],
            )?;
        }
        tx.commit()?;
        self.resealed(sealed);
        Ok(newest)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use zeroize::Zeroizing;

    use super::*;
    use crate::{crypto::AccountKey, store::Account};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("client.db"), Duration::from_secs(3600)).unwrap();
        store
            .save_account(&Account {
                server: "http://127.0.0.1:1".into(),
                user_id: "user".into(),
                device_id: "me".into(),
                device_name: "me".into(),
                token: Zeroizing::new("token".into()),
                key: AccountKey::generate(),
                key_epoch: 1,
                epoch_keys: EpochKeys::default(),
            })
            .unwrap();
        (dir, store)
    }

    #[test]
    fn a_newer_epoch_reseals_pending_changes_under_new_ids() {
        let (_dir, mut store) = store();
        let fields = json!({"text": "pending"}).as_object().unwrap().clone();
        store.put("notes", Some("r1"), &fields).unwrap();
        let (first, sealed) = store.sealed_outbox_batch(10).unwrap().pop().unwrap();
        assert_eq!(sealed.key_epoch, 1);

        let key = EpochKey::generate();
        assert_eq!(store.add_epoch_keys(&[(2, key.clone(), "other".into())]).unwrap(), 2);
        let account = store.account().unwrap();
        assert_eq!(account.key_epoch, 2);
        assert_eq!(account.epoch_keys.get(2), Some(&key));
        let (again, resealed) = store.sealed_outbox_batch(10).unwrap().pop().unwrap();
        assert_eq!(resealed.key_epoch, 2, "never sealed under an older epoch once a newer one is known");
        assert_ne!(again.change_id, first.change_id, "the old id may have landed under the old epoch");
        assert_eq!(again.seq, first.seq);

        // An epoch held already keeps its key; the device secret is made once.
        store.add_epoch_keys(&[(2, EpochKey::generate(), "third".into())]).unwrap();
        assert_eq!(store.account().unwrap().epoch_keys.get(2), Some(&key));
        let secret = store.device_secret().unwrap();
        assert_eq!(store.device_secret().unwrap().public_key(), secret.public_key());
        assert!(store.add_epoch_keys(&[(1, EpochKey::generate(), "x".into())]).is_err());
    }
}
