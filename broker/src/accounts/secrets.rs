//! Random bearer secrets and the hashes the server keeps instead of them.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use sha2::{Digest, Sha256};

pub type TokenHash = [u8; 32];

/// `prefix` + base64url of `bytes` random bytes from the OS generator.
pub fn new_secret(prefix: &str, bytes: usize) -> String {
    let mut secret = vec![0u8; bytes];
    // ThreadRng is a CSPRNG seeded (and periodically reseeded) from the OS.
    rand::rng().fill_bytes(&mut secret);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(secret))
}

/// Secrets carry at least 192 random bits, so one unsalted SHA-256 is enough:
/// there is nothing to brute-force from the hash.
pub fn hash_secret(secret: &str) -> TokenHash {
    Sha256::digest(secret.as_bytes()).into()
}
