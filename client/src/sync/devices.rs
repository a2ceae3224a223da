//! The account's devices: list them, revoke one. [`Syncer::revoke`] records
//! the revocation in the log first (a control record, `store::revocations`,
//! with the device's registered key), then revokes it on the server, then
//! starts the next epoch itself and pushes the record under it: every device
//! then refuses to seal keys to the revoked one, whatever the server lists.

use std::time::Duration;

use lockstep_proto::v1::{Device, ListDevicesRequest, RevokeDeviceRequest, accounts_client::AccountsClient};

use super::{Report, SyncError, Syncer, Trust, authed, connect, keys::KeySync, rpc};
use crate::{epochs::verify_device_key, store::Account, store::RevokedDevice};

pub async fn list_devices(account: &Account, rpc_timeout: Duration, trust: &Trust) -> Result<Vec<Device>, SyncError> {
    let mut accounts = AccountsClient::new(connect(&account.server, trust).await?);
    Ok(accounts
        .list_devices(authed(&account.token, ListDevicesRequest {}, Some(rpc_timeout))?)
        .await
        .map_err(rpc("ListDevices"))?
        .into_inner()
        .devices)
}

pub async fn revoke_device(
    account: &Account,
    device_id: &str,
    rpc_timeout: Duration,
    trust: &Trust,
) -> Result<(), SyncError> {
    let mut accounts = AccountsClient::new(connect(&account.server, trust).await?);
    let request = RevokeDeviceRequest { device_id: device_id.into() };
    accounts.revoke_device(authed(&account.token, request, Some(rpc_timeout))?).await.map_err(rpc("RevokeDevice"))?;
    Ok(())
}

impl Syncer {
    /// Revokes another device of the account (see the module doc); returns the
    /// key sync that started the next epoch and how many changes went up.
    pub async fn revoke(&mut self, device_id: &str) -> Result<(KeySync, Report), SyncError> {
        debug_assert_ne!(device_id, self.account.device_id, "a device leaving revokes itself without a record");
        let listed = match self.list_keys().await {
            // A server from before key rotation: nothing to seal, nothing to record against.
            Err(SyncError::Rpc { status, .. }) if status.code() == tonic::Code::Unimplemented => {
                revoke_device(&self.account, device_id, self.rpc_timeout, &self.trust).await?;
                return Ok((self.sync_keys().await?, Report::default()));
            }
            listed => listed?,
        };
        // The key the server lists for it counts only with the account key's proof.
        let public_key = listed
            .devices
            .iter()
            .find(|device| device.device_id == device_id && !device.public_key.is_empty())
            .and_then(|device| {
                verify_device_key(
                    &self.account.key,
                    &self.account.user_id,
                    device_id,
                    &device.public_key,
                    &device.proof,
                )
                .ok()
            });
        let revoked_in_epoch = listed.current_epoch.max(self.account.key_epoch);
        let revoked = RevokedDevice {
            device_id: device_id.into(),
            public_key: public_key.map(Vec::from).unwrap_or_default(),
            revoked_in_epoch,
        };
        let listed_active = listed.devices.iter().any(|device| device.device_id == device_id);
        if listed_active {
            // Recorded before the server hears of it: this device refuses it from now on.
            self.store.record_revocation(&revoked)?;
            revoke_device(&self.account, device_id, self.rpc_timeout, &self.trust).await?;
        } else {
            // Unknown or revoked already: the server says which; record only a real device.
            revoke_device(&self.account, device_id, self.rpc_timeout, &self.trust).await?;
            self.store.record_revocation(&revoked)?;
        }
        let keys = self.sync_keys().await?;
        let mut report = Report::default();
        self.push(&mut report, &mut |_| {}).await?;
        Ok((keys, report))
    }
}
