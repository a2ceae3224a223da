//! The log never silently shrinks. Data flow step: a check between Kafka and
//! both the gateway and delivery.
//!
//! The server remembers, per user, the highest log end it ever saw Kafka
//! acknowledge (`users.log_high_mark`). When Kafka later reports a log end
//! below that, or a device's committed offset past the log end, the log lost
//! changes it had acknowledged: the broker was restarted without its data, the
//! topic was deleted and recreated, an operator or a retention setting
//! truncated it. Telling devices to "start over" would then wipe the one place
//! where the data still exists, so instead:
//!
//! - the incident is recorded (`log_incidents`) and raised as an error log line;
//! - the user's *log generation* goes up, the dedup index of the user is
//!   dropped (its offsets point into the old log) and the new log is accepted
//!   as the baseline;
//! - every device of the user whose generation is older gets DATA_LOSS on
//!   Subscribe and Ack until it subscribes with `repair = true`: it then
//!   re-reads the log from its start (a Resync with reason LOG_LOST), merges,
//!   and pushes back what it holds that the log no longer has. The account
//!   heals from the union of its devices.

use rusqlite::OptionalExtension;
use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    db::{DbError, now_ms},
    error::ApiError,
    idle::LastUsed,
    kafka::{KafkaError, Topics, topics::Watermarks},
    store::{Sql, Store},
    values,
};
use lockstep_kafka::locks::lock;

/// What the server knows about one user's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserMark {
    /// No acknowledged change was ever at or past this offset... or the log end was at least here.
    pub high_mark: i64,
    /// Goes up by one with every recorded loss.
    pub generation: i64,
}

/// Why the server decided the log lost changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossEvidence {
    /// Kafka's log end is below the highest end the server saw acknowledged.
    LogEndWentBack { expected_end: i64 },
    /// A device committed an offset past Kafka's log end.
    CommittedPastEnd { committed: i64 },
}

impl LossEvidence {
    fn expected_end(self) -> i64 {
        match self {
            LossEvidence::LogEndWentBack { expected_end } => expected_end,
            LossEvidence::CommittedPastEnd { committed } => committed,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            LossEvidence::LogEndWentBack { .. } => "log end went back",
            LossEvidence::CommittedPastEnd { .. } => "a device committed past the log end",
        }
    }
}

/// The decision rule, on its own: does this view of the log contradict what
/// the server knows?
pub fn evidence_of_loss(mark: UserMark, watermarks: Watermarks, committed: Option<i64>) -> Option<LossEvidence> {
    if watermarks.log_end < mark.high_mark {
        return Some(LossEvidence::LogEndWentBack { expected_end: mark.high_mark });
    }
    match committed {
        Some(committed) if committed > watermarks.log_end => Some(LossEvidence::CommittedPastEnd { committed }),
        _ => None,
    }
}

/// A value read from the database, and when it was last used (see [`LogGuard::evict_idle`]).
struct Cached<T> {
    value: T,
    used: LastUsed,
}

impl<T: Copy> Cached<T> {
    fn new(value: T) -> Self {
        Self { value, used: LastUsed::default() }
    }

    fn get(&mut self) -> T {
        self.used.touch();
        self.value
    }
}

#[derive(Clone)]
pub struct LogGuard {
    inner: Arc<Inner>,
}

struct Inner {
    db: Store,
    users: Mutex<HashMap<Arc<str>, Cached<UserMark>>>,
    /// device id -> the log generation it last repaired to.
    devices: Mutex<HashMap<Arc<str>, Cached<i64>>>,
    /// Serialises recording incidents, so two requests that see the same
    /// loss at once record it once.
    incidents: tokio::sync::Mutex<()>,
}

impl LogGuard {
    pub fn new(db: Store) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                users: Mutex::default(),
                devices: Mutex::default(),
                incidents: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The user's mark, read from the database once.
    pub async fn mark(&self, user_id: &Arc<str>) -> Result<UserMark, DbError> {
        if let Some(mark) = lock(&self.inner.users).get_mut(user_id) {
            return Ok(mark.get());
        }
        let user = user_id.to_string();
        let stored = self
            .inner
            .db
            .call(move |connection| {
                connection
                    .query_opt("SELECT log_high_mark, log_generation FROM users WHERE user_id = ?1", values![user])?
                    .map(|row| Ok(UserMark { high_mark: row.get(0)?, generation: row.get(1)? }))
                    .transpose()
            })
            .await?
            .unwrap_or(UserMark { high_mark: 0, generation: 0 });
        let stored = if self.inner.db.is_shared() {
            // With the accounts in PostgreSQL, the gateway still raises the mark with its dedup
            // record in the node-local SQLite (`gateway::dedup`): the higher of the two counts.
            let user = user_id.to_string();
            let local: Option<i64> = self
                .inner
                .db
                .local()
                .call(move |connection| {
                    Ok(connection
                        .query_row("SELECT log_high_mark FROM users WHERE user_id = ?1", [user], |row| row.get(0))
                        .optional()?)
                })
                .await?;
            UserMark { high_mark: stored.high_mark.max(local.unwrap_or(0)), ..stored }
        } else {
            stored
        };
        let mut users = lock(&self.inner.users);
        Ok(users.entry(user_id.clone()).or_insert_with(|| Cached::new(stored)).get())
    }

    /// Forgets marks and device generations not used for `idle_after`: the
    /// database has them (a mark raised in memory only is at most as high as
    /// the stored one plus pushes whose dedup records are being written, and a
    /// lower mark only makes the check less strict for a moment, never wrong).
    /// Returns how many users' and devices' entries were forgotten.
    pub fn evict_idle(&self, idle_after: Duration) -> (usize, usize) {
        let mut users = lock(&self.inner.users);
        let before = users.len();
        users.retain(|_, mark| !mark.used.idle(idle_after));
        let users_forgotten = before - users.len();
        drop(users);
        let mut devices = lock(&self.inner.devices);
        let before = devices.len();
        devices.retain(|_, generation| !generation.used.idle(idle_after));
        (users_forgotten, before - devices.len())
    }

    /// Users' marks and devices' generations this node holds.
    pub fn state_entries(&self) -> (usize, usize) {
        (lock(&self.inner.users).len(), lock(&self.inner.devices).len())
    }

    /// The generation in memory, if this user was seen since start (cheap, for the push path).
    pub fn cached_generation(&self, user_id: &str) -> Option<i64> {
        lock(&self.inner.users).get_mut(user_id).map(|mark| mark.get().generation)
    }

    /// Kafka acknowledged changes up to `end` (exclusive): raise the mark in
    /// memory. The gateway stores it with its dedup record, in the same transaction.
    pub fn note_acknowledged(&self, user_id: &Arc<str>, end: i64) {
        if let Some(mark) = lock(&self.inner.users).get_mut(user_id) {
            mark.value.high_mark = mark.value.high_mark.max(end);
        }
    }

    /// Reads the user's log bounds and checks them (and a device's committed
    /// offset, if given) against what the server knows. Raises the mark when
    /// the log grew; records an incident when it contradicts the mark.
    /// Returns the bounds and the user's generation after the check.
    ///
    /// The mark and the committed offset must be older than the bounds they
    /// are compared with: pushes acknowledged (and acks committed) after the
    /// bounds were read would look like a loss. So the mark is read here
    /// before the bounds, and `device_committed` must have been read before
    /// this call.
    ///
    /// A device that has not repaired since the last incident committed its
    /// offset in the old log: that offset is no evidence (it is reset when the
    /// device repairs).
    pub async fn read_and_check(
        &self,
        topics: &Topics,
        user_id: &Arc<str>,
        topic: &str,
        device_committed: Option<(&Arc<str>, i64)>,
    ) -> Result<(Watermarks, i64), ApiError> {
        self.check_bounds(user_id, || topics.user_log_watermarks(topic), device_committed).await
    }

    /// [`Self::read_and_check`] with the bounds read by `read_bounds`.
    async fn check_bounds<F, Fut>(
        &self,
        user_id: &Arc<str>,
        read_bounds: F,
        device_committed: Option<(&Arc<str>, i64)>,
    ) -> Result<(Watermarks, i64), ApiError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Watermarks, KafkaError>>,
    {
        let mark = self.mark(user_id).await?;
        let watermarks = read_bounds().await?;
        let committed = match device_committed {
            Some((device_id, committed)) if self.device_generation(device_id).await? >= mark.generation => {
                Some(committed)
            }
            _ => None,
        };
        if evidence_of_loss(mark, watermarks, committed).is_none() {
            if watermarks.log_end > mark.high_mark {
                self.raise(user_id, watermarks.log_end).await?;
            }
            return Ok((watermarks, mark.generation));
        }
        let _serialised = self.inner.incidents.lock().await;
        // Look again, in order: another request may have recorded it meanwhile
        // (the mark is then the new log end).
        let mark = self.mark(user_id).await?;
        let watermarks = read_bounds().await?;
        let Some(evidence) = evidence_of_loss(mark, watermarks, committed) else {
            return Ok((watermarks, mark.generation));
        };
        let generation = self.record_incident(user_id, mark, watermarks, evidence).await?;
        Ok((watermarks, generation))
    }

    async fn raise(&self, user_id: &Arc<str>, end: i64) -> Result<(), DbError> {
        let user = user_id.to_string();
        self.inner
            .db
            .call(move |connection| {
                connection.execute(
                    "UPDATE users SET log_high_mark = CASE WHEN log_high_mark > ?2 THEN log_high_mark ELSE ?2 END
                     WHERE user_id = ?1",
                    values![user, end],
                )?;
                Ok(())
            })
            .await?;
        self.note_acknowledged(user_id, end);
        Ok(())
    }

    async fn record_incident(
        &self,
        user_id: &Arc<str>,
        mark: UserMark,
        watermarks: Watermarks,
        evidence: LossEvidence,
    ) -> Result<i64, ApiError> {
        let generation = mark.generation + 1;
        let expected_end = evidence.expected_end();
        tracing::error!(
            user_id = %user_id,
            expected_end,
            log_start = watermarks.log_start,
            log_end = watermarks.log_end,
            evidence = evidence.as_str(),
            generation,
            "the kafka log of a user lost changes it had acknowledged: its devices get DATA_LOSS until they repair"
        );
        // The dedup index first (node-local, see `store`): its offsets point into the old log.
        // Were the process to stop before the incident below is recorded, the next check finds
        // the same loss and resets the index again.
        let user = user_id.to_string();
        self.inner
            .db
            .local()
            .call(move |connection| {
                let transaction = connection.transaction()?;
                transaction.execute(
                    "UPDATE users SET dedup_indexed_through = ?2 WHERE user_id = ?1",
                    rusqlite::params![user, watermarks.log_start],
                )?;
                transaction.execute("DELETE FROM pushed_changes WHERE user_id = ?1", [&user])?;
                transaction.commit()?;
                Ok(())
            })
            .await?;
        let user = user_id.to_string();
        let reason = evidence.as_str();
        self.inner
            .db
            .call(move |connection| {
                let transaction = connection.transaction()?;
                transaction.execute(
                    "UPDATE users SET log_generation = ?2, log_high_mark = ?3 WHERE user_id = ?1",
                    values![&user, generation, watermarks.log_end],
                )?;
                transaction.execute(
                    "INSERT INTO log_incidents (user_id, generation, detected_at_ms, expected_end, found_start, found_end, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    values![&user, generation, now_ms(), expected_end, watermarks.log_start, watermarks.log_end, reason],
                )?;
                transaction.commit()?;
                Ok(())
            })
            .await?;
        if self.inner.db.is_shared() {
            // The node-local mark (see `mark`) comes down only now that the incident is recorded:
            // a stop before this line finds the loss again (a second incident), never misses it.
            let user = user_id.to_string();
            self.inner
                .db
                .local()
                .call(move |connection| {
                    connection.execute(
                        "UPDATE users SET log_high_mark = ?2 WHERE user_id = ?1",
                        rusqlite::params![user, watermarks.log_end],
                    )?;
                    Ok(())
                })
                .await?;
        }
        let mark = UserMark { high_mark: watermarks.log_end, generation };
        lock(&self.inner.users).insert(user_id.clone(), Cached::new(mark));
        Ok(generation)
    }

    /// The generation a device last repaired to.
    async fn device_generation(&self, device_id: &Arc<str>) -> Result<i64, DbError> {
        if let Some(generation) = lock(&self.inner.devices).get_mut(device_id) {
            return Ok(generation.get());
        }
        let device = device_id.to_string();
        let stored = self
            .inner
            .db
            .call(move |connection| {
                connection
                    .query_opt("SELECT log_generation FROM devices WHERE device_id = ?1", values![device])?
                    .map(|row| row.get(0))
                    .transpose()
            })
            .await?
            .unwrap_or(0);
        Ok(lock(&self.inner.devices).entry(device_id.clone()).or_insert_with(|| Cached::new(stored)).get())
    }

    /// DATA_LOSS unless the device has repaired since the user's last incident.
    pub async fn ensure_repaired(&self, user_id: &Arc<str>, device_id: &Arc<str>) -> Result<(), ApiError> {
        let mark = self.mark(user_id).await?;
        if self.device_generation(device_id).await? >= mark.generation {
            return Ok(());
        }
        let incident = self.last_incident(user_id).await?;
        Err(ApiError::LogLost(format!(
            "the server's log of this account lost changes it had acknowledged ({incident}); \
             this device must repair: subscribe with repair = true, then push back what the log no longer has \
             (lockstep-cli sync does this)"
        )))
    }

    /// The device repairs: from now on it is served again.
    pub async fn mark_repaired(&self, user_id: &Arc<str>, device_id: &Arc<str>) -> Result<(), DbError> {
        let generation = self.mark(user_id).await?.generation;
        if self.device_generation(device_id).await? >= generation {
            return Ok(());
        }
        let device = device_id.to_string();
        self.inner
            .db
            .call(move |connection| {
                connection.execute(
                    "UPDATE devices SET log_generation = CASE WHEN log_generation > ?2 THEN log_generation ELSE ?2 END
                     WHERE device_id = ?1",
                    values![device, generation],
                )?;
                Ok(())
            })
            .await?;
        lock(&self.inner.devices).insert(device_id.clone(), Cached::new(generation));
        tracing::info!(user_id = %user_id, device_id = %device_id, generation, "device repairs after a lost log");
        Ok(())
    }

    async fn last_incident(&self, user_id: &str) -> Result<String, DbError> {
        let user = user_id.to_string();
        self.inner
            .db
            .call(move |connection| {
                let found = connection
                    .query_opt(
                        "SELECT detected_at_ms, expected_end, found_start, found_end, reason FROM log_incidents
                         WHERE user_id = ?1 ORDER BY generation DESC LIMIT 1",
                        values![user],
                    )?
                    .map(|row| {
                        Ok::<_, DbError>(format!(
                            "{}: expected at least {} changes, Kafka holds offsets {}..{}, detected at {} ms",
                            row.get::<String>(4)?,
                            row.get::<i64>(1)?,
                            row.get::<i64>(2)?,
                            row.get::<i64>(3)?,
                            row.get::<i64>(0)?,
                        ))
                    })
                    .transpose()?;
                Ok(found.unwrap_or_else(|| "no details recorded".into()))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(high_mark: i64) -> UserMark {
        UserMark { high_mark, generation: 0 }
    }

    fn log(log_start: i64, log_end: i64) -> Watermarks {
        Watermarks { log_start, log_end }
    }

    #[test]
    fn a_log_that_grew_or_expired_history_is_no_loss() {
        assert_eq!(evidence_of_loss(marks(10), log(0, 10), Some(10)), None);
        assert_eq!(evidence_of_loss(marks(10), log(0, 15), Some(3)), None);
        // Retention moved the log start: history expired, not lost (a Resync).
        assert_eq!(evidence_of_loss(marks(10), log(8, 10), Some(2)), None);
        assert_eq!(evidence_of_loss(marks(0), log(0, 0), None), None);
    }

    #[test]
    fn a_log_end_below_the_mark_or_a_commit_past_the_end_is_loss() {
        assert_eq!(
            evidence_of_loss(marks(10), log(0, 3), None),
            Some(LossEvidence::LogEndWentBack { expected_end: 10 })
        );
        assert_eq!(
            evidence_of_loss(marks(3), log(0, 3), Some(7)),
            Some(LossEvidence::CommittedPastEnd { committed: 7 })
        );
    }

    impl LogGuard {
        async fn check(
            &self,
            user_id: &Arc<str>,
            watermarks: Watermarks,
            device_committed: Option<(&Arc<str>, i64)>,
        ) -> Result<i64, ApiError> {
            let read = || async move { Ok::<_, KafkaError>(watermarks) };
            Ok(self.check_bounds(user_id, read, device_committed).await?.1)
        }
    }

    use crate::{both_backends, store::testing::TestStore};

    fn guard(store: &TestStore) -> LogGuard {
        LogGuard::new(store.store.clone())
    }

    async fn add_user(guard: &LogGuard, user: &str, devices: &[&str]) {
        let (user, devices): (String, Vec<String>) = (user.into(), devices.iter().map(|d| d.to_string()).collect());
        let name = user.clone();
        guard
            .inner
            .db
            .call(move |connection| {
                connection.execute("INSERT INTO users (user_id, created_at_ms) VALUES (?1, 0)", values![&user])?;
                for device in devices {
                    connection.execute(
                        "INSERT INTO devices (device_id, user_id, name, token_hash, created_at_ms) VALUES (?1, ?2, ?1, ?3, 0)",
                        values![&device, &user, device.as_bytes()],
                    )?;
                }
                Ok(())
            })
            .await
            .unwrap();
        guard.inner.db.mirror_user_locally(&name).await.unwrap();
        guard
            .inner
            .db
            .local()
            .call(move |connection| {
                connection.execute(
                    "INSERT INTO pushed_changes (user_id, device_id, change_id, kafka_offset, digest) VALUES (?1, 'a', 'c', 0, x'00')",
                    [&name],
                )?;
                Ok(())
            })
            .await
            .unwrap();
    }

    both_backends!(
        a_loss_is_recorded_once_and_each_device_is_refused_until_it_repairs,
        |store: TestStore| async move {
            let guard = guard(&store);
            add_user(&guard, "u", &["a", "b"]).await;
            let (user, a, b): (Arc<str>, Arc<str>, Arc<str>) = ("u".into(), "a".into(), "b".into());
            assert_eq!(guard.check(&user, log(0, 5), None).await.unwrap(), 0);
            guard.ensure_repaired(&user, &a).await.unwrap();
            // Kafka came back without the last 5 changes.
            assert_eq!(guard.check(&user, log(0, 0), None).await.unwrap(), 1);
            assert_eq!(guard.check(&user, log(0, 0), None).await.unwrap(), 1, "recorded once");
            for device in [&a, &b] {
                let refused = guard.ensure_repaired(&user, device).await.unwrap_err();
                assert_eq!(refused.code(), tonic::Code::DataLoss);
                assert!(refused.to_string().contains("expected at least 5"), "{refused}");
            }
            guard.mark_repaired(&user, &a).await.unwrap();
            guard.ensure_repaired(&user, &a).await.unwrap();
            assert!(guard.ensure_repaired(&user, &b).await.is_err(), "b has not repaired yet");

            // A new guard (a restarted server) knows all of it from the database, and
            // the user's dedup index is gone with the old log.
            let restarted = LogGuard::new(guard.inner.db.clone());
            assert_eq!(restarted.mark(&user).await.unwrap(), UserMark { high_mark: 0, generation: 1 });
            restarted.ensure_repaired(&user, &a).await.unwrap();
            assert!(restarted.ensure_repaired(&user, &b).await.is_err());
            let (dedup_rows, indexed_through): (i64, i64) = guard
                .inner
                .db
                .local()
                .call(|connection| {
                    Ok((
                        connection.query_row("SELECT count(*) FROM pushed_changes", [], |row| row.get(0))?,
                        connection.query_row("SELECT dedup_indexed_through FROM users", [], |row| row.get(0))?,
                    ))
                })
                .await
                .unwrap();
            assert_eq!((dedup_rows, indexed_through), (0, 0));

            // Forgotten when idle, and the same verdicts from the database afterwards.
            assert_eq!(guard.evict_idle(Duration::from_secs(60)), (0, 0), "just used");
            assert_eq!(guard.evict_idle(Duration::ZERO), (1, 2));
            assert_eq!(guard.state_entries(), (0, 0));
            assert_eq!(guard.mark(&user).await.unwrap(), UserMark { high_mark: 0, generation: 1 });
            guard.ensure_repaired(&user, &a).await.unwrap();
            assert!(guard.ensure_repaired(&user, &b).await.is_err(), "b still has to repair");
            assert_eq!(guard.state_entries(), (1, 2));
        }
    );

    both_backends!(a_commit_past_the_end_is_a_loss_too, |store: TestStore| async move {
        let guard = guard(&store);
        add_user(&guard, "u", &["a"]).await;
        let user: Arc<str> = "u".into();
        let a: Arc<str> = "a".into();
        assert_eq!(guard.check(&user, log(0, 4), Some((&a, 9))).await.unwrap(), 1);
        assert_eq!(guard.mark(&user).await.unwrap().high_mark, 4);
        // Until it repairs, the device's offset is from the old log: no new incident.
        assert_eq!(guard.check(&user, log(0, 4), Some((&a, 9))).await.unwrap(), 1);
        guard.mark_repaired(&user, &a).await.unwrap();
        assert_eq!(guard.check(&user, log(0, 4), Some((&a, 4))).await.unwrap(), 1);
    });

    both_backends!(pushes_acknowledged_while_the_bounds_are_read_are_no_loss, |store: TestStore| async move {
        let guard = guard(&store);
        add_user(&guard, "u", &["a"]).await;
        let user: Arc<str> = "u".into();
        assert_eq!(guard.check(&user, log(0, 5), None).await.unwrap(), 0);
        // The bounds say 5; meanwhile Kafka acknowledged pushes up to 9.
        let read = || async {
            guard.note_acknowledged(&user, 9);
            Ok::<_, KafkaError>(log(0, 5))
        };
        let (_, generation) = guard.check_bounds(&user, read, None).await.unwrap();
        assert_eq!(generation, 0, "a mark raised after the bounds were read is no evidence");
        assert_eq!(guard.mark(&user).await.unwrap().high_mark, 9);
    });

    // The gateway raises the mark with its dedup record, in the node-local SQLite (also when the
    // accounts are in PostgreSQL): that mark counts, and comes down with an incident.
    both_backends!(the_mark_the_dedup_record_raised_counts_on_both_backends, |store: TestStore| async move {
        let guard = guard(&store);
        add_user(&guard, "u", &["a"]).await;
        guard
            .inner
            .db
            .local()
            .call(|connection| {
                connection.execute("UPDATE users SET log_high_mark = 7 WHERE user_id = 'u'", [])?;
                Ok(())
            })
            .await
            .unwrap();
        let user: Arc<str> = "u".into();
        assert_eq!(guard.mark(&user).await.unwrap(), UserMark { high_mark: 7, generation: 0 });
        assert_eq!(guard.check(&user, log(0, 2), None).await.unwrap(), 1, "the log lost what Kafka acknowledged");
        let restarted = LogGuard::new(store.store.clone());
        assert_eq!(restarted.mark(&user).await.unwrap(), UserMark { high_mark: 2, generation: 1 });
        assert_eq!(restarted.check(&user, log(0, 2), None).await.unwrap(), 1, "recorded once");
    });
}
