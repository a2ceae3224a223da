//! Leaving and deleting: what a device can ask the server to forget.

use std::time::Duration;

use lockstep_proto::v1::{
    DeleteAccountRequest, DeleteAccountResponse, RevokeDeviceRequest, accounts_client::AccountsClient,
};

use super::{SyncError, Trust, authed, connect, rpc};
use crate::store::Account;

/// Deletes the whole account from the server (its topic, every device's
/// consumer group, devices, tokens, push targets, dedup entries). Every
/// device of the account is signed out; local stores are untouched.
pub async fn delete_account(
    account: &Account,
    rpc_timeout: Duration,
    trust: &Trust,
) -> Result<DeleteAccountResponse, SyncError> {
    let request = DeleteAccountRequest { confirm_user_id: account.user_id.clone() };
    // The server waits up to 15 s for Kafka before it answers `completed = false`.
    let deadline = rpc_timeout.max(Duration::from_secs(30));
    Ok(AccountsClient::new(connect(&account.server, trust).await?)
        .delete_account(authed(&account.token, request, Some(deadline))?)
        .await
        .map_err(rpc("DeleteAccount"))?
        .into_inner())
}

/// Revokes this device itself: its token stops working; the account and
/// the other devices go on.
pub async fn leave(account: &Account, rpc_timeout: Duration, trust: &Trust) -> Result<(), SyncError> {
    let request = RevokeDeviceRequest { device_id: account.device_id.clone() };
    AccountsClient::new(connect(&account.server, trust).await?)
        .revoke_device(authed(&account.token, request, Some(rpc_timeout))?)
        .await
        .map_err(rpc("RevokeDevice"))?;
    Ok(())
}
