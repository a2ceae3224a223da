//! Push targets: where each device can be woken. Stored in the server's
//! database (one per device), announced on the events topic (the push worker
//! learns them there, so it runs anywhere Kafka is reachable), removed when
//! the device removes it or is revoked.
//!
//! A target is a secret — whoever has a Web Push endpoint can wake the
//! device — so it is never logged (only its origin) and only the device
//! itself can read it back.

pub mod follower;

use lockstep_schemas::{PushTarget, TargetRemovedReason};

use crate::{
    accounts::AuthedDevice,
    db::{DbError, now_ms},
    events::Events,
    store::{Row as StoreRow, Sql, Store},
    values,
};

pub use lockstep_schemas::target_policy::{
    AUTH_BYTES, MATRIX_NOTIFY_PATH, MAX_APP_ID_CHARS, MAX_PUSHKEY_CHARS, MAX_URL_CHARS, P256DH_BYTES, TargetPolicy,
};

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

/// Validates a target as a device sent it: its shape, and that it names no
/// address inside the network (loopback, private, link-local, …) unless `policy`
/// (`push.allow_private_targets`) allows it. Host names are not resolved here (an
/// answer now says nothing about the answer the worker gets later): the worker
/// drops refused addresses from every resolution itself.
pub fn validate(target: &PushTarget, policy: &TargetPolicy) -> Result<(), TargetError> {
    policy.check_target(target).map(|_| ()).map_err(TargetError::Invalid)
}

/// The targets store; every change is announced on the events topic after
/// it is written.
#[derive(Clone)]
pub struct PushTargets {
    db: Store,
    events: Events,
    policy: TargetPolicy,
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

fn read_row(row: &StoreRow, first: usize) -> Result<Row, DbError> {
    Ok((
        row.get(first)?,
        row.get(first + 1)?,
        row.get(first + 2)?,
        row.get(first + 3)?,
        row.get(first + 4)?,
        row.get(first + 5)?,
        row.get(first + 6)?,
    ))
}

impl PushTargets {
    pub fn new(db: Store, events: Events, policy: TargetPolicy) -> Self {
        Self { db, events, policy }
    }

    /// Sets (replaces) the device's target.
    pub async fn set(&self, device: &AuthedDevice, target: PushTarget) -> Result<StoredTarget, TargetError> {
        validate(&target, &self.policy)?;
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
                    values![id, user, kind, endpoint, p256dh, auth, app_id, pushkey, updated_at_ms],
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
                connection
                    .query_opt(&format!("{SELECT} WHERE device_id = ?1"), values![id])?
                    .map(|row| read_row(&row, 0))
                    .transpose()
            })
            .await?;
        row.and_then(from_row).ok_or(TargetError::NotFound)
    }

    /// Removes the device's target; `NotFound` if it had none.
    pub async fn remove(&self, device: &AuthedDevice, reason: TargetRemovedReason) -> Result<(), TargetError> {
        let id = device.device_id.to_string();
        let removed = self
            .db
            .call(move |connection| connection.execute("DELETE FROM push_targets WHERE device_id = ?1", values![id]))
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
                connection.execute(
                    "DELETE FROM push_targets WHERE device_id = ?1 AND user_id = ?2 AND updated_at_ms <= ?3",
                    values![device, user, at_ms],
                )
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
                connection
                    .query(
                        "SELECT user_id, device_id, kind, endpoint, p256dh, auth, app_id, pushkey, updated_at_ms \
                         FROM push_targets",
                        &[],
                    )?
                    .iter()
                    .map(|row| Ok((row.get::<String>(0)?, row.get::<String>(1)?, read_row(row, 2)?)))
                    .collect::<Result<Vec<_>, DbError>>()
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

    fn public() -> TargetPolicy {
        TargetPolicy::public_only()
    }

    #[test]
    fn good_targets_pass() {
        validate(&web_push("https://updates.push.services.mozilla.com/wpush/v2/gAAAA", 65, 16), &public()).unwrap();
        validate(&webhook("https://ntfy.example.org/_matrix/push/v1/notify"), &public()).unwrap();
        // A local push service, for tests: only with the allow-list.
        let local = TargetPolicy::allowing(&["127.0.0.1".into(), "::1".into()]).unwrap();
        validate(&web_push("http://127.0.0.1:8080/push/abc", 65, 16), &local).unwrap();
        validate(&web_push("http://[::1]:8080/push/abc", 65, 16), &local).unwrap();
    }

    #[test]
    fn targets_inside_the_network_are_refused_with_a_readable_reason() {
        for (url, range) in [
            ("http://127.0.0.1:8080/push/abc", "loopback"),
            ("https://10.0.0.1/push", "private"),
            ("https://169.254.169.254/latest/meta-data", "link-local"),
            ("http://[::1]:8080/push", "loopback"),
            ("https://[fd00::1]/push", "unique local"),
            ("https://100.64.1.1/push", "CGNAT"),
            ("https://0.0.0.0/push", "unspecified"),
            ("https://localhost/push", "loopback"),
        ] {
            let error = validate(&web_push(url, 65, 16), &public()).expect_err(url).to_string();
            assert!(error.contains(range) && error.contains("may not reach"), "{url}: {error}");
            assert!(error.starts_with("web_push.endpoint"), "{error}");
        }
        let error = validate(&webhook("https://192.168.0.10/_matrix/push/v1/notify"), &public()).unwrap_err();
        assert!(error.to_string().contains("webhook.url names a private"), "{error}");
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
            let error = validate(&target, &public()).expect_err(expected).to_string();
            assert!(error.contains(expected), "{error:?} should mention {expected:?}");
            assert!(!error.contains("aaaaaaaaaa"), "the error does not echo the URL");
        }
        let mut compressed = web_push("https://push.example/x", 65, 16);
        if let PushTarget::WebPush { p256dh, .. } = &mut compressed {
            p256dh[0] = 0x02;
        }
        assert!(validate(&compressed, &public()).is_err());
        let empty_key = PushTarget::Webhook {
            url: "https://gw.example/_matrix/push/v1/notify".into(),
            app_id: String::new(),
            pushkey: "k".into(),
        };
        assert!(validate(&empty_key, &public()).unwrap_err().to_string().contains("app_id"));
    }

    use crate::{both_backends, store::testing::TestStore};

    both_backends!(a_target_is_set_replaced_read_and_removed_per_device, |store: TestStore| async move {
        let accounts =
            crate::accounts::Accounts::open(store.store.clone(), std::time::Duration::from_secs(60)).await.unwrap();
        let created = accounts.create_account("u1".into(), "laptop".into()).await.unwrap();
        let device = accounts.authenticate(&created.token).unwrap();
        let targets = PushTargets::new(store.store.clone(), Events::disabled(), public());
        assert!(matches!(targets.get(&device).await, Err(TargetError::NotFound)));
        let first = web_push("https://push.example/a", 65, 16);
        targets.set(&device, first.clone()).await.unwrap();
        assert_eq!(targets.get(&device).await.unwrap().target, first);
        let second = webhook("https://gw.example/_matrix/push/v1/notify");
        let stored = targets.set(&device, second.clone()).await.unwrap();
        assert_eq!(targets.get(&device).await.unwrap(), stored);
        assert_eq!(targets.announce_all().await.unwrap(), 1);
        // A worker's report older than the last change keeps the target; a newer one removes it.
        assert!(!targets.forget_gone("u1", &device.device_id, stored.updated_at_ms - 1).await.unwrap());
        assert!(targets.forget_gone("u1", &device.device_id, stored.updated_at_ms).await.unwrap());
        targets.set(&device, first).await.unwrap();
        targets.remove(&device, TargetRemovedReason::RemovedByDevice).await.unwrap();
        assert!(matches!(
            targets.remove(&device, TargetRemovedReason::RemovedByDevice).await,
            Err(TargetError::NotFound)
        ));
    });
}
