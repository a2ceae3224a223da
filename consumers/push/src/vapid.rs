//! VAPID (RFC 8292): the worker's P-256 key pair and the ES256 JWT that
//! identifies it to push services. The public key is what browsers subscribe
//! with (`applicationServerKey`), advertised by the server's GetServerInfo.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use p256::{
    SecretKey,
    ecdsa::{Signature, SigningKey, signature::Signer},
    elliptic_curve::sec1::ToEncodedPoint,
};
use rand::RngCore;

use crate::Error;

/// File in the data directory holding the private key (base64url of the 32-byte scalar).
pub const KEY_FILE: &str = "vapid_private_key";

pub struct VapidKey {
    signing_key: SigningKey,
    /// base64url (no padding) of the 65-byte uncompressed public point.
    public_key: String,
}

impl std::fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VapidKey(public={})", self.public_key)
    }
}

impl VapidKey {
    /// From base64url of the 32-byte private scalar.
    pub fn from_base64(private_key: &str) -> Result<Self, Error> {
        let bytes = URL_SAFE_NO_PAD
            .decode(private_key.trim().trim_end_matches('='))
            .map_err(|_| Error::Vapid("the private key is not base64url".into()))?;
        let secret =
            SecretKey::from_slice(&bytes).map_err(|_| Error::Vapid("the private key is not a P-256 scalar".into()))?;
        Ok(Self::from_secret(&secret))
    }

    fn from_secret(secret: &SecretKey) -> Self {
        let uncompressed = secret.public_key().to_encoded_point(false);
        Self { signing_key: SigningKey::from(secret), public_key: URL_SAFE_NO_PAD.encode(uncompressed.as_bytes()) }
    }

    /// The key in `data_dir`, made (mode 0600) when missing.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, Error> {
        let path = data_dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => return Self::from_base64(&text),
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io(&path, error)),
            Err(_) => {}
        }
        std::fs::create_dir_all(data_dir).map_err(|e| io(data_dir, e))?;
        let secret = loop {
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            // Fails only for 0 or a value ≥ the group order (probability ~2^-32).
            if let Ok(secret) = SecretKey::from_slice(&bytes) {
                break secret;
            }
        };
        let encoded = URL_SAFE_NO_PAD.encode(secret.to_bytes());
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(&path) {
            Ok(mut file) => {
                file.write_all(encoded.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| io(&path, e))?;
                tracing::info!(path = %path.display(), "made a new vapid key pair");
                Ok(Self::from_secret(&secret))
            }
            // Another instance sharing the directory made it first: use theirs.
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::from_base64(&std::fs::read_to_string(&path).map_err(|e| io(&path, e))?)
            }
            Err(error) => Err(io(&path, error)),
        }
    }

    /// base64url (no padding) of the uncompressed public point (65 bytes, 0x04 first).
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The `Authorization` header value for a request to `origin`
    /// (`scheme://host[:port]`, the JWT's `aud`).
    pub fn authorization(&self, origin: &str, subject: &str, lifetime: Duration) -> String {
        let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + lifetime;
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({ "aud": origin, "exp": exp.as_secs(), "sub": subject });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        // ES256 signs SHA-256 of the input; the JWS signature is r ‖ s (64 bytes).
        let signature: Signature = self.signing_key.sign(signing_input.as_bytes());
        let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()));
        format!("vapid t={token}, k={}", self.public_key)
    }
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: PathBuf::from(path), source }
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::{VerifyingKey, signature::Verifier};

    use super::*;

    #[test]
    fn the_key_is_made_once_with_mode_0600_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = VapidKey::load_or_create(dir.path()).unwrap();
        let second = VapidKey::load_or_create(dir.path()).unwrap();
        assert_eq!(first.public_key(), second.public_key());
        let public = URL_SAFE_NO_PAD.decode(first.public_key()).unwrap();
        assert_eq!((public.len(), public[0]), (65, 4));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn the_jwt_verifies_with_the_advertised_key_and_names_the_origin() {
        let dir = tempfile::tempdir().unwrap();
        let key = VapidKey::load_or_create(dir.path()).unwrap();
        let header = key.authorization("http://127.0.0.1:8080", "mailto:ops@example.org", Duration::from_secs(3600));
        let (token, k) = header.strip_prefix("vapid t=").unwrap().split_once(", k=").unwrap();
        assert_eq!(k, key.public_key());
        let parts: Vec<&str> = token.split('.').collect();
        let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["aud"], "http://127.0.0.1:8080");
        assert_eq!(claims["sub"], "mailto:ops@example.org");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let exp = claims["exp"].as_u64().unwrap();
        assert!(exp > now && exp <= now + 3601, "{exp} vs {now}");
        let verifying = VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(k).unwrap()).unwrap();
        let signature = Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
        verifying.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature).unwrap();
        let mut tampered = parts[1].to_string();
        tampered.push('A');
        assert!(verifying.verify(format!("{}.{tampered}", parts[0]).as_bytes(), &signature).is_err());
    }
}
