//! Invite codes: single-use credentials for CreateAccount, made by the operator
//! (`lockstep invite create`, which writes to the same database while the server
//! runs: WAL and a busy timeout let the two processes share it).
//!
//! A code is 160 random bits, shown once; the database keeps its SHA-256 only.
//! Redeeming is two steps around the Kafka topic's creation:
//!
//! 1. [`Invites::claim`] marks the invite as taken for `claim_lease` (the
//!    longest a CreateAccount may run), so a concurrent use of the same code is
//!    refused before it creates a topic;
//! 2. the account's rows and the invite's `used_at_ms` are written in one
//!    transaction (`Accounts::create_account_with_invite`).
//!
//! A claim that is not spent (the topic could not be created, the caller went
//! away) is released when it is dropped, or lapses with its lease after a crash:
//! the code works again.

use std::time::Duration;

use serde::Serialize;

use super::secrets::{hash_secret, new_secret};
use crate::{
    db::{DbError, now_ms},
    store::{Sql, Store, Tx},
    values,
};

/// The prefix of invite codes (`lsi_` + 27 base64url characters).
pub const INVITE_PREFIX: &str = "lsi_";
const INVITE_BYTES: usize = 20;
/// Invites made in one call.
pub const MAX_INVITES_PER_CALL: u32 = 1000;
const MAX_NOTE_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum InviteError {
    /// Unknown, expired, revoked, used, or being used right now: the caller learns no more.
    #[error("the invite code is invalid, expired or already used")]
    Invalid,
    #[error("no invite {0}")]
    NotFound(i64),
    #[error("invite {0} was {1} already")]
    Settled(i64, &'static str),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A new invite; `code` exists only here, never in the database.
#[derive(Serialize)]
pub struct CreatedInvite {
    pub invite_id: i64,
    pub code: String,
    pub expires_at_ms: i64,
}

impl std::fmt::Debug for CreatedInvite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedInvite")
            .field("invite_id", &self.invite_id)
            .field("code", &"<hidden>")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

/// An invite as `lockstep invite list` shows it (never its code).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InviteRecord {
    pub invite_id: i64,
    pub note: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub used_at_ms: Option<i64>,
    pub used_by_user: Option<String>,
    pub revoked_at_ms: Option<i64>,
    pub state: InviteState,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InviteState {
    Unused,
    Used,
    Revoked,
    Expired,
}

impl InviteState {
    fn of(used_at_ms: Option<i64>, revoked_at_ms: Option<i64>, expires_at_ms: i64, now_ms: i64) -> Self {
        if used_at_ms.is_some() {
            InviteState::Used
        } else if revoked_at_ms.is_some() {
            InviteState::Revoked
        } else if expires_at_ms <= now_ms {
            InviteState::Expired
        } else {
            InviteState::Unused
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InviteState::Unused => "unused",
            InviteState::Used => "used",
            InviteState::Revoked => "revoked",
            InviteState::Expired => "expired",
        }
    }
}

/// The invites table, for the server (claims) and for `lockstep invite`.
#[derive(Clone)]
pub struct Invites {
    db: Store,
    claim_lease: Duration,
}

impl Invites {
    /// `claim_lease`: how long a CreateAccount may hold an invite before it counts as abandoned.
    pub fn new(db: Store, claim_lease: Duration) -> Self {
        Self { db, claim_lease }
    }

    /// Makes `count` invites valid for `ttl`, in one transaction.
    pub async fn create(&self, count: u32, ttl: Duration, note: &str) -> Result<Vec<CreatedInvite>, InviteError> {
        if count == 0 || count > MAX_INVITES_PER_CALL {
            return Err(InviteError::BadRequest(format!("make 1 to {MAX_INVITES_PER_CALL} invites at a time")));
        }
        if ttl.is_zero() {
            return Err(InviteError::BadRequest("an invite must be valid for some time".into()));
        }
        let note = note.trim().to_string();
        if note.chars().count() > MAX_NOTE_CHARS || note.chars().any(char::is_control) {
            return Err(InviteError::BadRequest(format!(
                "the note must be at most {MAX_NOTE_CHARS} characters, without control characters"
            )));
        }
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        Ok(self
            .db
            .call(move |connection| {
                let transaction = connection.transaction()?;
                let now = now_ms();
                let expires_at_ms = now.saturating_add(ttl_ms);
                let mut created = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let code = new_secret(INVITE_PREFIX, INVITE_BYTES);
                    let invite_id: i64 = transaction
                        .query_one(
                            "INSERT INTO invites (code_hash, note, created_at_ms, expires_at_ms) VALUES (?1, ?2, ?3, ?4)
                             RETURNING invite_id",
                            values![hash_secret(&code).as_slice(), &note, now, expires_at_ms],
                        )?
                        .get(0)?;
                    created.push(CreatedInvite { invite_id, code, expires_at_ms });
                }
                transaction.commit()?;
                Ok(created)
            })
            .await?)
    }

    /// Every invite, oldest first.
    pub async fn list(&self) -> Result<Vec<InviteRecord>, InviteError> {
        Ok(self
            .db
            .call(|connection| {
                let now = now_ms();
                connection
                    .query(
                        "SELECT invite_id, note, created_at_ms, expires_at_ms, used_at_ms, used_by_user, revoked_at_ms
                         FROM invites ORDER BY invite_id",
                        &[],
                    )?
                    .iter()
                    .map(|row| {
                        let (expires_at_ms, used_at_ms, revoked_at_ms) = (row.get(3)?, row.get(4)?, row.get(6)?);
                        Ok(InviteRecord {
                            invite_id: row.get(0)?,
                            note: row.get(1)?,
                            created_at_ms: row.get(2)?,
                            expires_at_ms,
                            used_at_ms,
                            used_by_user: row.get(5)?,
                            revoked_at_ms,
                            state: InviteState::of(used_at_ms, revoked_at_ms, expires_at_ms, now),
                        })
                    })
                    .collect::<Result<Vec<_>, DbError>>()
            })
            .await?)
    }

    /// Revokes an unused invite: its code stops working (also one claimed by a CreateAccount
    /// in progress, which then fails).
    pub async fn revoke(&self, invite_id: i64) -> Result<(), InviteError> {
        self.db
            .call(move |connection| {
                let transaction = connection.transaction()?;
                let now = now_ms();
                let revoked = transaction.execute(
                    "UPDATE invites SET revoked_at_ms = ?2
                     WHERE invite_id = ?1 AND used_at_ms IS NULL AND revoked_at_ms IS NULL",
                    values![invite_id, now],
                )?;
                if revoked == 1 {
                    transaction.commit()?;
                    return Ok(Ok(()));
                }
                let settled: Option<(Option<i64>, Option<i64>)> = transaction
                    .query_opt(
                        "SELECT used_at_ms, revoked_at_ms FROM invites WHERE invite_id = ?1",
                        values![invite_id],
                    )?
                    .map(|row| Ok::<_, DbError>((row.get(0)?, row.get(1)?)))
                    .transpose()?;
                Ok(Err(match settled {
                    None => InviteError::NotFound(invite_id),
                    Some((Some(_), _)) => InviteError::Settled(invite_id, "used"),
                    Some((None, _)) => InviteError::Settled(invite_id, "revoked"),
                }))
            })
            .await?
    }

    /// Takes the invite of `code` for one CreateAccount (see the module doc). The lookup is by
    /// the code's SHA-256: what its timing could reveal is a hash prefix, which does not help
    /// to find a code.
    pub async fn claim(&self, code: &str) -> Result<InviteClaim, InviteError> {
        let code_hash = hash_secret(code.trim());
        let lease_ms = i64::try_from(self.claim_lease.as_millis()).unwrap_or(i64::MAX);
        let (invite_id, claimed_until_ms) = self
            .db
            .call(move |connection| {
                let now = now_ms();
                let claimed_until_ms = now.saturating_add(lease_ms);
                connection
                    .query_opt(
                        "UPDATE invites SET claimed_until_ms = ?3
                         WHERE code_hash = ?1 AND used_at_ms IS NULL AND revoked_at_ms IS NULL AND expires_at_ms > ?2
                           AND (claimed_until_ms IS NULL OR claimed_until_ms <= ?2)
                         RETURNING invite_id",
                        values![code_hash.as_slice(), now, claimed_until_ms],
                    )?
                    .map(|row| Ok((row.get::<i64>(0)?, claimed_until_ms)))
                    .transpose()
            })
            .await?
            .ok_or(InviteError::Invalid)?;
        Ok(InviteClaim { invite_id, claimed_until_ms, db: self.db.clone(), spent: false })
    }

    /// Forgets which account used an invite, when that account is deleted.
    pub(crate) fn forget_user(transaction: &Tx<'_>, user_id: &str) -> Result<(), DbError> {
        transaction.execute("UPDATE invites SET used_by_user = NULL WHERE used_by_user = ?1", values![user_id])?;
        Ok(())
    }
}

/// An invite taken for one CreateAccount; released on drop unless spent.
pub struct InviteClaim {
    invite_id: i64,
    /// Identifies this claim: a release never frees a newer claim made after this one lapsed.
    claimed_until_ms: i64,
    db: Store,
    spent: bool,
}

impl InviteClaim {
    pub fn invite_id(&self) -> i64 {
        self.invite_id
    }

    /// Marks the invite used by `user_id`, inside the transaction that creates the account.
    /// False (write nothing then) when it was revoked meanwhile, or spent by a request whose
    /// lease had lapsed.
    pub(super) fn spend(&self, transaction: &Tx<'_>, user_id: &str) -> Result<bool, DbError> {
        let spent = transaction.execute(
            "UPDATE invites SET used_at_ms = ?2, used_by_user = ?3, claimed_until_ms = NULL
             WHERE invite_id = ?1 AND used_at_ms IS NULL AND revoked_at_ms IS NULL",
            values![self.invite_id, now_ms(), user_id],
        )?;
        Ok(spent == 1)
    }

    /// The account exists: the invite stays used.
    pub(super) fn settle(mut self) {
        self.spent = true;
    }
}

impl Drop for InviteClaim {
    fn drop(&mut self) {
        if self.spent {
            return;
        }
        // Without a runtime (shutting down), the lease lapses on its own.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (db, invite_id, claimed_until_ms) = (self.db.clone(), self.invite_id, self.claimed_until_ms);
        runtime.spawn(async move {
            let released = db
                .call(move |connection| {
                    connection.execute(
                        "UPDATE invites SET claimed_until_ms = NULL
                         WHERE invite_id = ?1 AND claimed_until_ms = ?2 AND used_at_ms IS NULL",
                        values![invite_id, claimed_until_ms],
                    )?;
                    Ok(())
                })
                .await;
            if let Err(error) = released {
                tracing::warn!(invite_id, %error, "could not release an invite; it is free again after its lease");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{both_backends, store::testing::TestStore};

    fn invites(store: &TestStore, lease: Duration) -> Invites {
        Invites::new(store.store.clone(), lease)
    }

    both_backends!(codes_are_long_random_and_stored_only_as_hashes, |store: TestStore| async move {
        let invites = invites(&store, Duration::from_secs(30));
        let created = invites.create(3, Duration::from_secs(3600), "for the family").await.unwrap();
        assert_eq!(created.len(), 3);
        for invite in &created {
            assert!(invite.code.starts_with(INVITE_PREFIX));
            // 160 bits in base64url: 27 characters after the prefix.
            assert_eq!(invite.code.len(), INVITE_PREFIX.len() + 27, "{}", invite.code);
            assert!(!format!("{invite:?}").contains(&invite.code));
        }
        assert_ne!(created[0].code, created[1].code);
        let ids: Vec<i64> = created.iter().map(|invite| invite.invite_id).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
        let stored: Vec<Vec<u8>> = invites
            .db
            .call(|connection| {
                connection.query("SELECT code_hash FROM invites", &[])?.iter().map(|row| row.get(0)).collect()
            })
            .await
            .unwrap();
        assert_eq!(stored.len(), 3);
        for invite in &created {
            assert!(stored.contains(&hash_secret(&invite.code).as_slice().to_vec()), "stored as its hash");
        }
        drop(invites);
        let raw = std::fs::read(store.dir.path().join("lockstep.db")).unwrap();
        let wal = std::fs::read(store.dir.path().join("lockstep.db-wal")).unwrap_or_default();
        for invite in &created {
            let code = invite.code.as_bytes();
            let found = |bytes: &[u8]| bytes.windows(code.len()).any(|window| window == code);
            assert!(!found(&raw) && !found(&wal), "a code is in the database");
        }
    });

    both_backends!(a_claim_is_exclusive_released_on_drop_and_spent_once, |store: TestStore| async move {
        let invites = invites(&store, Duration::from_secs(30));
        let code = invites.create(1, Duration::from_secs(3600), "").await.unwrap().remove(0).code;
        let claim = invites.claim(&code).await.unwrap();
        assert!(matches!(invites.claim(&code).await, Err(InviteError::Invalid)), "claimed twice");
        drop(claim);
        // The release runs in the background.
        let mut claim = None;
        for _ in 0..100 {
            if let Ok(taken) = invites.claim(&code).await {
                claim = Some(taken);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let claim = claim.expect("a dropped claim frees the invite");
        invites
            .db
            .call(move |connection| {
                let transaction = connection.transaction()?;
                assert!(claim.spend(&transaction, "u1")?);
                transaction.commit()?;
                claim.settle();
                Ok(())
            })
            .await
            .unwrap();
        assert!(matches!(invites.claim(&code).await, Err(InviteError::Invalid)), "used twice");
        let listed = invites.list().await.unwrap();
        assert_eq!(listed[0].state, InviteState::Used);
        assert_eq!(listed[0].used_by_user.as_deref(), Some("u1"));
        assert!(matches!(invites.revoke(listed[0].invite_id).await, Err(InviteError::Settled(_, "used"))));
    });

    both_backends!(a_lapsed_lease_frees_the_invite, |store: TestStore| async move {
        let invites = invites(&store, Duration::from_millis(1));
        let code = invites.create(1, Duration::from_secs(3600), "").await.unwrap().remove(0).code;
        let claim = invites.claim(&code).await.unwrap();
        // A crashed server never releases: the lease lapses.
        std::mem::forget(claim);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = invites.claim(&code).await.unwrap();
        // The lapsed claim's late release must not free the newer one.
        let late =
            InviteClaim { invite_id: second.invite_id, claimed_until_ms: 0, db: invites.db.clone(), spent: false };
        drop(late);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let held: Option<i64> = invites
            .db
            .call(|connection| connection.query_one("SELECT claimed_until_ms FROM invites", &[])?.get(0))
            .await
            .unwrap();
        assert_eq!(held, Some(second.claimed_until_ms));
    });

    both_backends!(expired_revoked_and_unknown_codes_are_all_just_invalid, |store: TestStore| async move {
        let invites = invites(&store, Duration::from_secs(30));
        let short = invites.create(1, Duration::from_millis(1), "").await.unwrap().remove(0);
        let revoked = invites.create(1, Duration::from_secs(3600), "").await.unwrap().remove(0);
        invites.revoke(revoked.invite_id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        for code in [short.code.as_str(), revoked.code.as_str(), "lsi_unknown"] {
            let error = invites.claim(code).await.err().expect("refused");
            assert_eq!(error.to_string(), "the invite code is invalid, expired or already used");
        }
        let states: Vec<InviteState> = invites.list().await.unwrap().iter().map(|invite| invite.state).collect();
        assert_eq!(states, [InviteState::Expired, InviteState::Revoked]);
        assert!(matches!(invites.revoke(revoked.invite_id).await, Err(InviteError::Settled(_, "revoked"))));
        assert!(matches!(invites.revoke(999).await, Err(InviteError::NotFound(999))));
        assert!(matches!(invites.create(0, Duration::from_secs(1), "").await, Err(InviteError::BadRequest(_))));
    });
}
