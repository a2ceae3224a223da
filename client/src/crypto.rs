//! Encryption on the device. One random 32-byte account key per user, shared
//! between the user's devices only through pairing. Epoch 1's subkey is
//! `HKDF-SHA256(account key, info = "lockstep.v1 epoch" ‖ 1)`.
//! Changes are sealed with XChaCha20-Poly1305 (random 24-byte nonces) and the
//! associated data binds the ciphertext to the user, record, collection, op and
//! epoch: a server that moves a ciphertext to another record, user or
//! collection, or turns an update into a delete, makes decryption fail.
//!
//! Epoch 1 uses the subkey derived from the account key; every later epoch
//! (started when a device is revoked) has a random key of its own, sealed to
//! each remaining device ([`crate::epochs`]).

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub const NONCE_BYTES: usize = 24;
const HKDF_SALT: &[u8] = b"lockstep.v1 account key";
const AAD_TAG: &[u8] = b"lockstep.v1 change";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("the ciphertext does not decrypt with this account's key (tampered, moved, or another key)")]
    Decrypt,
    #[error("a nonce must have {NONCE_BYTES} bytes, this one has {0}")]
    Nonce(usize),
    #[error("an account key is 32 bytes in base64url; this one is not")]
    KeyFormat,
    #[error("this device has no key for key epoch {0} (yet): another device of the account must share it")]
    NoEpochKey(u32),
    #[error("a sealed epoch key does not open with this device's key, or its proof does not verify")]
    SealedKey,
    #[error("device key proof does not verify: the key was not registered by a holder of the account key")]
    DeviceProof,
    #[error("a device public key must be 32 bytes and not of low order")]
    PublicKey,
}

/// The account key. Zeroized on drop; `Debug` does not show it.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct AccountKey([u8; 32]);

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccountKey(<hidden>)")
    }
}

/// What a ciphertext is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub user_id: &'a str,
    pub record_id: &'a str,
    pub collection: &'a str,
    /// 1 for an upsert, 2 for a delete (the proto's `Op`).
    pub op: i32,
    pub key_epoch: u32,
}

impl Binding<'_> {
    /// Length-prefixed fields, so that no two bindings share an encoding.
    pub fn associated_data(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(64 + self.user_id.len() + self.record_id.len() + self.collection.len());
        aad.extend_from_slice(AAD_TAG);
        for part in [self.user_id, self.record_id, self.collection] {
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
        aad.extend_from_slice(&self.op.to_be_bytes());
        aad.extend_from_slice(&self.key_epoch.to_be_bytes());
        aad
    }
}

impl AccountKey {
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Self(key)
    }

    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let bytes = Zeroizing::new(URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| CryptoError::KeyFormat)?);
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| CryptoError::KeyFormat)?;
        Ok(Self(key))
    }

    /// The key as text, for pairing and the local store only.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(URL_SAFE_NO_PAD.encode(self.0))
    }

    /// A MAC key for `label`, derived from the account key (proofs that a
    /// device key or an epoch key comes from a holder of the account key).
    pub(crate) fn mac_key(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        let hkdf = Hkdf::<Sha256>::new(Some(HKDF_SALT), &self.0);
        let mut key = Zeroizing::new([0u8; 32]);
        hkdf.expand(label, key.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
        key
    }

    /// The subkey of `epoch` derived from the account key. Only epoch 1 uses
    /// it: later epochs have random keys (`epochs`), which the account key
    /// cannot derive.
    pub(crate) fn epoch_cipher(&self, epoch: u32) -> XChaCha20Poly1305 {
        let hkdf = Hkdf::<Sha256>::new(Some(HKDF_SALT), &self.0);
        let mut info = b"lockstep.v1 epoch".to_vec();
        info.extend_from_slice(&epoch.to_be_bytes());
        let mut subkey = Zeroizing::new([0u8; 32]);
        hkdf.expand(&info, subkey.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
        XChaCha20Poly1305::new(subkey.as_ref().into())
    }

    /// Encrypts `plaintext`; returns (nonce, ciphertext).
    pub fn seal(&self, binding: &Binding<'_>, plaintext: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let aad = binding.associated_data();
        let ciphertext = self
            .epoch_cipher(binding.key_epoch)
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
            .expect("XChaCha20-Poly1305 encrypts any message that fits in memory");
        (nonce.to_vec(), ciphertext)
    }

    pub fn open(
        &self,
        binding: &Binding<'_>,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if nonce.len() != NONCE_BYTES {
            return Err(CryptoError::Nonce(nonce.len()));
        }
        let aad = binding.associated_data();
        self.epoch_cipher(binding.key_epoch)
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> Binding<'static> {
        Binding { user_id: "u1", record_id: "r1", collection: "notes", op: 1, key_epoch: 1 }
    }

    #[test]
    fn seal_open_and_bindings() {
        let key = AccountKey::generate();
        let (nonce, ciphertext) = key.seal(&binding(), b"hello");
        assert_eq!(key.open(&binding(), &nonce, &ciphertext).unwrap().as_slice(), b"hello");
        let moved = [
            Binding { user_id: "u2", ..binding() },
            Binding { record_id: "r2", ..binding() },
            Binding { collection: "notez", ..binding() },
            Binding { op: 2, ..binding() },
            Binding { key_epoch: 2, ..binding() },
        ];
        for other in moved {
            assert_eq!(key.open(&other, &nonce, &ciphertext), Err(CryptoError::Decrypt), "{other:?}");
        }
        assert_eq!(AccountKey::generate().open(&binding(), &nonce, &ciphertext), Err(CryptoError::Decrypt));
        // Length prefixes: moving bytes between fields changes the associated data.
        let a = Binding { user_id: "ab", record_id: "c", ..binding() }.associated_data();
        let b = Binding { user_id: "a", record_id: "bc", ..binding() }.associated_data();
        assert_ne!(a, b);
    }

    #[test]
    fn keys_round_trip_as_text_and_stay_hidden() {
        let key = AccountKey::generate();
        assert_eq!(AccountKey::from_base64(&key.to_base64()).unwrap(), key);
        assert_eq!(AccountKey::from_base64("short"), Err(CryptoError::KeyFormat));
        assert_eq!(format!("{key:?}"), "AccountKey(<hidden>)");
    }
}
