//! Deleting an account: the server forgets a user completely.
//!
//! Two steps, so that a deletion is never half-done for good:
//! 1. [`Erasure::begin`] — one transaction marks the user as being deleted,
//!    revokes every device and spends every pairing ticket; tokens stop
//!    working and streams end at once. From here on no client can reach the
//!    account, nor write to its topic.
//! 2. [`Erasure::purge`] — deletes the user's topic and every device's
//!    consumer group in Kafka, then every row (push targets, dedup entries,
//!    incidents, devices, the user). If Kafka is away, the purge is retried in
//!    the background and at the next start ([`Erasure::resume`]), until done.

use std::{sync::Arc, time::Duration};

use crate::{
    accounts::{Accounts, AuthedDevice},
    db::{DbError, now_ms},
    delivery::Delivery,
    error::ApiError,
    events::Events,
    kafka::{GroupOffsets, KafkaError, KafkaFailure, Topics, device_group, user_topic},
    settings::KafkaSettings,
    shutdown::ShutdownSource,
    store::{Sql, Store},
    values,
};

#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
}

/// A Kafka wait of an erasure is bounded like every other (`kafka::bounded`).
impl KafkaFailure for ErasureError {
    fn as_kafka(&self) -> Option<&KafkaError> {
        match self {
            ErasureError::Kafka(error) => Some(error),
            ErasureError::Db(_) => None,
        }
    }
}

/// An erasure fails as the store under it failed: its status code is theirs
/// (see `error`).
impl From<ErasureError> for ApiError {
    fn from(error: ErasureError) -> Self {
        match error {
            ErasureError::Db(error) => ApiError::Db(error),
            ErasureError::Kafka(error) => ApiError::Kafka(error),
        }
    }
}

/// What a purge removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    pub topic_deleted: bool,
    pub device_groups_deleted: u32,
    pub devices_removed: u32,
    pub push_targets_removed: u32,
    pub dedup_entries_removed: u64,
}

#[derive(Clone)]
pub struct Erasure {
    inner: Arc<Inner>,
}

struct Inner {
    db: Store,
    accounts: Accounts,
    delivery: Delivery,
    events: Events,
    topics: Topics,
    offsets: GroupOffsets,
    kafka: KafkaSettings,
    shutdown: ShutdownSource,
}

impl Erasure {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: Store,
        accounts: Accounts,
        delivery: Delivery,
        events: Events,
        topics: Topics,
        offsets: GroupOffsets,
        kafka: KafkaSettings,
        shutdown: ShutdownSource,
    ) -> Self {
        Self { inner: Arc::new(Inner { db, accounts, delivery, events, topics, offsets, kafka, shutdown }) }
    }

    /// Step 1: the account is closed for every client. Returns its device ids.
    pub async fn begin(&self, user_id: &str) -> Result<Vec<String>, ErasureError> {
        let user = user_id.to_owned();
        let devices = self
            .inner
            .db
            .call(move |connection| {
                let transaction = connection.transaction()?;
                let now = now_ms();
                transaction.execute(
                    "UPDATE users SET deleting_at_ms = ?2 WHERE user_id = ?1 AND deleting_at_ms IS NULL",
                    values![&user, now],
                )?;
                transaction.execute(
                    "UPDATE devices SET revoked_at_ms = ?2 WHERE user_id = ?1 AND revoked_at_ms IS NULL",
                    values![&user, now],
                )?;
                transaction.execute("DELETE FROM pairing_tickets WHERE user_id = ?1", values![&user])?;
                let devices = transaction
                    .query("SELECT device_id FROM devices WHERE user_id = ?1", values![&user])?
                    .iter()
                    .map(|row| row.get::<String>(0))
                    .collect::<Result<Vec<_>, _>>()?;
                transaction.commit()?;
                Ok(devices)
            })
            .await?;
        for device_id in &devices {
            self.inner.accounts.forget_device(device_id);
            self.inner.delivery.revoke(device_id);
            self.inner.events.device_revoked(user_id, device_id);
        }
        tracing::info!(user_id, devices = devices.len(), "account deletion began: every device signed out");
        Ok(devices)
    }

    /// Step 2: Kafka's copy, then the rows. Idempotent: a topic or group that
    /// is gone already counts as deleted.
    pub async fn purge(&self, user_id: &str) -> Result<Purged, ErasureError> {
        let inner = &self.inner;
        let user = user_id.to_owned();
        let devices: Vec<(String, bool)> = inner
            .db
            .call(move |connection| {
                connection
                    .query(
                        "SELECT d.device_id, EXISTS (SELECT 1 FROM push_targets t WHERE t.device_id = d.device_id)
                         FROM devices d WHERE d.user_id = ?1",
                        values![&user],
                    )?
                    .iter()
                    .map(|row| Ok((row.get(0)?, row.get(1)?)))
                    .collect::<Result<Vec<_>, DbError>>()
            })
            .await?;
        let mut purged = Purged::default();
        let topic = user_topic(&inner.kafka, user_id);
        if inner.kafka.delete_topics {
            inner.topics.delete_topic(&topic).await?;
            purged.topic_deleted = true;
        } else {
            tracing::warn!(topic, "kafka.delete_topics is off: the deleted account's topic stays in Kafka");
        }
        for (device_id, had_target) in &devices {
            inner.offsets.delete_group(&device_group(&inner.kafka, device_id)).await.map_err(KafkaError::from)?;
            purged.device_groups_deleted += 1;
            if *had_target {
                inner.events.target_removed(user_id, device_id, lockstep_schemas::TargetRemovedReason::DeviceRevoked);
            }
        }
        // With PostgreSQL, the node-local SQLite keeps a `users` row per account (see `store`):
        // removed first; were the process to stop between the two, the account's row (still
        // marked as being deleted) brings the purge back at the next start.
        if inner.db.is_shared() {
            let user = user_id.to_owned();
            inner
                .db
                .local()
                .call(move |connection| {
                    connection.execute("DELETE FROM users WHERE user_id = ?1", [&user])?;
                    Ok(())
                })
                .await?;
        }
        let user = user_id.to_owned();
        let (targets, devices_removed, dedup) = inner
            .db
            .call(move |connection| {
                let transaction = connection.transaction()?;
                let targets = transaction.execute("DELETE FROM push_targets WHERE user_id = ?1", values![&user])?;
                // The dedup index and its reservations are in the store, on every node's view.
                let dedup = transaction.execute("DELETE FROM pushed_changes WHERE user_id = ?1", values![&user])?;
                transaction.execute("DELETE FROM push_reservations WHERE user_id = ?1", values![&user])?;
                transaction.execute("DELETE FROM log_incidents WHERE user_id = ?1", values![&user])?;
                transaction.execute("DELETE FROM pairing_tickets WHERE user_id = ?1", values![&user])?;
                crate::accounts::Invites::forget_user(&transaction, &user)?;
                // Key tables (`keys`): device_keys references devices, so before them.
                for table in crate::keys::TABLES_BY_USER {
                    transaction.execute(&format!("DELETE FROM {table} WHERE user_id = ?1"), values![&user])?;
                }
                let devices = transaction.execute("DELETE FROM devices WHERE user_id = ?1", values![&user])?;
                transaction.execute("DELETE FROM users WHERE user_id = ?1", values![&user])?;
                transaction.commit()?;
                Ok((targets, devices, dedup))
            })
            .await?;
        purged.push_targets_removed = targets as u32;
        purged.dedup_entries_removed = dedup;
        purged.devices_removed = devices_removed as u32;
        tracing::info!(user_id, ?purged, "account deleted");
        Ok(purged)
    }

    /// A revoked device's consumer group (its offsets) is of no use to anyone: deleted.
    pub async fn delete_device_group(&self, device_id: &str) -> Result<(), ErasureError> {
        let group = device_group(&self.inner.kafka, device_id);
        self.inner.offsets.delete_group(&group).await.map_err(KafkaError::from)?;
        Ok(())
    }

    /// Purges in the background until it succeeds or shutdown begins.
    pub fn purge_later(&self, user_id: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let Some(mut running) = this.inner.shutdown.handle() else { return };
            let mut backoff = Duration::from_secs(1);
            loop {
                match this.purge(&user_id).await {
                    Ok(_) => return,
                    Err(error) => tracing::warn!(user_id, %error, "account deletion not finished yet; retrying"),
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = running.begun() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        });
    }

    /// At start: finishes the deletions a previous process began.
    pub async fn resume(&self) -> Result<usize, ErasureError> {
        let users: Vec<String> = self
            .inner
            .db
            .call(|connection| {
                connection
                    .query("SELECT user_id FROM users WHERE deleting_at_ms IS NOT NULL", &[])?
                    .iter()
                    .map(|row| row.get(0))
                    .collect::<Result<Vec<_>, DbError>>()
            })
            .await?;
        for user_id in &users {
            tracing::info!(user_id, "finishing an account deletion begun before the restart");
            self.purge_later(user_id.clone());
        }
        Ok(users.len())
    }

    /// The whole deletion for the device's account; `completed = false` in
    /// the answer when Kafka's part continues in the background.
    pub async fn delete_account(
        &self,
        caller: &AuthedDevice,
        deadline: Duration,
    ) -> Result<(Purged, bool), ErasureError> {
        self.begin(&caller.user_id).await?;
        match tokio::time::timeout(deadline, self.purge(&caller.user_id)).await {
            Ok(Ok(purged)) => Ok((purged, true)),
            Ok(Err(error)) => {
                tracing::warn!(user_id = %caller.user_id, %error, "account deletion continues in the background");
                self.purge_later(caller.user_id.to_string());
                Ok((Purged::default(), false))
            }
            Err(_) => {
                self.purge_later(caller.user_id.to_string());
                Ok((Purged::default(), false))
            }
        }
    }
}
