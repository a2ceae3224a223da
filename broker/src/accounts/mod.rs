//! Accounts: users, devices, bearer tokens, pairing tickets and invite codes.
//!
//! Tokens and tickets are random secrets (256 and 192 bits); only their SHA-256
//! hashes are stored. Tokens are cached in memory so that most requests are
//! authenticated without touching the database, but the cache is never needed
//! for correctness (several nodes share one PostgreSQL, issue 21):
//! - a token the cache does not know is looked up in the database (a device
//!   paired through another node works at once); tokens found unknown or
//!   revoked there are remembered in a bounded negative cache (256-bit random
//!   tokens: an unknown one never becomes valid later, a revoked one neither);
//! - a cached token is checked against the database again once it is older
//!   than `accounts.token_recheck_interval`, so a node that missed another
//!   node's DeviceRevoked event refuses the token within that interval;
//! - the events follower forgets a device revoked through another node as soon
//!   as it reads the event.
//!
//! With SQLite (one node, the only writer) the cache is the whole truth: an
//! unknown token is refused without a query, so a flood of made-up tokens costs
//! no database work.

pub mod invites;
mod secrets;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

pub use invites::{InviteClaim, InviteError, Invites};
pub use secrets::{TokenHash, hash_secret, new_secret};

use crate::{
    db::{DbError, now_ms},
    store::{LOCK_USER, Sql, Store},
    values,
};
use lockstep_kafka::locks::{lock, read, write};

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("pairing ticket is unknown, expired or already used")]
    TicketInvalid,
    #[error("no such device in this account")]
    DeviceNotFound,
    #[error("the account has {0} devices, the most this server allows: revoke one before pairing another")]
    TooManyDevices(u32),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// The device a request was authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthedDevice {
    pub user_id: Arc<str>,
    pub device_id: Arc<str>,
}

#[derive(Debug, Clone)]
pub struct DeviceRecord {
    pub device_id: String,
    pub name: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct NewDevice {
    pub user_id: String,
    pub device_id: String,
    pub token: String,
}

/// See [`Accounts::with_invite_claim_lease`].
const DEFAULT_INVITE_CLAIM_LEASE: Duration = Duration::from_secs(30);
/// See [`Accounts::with_token_recheck`].
const DEFAULT_TOKEN_RECHECK: Duration = Duration::from_secs(30);
/// Tokens remembered as unknown or revoked; past it, the negative cache starts over.
const MAX_REFUSED_TOKENS: usize = 10_000;

/// A token the database said is valid, and when it said so.
#[derive(Clone)]
struct CachedToken {
    device: AuthedDevice,
    checked_at: Instant,
}

/// What the token cache alone can say about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachedAuth {
    /// Valid, checked against the database within the recheck interval.
    Valid(AuthedDevice),
    /// Unknown or revoked (remembered from an earlier database lookup).
    Refused,
    /// Not known to this node (paired through another node, or made up): ask
    /// [`Accounts::lookup`]. Only with a shared database; the guard limits these per
    /// address (`rate_limits.unknown_token_lookups_per_address`), since each costs a query.
    Unknown,
    /// Known, but checked longer ago than the recheck interval: ask [`Accounts::lookup`].
    Stale,
}

#[derive(Clone)]
pub struct Accounts {
    db: Store,
    tokens: Arc<RwLock<HashMap<TokenHash, CachedToken>>>,
    refused: Arc<Mutex<HashSet<TokenHash>>>,
    token_recheck: Duration,
    /// Whether other nodes may write the accounts (PostgreSQL): then the cache can be stale.
    shared: bool,
    ticket_ttl: Duration,
    /// Devices (not revoked) an account may have.
    max_devices: u32,
    invites: Invites,
}

/// Marks a ticket redeemed if it is unexpired, unused and its issuer is not revoked (exactly
/// once under concurrency: PostgreSQL re-checks the `WHERE` against a row another transaction
/// redeemed meanwhile, SQLite has one writer at a time). The
/// issuer is looked up by its key (`EXISTS`): `issued_by_device IN (SELECT … FROM devices)`
/// listed every device of the server on each redemption (pairing 100,000 devices slowed
/// to 40 a second, issue 20's W3).
pub(crate) const REDEEM_TICKET: &str = "UPDATE pairing_tickets SET redeemed_at_ms = ?2
     WHERE ticket_hash = ?1 AND redeemed_at_ms IS NULL AND expires_at_ms > ?2
       AND EXISTS (SELECT 1 FROM devices
                   WHERE devices.device_id = pairing_tickets.issued_by_device AND devices.revoked_at_ms IS NULL)
     RETURNING user_id";

impl Accounts {
    pub async fn open(db: Store, ticket_ttl: Duration) -> Result<Self, AccountsError> {
        let active = db
            .call(|connection| {
                connection
                    .query("SELECT token_hash, user_id, device_id FROM devices WHERE revoked_at_ms IS NULL", &[])?
                    .iter()
                    .map(|row| Ok((row.get::<Vec<u8>>(0)?, row.get::<String>(1)?, row.get::<String>(2)?)))
                    .collect::<Result<Vec<_>, DbError>>()
            })
            .await?;
        let mut tokens = HashMap::with_capacity(active.len());
        let checked_at = Instant::now();
        for (hash, user_id, device_id) in active {
            let Ok(hash) = TokenHash::try_from(hash.as_slice()) else {
                tracing::warn!(device_id, "skipping device with a malformed token hash");
                continue;
            };
            let device = AuthedDevice { user_id: user_id.into(), device_id: device_id.into() };
            tokens.insert(hash, CachedToken { device, checked_at });
        }
        tracing::info!(active_devices = tokens.len(), "accounts loaded");
        let invites = Invites::new(db.clone(), DEFAULT_INVITE_CLAIM_LEASE);
        Ok(Self {
            shared: db.engine() != "sqlite",
            db,
            tokens: Arc::new(RwLock::new(tokens)),
            refused: Arc::default(),
            token_recheck: DEFAULT_TOKEN_RECHECK,
            ticket_ttl,
            max_devices: u32::MAX,
            invites,
        })
    }

    /// How long a token checked against the database is trusted before it is checked again
    /// (`accounts.token_recheck_interval`).
    pub fn with_token_recheck(mut self, interval: Duration) -> Self {
        self.token_recheck = interval;
        self
    }

    /// How long a CreateAccount may hold an invite it redeems (the longest a call may take:
    /// `limits.request_timeout`); past it, an unspent invite counts as abandoned.
    pub fn with_invite_claim_lease(mut self, lease: Duration) -> Self {
        self.invites = Invites::new(self.db.clone(), lease);
        self
    }

    pub fn invites(&self) -> &Invites {
        &self.invites
    }

    /// Caps the devices (not revoked) of one account; redeeming a ticket past it fails.
    pub fn with_max_devices(mut self, max_devices: u32) -> Self {
        self.max_devices = max_devices;
        self
    }

    /// The device of `token` if the cache holds it (however long ago it was checked): for
    /// handlers behind the token layer, which looked the token up with [`Accounts::lookup`].
    pub fn authenticate(&self, token: &str) -> Option<AuthedDevice> {
        let hash = hash_secret(token);
        read(&self.tokens).get(&hash).map(|cached| cached.device.clone())
    }

    /// What the cache alone says about `token`, without waiting for the database.
    pub fn cached(&self, token: &str) -> CachedAuth {
        let hash = hash_secret(token);
        if let Some(cached) = read(&self.tokens).get(&hash) {
            if !self.shared || cached.checked_at.elapsed() < self.token_recheck {
                return CachedAuth::Valid(cached.device.clone());
            }
            return CachedAuth::Stale;
        }
        if !self.shared || lock(&self.refused).contains(&hash) { CachedAuth::Refused } else { CachedAuth::Unknown }
    }

    /// The device of `token`: from the cache when it was checked recently, else from the
    /// database (and cached either way). `None` for an unknown or revoked token.
    pub async fn lookup(&self, token: &str) -> Result<Option<AuthedDevice>, AccountsError> {
        match self.cached(token) {
            CachedAuth::Valid(device) => return Ok(Some(device)),
            CachedAuth::Refused => return Ok(None),
            CachedAuth::Unknown | CachedAuth::Stale => {}
        }
        let hash = hash_secret(token);
        let found = self
            .db
            .call(move |connection| {
                connection
                    .query_opt(
                        "SELECT user_id, device_id FROM devices WHERE token_hash = ?1 AND revoked_at_ms IS NULL",
                        values![hash.as_slice()],
                    )?
                    .map(|row| Ok::<_, DbError>((row.get::<String>(0)?, row.get::<String>(1)?)))
                    .transpose()
            })
            .await?;
        metrics::counter!("lockstep_token_lookups_total", "found" => if found.is_some() { "yes" } else { "no" })
            .increment(1);
        match found {
            Some((user_id, device_id)) => {
                self.remember(hash, &user_id, &device_id);
                Ok(Some(AuthedDevice { user_id: user_id.into(), device_id: device_id.into() }))
            }
            None => {
                write(&self.tokens).remove(&hash);
                let mut refused = lock(&self.refused);
                if refused.len() >= MAX_REFUSED_TOKENS {
                    refused.clear();
                }
                refused.insert(hash);
                Ok(None)
            }
        }
    }

    /// Records a new user and its first device. The caller has created the
    /// user's topic already, so a user never exists without one.
    pub async fn create_account(&self, user_id: String, device_name: String) -> Result<NewDevice, AccountsError> {
        let created = self.insert_account(user_id, device_name, None).await?;
        Ok(created.expect("without an invite, the account is always written"))
    }

    /// Like [`Accounts::create_account`], spending `invite` in the same transaction: the
    /// account exists if and only if the invite is used. `None` (nothing written, the claim
    /// released) when the invite was revoked meanwhile, or spent by a request whose claim lapsed.
    pub async fn create_account_with_invite(
        &self,
        user_id: String,
        device_name: String,
        invite: InviteClaim,
    ) -> Result<Option<NewDevice>, AccountsError> {
        self.insert_account(user_id, device_name, Some(invite)).await
    }

    async fn insert_account(
        &self,
        user_id: String,
        device_name: String,
        invite: Option<InviteClaim>,
    ) -> Result<Option<NewDevice>, AccountsError> {
        let device_id = uuid::Uuid::now_v7().to_string();
        let token = new_secret("lst_", 32);
        let hash = hash_secret(&token);
        let (user, device) = (user_id.clone(), device_id.clone());
        let written = self
            .db
            .call(move |connection| {
                let transaction = connection.transaction()?;
                let now = now_ms();
                // The invite first: its UPDATE takes the write lock before anything is read.
                if let Some(invite) = &invite {
                    if !invite.spend(&transaction, &user)? {
                        return Ok(false);
                    }
                }
                transaction.execute("INSERT INTO users (user_id, created_at_ms) VALUES (?1, ?2)", values![&user, now])?;
                transaction.execute(
                    "INSERT INTO devices (device_id, user_id, name, token_hash, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    values![&device, &user, device_name, hash.as_slice(), now],
                )?;
                transaction.commit()?;
                if let Some(invite) = invite {
                    invite.settle();
                }
                Ok(true)
            })
            .await?;
        if !written {
            return Ok(None);
        }
        self.db.mirror_user_locally(&user_id).await?;
        self.remember(hash, &user_id, &device_id);
        Ok(Some(NewDevice { user_id, device_id, token }))
    }

    pub async fn create_pairing_ticket(&self, device: &AuthedDevice) -> Result<(String, i64), AccountsError> {
        let ticket = new_secret("lsp_", 24);
        let hash = hash_secret(&ticket);
        let expires_at_ms = now_ms() + self.ticket_ttl.as_millis() as i64;
        let (user, issuer) = (device.user_id.to_string(), device.device_id.to_string());
        self.db
            .call(move |connection| {
                // Expired tickets are useless; drop them while we are here.
                connection.execute(
                    "DELETE FROM pairing_tickets WHERE expires_at_ms < ?1",
                    values![now_ms() - 86_400_000],
                )?;
                connection.execute(
                    "INSERT INTO pairing_tickets (ticket_hash, user_id, issued_by_device, expires_at_ms) VALUES (?1, ?2, ?3, ?4)",
                    values![hash.as_slice(), user, issuer, expires_at_ms],
                )?;
                Ok(())
            })
            .await?;
        Ok((ticket, expires_at_ms))
    }

    /// Spends a ticket and creates the new device, in one transaction.
    pub async fn redeem_pairing_ticket(&self, ticket: &str, device_name: String) -> Result<NewDevice, AccountsError> {
        let ticket_hash = hash_secret(ticket);
        let device_id = uuid::Uuid::now_v7().to_string();
        let token = new_secret("lst_", 32);
        let hash = hash_secret(&token);
        let device = device_id.clone();
        let max_devices = self.max_devices;
        let user_id = self
            .db
            .call(move |connection| {
                let transaction = connection.transaction()?;
                let now = now_ms();
                let user: Option<String> = transaction
                    .query_opt(REDEEM_TICKET, values![ticket_hash.as_slice(), now])?
                    .map(|row| row.get(0))
                    .transpose()?;
                let Some(user) = user else { return Ok(Err(AccountsError::TicketInvalid)) };
                // Two redemptions of different tickets of one account at once: counted one
                // after the other.
                transaction.execute(LOCK_USER, values![&user])?;
                let devices: i64 = transaction
                    .query_one(
                        "SELECT COUNT(*) FROM devices WHERE user_id = ?1 AND revoked_at_ms IS NULL",
                        values![&user],
                    )?
                    .get(0)?;
                if devices >= i64::from(max_devices) {
                    // Rolled back: the ticket stays valid for after a revocation.
                    return Ok(Err(AccountsError::TooManyDevices(max_devices)));
                }
                // A new device starts from the log as it is now: it has nothing to repair.
                transaction.execute(
                    "INSERT INTO devices (device_id, user_id, name, token_hash, created_at_ms, log_generation)
                     VALUES (?1, ?2, ?3, ?4, ?5, (SELECT log_generation FROM users WHERE user_id = ?2))",
                    values![device, &user, device_name, hash.as_slice(), now],
                )?;
                transaction.commit()?;
                Ok(Ok(user))
            })
            .await??;
        self.remember(hash, &user_id, &device_id);
        Ok(NewDevice { user_id, device_id, token })
    }

    pub async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceRecord>, AccountsError> {
        let user = user_id.to_string();
        Ok(self
            .db
            .call(move |connection| {
                connection
                    .query(
                        "SELECT device_id, name, created_at_ms, revoked_at_ms FROM devices WHERE user_id = ?1 ORDER BY created_at_ms, device_id",
                        values![user],
                    )?
                    .iter()
                    .map(|row| {
                        Ok(DeviceRecord {
                            device_id: row.get(0)?,
                            name: row.get(1)?,
                            created_at_ms: row.get(2)?,
                            revoked_at_ms: row.get(3)?,
                        })
                    })
                    .collect::<Result<Vec<_>, DbError>>()
            })
            .await?)
    }

    /// Revokes a device of `user_id`; its token stops working at once.
    /// Revoking an already revoked device succeeds (idempotent).
    pub async fn revoke_device(&self, user_id: &str, device_id: &str) -> Result<(), AccountsError> {
        let (user, device) = (user_id.to_string(), device_id.to_string());
        let found = self
            .db
            .call(move |connection| {
                let transaction = connection.transaction()?;
                let exists = transaction
                    .query_opt("SELECT 1 FROM devices WHERE device_id = ?1 AND user_id = ?2", values![&device, user])?;
                if exists.is_none() {
                    return Ok(false);
                }
                transaction.execute(
                    "UPDATE devices SET revoked_at_ms = ?2 WHERE device_id = ?1 AND revoked_at_ms IS NULL",
                    values![&device, now_ms()],
                )?;
                transaction.execute(
                    "DELETE FROM pairing_tickets WHERE issued_by_device = ?1 AND redeemed_at_ms IS NULL",
                    values![&device],
                )?;
                transaction.commit()?;
                Ok(true)
            })
            .await?;
        if !found {
            return Err(AccountsError::DeviceNotFound);
        }
        self.forget_device(device_id);
        Ok(())
    }

    /// Forgets a device's token in memory (its row was revoked already, on this node or on
    /// another: the events follower calls this for another node's DeviceRevoked). A later use
    /// of the token asks the database, which refuses it.
    pub fn forget_device(&self, device_id: &str) {
        write(&self.tokens).retain(|_, cached| &*cached.device.device_id != device_id);
    }

    fn remember(&self, hash: TokenHash, user_id: &str, device_id: &str) {
        let device = AuthedDevice { user_id: user_id.into(), device_id: device_id.into() };
        write(&self.tokens).insert(hash, CachedToken { device, checked_at: Instant::now() });
    }
}

#[cfg(test)]
mod tests;
