//! Push targets: where each device can be woken. Stored in the server's
//! database (one per device), announced on the events topic (the push worker
//! learns them there, so it runs anywhere Kafka is reachable), removed when
//! the device removes it or is revoked.
//!
//! A target is a secret — whoever has a Web Push endpoint can wake the
//! device — so it is never logged (only its origin) and only the device
//! itself can read it back.

use lockstep_schemas::{PushTarget, TargetRemovedReason};
use rusqlite::{OptionalExtension, params};
use tonic::codegen::http::Uri;

use crate::{
    accounts::AuthedDevice,
    db::{Db, DbError, now_ms},
    events::Events,
};

/// Longest endpoint / webhook URL.
pub const MAX_URL_CHARS: usize = 1024;
pub const MAX_APP_ID_CHARS: usize = 64;
pub const MAX_PUSHKEY_CHARS: usize = 512;
/// An uncompressed P-256 point.
pub const P256DH_BYTES: usize = 65;
pub const AUTH_BYTES: usize = 16;
/// The path every Matrix push gateway serves.
pub const MATRIX_NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{0}")]
    Invalid(String),
    #[error("this device has no push target")]
    NotFound,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A stored target and when it was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTarget {
    pub target: PushTarget,
    pub updated_at_ms: i64,
}

/// Checks a URL a push worker would POST to: absolute, `https` (plain
/// `http` only for a loopback host, for local push services), a host, no
/// credentials, no fragment, at most [`MAX_URL_CHARS`].
fn check_url(field: &str, url: &str) -> Result<Uri, TargetError> {
    let invalid = |why: &str| Err(TargetError::Invalid(format!("{field} {why}")));
    if url.is_empty() {
        return invalid("is missing");
    }
    if url.chars().count() > MAX_URL_CHARS {
        return invalid(&format!("is longer than {MAX_URL_CHARS} characters"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) || url.contains('#') {
        return invalid("contains whitespace, control characters or a fragment");
    }
    let Ok(uri) = url.parse::<Uri>() else {
        return invalid("is not a URL");
    };
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return invalid("is not an absolute URL (https://host/…)");
    };
    if authority.as_str().contains('@') {
        return invalid("must not contain credentials");
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return invalid("has no host");
    }
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match scheme {
        "https" => Ok(uri),
        "http" if loopback => Ok(uri),
        "http" => invalid("must use https (plain http only for a loopback host)"),
        _ => invalid("must be an https URL"),
    }
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), TargetError> {
    if value.is_empty() {
        return Err(TargetError::Invalid(format!("{field} is missing")));
    }
    if value.chars().count() > max {
        return Err(TargetError::Invalid(format!("{field} is longer than {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(TargetError::Invalid(format!("{field} contains control characters")));
    }
    Ok(())
}

/// Validates a target as a device sent it.
pub fn validate(target: &PushTarget) -> Result<(), TargetError> {
    match target {
        PushTarget::WebPush { endpoint, p256dh, auth } => {
            check_url("web_push.endpoint", endpoint)?;
            if p256dh.len() != P256DH_BYTES || p256dh[0] != 0x04 {
                return Err(TargetError::Invalid(format!(
                    "web_push.p256dh must be an uncompressed P-256 public key: {P256DH_BYTES} bytes starting with 0x04 \
                     (got {} bytes)",
                    p256dh.len()
                )));
            }
            if auth.len() != AUTH_BYTES {
                return Err(TargetError::Invalid(format!(
                    "web_push.auth must be {AUTH_BYTES} bytes (got {})",
                    auth.len()
                )));
            }
        }
        PushTarget::Webhook { url, app_id, pushkey } => {
            let uri = check_url("webhook.url", url)?;
            if !uri.path().ends_with(MATRIX_NOTIFY_PATH) || uri.query().is_some() {
                return Err(TargetError::Invalid(format!(
                    "webhook.url must be a Matrix push gateway URL ending in {MATRIX_NOTIFY_PATH}, without a query"
                )));
            }
            check_text("webhook.app_id", app_id, MAX_APP_ID_CHARS)?;
            check_text("webhook.pushkey", pushkey, MAX_PUSHKEY_CHARS)?;
        }
    }
    Ok(())
}

/// The targets store; every change is announced on the events topic after
/// it is written.
#[derive(Clone)]
pub struct PushTargets {
    db: Db,
    events: Events,
}

type Row = (String, String, Option<Vec<u8>>, Option<Vec<u8>>, Option<String>, Option<String>, i64);

fn from_row((kind, endpoint, p256dh, auth, app_id, pushkey, updated_at_ms): Row) -> Option<StoredTarget> {
    let target = match kind.as_str() {
        "web_push" => PushTarget::WebPush { endpoint, p256dh: p256dh?, auth: auth? },
        "webhook" => PushTarget::Webhook { url: endpoint, app_id: app_id?, pushkey: pushkey? },
        _ => return None,
    };
    Some(StoredTarget { target, updated_at_ms })
}

const SELECT: &str = "SELECT kind, endpoint, p256dh, auth, app_id, pushkey, updated_at_ms FROM push_targets";

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?, row.get(6)?))
}

impl PushTargets {
    pub fn new(db: Db, events: Events) -> Self {
        Self { db, events }
    }

    /// Sets (replaces) the device's target.
    pub async fn set(&self, device: &AuthedDevice, target: PushTarget) -> Result<StoredTarget, TargetError> {
        validate(&target)?;
        let (user, id) = (device.user_id.to_string(), device.device_id.to_string());
        let updated_at_ms = now_ms();
        let (kind, endpoint, p256dh, auth, app_id, pushkey) = match &target {
            PushTarget::WebPush { endpoint, p256dh, auth } => {
                ("web_push", endpoint.clone(), Some(p256dh.clone()), Some(auth.clone()), None, None)
            }
            PushTarget::Webhook { url, app_id, pushkey } => {
                ("webhook", url.clone(), None, None, Some(app_id.clone()), Some(pushkey.clone()))
            }
        };
        self.db
            .call(move |connection| {
                connection.execute(
                    "INSERT INTO push_targets (device_id, user_id, kind, endpoint, p256dh, auth, app_id, pushkey, updated_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (device_id) DO UPDATE SET kind = ?3, endpoint = ?4, p256dh = ?5, auth = ?6,
                         app_id = ?7, pushkey = ?8, updated_at_ms = ?9",
                    params![id, user, kind, endpoint, p256dh, auth, app_id, pushkey, updated_at_ms],
                )?;
                Ok(())
            })
            .await?;
        tracing::info!(user_id = %device.user_id, device_id = %device.device_id, origin = target.origin(), "push target set");
        self.events.target_set(&device.user_id, &device.device_id, target.clone());
        Ok(StoredTarget { target, updated_at_ms })
    }

    pub async fn get(&self, device: &AuthedDevice) -> Result<StoredTarget, TargetError> {
        let id = device.device_id.to_string();
        let row = self
            .db
            .call(move |connection| {
                Ok(connection.query_row(&format!("{SELECT} WHERE device_id = ?1"), [id], read_row).optional()?)
            })
            .await?;
        row.and_then(from_row).ok_or(TargetError::NotFound)
    }

    /// Removes the device's target; `NotFound` if it had none.
    pub async fn remove(&self, device: &AuthedDevice, reason: TargetRemovedReason) -> Result<(), TargetError> {
        let id = device.device_id.to_string();
        let removed = self
            .db
            .call(move |connection| Ok(connection.execute("DELETE FROM push_targets WHERE device_id = ?1", [id])?))
            .await?;
        if removed == 0 {
            return Err(TargetError::NotFound);
        }
        tracing::info!(user_id = %device.user_id, device_id = %device.device_id, reason = reason.as_str(), "push target removed");
        self.events.target_removed(&device.user_id, &device.device_id, reason);
        Ok(())
    }

    /// A push worker found the device's target gone (`at_ms`): deletes it
    /// unless the device set a new one since. `true` if a row was deleted.
    /// Publishes nothing: the worker announced the removal itself.
    pub async fn forget_gone(&self, user_id: &str, device_id: &str, at_ms: i64) -> Result<bool, TargetError> {
        let (user, device) = (user_id.to_owned(), device_id.to_owned());
        let removed = self
            .db
            .call(move |connection| {
                Ok(connection.execute(
                    "DELETE FROM push_targets WHERE device_id = ?1 AND user_id = ?2 AND updated_at_ms <= ?3",
                    params![device, user, at_ms],
                )?)
            })
            .await?;
        Ok(removed > 0)
    }

    /// Announces every stored target again, so that a push worker reading the
    /// events topic from its start finds them even after the broker's
    /// retention dropped the original events.
    pub async fn announce_all(&self) -> Result<usize, TargetError> {
        let rows = self
            .db
            .call(|connection| {
                let mut statement = connection.prepare(
                    "SELECT user_id, device_id, kind, endpoint, p256dh, auth, app_id, pushkey, updated_at_ms \
                     FROM push_targets",
                )?;
                let rows = statement.query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        (row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?, row.get(6)?, row.get(7)?, row.get(8)?),
                    ))
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await?;
        let mut announced = 0;
        for (user_id, device_id, row) in rows {
            if let Some(stored) = from_row(row) {
                self.events.target_set(&user_id, &device_id, stored.target);
                announced += 1;
            }
        }
        Ok(announced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web_push(endpoint: &str, p256dh: usize, auth: usize) -> PushTarget {
        let mut key = vec![4u8; p256dh];
        if let Some(first) = key.first_mut() {
            *first = 0x04;
        }
        PushTarget::WebPush { endpoint: endpoint.into(), p256dh: key, auth: vec![1; auth] }
    }

    fn webhook(url: &str) -> PushTarget {
        PushTarget::Webhook { url: url.into(), app_id: "org.example".into(), pushkey: "pk".into() }
    }

    #[test]
    fn good_targets_pass() {
        validate(&web_push("https://updates.push.services.mozilla.com/wpush/v2/gAAAA", 65, 16)).unwrap();
        validate(&web_push("http://127.0.0.1:8080/push/abc", 65, 16)).unwrap();
        validate(&web_push("http://[::1]:8080/push/abc", 65, 16)).unwrap();
        validate(&webhook("https://ntfy.example.org/_matrix/push/v1/notify")).unwrap();
    }

    #[test]
    fn bad_targets_are_refused_with_a_reason() {
        let cases = [
            (web_push("not a url", 65, 16), "web_push.endpoint"),
            (web_push("", 65, 16), "missing"),
            (web_push(&format!("https://push.example/{}", "a".repeat(10_000)), 65, 16), "longer than 1024"),
            (web_push("http://push.example/x", 65, 16), "https"),
            (web_push("ftp://push.example/x", 65, 16), "https"),
            (web_push("https://user:pw@push.example/x", 65, 16), "credentials"),
            (web_push("/relative/path", 65, 16), "absolute"),
            (web_push("https://push.example/x", 33, 16), "p256dh"),
            (web_push("https://push.example/x", 65, 15), "auth"),
            (webhook("https://gw.example/notify"), "_matrix/push/v1/notify"),
            (webhook("http://gw.example/_matrix/push/v1/notify"), "https"),
        ];
        for (target, expected) in cases {
            let error = validate(&target).expect_err(expected).to_string();
            assert!(error.contains(expected), "{error:?} should mention {expected:?}");
            assert!(!error.contains("aaaaaaaaaa"), "the error does not echo the URL");
        }
        let mut compressed = web_push("https://push.example/x", 65, 16);
        if let PushTarget::WebPush { p256dh, .. } = &mut compressed {
            p256dh[0] = 0x02;
        }
        assert!(validate(&compressed).is_err());
        let empty_key = PushTarget::Webhook {
            url: "https://gw.example/_matrix/push/v1/notify".into(),
            app_id: String::new(),
            pushkey: "k".into(),
        };
        assert!(validate(&empty_key).unwrap_err().to_string().contains("app_id"));
    }
}
