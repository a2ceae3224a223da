//! What a new account needs on a server (GetServerInfo.registration), checked
//! before CreateAccount so that a missing invite code or secret fails early and
//! says which one.

use std::time::Duration;

use lockstep_proto::v1::{GetServerInfoRequest, GetServerInfoResponse, RegistrationMode, sync_client::SyncClient};
use tonic::Request;

use super::{SyncError, Trust, connect, rpc};

/// What `init` brings to CreateAccount: the server's registration secret, an invite code, both or neither.
#[derive(Debug, Default, Clone, Copy)]
pub struct Registration<'a> {
    pub secret: Option<&'a str>,
    pub invite_code: Option<&'a str>,
}

/// The server's limits and registration mode; needs no account (GetServerInfo is open).
pub async fn server_info(
    server: &str,
    rpc_timeout: Duration,
    trust: &Trust,
) -> Result<GetServerInfoResponse, SyncError> {
    let mut request = Request::new(GetServerInfoRequest {});
    request.set_timeout(rpc_timeout);
    Ok(SyncClient::new(connect(server, trust).await?)
        .get_server_info(request)
        .await
        .map_err(rpc("GetServerInfo"))?
        .into_inner())
}

/// Why `registration` cannot create an account on a server in `mode`, if it cannot. A server
/// that does not say (older servers) is left to answer CreateAccount itself.
pub fn refusal(mode: RegistrationMode, registration: &Registration<'_>) -> Option<String> {
    let has_invite = registration.invite_code.is_some_and(|code| !code.trim().is_empty());
    match mode {
        RegistrationMode::Closed => Some("this server does not accept new accounts".into()),
        RegistrationMode::Invite if !has_invite => Some(
            "this server takes new accounts by invite only: pass --invite CODE (or --invite-file, LOCKSTEP_INVITE) \
             with a code from its operator"
                .into(),
        ),
        RegistrationMode::Secret if !has_invite && registration.secret.is_none() => Some(
            "this server needs an invite code (--invite) or its registration secret (--registration-secret) for a \
             new account"
                .into(),
        ),
        _ => None,
    }
}

/// How `lockstep-cli server-info` names a mode.
pub fn describe_mode(mode: RegistrationMode) -> &'static str {
    match mode {
        RegistrationMode::Open => "open",
        RegistrationMode::Secret => "registration secret or invite code",
        RegistrationMode::Invite => "invite code",
        RegistrationMode::Closed => "closed",
        RegistrationMode::Unspecified => "not advertised",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_each_mode_needs() {
        let nothing = Registration::default();
        let invite = Registration { invite_code: Some("lsi_x"), ..Registration::default() };
        let secret = Registration { secret: Some("s"), ..Registration::default() };
        assert!(refusal(RegistrationMode::Open, &nothing).is_none());
        assert!(refusal(RegistrationMode::Unspecified, &nothing).is_none());
        assert!(refusal(RegistrationMode::Invite, &nothing).unwrap().contains("--invite"));
        assert!(refusal(RegistrationMode::Invite, &secret).is_some());
        assert!(refusal(RegistrationMode::Invite, &invite).is_none());
        assert!(refusal(RegistrationMode::Secret, &nothing).unwrap().contains("--registration-secret"));
        assert!(refusal(RegistrationMode::Secret, &secret).is_none());
        assert!(refusal(RegistrationMode::Secret, &invite).is_none());
        assert!(refusal(RegistrationMode::Closed, &invite).is_some());
        let blank = Registration { invite_code: Some("  "), ..Registration::default() };
        assert!(refusal(RegistrationMode::Invite, &blank).is_some());
    }
}
