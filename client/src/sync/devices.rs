//! The account's devices: list them, revoke one. Revoking makes a key
//! rotation due; the caller (or any remaining device at its next sync) starts
//! the next epoch ([`Syncer::sync_keys`](super::Syncer::sync_keys)).

use std::time::Duration;

use lockstep_proto::v1::{Device, ListDevicesRequest, RevokeDeviceRequest, accounts_client::AccountsClient};

use super::{SyncError, Trust, authed, connect, rpc};
use crate::store::Account;

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
