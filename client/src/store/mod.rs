//! The device's local store (SQLite): its account, the merged records, the
//! mirror (the last state of each record seen from the server), the outbox of
//! local changes the server has not acknowledged yet ([`outbox`]), problems
//! found in incoming changes, changes set aside until they can apply
//! ([`deferred`]), the resync marker ([`resync`]), the sync cursor, and what
//! the log says of revocations and epochs ([`revocations`]: revoked devices,
//! where each epoch started).
//!
//! Every operation is one transaction. A local edit updates the record and
//! queues its change together; an incoming batch is merged and the cursor moved
//! together, and only then acknowledged to the server. A crash at any point
//! loses no local edit, and a change applied twice (merge is idempotent)
//! changes nothing.
//!
//! The account's secrets (account key, device token, device and epoch keys)
//! sit in the clear unless a passphrase seals them ([`vault`]); the records do
//! either way.

mod apply;
mod deferred;
mod keys;
mod outbox;
mod resync;
mod revocations;
mod vault;
mod views;

use std::{path::Path, time::Duration};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use self::apply::file_problem;
use self::vault::{SEALED_META, SECRET_META, Vault};
pub use self::{
    deferred::{Deferred, open_change},
    outbox::{OutboxEntry, Sealed},
    resync::{ResyncReason, ResyncState},
    revocations::{RESERVED_PREFIX, REVOCATIONS_COLLECTION, RevokedDevice},
    vault::KdfParams,
};
use crate::{
    crypto::AccountKey,
    epochs::{EpochKeys, Keyring},
    hlc::Clock,
    ids,
    record::{ChangePayload, PARENT_FIELD, PayloadReader, RecordState, Stamp},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("local store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("local store {path}: {message}")]
    Open { path: String, message: String },
    #[error(
        "this store has no account yet: run `lockstep-cli init --server URL` or `lockstep-cli pair redeem --name NAME` (it reads the code)"
    )]
    NoAccount,
    #[error("this store already belongs to user {0}; use another --store for another account")]
    HasAccount(String),
    #[error("no record {0}")]
    NoRecord(String),
    #[error("record {record_id} is in collection {actual}, not {requested}")]
    WrongCollection { record_id: String, actual: String, requested: String },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "this store's secrets are protected by a passphrase: give it with --passphrase-file PATH (or \
         LOCKSTEP_PASSPHRASE_FILE), or LOCKSTEP_PASSPHRASE, or run the command in a terminal to be asked"
    )]
    Locked,
    #[error("wrong passphrase: the store's secrets do not open with it (nothing was changed)")]
    WrongPassphrase,
    #[error("corrupt local store: {0}")]
    Corrupt(String),
    /// The server skipped offsets: nothing of the batch was applied.
    #[error(
        "the server sent offset {found} where offset {expected} was due: changes would be missing, \
         so nothing was applied (reported by `lockstep-cli check`); syncing again retries"
    )]
    Gap { expected: i64, found: i64 },
}

impl StoreError {
    /// Whether trying again may succeed (a gap is the server's, and may be transient).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Gap { .. })
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    record_id TEXT PRIMARY KEY, collection TEXT NOT NULL, state TEXT NOT NULL, updated_hlc INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS records_by_collection ON records (collection, record_id);
CREATE TABLE IF NOT EXISTS mirror (
    record_id TEXT PRIMARY KEY, collection TEXT NOT NULL, state TEXT NOT NULL, offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, change_id TEXT NOT NULL UNIQUE, record_id TEXT NOT NULL,
    collection TEXT NOT NULL, op INTEGER NOT NULL, hlc INTEGER NOT NULL, state TEXT NOT NULL,
    rejected TEXT, key_epoch INTEGER, nonce BLOB, ciphertext BLOB);
CREATE TABLE IF NOT EXISTS problems (
    offset INTEGER PRIMARY KEY, record_id TEXT NOT NULL, collection TEXT NOT NULL, origin_device_id TEXT NOT NULL,
    kind TEXT NOT NULL, detail TEXT NOT NULL, seen_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deferred (
    offset INTEGER PRIMARY KEY, record_id TEXT NOT NULL, collection TEXT NOT NULL, op INTEGER NOT NULL,
    hlc INTEGER NOT NULL, key_epoch INTEGER NOT NULL, nonce BLOB NOT NULL, ciphertext BLOB NOT NULL,
    origin_device_id TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL, deferred_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS epoch_keys (
    epoch INTEGER PRIMARY KEY, key TEXT NOT NULL, sealed_by_device TEXT NOT NULL, received_at_ms INTEGER NOT NULL);
";

/// Columns added after the first release, created on open when missing.
const ADDED_COLUMNS: &[(&str, &str, &str)] =
    &[("outbox", "key_epoch", "INTEGER"), ("outbox", "nonce", "BLOB"), ("outbox", "ciphertext", "BLOB")];

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, kind) in ADDED_COLUMNS {
        let present: bool = conn.query_row(
            &format!("SELECT count(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
            [column],
            |row| row.get(0),
        )?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

/// The proto's op values.
pub const OP_UPSERT: i32 = 1;
pub const OP_DELETE: i32 = 2;

#[derive(Debug, Clone)]
pub struct Account {
    pub server: String,
    pub user_id: String,
    pub device_id: String,
    pub device_name: String,
    pub token: Zeroizing<String>,
    pub key: AccountKey,
    /// The newest key epoch this device holds: every change it seals uses it.
    pub key_epoch: u32,
    /// The random keys of the epochs after the first that this device holds.
    pub epoch_keys: EpochKeys,
}

impl Account {
    /// Seals and opens changes under every epoch this device holds.
    pub fn keyring(&self) -> Keyring<'_> {
        Keyring { account: &self.key, epochs: &self.epoch_keys }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub record_id: String,
    pub collection: String,
    pub state: RecordState,
}

/// An incoming change, decrypted (or not) by the sync layer.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub offset: i64,
    pub record_id: String,
    pub collection: String,
    pub origin_device_id: String,
    pub content: Result<ChangePayload, (ProblemKind, String)>,
    /// The change as delivered: kept in `deferred` when it cannot apply yet
    /// (clock ahead, newer payload version). Without it such a change is a problem.
    pub sealed: Option<Sealed>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The ciphertext failed authentication: tampered, moved, or another key.
    Undecryptable,
    /// The plaintext is not a change this client understands.
    Malformed,
    /// Its clock is further ahead than the bound (deferred until it is not).
    ClockAhead,
    /// A payload version this client does not read yet (deferred until it does).
    UnknownVersion,
    /// It names a record this device holds in another collection.
    CollectionConflict,
    /// The server says the record at this offset is not a change it can read.
    Undecodable,
    /// The server skipped offsets.
    Gap,
    /// Written under an epoch older than the one in force at its offset (never applied).
    StaleEpoch,
}

impl ProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Undecryptable => "undecryptable",
            ProblemKind::Malformed => "malformed",
            ProblemKind::ClockAhead => "clock-ahead",
            ProblemKind::UnknownVersion => "unknown-version",
            ProblemKind::CollectionConflict => "collection-conflict",
            ProblemKind::Undecodable => "undecodable",
            ProblemKind::Gap => "gap",
            ProblemKind::StaleEpoch => "stale-epoch",
        }
    }

    /// Kinds that may apply later: kept in `deferred`, not filed as problems.
    fn waits(self) -> bool {
        matches!(self, ProblemKind::ClockAhead | ProblemKind::UnknownVersion)
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Problem {
    pub offset: i64,
    pub record_id: String,
    pub collection: String,
    pub origin_device_id: String,
    pub kind: String,
    pub detail: String,
    pub seen_at_ms: i64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub changes: usize,
    pub changed_records: usize,
    pub problems: usize,
    /// Changes set aside in `deferred` by this batch.
    pub deferred: usize,
    /// Changes from `deferred` that applied now.
    pub from_deferred: usize,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Orphan {
    pub record_id: String,
    pub collection: String,
    pub parent: String,
    /// "deleted" or "missing".
    pub parent_is: &'static str,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Status {
    pub user_id: String,
    pub device_id: String,
    pub device_name: String,
    pub server: String,
    /// The next offset this device will apply.
    pub cursor: Option<i64>,
    /// The log end seen at the last sync.
    pub log_end_seen: Option<i64>,
    pub lag_at_last_sync: Option<i64>,
    pub outbox: i64,
    pub outbox_rejected: i64,
    pub records: i64,
    pub deleted_records: i64,
    pub problems: i64,
    /// Incoming changes waiting to apply (clock ahead, newer payload version).
    pub deferred: i64,
    pub last_sync_ms: Option<i64>,
    /// How many times the device rebuilt from the log start.
    pub resyncs: i64,
    /// The resync in progress, else the last one.
    pub resync: Option<ResyncState>,
    /// Something wrong on the server's side that the last sync stopped at.
    pub server_problem: Option<String>,
    /// The newest key epoch this device holds (what it encrypts with).
    pub key_epoch: u32,
    /// The account's current key epoch as the server said at the last sync.
    pub server_key_epoch: Option<u32>,
    /// Devices the log's revocation records name: never sealed a key to, whatever the server lists.
    pub revoked_devices: i64,
    /// Whether a passphrase seals the store's secrets.
    pub protected: bool,
}

/// How the store's hybrid logical clock reads time.
#[derive(Debug, Clone, Copy)]
struct ClockSettings {
    max_ahead: Duration,
    offset_ms: i64,
}

pub struct Store {
    conn: Connection,
    clock: ClockSettings,
    reader: PayloadReader,
    vault: Vault,
}

use crate::hlc::unix_ms as now_ms;

fn to_json(state: &RecordState) -> String {
    serde_json::to_string(state).expect("a record state always serializes")
}

fn from_json(text: &str) -> Result<RecordState> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt(format!("record state: {error}")))
}

fn get_meta(tx: &Connection, key: &str) -> Result<Option<String>> {
    Ok(tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| row.get(0)).optional()?)
}

fn set_meta(tx: &Connection, key: &str, value: &str) -> Result<()> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
        [key, value],
    )?;
    Ok(())
}

fn clock(tx: &Connection, settings: ClockSettings) -> Result<Clock> {
    let last = get_meta(tx, "hlc")?.and_then(|value| value.parse().ok()).unwrap_or(0);
    Ok(Clock::new(last, settings.max_ahead).with_offset(settings.offset_ms))
}

fn load_record(tx: &Connection, table: &str, record_id: &str) -> Result<Option<(String, RecordState)>> {
    let row: Option<(String, String)> = tx
        .query_row(&format!("SELECT collection, state FROM {table} WHERE record_id = ?1"), [record_id], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()?;
    row.map(|(collection, state)| Ok((collection, from_json(&state)?))).transpose()
}

fn save_record(tx: &Connection, record_id: &str, collection: &str, state: &RecordState) -> Result<()> {
    tx.execute(
        "INSERT INTO records (record_id, collection, state, updated_hlc) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (record_id) DO UPDATE SET state = ?3, updated_hlc = ?4",
        params![record_id, collection, to_json(state), state.max_hlc() as i64],
    )?;
    Ok(())
}

fn account_in(conn: &Connection, vault: &Vault) -> Result<Option<Account>> {
    let Some(user_id) = get_meta(conn, "user_id")? else { return Ok(None) };
    let need = |key: &str| -> Result<String> {
        get_meta(conn, key)?.ok_or_else(|| StoreError::Corrupt(format!("account without {key}")))
    };
    let secret = |key: &str| -> Result<Zeroizing<String>> {
        vault.meta(conn, key)?.ok_or_else(|| StoreError::Corrupt(format!("account without {key}")))
    };
    let key = secret("account_key")?;
    let epoch_keys = keys::epoch_keys_in(conn, vault)?;
    let stored_epoch: u32 = need("key_epoch")?.parse().map_err(|_| StoreError::Corrupt("key_epoch".into()))?;
    Ok(Some(Account {
        server: need("server")?,
        user_id,
        device_id: need("device_id")?,
        device_name: need("device_name")?,
        token: secret("device_token")?,
        key: AccountKey::from_base64(&key).map_err(|error| StoreError::Corrupt(error.to_string()))?,
        key_epoch: stored_epoch.max(epoch_keys.newest()),
        epoch_keys,
    }))
}

impl Store {
    /// Opens (or creates) the store at `path`. The file holds the account key:
    /// it is created readable by its owner only.
    pub fn open(path: &Path, max_clock_ahead: Duration) -> Result<Self> {
        let fail = |message: String| StoreError::Open { path: path.display().to_string(), message };
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|error| fail(error.to_string()))?;
        }
        let existed = path.exists();
        let conn = Connection::open(path).map_err(|error| fail(error.to_string()))?;
        #[cfg(unix)]
        if !existed {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|error| fail(error.to_string()))?;
        }
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed transaction survives power loss too, so an offset is
        // acknowledged to the server only once its changes are on disk.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(revocations::SCHEMA)?;
        migrate(&conn)?;
        let vault = Vault::of(&conn)?;
        Ok(Self {
            conn,
            clock: ClockSettings { max_ahead: max_clock_ahead, offset_ms: 0 },
            reader: ChangePayload::decode,
            vault,
        })
    }

    /// Whether a passphrase seals this store's secrets.
    pub fn is_protected(&self) -> bool {
        !matches!(self.vault, Vault::Plain)
    }

    /// Opens the sealed secrets with `passphrase` (nothing to do for a store
    /// without one). A wrong passphrase changes nothing.
    pub fn unlock(&mut self, passphrase: &[u8]) -> Result<()> {
        self.vault.unlock(&self.conn, passphrase)
    }

    /// The KDF parameters of an unlocked protected store.
    pub fn kdf_params(&self) -> Option<KdfParams> {
        self.vault.params()
    }

    /// Seals every secret under `passphrase` (protects the store, or changes
    /// its passphrase once unlocked) and removes their plaintext. Returns
    /// whether the old plaintext is also gone from the file and its WAL: not
    /// when another process holds the store open (the WAL cannot be reset).
    pub fn protect(&mut self, passphrase: &[u8], params: KdfParams) -> Result<bool> {
        // Deleted and overwritten content is zeroed in the pages, not left in free space.
        self.conn.pragma_update(None, "secure_delete", true)?;
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        self.vault.check_current(&tx)?;
        let unlocked = Vault::new_unlocked(passphrase, params, self.vault.secrets(&tx)?)?;
        set_meta(&tx, SEALED_META, &unlocked.seal(&unlocked.secrets))?;
        for key in SECRET_META {
            tx.execute("DELETE FROM meta WHERE key = ?1", [key])?;
        }
        tx.execute("UPDATE epoch_keys SET key = ''", [])?;
        tx.commit()?;
        self.vault = Vault::Unlocked(Box::new(unlocked));
        self.scrub()
    }

    /// Keeps the secrets in the clear again (the store as without a passphrase).
    pub fn remove_protection(&mut self) -> Result<()> {
        if let Vault::Plain = self.vault {
            return Ok(());
        }
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        self.vault.check_current(&tx)?;
        let secrets = self.vault.secrets(&tx)?;
        Vault::write_plain(&tx, &secrets)?;
        tx.commit()?;
        self.vault = Vault::Plain;
        Ok(())
    }

    /// Rewrites the database file without free pages and empties the WAL,
    /// whose old frames still hold the pages as they were.
    fn scrub(&mut self) -> Result<bool> {
        let checkpoint = |conn: &Connection| -> Result<bool> {
            let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))?;
            Ok(busy == 0)
        };
        let before = checkpoint(&self.conn)?;
        self.conn.execute_batch("VACUUM")?;
        Ok(checkpoint(&self.conn)? && before)
    }

    /// Seals `change(secrets)` in `tx` when the store is protected (`None`
    /// when not: the caller writes in the clear); the secrets in memory change
    /// once the caller committed ([`Store::resealed`]).
    fn reseal(
        vault: &Vault,
        tx: &Connection,
        change: impl FnOnce(&mut vault::Secrets),
    ) -> Result<Option<vault::Secrets>> {
        vault.check_current(tx)?;
        let Vault::Unlocked(unlocked) = vault else { return Ok(None) };
        let mut secrets = unlocked.secrets.clone();
        change(&mut secrets);
        set_meta(tx, SEALED_META, &unlocked.seal(&secrets))?;
        Ok(Some(secrets))
    }

    fn resealed(&mut self, secrets: Option<vault::Secrets>) {
        if let (Vault::Unlocked(unlocked), Some(secrets)) = (&mut self.vault, secrets) {
            unlocked.secrets = secrets;
        }
    }

    /// Shifts the wall clock this store's clock reads (a device whose clock is off; tests).
    pub fn set_clock_offset_ms(&mut self, offset_ms: i64) {
        self.clock.offset_ms = offset_ms;
    }

    /// Replaces the payload reader (default [`ChangePayload::decode`]).
    pub fn set_payload_reader(&mut self, reader: PayloadReader) {
        self.reader = reader;
    }

    pub fn payload_reader(&self) -> PayloadReader {
        self.reader
    }

    pub fn account(&self) -> Result<Account> {
        self.try_account()?.ok_or(StoreError::NoAccount)
    }

    pub fn try_account(&self) -> Result<Option<Account>> {
        account_in(&self.conn, &self.vault)
    }

    pub fn save_account(&mut self, account: &Account) -> Result<()> {
        if let Vault::Locked = self.vault {
            return Err(StoreError::Locked);
        }
        let tx = self.conn.transaction()?;
        if let Some(user_id) = get_meta(&tx, "user_id")? {
            return Err(StoreError::HasAccount(user_id));
        }
        set_meta(&tx, "user_id", &account.user_id)?;
        set_meta(&tx, "server", &account.server)?;
        set_meta(&tx, "device_id", &account.device_id)?;
        set_meta(&tx, "device_name", &account.device_name)?;
        set_meta(&tx, "key_epoch", &account.key_epoch.to_string())?;
        let secrets = [("device_token", account.token.clone()), ("account_key", account.key.to_base64())];
        let sealed = Self::reseal(&self.vault, &tx, |sealed| {
            secrets.iter().for_each(|(key, value)| sealed.set_meta(key, value))
        })?;
        if sealed.is_none() {
            for (key, value) in &secrets {
                set_meta(&tx, key, value)?;
            }
        }
        tx.commit()?;
        self.resealed(sealed);
        Ok(())
    }

    /// Points the account at the server's new address (same server, moved).
    pub fn set_server(&mut self, server: &str) -> Result<()> {
        self.account()?;
        set_meta(&self.conn, "server", server)
    }

    fn local_change(
        settings: ClockSettings,
        tx: &Transaction<'_>,
        record_id: &str,
        collection: &str,
        op: i32,
        edit: impl FnOnce(&mut RecordState, &Stamp),
        existing: Option<RecordState>,
    ) -> Result<Record> {
        let device_id = get_meta(tx, "device_id")?.ok_or(StoreError::NoAccount)?;
        let mut clock = clock(tx, settings)?;
        let mut state = existing.unwrap_or_default();
        // Stay ahead of every stamp in the record, also one written by a device
        // whose clock runs fast: otherwise this edit would lose to it.
        clock.observe_held(state.max_hlc());
        let stamp = Stamp { hlc: clock.tick(), device: device_id };
        edit(&mut state, &stamp);
        save_record(tx, record_id, collection, &state)?;
        outbox::queue(tx, record_id, collection, op, stamp.hlc, &state)?;
        set_meta(tx, "hlc", &clock.last().to_string())?;
        Ok(Record { record_id: record_id.into(), collection: collection.into(), state })
    }

    /// Writes `fields` into a record (a new one when `record_id` is `None`) and
    /// queues the change. A `null` value removes a field.
    pub fn put(&mut self, collection: &str, record_id: Option<&str>, fields: &Map<String, Value>) -> Result<Record> {
        let mut records = self.put_many(&[(collection, record_id, fields)])?;
        Ok(records.pop().expect("one record per put"))
    }

    /// Several puts in one transaction: all of them or none.
    pub fn put_many(&mut self, puts: &[(&str, Option<&str>, &Map<String, Value>)]) -> Result<Vec<Record>> {
        let settings = self.clock;
        let tx = self.conn.transaction()?;
        let mut records = Vec::with_capacity(puts.len());
        for (collection, record_id, fields) in puts {
            records.push(Self::put_in(settings, &tx, collection, *record_id, fields)?);
        }
        tx.commit()?;
        Ok(records)
    }

    fn put_in(
        settings: ClockSettings,
        tx: &Transaction<'_>,
        collection: &str,
        record_id: Option<&str>,
        fields: &Map<String, Value>,
    ) -> Result<Record> {
        ids::validate_collection(collection).map_err(StoreError::Invalid)?;
        revocations::check_user_collection(collection)?;
        if fields.is_empty() {
            return Err(StoreError::Invalid("nothing to write: give at least one field".into()));
        }
        if let Some(Value::String(parent)) = fields.get(PARENT_FIELD) {
            ids::validate_record_id(parent).map_err(|error| StoreError::Invalid(format!("parent: {error}")))?;
        }
        let record_id = match record_id {
            Some(id) => {
                ids::validate_record_id(id).map_err(StoreError::Invalid)?;
                id.to_string()
            }
            None => ids::new_id(),
        };
        let existing = load_record(tx, "records", &record_id)?;
        if let Some((actual, _)) = &existing
            && actual != collection
        {
            return Err(StoreError::WrongCollection {
                record_id,
                actual: actual.clone(),
                requested: collection.into(),
            });
        }
        Self::local_change(
            settings,
            tx,
            &record_id,
            collection,
            OP_UPSERT,
            |state, stamp| state.set(fields, stamp),
            existing.map(|(_, state)| state),
        )
    }

    /// Deletes a record (a tombstone) and queues the change.
    pub fn delete(&mut self, record_id: &str) -> Result<Record> {
        let tx = self.conn.transaction()?;
        let Some((collection, state)) = load_record(&tx, "records", record_id)? else {
            return Err(StoreError::NoRecord(record_id.into()));
        };
        if state.is_deleted() {
            return Err(StoreError::NoRecord(format!("{record_id} (already deleted)")));
        }
        let record = Self::local_change(
            self.clock,
            &tx,
            record_id,
            &collection,
            OP_DELETE,
            |state, stamp| state.delete(stamp),
            Some(state),
        )?;
        tx.commit()?;
        Ok(record)
    }

    pub fn get(&self, record_id: &str) -> Result<Option<Record>> {
        Ok(load_record(&self.conn, "records", record_id)?.map(|(collection, state)| Record {
            record_id: record_id.into(),
            collection,
            state,
        }))
    }

    /// Records in id order (creation order for generated ids), deleted ones only
    /// if asked; the client's reserved collections only when asked by name.
    pub fn list(&self, collection: Option<&str>, include_deleted: bool) -> Result<Vec<Record>> {
        let mut statement = self.conn.prepare(
            "SELECT record_id, collection, state FROM records WHERE ?1 IS NULL OR collection = ?1 ORDER BY record_id",
        )?;
        let rows = statement
            .query_map([collection], |row| Ok((row.get(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?)))?;
        let collection_filter_is_none = collection.is_none();
        let mut records = Vec::new();
        for row in rows {
            let (record_id, collection, state) = row?;
            let state = from_json(&state)?;
            let reserved = collection_filter_is_none && collection.starts_with(RESERVED_PREFIX);
            if (include_deleted || state.is_live()) && !reserved {
                records.push(Record { record_id, collection, state });
            }
        }
        Ok(records)
    }

    pub fn cursor(&self) -> Result<Option<i64>> {
        Ok(get_meta(&self.conn, "cursor")?.and_then(|value| value.parse().ok()))
    }

    pub fn note_sync(&mut self, log_end: i64) -> Result<()> {
        set_meta(&self.conn, "log_end_seen", &log_end.to_string())?;
        set_meta(&self.conn, "last_sync_ms", &now_ms().to_string())
    }

    /// Keeps what went wrong on the server's side for `status` and `check`
    /// (`None`: the last sync went through).
    pub fn note_server_problem(&mut self, problem: Option<&str>) -> Result<()> {
        match problem {
            Some(problem) => set_meta(&self.conn, "server_problem", problem),
            None => {
                self.conn.execute("DELETE FROM meta WHERE key = 'server_problem'", [])?;
                Ok(())
            }
        }
    }
}
