//! Key epochs and device key pairs: what makes a revocation hold.
//!
//! - Every device has an X25519 key pair ([`DeviceSecret`]); the private half
//!   stays in its store, the public half is registered with the server with a
//!   proof (HMAC keyed from the account key) that a holder of the account key
//!   registered it, so a server cannot slip in a key of its own.
//! - Epoch 1 is the account key's derived subkey. Revoking a device starts the
//!   next epoch: a remaining device makes a random [`EpochKey`] (the account
//!   key cannot derive it) and seals it to each remaining device's public key
//!   ([`seal_epoch_key`]): X25519 with a fresh ephemeral key, HKDF-SHA256,
//!   XChaCha20-Poly1305, bound to user, recipient device and epoch. The sealed
//!   plaintext carries a proof keyed from the account key, so a device only
//!   accepts epoch keys made by a holder of the account key.
//! - [`Keyring`] seals each change under the newest epoch it holds and opens
//!   changes of every epoch it holds.

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crypto::{AccountKey, Binding, CryptoError, NONCE_BYTES};

pub const PUBLIC_KEY_BYTES: usize = 32;
pub const PROOF_BYTES: usize = 32;
/// Ephemeral public key ‖ nonce ‖ ciphertext of (epoch key ‖ proof) ‖ tag.
pub const SEALED_KEY_BYTES: usize = PUBLIC_KEY_BYTES + NONCE_BYTES + 32 + PROOF_BYTES + 16;

const DEVICE_PROOF_LABEL: &[u8] = b"lockstep.v1 device key proof";
const EPOCH_PROOF_LABEL: &[u8] = b"lockstep.v1 epoch key proof";
const SEALED_KEY_LABEL: &[u8] = b"lockstep.v1 sealed epoch key";
const EPOCH_KEY_SALT: &[u8] = b"lockstep.v1 epoch key";

type HmacSha256 = Hmac<Sha256>;

fn length_prefixed(out: &mut Vec<u8>, parts: &[&[u8]]) {
    for part in parts {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
}

fn mac(key: &[u8; 32], parts: &[&[u8]]) -> HmacSha256 {
    let mut message = Vec::new();
    length_prefixed(&mut message, parts);
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(&message);
    mac
}

/// This device's X25519 private key. Zeroized on drop; `Debug` does not show it.
#[derive(Clone)]
pub struct DeviceSecret(StaticSecret);

impl std::fmt::Debug for DeviceSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceSecret(<hidden>)")
    }
}

impl DeviceSecret {
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(bytes.as_mut());
        Self(StaticSecret::from(*bytes))
    }

    pub fn public_key(&self) -> [u8; PUBLIC_KEY_BYTES] {
        PublicKey::from(&self.0).to_bytes()
    }

    /// For the local store only.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(URL_SAFE_NO_PAD.encode(self.0.as_bytes()))
    }

    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let bytes = Zeroizing::new(URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| CryptoError::KeyFormat)?);
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| CryptoError::KeyFormat)?;
        Ok(Self(StaticSecret::from(key)))
    }
}

/// The proof sent with a device's public key.
pub fn device_key_proof(account: &AccountKey, user_id: &str, device_id: &str, public_key: &[u8]) -> [u8; PROOF_BYTES] {
    let key = account.mac_key(DEVICE_PROOF_LABEL);
    mac(&key, &[user_id.as_bytes(), device_id.as_bytes(), public_key]).finalize().into_bytes().into()
}

/// Checks a listed device's public key and proof before anything is sealed to it.
pub fn verify_device_key(
    account: &AccountKey,
    user_id: &str,
    device_id: &str,
    public_key: &[u8],
    proof: &[u8],
) -> Result<[u8; PUBLIC_KEY_BYTES], CryptoError> {
    let public: [u8; PUBLIC_KEY_BYTES] = public_key.try_into().map_err(|_| CryptoError::PublicKey)?;
    let key = account.mac_key(DEVICE_PROOF_LABEL);
    mac(&key, &[user_id.as_bytes(), device_id.as_bytes(), public_key])
        .verify_slice(proof)
        .map_err(|_| CryptoError::DeviceProof)?;
    Ok(public)
}

/// A random key of one epoch after the first. Zeroized on drop; `Debug` does not show it.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct EpochKey([u8; 32]);

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochKey(<hidden>)")
    }
}

impl EpochKey {
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Self(key)
    }

    /// For the local store only.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(URL_SAFE_NO_PAD.encode(self.0))
    }

    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let bytes = Zeroizing::new(URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| CryptoError::KeyFormat)?);
        Ok(Self(bytes.as_slice().try_into().map_err(|_| CryptoError::KeyFormat)?))
    }

    fn cipher(&self, epoch: u32) -> XChaCha20Poly1305 {
        let hkdf = Hkdf::<Sha256>::new(Some(EPOCH_KEY_SALT), &self.0);
        let mut info = b"lockstep.v1 epoch".to_vec();
        info.extend_from_slice(&epoch.to_be_bytes());
        let mut subkey = Zeroizing::new([0u8; 32]);
        hkdf.expand(&info, subkey.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
        XChaCha20Poly1305::new(subkey.as_ref().into())
    }

    fn proof(&self, account: &AccountKey, user_id: &str, epoch: u32) -> HmacSha256 {
        let key = account.mac_key(EPOCH_PROOF_LABEL);
        mac(&key, &[user_id.as_bytes(), &epoch.to_be_bytes(), &self.0])
    }
}

/// Who a sealed epoch key is for.
#[derive(Debug, Clone, Copy)]
pub struct SealedFor<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub epoch: u32,
}

impl SealedFor<'_> {
    fn associated_data(&self) -> Vec<u8> {
        let mut aad = SEALED_KEY_LABEL.to_vec();
        length_prefixed(&mut aad, &[self.user_id.as_bytes(), self.device_id.as_bytes(), &self.epoch.to_be_bytes()]);
        aad
    }
}

fn box_cipher(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> XChaCha20Poly1305 {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let hkdf = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut key = Zeroizing::new([0u8; 32]);
    hkdf.expand(SEALED_KEY_LABEL, key.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
    XChaCha20Poly1305::new(key.as_ref().into())
}

/// Seals `key` to the recipient's public key (a sealed box: only the holder of
/// the matching private key opens it; the sender stays anonymous, the proof
/// inside says a holder of the account key made it).
pub fn seal_epoch_key(
    account: &AccountKey,
    recipient_public_key: &[u8; PUBLIC_KEY_BYTES],
    sealed_for: &SealedFor<'_>,
    key: &EpochKey,
) -> Result<Vec<u8>, CryptoError> {
    let ephemeral = DeviceSecret::generate();
    let ephemeral_public = ephemeral.public_key();
    let shared = ephemeral.0.diffie_hellman(&PublicKey::from(*recipient_public_key));
    if !shared.was_contributory() {
        return Err(CryptoError::PublicKey);
    }
    let mut plaintext = Zeroizing::new(Vec::with_capacity(64));
    plaintext.extend_from_slice(&key.0);
    plaintext.extend_from_slice(&key.proof(account, sealed_for.user_id, sealed_for.epoch).finalize().into_bytes());
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rng().fill_bytes(&mut nonce);
    let ciphertext = box_cipher(shared.as_bytes(), &ephemeral_public, recipient_public_key)
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: &plaintext, aad: &sealed_for.associated_data() })
        .expect("XChaCha20-Poly1305 encrypts any message that fits in memory");
    let mut sealed = Vec::with_capacity(SEALED_KEY_BYTES);
    sealed.extend_from_slice(&ephemeral_public);
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&ciphertext);
    debug_assert_eq!(sealed.len(), SEALED_KEY_BYTES);
    Ok(sealed)
}

/// Opens a key sealed to this device and checks that a holder of the account
/// key made it for this user, device and epoch.
pub fn open_epoch_key(
    account: &AccountKey,
    secret: &DeviceSecret,
    sealed_for: &SealedFor<'_>,
    sealed: &[u8],
) -> Result<EpochKey, CryptoError> {
    if sealed.len() != SEALED_KEY_BYTES {
        return Err(CryptoError::SealedKey);
    }
    let (ephemeral, rest) = sealed.split_at(PUBLIC_KEY_BYTES);
    let (nonce, ciphertext) = rest.split_at(NONCE_BYTES);
    let ephemeral: [u8; 32] = ephemeral.try_into().map_err(|_| CryptoError::SealedKey)?;
    let shared = secret.0.diffie_hellman(&PublicKey::from(ephemeral));
    if !shared.was_contributory() {
        return Err(CryptoError::SealedKey);
    }
    let plaintext = Zeroizing::new(
        box_cipher(shared.as_bytes(), &ephemeral, &secret.public_key())
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: &sealed_for.associated_data() })
            .map_err(|_| CryptoError::SealedKey)?,
    );
    let (key, proof) = plaintext.split_at(32);
    let key = EpochKey(key.try_into().map_err(|_| CryptoError::SealedKey)?);
    key.proof(account, sealed_for.user_id, sealed_for.epoch).verify_slice(proof).map_err(|_| CryptoError::SealedKey)?;
    Ok(key)
}

/// The keys of every epoch this device holds: epoch 1 from the account key,
/// later epochs from their random keys.
#[derive(Debug, Clone, Default)]
pub struct EpochKeys(BTreeMap<u32, EpochKey>);

impl EpochKeys {
    pub fn insert(&mut self, epoch: u32, key: EpochKey) {
        debug_assert!(epoch >= 2, "epoch 1 is the account key's");
        self.0.insert(epoch, key);
    }

    pub fn get(&self, epoch: u32) -> Option<&EpochKey> {
        self.0.get(&epoch)
    }

    /// The newest epoch held (1 when none after the first).
    pub fn newest(&self) -> u32 {
        self.0.keys().next_back().copied().unwrap_or(1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &EpochKey)> {
        self.0.iter().map(|(epoch, key)| (*epoch, key))
    }
}

/// Seals and opens changes under the epochs a device holds.
#[derive(Debug, Clone, Copy)]
pub struct Keyring<'a> {
    pub account: &'a AccountKey,
    pub epochs: &'a EpochKeys,
}

impl Keyring<'_> {
    fn cipher(&self, epoch: u32) -> Result<XChaCha20Poly1305, CryptoError> {
        match epoch {
            1 => Ok(self.account.epoch_cipher(1)),
            epoch => self.epochs.get(epoch).map(|key| key.cipher(epoch)).ok_or(CryptoError::NoEpochKey(epoch)),
        }
    }

    /// Encrypts under `binding.key_epoch`; returns (nonce, ciphertext).
    pub fn seal(&self, binding: &Binding<'_>, plaintext: &[u8]) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        let cipher = self.cipher(binding.key_epoch)?;
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let aad = binding.associated_data();
        let ciphertext = cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
            .expect("XChaCha20-Poly1305 encrypts any message that fits in memory");
        Ok((nonce.to_vec(), ciphertext))
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
        self.cipher(binding.key_epoch)?
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Decrypt)
    }
}

#[cfg(test)]
mod tests;
