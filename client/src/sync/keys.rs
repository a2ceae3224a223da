//! Key sync: register this device's public key, fetch and open the epoch keys
//! sealed to it, start the next epoch when a revocation made one due, and seal
//! the epochs this device holds to devices that lack them (a device paired
//! after a rotation gets them from whichever device syncs next).
//!
//! Every device sealed to must show a proof made with the account key, and
//! every epoch key opened must carry one: the server relays keys but cannot
//! make one that a device accepts. The server's device list says who may be
//! sealed to, not who must: a device the log's revocation records name (by
//! id or by public key, `store::revocations`) never gets an epoch key, and a
//! revocation there makes this device start an epoch after it whatever the
//! server says is due. A copy sealed to this device that does not open is
//! reported, so that the server forgets it and another device shares it again.

use lockstep_proto::v1::{
    DeviceKey, GetEpochKeysRequest, ListDeviceKeysRequest, ListDeviceKeysResponse, RegisterDeviceKeyRequest,
    SealedEpochKey, ShareEpochKeysRequest, StartKeyEpochRequest, keys_client::KeysClient,
};
use tonic::{Code, transport::Channel};

use super::{SyncError, Syncer, authed, rpc};
use crate::epochs::{EpochKey, SealedFor, device_key_proof, open_epoch_key, seal_epoch_key, verify_device_key};

/// Sealed keys per ShareEpochKeys call (the server takes up to 1,024).
const SHARE_CHUNK: usize = 512;
/// StartKeyEpoch attempts when another device rotates or a device appears at the same time.
const ROTATION_ATTEMPTS: u32 = 3;

/// Whether a key sync seals epoch keys to devices that lack them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Share {
    Yes,
    AfterReceiving,
}

/// What a key sync did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KeySync {
    /// This device registered its public key now.
    pub registered: bool,
    /// Epoch keys received and opened.
    pub received: u32,
    /// The epoch this device started (after a revocation).
    pub started_epoch: Option<u32>,
    /// Sealed copies shared with devices that lacked them.
    pub shared: u32,
    /// The account's current epoch, as the server says.
    pub current_epoch: u32,
    /// The newest epoch this device holds.
    pub held_epoch: u32,
    /// The server has the Keys service (a server from before key rotation does not).
    pub supported: bool,
}

impl Syncer {
    async fn keys_client(&mut self) -> Result<KeysClient<Channel>, SyncError> {
        self.connection().await?;
        self.keys.clone().ok_or(SyncError::StreamEnded)
    }

    /// Brings this device's keys up to date with the account (see the module
    /// doc). Against a server without the Keys service (older than key
    /// rotation) it does nothing and says so (`supported: false`).
    pub async fn sync_keys(&mut self) -> Result<KeySync, SyncError> {
        self.sync_keys_sharing(Share::Yes).await
    }

    /// [`Syncer::sync_keys`] without sharing keys with other devices: before
    /// receiving, a revocation record waiting in the log is not applied yet,
    /// and the server's list of who lacks a key is not to be trusted.
    pub async fn sync_keys_before_receiving(&mut self) -> Result<KeySync, SyncError> {
        self.sync_keys_sharing(Share::AfterReceiving).await
    }

    async fn sync_keys_sharing(&mut self, share: Share) -> Result<KeySync, SyncError> {
        match self.sync_keys_with_server(share).await {
            Err(SyncError::Rpc { status, .. }) if status.code() == Code::Unimplemented => {
                tracing::warn!("the server has no Keys service: no key rotation with it");
                let held_epoch = self.account.key_epoch;
                Ok(KeySync { held_epoch, current_epoch: held_epoch, ..KeySync::default() })
            }
            outcome => outcome,
        }
    }

    async fn sync_keys_with_server(&mut self, share: Share) -> Result<KeySync, SyncError> {
        let mut keys = self.keys_client().await?;
        let mut outcome = KeySync { supported: true, ..KeySync::default() };
        if !self.store.device_key_registered()? {
            self.register_device_key(&mut keys).await?;
            outcome.registered = true;
        }
        let rotation_due = self.fetch_epoch_keys(&mut keys, &mut outcome).await?;
        if rotation_due || self.revocation_needs_epoch(outcome.current_epoch)? {
            self.rotate(&mut keys, &mut outcome).await?;
        }
        if share == Share::Yes {
            self.share_missing(&mut keys, &mut outcome).await?;
        }
        outcome.held_epoch = self.account.key_epoch;
        Ok(outcome)
    }

    async fn register_device_key(&mut self, keys: &mut KeysClient<Channel>) -> Result<(), SyncError> {
        let public_key = self.store.device_secret()?.public_key();
        let proof = device_key_proof(&self.account.key, &self.account.user_id, &self.account.device_id, &public_key);
        let request = RegisterDeviceKeyRequest { public_key: public_key.to_vec().into(), proof: proof.to_vec().into() };
        keys.register_device_key(authed(&self.account.token, request, Some(self.rpc_timeout))?)
            .await
            .map_err(rpc("RegisterDeviceKey"))?;
        self.store.note_device_key_registered()?;
        Ok(())
    }

    /// Fetches every epoch key sealed to this device that it does not hold
    /// yet; returns whether a rotation is due.
    async fn fetch_epoch_keys(
        &mut self,
        keys: &mut KeysClient<Channel>,
        outcome: &mut KeySync,
    ) -> Result<bool, SyncError> {
        let secret = self.store.device_secret()?;
        let mut since_epoch = 0;
        let mut unopened = Vec::new();
        loop {
            let unopened_epochs = std::mem::take(&mut unopened);
            let reported = !unopened_epochs.is_empty();
            let request = GetEpochKeysRequest { since_epoch, unopened_epochs };
            let answer = keys
                .get_epoch_keys(authed(&self.account.token, request, Some(self.rpc_timeout))?)
                .await
                .map_err(rpc("GetEpochKeys"))?
                .into_inner();
            let mut opened = Vec::new();
            for sealed in &answer.sealed_keys {
                since_epoch = since_epoch.max(sealed.epoch);
                if sealed.epoch < 2 || self.account.epoch_keys.get(sealed.epoch).is_some() {
                    continue;
                }
                let sealed_for = SealedFor {
                    user_id: &self.account.user_id,
                    device_id: &self.account.device_id,
                    epoch: sealed.epoch,
                };
                match open_epoch_key(&self.account.key, &secret, &sealed_for, &sealed.sealed) {
                    Ok(key) => opened.push((sealed.epoch, key, sealed.sealed_by_device_id.clone())),
                    Err(error) => {
                        tracing::warn!(
                            epoch = sealed.epoch,
                            sealed_by = sealed.sealed_by_device_id,
                            %error,
                            "reporting an epoch key that does not open or verify, for another device to share again"
                        );
                        unopened.push(sealed.epoch);
                    }
                }
            }
            if !opened.is_empty() {
                outcome.received += opened.len() as u32;
                self.store.add_epoch_keys(&opened)?;
                self.account = self.store.account()?;
            }
            outcome.current_epoch = answer.current_epoch;
            self.store.note_server_key_epoch(answer.current_epoch)?;
            // One more call reports the copies that did not open (the server then forgets them).
            let done = !answer.more || answer.sealed_keys.is_empty();
            if done && (unopened.is_empty() || reported) {
                return Ok(answer.rotation_due);
            }
        }
    }

    /// The account's device keys as the server lists them.
    pub(super) async fn list_keys(&mut self) -> Result<ListDeviceKeysResponse, SyncError> {
        let mut keys = self.keys_client().await?;
        self.list_device_keys(&mut keys).await
    }

    async fn list_device_keys(&self, keys: &mut KeysClient<Channel>) -> Result<ListDeviceKeysResponse, SyncError> {
        Ok(keys
            .list_device_keys(authed(&self.account.token, ListDeviceKeysRequest {}, Some(self.rpc_timeout))?)
            .await
            .map_err(rpc("ListDeviceKeys"))?
            .into_inner())
    }

    /// A listed device's public key, once its proof verified.
    fn verified_key(&self, device: &DeviceKey) -> Result<[u8; 32], SyncError> {
        verify_device_key(
            &self.account.key,
            &self.account.user_id,
            &device.device_id,
            &device.public_key,
            &device.proof,
        )
        .map_err(|error| SyncError::Keys(format!("device {}: {error}; no key is sealed to it", device.device_id)))
    }

    /// Whether a revocation this device knows of (from the log, or its own)
    /// has no epoch after it yet: the revoked device may hold every epoch up to
    /// `revoked_in_epoch`. Asks nothing of the server.
    fn revocation_needs_epoch(&self, server_epoch: u32) -> Result<bool, SyncError> {
        let newest_known = server_epoch.max(self.account.key_epoch);
        Ok(self.store.revoked_in_epoch()?.is_some_and(|revoked_in| revoked_in >= newest_known))
    }

    /// A device this device must never seal an epoch key to.
    fn refuses(&self, device: &DeviceKey) -> Result<bool, SyncError> {
        let revoked = device.device_id != self.account.device_id
            && self.store.is_revoked(&device.device_id, &device.public_key)?;
        if revoked {
            tracing::warn!(
                device_id = device.device_id,
                "the server lists a device this account revoked: no epoch key is sealed to it"
            );
        }
        Ok(revoked)
    }

    /// Starts the next epoch with a fresh random key sealed to every active
    /// device with a registered key, except those the log says are revoked.
    async fn rotate(&mut self, keys: &mut KeysClient<Channel>, outcome: &mut KeySync) -> Result<(), SyncError> {
        for _ in 0..ROTATION_ATTEMPTS {
            let listed = self.list_device_keys(keys).await?;
            if !listed.rotation_due && !self.revocation_needs_epoch(listed.current_epoch)? {
                return Ok(());
            }
            let epoch = listed.current_epoch + 1;
            let key = EpochKey::generate();
            let mut sealed_keys = Vec::with_capacity(listed.devices.len());
            for device in listed.devices.iter().filter(|device| !device.public_key.is_empty()) {
                if self.refuses(device)? {
                    continue;
                }
                let public_key = self.verified_key(device)?;
                let sealed_for = SealedFor { user_id: &self.account.user_id, device_id: &device.device_id, epoch };
                let sealed = seal_epoch_key(&self.account.key, &public_key, &sealed_for, &key)
                    .map_err(|error| SyncError::Keys(format!("device {}: {error}", device.device_id)))?;
                sealed_keys.push(SealedEpochKey {
                    device_id: device.device_id.clone(),
                    epoch,
                    sealed: sealed.into(),
                    sealed_by_device_id: String::new(),
                });
            }
            let sealed_count = sealed_keys.len();
            let request = StartKeyEpochRequest { epoch, sealed_keys };
            match keys.start_key_epoch(authed(&self.account.token, request, Some(self.rpc_timeout))?).await {
                Ok(_) => {
                    self.store.add_epoch_keys(&[(epoch, key, self.account.device_id.clone())])?;
                    self.account = self.store.account()?;
                    self.store.note_server_key_epoch(epoch)?;
                    outcome.started_epoch = Some(epoch);
                    outcome.current_epoch = epoch;
                    tracing::info!(epoch, recipients = sealed_count, "started a new key epoch");
                    return Ok(());
                }
                // Another device rotated first, or the device set changed meanwhile.
                Err(status) if status.code() == Code::FailedPrecondition => {
                    tracing::info!(message = status.message(), "key rotation raced; checking again");
                    let rotation_due = self.fetch_epoch_keys(keys, outcome).await?;
                    if !rotation_due && !self.revocation_needs_epoch(outcome.current_epoch)? {
                        return Ok(());
                    }
                }
                Err(status) => return Err(rpc("StartKeyEpoch")(status)),
            }
        }
        Err(SyncError::Keys(format!(
            "the key rotation did not go through after {ROTATION_ATTEMPTS} attempts (devices changing meanwhile?); \
             the next sync tries again"
        )))
    }

    /// Seals the epochs this device holds to each device that lacks them.
    async fn share_missing(&mut self, keys: &mut KeysClient<Channel>, outcome: &mut KeySync) -> Result<(), SyncError> {
        let listed = self.list_device_keys(keys).await?;
        let mut sealed_keys = Vec::new();
        for device in &listed.devices {
            let held: Vec<(u32, &EpochKey)> = device
                .missing_epochs
                .iter()
                .filter_map(|epoch| self.account.epoch_keys.get(*epoch).map(|key| (*epoch, key)))
                .collect();
            if device.device_id == self.account.device_id
                || device.public_key.is_empty()
                || held.is_empty()
                || self.refuses(device)?
            {
                continue;
            }
            let public_key = match self.verified_key(device) {
                Ok(public_key) => public_key,
                Err(error) => {
                    tracing::warn!(%error, "not sharing epoch keys");
                    continue;
                }
            };
            for (epoch, key) in held {
                let sealed_for = SealedFor { user_id: &self.account.user_id, device_id: &device.device_id, epoch };
                let Ok(sealed) = seal_epoch_key(&self.account.key, &public_key, &sealed_for, key) else {
                    tracing::warn!(device_id = device.device_id, "not sharing with a low-order public key");
                    break;
                };
                sealed_keys.push(SealedEpochKey {
                    device_id: device.device_id.clone(),
                    epoch,
                    sealed: sealed.into(),
                    sealed_by_device_id: String::new(),
                });
            }
        }
        for chunk in sealed_keys.chunks(SHARE_CHUNK) {
            let request = ShareEpochKeysRequest { sealed_keys: chunk.to_vec() };
            let answer = keys
                .share_epoch_keys(authed(&self.account.token, request, Some(self.rpc_timeout))?)
                .await
                .map_err(rpc("ShareEpochKeys"))?
                .into_inner();
            outcome.shared += answer.stored;
        }
        Ok(())
    }
}
