//! This device's push target: where the push worker wakes it when it is
//! offline and another device changed something. A woken app runs a sync
//! (`Syncer::sync_once`, or `lockstep-cli sync`); the wake-up itself carries
//! no content, only `{"v":1,"log_end":N}`.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use lockstep_proto::v1::{
    GetPushTargetRequest, PushTarget as ProtoTarget, RemovePushTargetRequest, SetPushTargetRequest, WebPushTarget,
    WebhookTarget, push_target::Target as ProtoKind, push_targets_client::PushTargetsClient,
};
use serde_json::Value;
use tonic::Code;

use super::{SyncError, Trust, authed, connect, rpc};
use crate::store::Account;

/// Where a device can be woken.
#[derive(Clone, PartialEq, Eq)]
pub enum PushTarget {
    /// An RFC 8030 push subscription (a browser's, or a UnifiedPush distributor's).
    WebPush { endpoint: String, p256dh: Vec<u8>, auth: Vec<u8> },
    /// A Matrix push gateway.
    Webhook { url: String, app_id: String, pushkey: String },
}

impl std::fmt::Debug for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({}/…)", self.kind(), self.origin())
    }
}

impl PushTarget {
    pub fn kind(&self) -> &'static str {
        match self {
            PushTarget::WebPush { .. } => "web-push",
            PushTarget::Webhook { .. } => "webhook",
        }
    }

    /// The URL, which is a secret (whoever has it can wake the device).
    pub fn url(&self) -> &str {
        match self {
            PushTarget::WebPush { endpoint, .. } => endpoint,
            PushTarget::Webhook { url, .. } => url,
        }
    }

    /// `scheme://host[:port]`: safe to show.
    pub fn origin(&self) -> &str {
        let url = self.url();
        let after_scheme = url.find("://").map_or(0, |i| i + 3);
        let end = url[after_scheme..].find(['/', '?', '#']).map_or(url.len(), |i| after_scheme + i);
        &url[..end]
    }

    /// A Web Push subscription as `PushSubscription.toJSON()` gives it:
    /// `{"endpoint": "https://…", "keys": {"p256dh": "<base64url>", "auth": "<base64url>"}}`.
    pub fn from_subscription_json(text: &str) -> Result<Self, String> {
        let json: Value =
            serde_json::from_str(text).map_err(|error| format!("the subscription is not JSON: {error}"))?;
        let endpoint = json
            .get("endpoint")
            .and_then(Value::as_str)
            .ok_or("the subscription has no \"endpoint\" string")?
            .to_string();
        let key = |name: &str| -> Result<Vec<u8>, String> {
            let text = json
                .get("keys")
                .and_then(|keys| keys.get(name))
                .and_then(Value::as_str)
                .ok_or_else(|| format!("the subscription has no \"keys\".\"{name}\" string"))?;
            decode_base64url(text).map_err(|error| format!("keys.{name} is not base64url: {error}"))
        };
        Ok(PushTarget::WebPush { endpoint, p256dh: key("p256dh")?, auth: key("auth")? })
    }

    fn into_proto(self) -> ProtoTarget {
        let target = match self {
            PushTarget::WebPush { endpoint, p256dh, auth } => {
                ProtoKind::WebPush(WebPushTarget { endpoint, p256dh: p256dh.into(), auth: auth.into() })
            }
            PushTarget::Webhook { url, app_id, pushkey } => ProtoKind::Webhook(WebhookTarget { url, app_id, pushkey }),
        };
        ProtoTarget { target: Some(target), updated_at_ms: 0 }
    }
}

/// Base64url with or without padding (browsers give it without).
pub fn decode_base64url(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(text.trim().trim_end_matches('='))
}

pub fn encode_base64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

async fn client(account: &Account, trust: &Trust) -> Result<PushTargetsClient<tonic::transport::Channel>, SyncError> {
    Ok(PushTargetsClient::new(connect(&account.server, trust).await?))
}

/// Sets (replaces) this device's target. The server checks it: a malformed
/// one is refused with INVALID_ARGUMENT and a reason.
pub async fn set(account: &Account, target: PushTarget, rpc_timeout: Duration, trust: &Trust) -> Result<(), SyncError> {
    let request = SetPushTargetRequest { target: Some(target.into_proto()) };
    client(account, trust)
        .await?
        .set_push_target(authed(&account.token, request, Some(rpc_timeout))?)
        .await
        .map_err(rpc("SetPushTarget"))?;
    Ok(())
}

/// This device's target and when it was set, `None` if it has none.
pub async fn get(
    account: &Account,
    rpc_timeout: Duration,
    trust: &Trust,
) -> Result<Option<(PushTarget, i64)>, SyncError> {
    let answer = client(account, trust)
        .await?
        .get_push_target(authed(&account.token, GetPushTargetRequest {}, Some(rpc_timeout))?)
        .await;
    let shown = match answer {
        Ok(answer) => answer.into_inner().target,
        Err(status) if status.code() == Code::NotFound => return Ok(None),
        Err(status) => return Err(rpc("GetPushTarget")(status)),
    };
    let Some(shown) = shown else { return Ok(None) };
    let target = match shown.target {
        Some(ProtoKind::WebPush(t)) => {
            PushTarget::WebPush { endpoint: t.endpoint, p256dh: t.p256dh.to_vec(), auth: t.auth.to_vec() }
        }
        Some(ProtoKind::Webhook(t)) => PushTarget::Webhook { url: t.url, app_id: t.app_id, pushkey: t.pushkey },
        None => return Ok(None),
    };
    Ok(Some((target, shown.updated_at_ms)))
}

/// Removes this device's target; `false` if it had none.
pub async fn remove(account: &Account, rpc_timeout: Duration, trust: &Trust) -> Result<bool, SyncError> {
    let answer = client(account, trust)
        .await?
        .remove_push_target(authed(&account.token, RemovePushTargetRequest {}, Some(rpc_timeout))?)
        .await;
    match answer {
        Ok(_) => Ok(true),
        Err(status) if status.code() == Code::NotFound => Ok(false),
        Err(status) => Err(rpc("RemovePushTarget")(status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_browser_subscription_parses() {
        let p256dh = encode_base64url(&[4; 65]);
        let json = format!(
            r#"{{"endpoint":"https://fcm.googleapis.com/fcm/send/abc","expirationTime":null,"keys":{{"p256dh":"{p256dh}","auth":"AAECAwQFBgcICQoLDA0ODw"}}}}"#
        );
        let target = PushTarget::from_subscription_json(&json).unwrap();
        assert_eq!(
            target,
            PushTarget::WebPush {
                endpoint: "https://fcm.googleapis.com/fcm/send/abc".into(),
                p256dh: vec![4; 65],
                auth: (0..16).collect()
            }
        );
        assert_eq!(target.origin(), "https://fcm.googleapis.com");
        assert!(!format!("{target:?}").contains("abc"), "Debug hides the endpoint");
    }

    #[test]
    fn broken_subscriptions_say_what_is_wrong() {
        for (json, expected) in [
            ("nope", "not JSON"),
            (r#"{"keys":{}}"#, "endpoint"),
            (r#"{"endpoint":"https://x/y","keys":{"auth":"AAAA"}}"#, "p256dh"),
            (r#"{"endpoint":"https://x/y","keys":{"p256dh":"!!","auth":"AAAA"}}"#, "base64url"),
        ] {
            let error = PushTarget::from_subscription_json(json).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
    }
}
