//! The store's secrets at rest: the account key, the device token, the
//! device's X25519 key and the epoch keys.
//!
//! Without a passphrase they sit in `meta` (`account_key`, `device_token`,
//! `device_secret`) and in `epoch_keys.key`, as they always did. With one, they
//! are sealed together into meta `sealed_secrets`: XChaCha20-Poly1305 under a
//! key derived from the passphrase with Argon2id, the KDF parameters and salt
//! stored next to the ciphertext (version-tagged, so they can change). The
//! plaintext columns are emptied, and the database file and its WAL are
//! rewritten so that the old plaintext is gone from them.
//!
//! The passphrase is asked once per process: the derived key stays in
//! `Zeroizing` memory, so a change (a new epoch key, the device key made on
//! first use) is sealed again under a fresh nonce without running the KDF.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use rand::RngCore;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::{Result, StoreError, get_meta, set_meta};

/// The meta key of the sealed blob.
pub(super) const SEALED_META: &str = "sealed_secrets";
/// The meta keys that hold secrets in a store without a passphrase.
pub(super) const SECRET_META: [&str; 3] = ["account_key", "device_token", "device_secret"];
/// Version 1: Argon2id (v0x13) → XChaCha20-Poly1305 over a JSON document.
const BLOB_VERSION: u32 = 1;
const AAD: &[u8] = b"lockstep.v1 store secrets";
const SALT_BYTES: usize = 16;
const NONCE_BYTES: usize = 24;

/// Argon2id's cost, stored with each sealed blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl KdfParams {
    /// What a passphrase gets: 64 MiB, 3 passes, 1 lane (RFC 9106's second
    /// recommended option, for machines where 2 GiB is too much).
    pub const DEFAULT: Self = Self { memory_kib: 64 * 1024, iterations: 3, parallelism: 1 };
    /// Cheap parameters for tests only (`LOCKSTEP_KDF_TEST_PARAMS=1`). They are
    /// stored in the blob, so a store sealed with them stays cheap to attack
    /// until its passphrase is set again without the variable.
    pub const TEST: Self = Self { memory_kib: 64, iterations: 1, parallelism: 1 };
    /// A tampered blob must not make the device allocate without bound.
    const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
    const MAX_ITERATIONS: u32 = 64;
    const MAX_PARALLELISM: u32 = 16;

    /// [`KdfParams::DEFAULT`], or [`KdfParams::TEST`] when the environment has
    /// `LOCKSTEP_KDF_TEST_PARAMS=1`.
    pub fn for_new_passphrase() -> Self {
        if std::env::var_os("LOCKSTEP_KDF_TEST_PARAMS").is_some_and(|value| value == "1") {
            Self::TEST
        } else {
            Self::DEFAULT
        }
    }

    fn argon2(&self) -> Result<argon2::Argon2<'static>> {
        if self.memory_kib > Self::MAX_MEMORY_KIB
            || self.iterations > Self::MAX_ITERATIONS
            || self.parallelism > Self::MAX_PARALLELISM
        {
            return Err(StoreError::Corrupt(format!("sealed secrets: KDF parameters out of bounds ({self:?})")));
        }
        let params = argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|error| StoreError::Corrupt(format!("sealed secrets: KDF parameters: {error}")))?;
        Ok(argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params))
    }
}

impl std::fmt::Display for KdfParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let memory = if self.memory_kib % 1024 == 0 {
            format!("{} MiB", self.memory_kib / 1024)
        } else {
            format!("{} KiB", self.memory_kib)
        };
        let plural = |count: u32, one: &str, many: &str| format!("{count} {}", if count == 1 { one } else { many });
        write!(
            f,
            "Argon2id, {memory}, {}, {}",
            plural(self.iterations, "pass", "passes"),
            plural(self.parallelism, "lane", "lanes")
        )
    }
}

/// Every secret of the store, as the store keeps them (base64url text).
/// No `Debug`: nothing may print them.
#[derive(Default, Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub(super) struct Secrets {
    pub account_key: Option<String>,
    pub device_token: Option<String>,
    pub device_secret: Option<String>,
    pub epoch_keys: Vec<EpochKeyText>,
}

#[derive(Clone, Serialize, Deserialize, Zeroize)]
pub(super) struct EpochKeyText {
    pub epoch: u32,
    pub key: String,
}

impl Secrets {
    fn meta(&self, key: &str) -> Option<&String> {
        match key {
            "account_key" => self.account_key.as_ref(),
            "device_token" => self.device_token.as_ref(),
            "device_secret" => self.device_secret.as_ref(),
            _ => None,
        }
    }

    pub fn set_meta(&mut self, key: &str, value: &str) {
        let slot = match key {
            "account_key" => &mut self.account_key,
            "device_token" => &mut self.device_token,
            "device_secret" => &mut self.device_secret,
            _ => unreachable!("{key} is not a secret"),
        };
        if let Some(old) = slot.as_mut() {
            old.zeroize();
        }
        *slot = Some(value.to_string());
    }

    pub fn epoch_key(&self, epoch: u32) -> Option<&String> {
        self.epoch_keys.iter().find(|held| held.epoch == epoch).map(|held| &held.key)
    }

    /// What a store without a passphrase holds in the clear.
    fn read_plain(conn: &Connection) -> Result<Self> {
        let mut secrets = Secrets::default();
        for key in SECRET_META {
            if let Some(value) = get_meta(conn, key)?.map(Zeroizing::new) {
                secrets.set_meta(key, &value);
            }
        }
        let mut statement = conn.prepare("SELECT epoch, key FROM epoch_keys ORDER BY epoch")?;
        let rows = statement.query_map([], |row| Ok(EpochKeyText { epoch: row.get(0)?, key: row.get(1)? }))?;
        for row in rows {
            secrets.epoch_keys.push(row?);
        }
        Ok(secrets)
    }

    fn write_plain(&self, conn: &Connection) -> Result<()> {
        for key in SECRET_META {
            if let Some(value) = self.meta(key) {
                set_meta(conn, key, value)?;
            }
        }
        for held in &self.epoch_keys {
            conn.execute("UPDATE epoch_keys SET key = ?2 WHERE epoch = ?1", rusqlite::params![held.epoch, held.key])?;
        }
        Ok(())
    }
}

/// The sealed blob as stored in meta `sealed_secrets` (JSON).
#[derive(Serialize, Deserialize)]
struct Blob {
    version: u32,
    kdf: String,
    #[serde(flatten)]
    params: KdfParams,
    salt: String,
    nonce: String,
    ciphertext: String,
}

/// A protected store whose passphrase was given: the derived key and the secrets.
pub(super) struct Unlocked {
    key: Zeroizing<[u8; 32]>,
    params: KdfParams,
    salt: [u8; SALT_BYTES],
    pub secrets: Secrets,
}

impl Unlocked {
    fn derive(passphrase: &[u8], params: KdfParams, salt: [u8; SALT_BYTES], secrets: Secrets) -> Result<Self> {
        let mut key = Zeroizing::new([0u8; 32]);
        params
            .argon2()?
            .hash_password_into(passphrase, &salt, key.as_mut())
            .map_err(|error| StoreError::Invalid(format!("passphrase: {error}")))?;
        Ok(Self { key, params, salt, secrets })
    }

    /// `secrets` sealed under this key with a fresh nonce, as stored in meta.
    pub fn seal(&self, secrets: &Secrets) -> String {
        let mut plaintext = Zeroizing::new(Vec::with_capacity(4096));
        serde_json::to_writer(&mut *plaintext, secrets).expect("secrets serialize");
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = XChaCha20Poly1305::new(self.key.as_ref().into())
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: &plaintext, aad: AAD })
            .expect("XChaCha20-Poly1305 encrypts any message that fits in memory");
        let blob = Blob {
            version: BLOB_VERSION,
            kdf: "argon2id".into(),
            params: self.params,
            salt: URL_SAFE_NO_PAD.encode(self.salt),
            nonce: URL_SAFE_NO_PAD.encode(nonce),
            ciphertext: URL_SAFE_NO_PAD.encode(ciphertext),
        };
        serde_json::to_string(&blob).expect("a blob serializes")
    }

    /// Opens a sealed blob; [`StoreError::WrongPassphrase`] when it does not open.
    fn open(blob: &str, passphrase: &[u8]) -> Result<Self> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("sealed secrets: {what}"));
        let blob: Blob = serde_json::from_str(blob).map_err(|error| corrupt(&error.to_string()))?;
        if blob.version != BLOB_VERSION || blob.kdf != "argon2id" {
            return Err(corrupt(&format!(
                "version {} with KDF {} (this client reads version {BLOB_VERSION}, argon2id: a newer client sealed them?)",
                blob.version, blob.kdf
            )));
        }
        let decode = |text: &str, what: &str| URL_SAFE_NO_PAD.decode(text).map_err(|_| corrupt(what));
        let salt: [u8; SALT_BYTES] = decode(&blob.salt, "salt")?.try_into().map_err(|_| corrupt("salt length"))?;
        let nonce = decode(&blob.nonce, "nonce")?;
        if nonce.len() != NONCE_BYTES {
            return Err(corrupt("nonce length"));
        }
        let ciphertext = decode(&blob.ciphertext, "ciphertext")?;
        let mut unlocked = Self::derive(passphrase, blob.params, salt, Secrets::default())?;
        let plaintext = XChaCha20Poly1305::new(unlocked.key.as_ref().into())
            .decrypt(XNonce::from_slice(&nonce), Payload { msg: &ciphertext, aad: AAD })
            .map(Zeroizing::new)
            .map_err(|_| StoreError::WrongPassphrase)?;
        unlocked.secrets = serde_json::from_slice(&plaintext).map_err(|error| corrupt(&error.to_string()))?;
        Ok(unlocked)
    }
}

/// Where the store's secrets are.
pub(super) enum Vault {
    /// No passphrase: in the clear, in `meta` and `epoch_keys`.
    Plain,
    /// Sealed, and the passphrase was not given (yet).
    Locked,
    /// Sealed, and open in memory.
    Unlocked(Box<Unlocked>),
}

impl Vault {
    /// How a store just opened keeps its secrets.
    pub fn of(conn: &Connection) -> Result<Self> {
        Ok(if get_meta(conn, SEALED_META)?.is_some() { Vault::Locked } else { Vault::Plain })
    }

    /// A secret kept in `meta` (one of [`SECRET_META`]).
    pub fn meta(&self, conn: &Connection, key: &str) -> Result<Option<Zeroizing<String>>> {
        debug_assert!(SECRET_META.contains(&key), "{key} is not a secret");
        match self {
            Vault::Plain => Ok(get_meta(conn, key)?.map(Zeroizing::new)),
            Vault::Locked => Err(StoreError::Locked),
            Vault::Unlocked(unlocked) => Ok(unlocked.secrets.meta(key).map(|value| Zeroizing::new(value.clone()))),
        }
    }

    /// The key of `epoch`; `stored` is the `epoch_keys.key` column (empty when sealed).
    pub fn epoch_key(&self, epoch: u32, stored: String) -> Result<Zeroizing<String>> {
        let stored = Zeroizing::new(stored);
        match self {
            Vault::Plain => Ok(stored),
            Vault::Locked => Err(StoreError::Locked),
            Vault::Unlocked(unlocked) => unlocked
                .secrets
                .epoch_key(epoch)
                .map(|key| Zeroizing::new(key.clone()))
                .ok_or_else(|| StoreError::Corrupt(format!("the sealed secrets lack the key of epoch {epoch}"))),
        }
    }

    pub fn unlock(&mut self, conn: &Connection, passphrase: &[u8]) -> Result<()> {
        if let Vault::Locked = self {
            let blob = get_meta(conn, SEALED_META)?.ok_or(StoreError::Corrupt("sealed secrets vanished".into()))?;
            *self = Vault::Unlocked(Box::new(Unlocked::open(&blob, passphrase)?));
        }
        Ok(())
    }

    /// Every secret, wherever it is now (for sealing them under a new passphrase).
    pub fn secrets(&self, conn: &Connection) -> Result<Secrets> {
        match self {
            Vault::Plain => Secrets::read_plain(conn),
            Vault::Locked => Err(StoreError::Locked),
            Vault::Unlocked(unlocked) => Ok(unlocked.secrets.clone()),
        }
    }

    /// Derives a key from a new passphrase for `secrets` (a random salt).
    pub fn new_unlocked(passphrase: &[u8], params: KdfParams, secrets: Secrets) -> Result<Unlocked> {
        if passphrase.is_empty() {
            return Err(StoreError::Invalid("a passphrase must not be empty".into()));
        }
        let mut salt = [0u8; SALT_BYTES];
        rand::rng().fill_bytes(&mut salt);
        Unlocked::derive(passphrase, params, salt, secrets)
    }

    /// Writes the secrets back in the clear (removing the passphrase).
    pub fn write_plain(conn: &Connection, secrets: &Secrets) -> Result<()> {
        secrets.write_plain(conn)?;
        conn.execute("DELETE FROM meta WHERE key = ?1", [SEALED_META])?;
        Ok(())
    }

    /// Refuses to write secrets when another process set, changed or removed
    /// the passphrase since this one opened the store: a write under the old
    /// state would put plaintext back, or seal under the old passphrase.
    pub fn check_current(&self, conn: &Connection) -> Result<()> {
        let stored = get_meta(conn, SEALED_META)?;
        let current = match (self, &stored) {
            (Vault::Plain, None) => true,
            (Vault::Locked, _) => return Err(StoreError::Locked),
            (Vault::Unlocked(unlocked), Some(blob)) => serde_json::from_str::<Blob>(blob)
                .is_ok_and(|blob| URL_SAFE_NO_PAD.decode(blob.salt).is_ok_and(|salt| salt == unlocked.salt)),
            _ => false,
        };
        if !current {
            return Err(StoreError::Invalid(
                "another process set, changed or removed this store's passphrase since this one opened it: run the \
                 command again"
                    .into(),
            ));
        }
        Ok(())
    }

    pub fn params(&self) -> Option<KdfParams> {
        match self {
            Vault::Unlocked(unlocked) => Some(unlocked.params),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        let mut secrets = Secrets::default();
        secrets.set_meta("account_key", "the-account-key");
        secrets.set_meta("device_token", "the-token");
        secrets.epoch_keys.push(EpochKeyText { epoch: 2, key: "epoch-two".into() });
        secrets
    }

    #[test]
    fn sealed_secrets_open_with_their_passphrase_only() {
        let unlocked = Vault::new_unlocked(b"correct horse", KdfParams::TEST, secrets()).unwrap();
        let blob = unlocked.seal(&unlocked.secrets);
        assert!(!blob.contains("the-account-key") && !blob.contains("the-token") && !blob.contains("epoch-two"));

        let opened = Unlocked::open(&blob, b"correct horse").unwrap();
        assert_eq!(opened.secrets.account_key.as_deref(), Some("the-account-key"));
        assert_eq!(opened.secrets.device_token.as_deref(), Some("the-token"));
        assert_eq!(opened.secrets.device_secret, None);
        assert_eq!(opened.secrets.epoch_key(2).map(String::as_str), Some("epoch-two"));
        assert_eq!((opened.params, opened.salt), (KdfParams::TEST, unlocked.salt), "parameters round trip");

        assert!(matches!(Unlocked::open(&blob, b"correct horsf"), Err(StoreError::WrongPassphrase)));
        // Resealing uses a fresh nonce under the same key.
        let again = opened.seal(&opened.secrets);
        assert_ne!(again, blob);
        assert!(Unlocked::open(&again, b"correct horse").is_ok());
        assert!(Vault::new_unlocked(b"", KdfParams::TEST, secrets()).is_err());
    }

    #[test]
    fn blobs_name_their_parameters_and_bad_ones_are_refused() {
        let unlocked = Vault::new_unlocked(b"pw", KdfParams::TEST, secrets()).unwrap();
        let mut blob: serde_json::Value = serde_json::from_str(&unlocked.seal(&unlocked.secrets)).unwrap();
        assert_eq!(
            (&blob["version"], &blob["kdf"], &blob["memory_kib"], &blob["iterations"], &blob["parallelism"]),
            (&1.into(), &"argon2id".into(), &64.into(), &1.into(), &1.into())
        );
        assert_eq!(URL_SAFE_NO_PAD.decode(blob["salt"].as_str().unwrap()).unwrap().len(), SALT_BYTES);

        // Other parameters derive another key: the blob does not open.
        blob["iterations"] = 2.into();
        assert!(matches!(Unlocked::open(&blob.to_string(), b"pw"), Err(StoreError::WrongPassphrase)));
        blob["memory_kib"] = (KdfParams::MAX_MEMORY_KIB + 1).into();
        assert!(matches!(Unlocked::open(&blob.to_string(), b"pw"), Err(StoreError::Corrupt(_))));
        blob["version"] = 2.into();
        let error = Unlocked::open(&blob.to_string(), b"pw").err().unwrap().to_string();
        assert!(error.contains("version 2"), "{error}");
    }

    #[test]
    fn users_get_the_strong_parameters() {
        if std::env::var_os("LOCKSTEP_KDF_TEST_PARAMS").is_none() {
            assert_eq!(KdfParams::for_new_passphrase(), KdfParams::DEFAULT);
        }
        assert_eq!(KdfParams::DEFAULT, KdfParams { memory_kib: 65536, iterations: 3, parallelism: 1 });
        assert_eq!(KdfParams::DEFAULT.to_string(), "Argon2id, 64 MiB, 3 passes, 1 lane");
        assert_eq!(KdfParams::TEST.to_string(), "Argon2id, 64 KiB, 1 pass, 1 lane");
        KdfParams::DEFAULT.argon2().unwrap();
    }
}
