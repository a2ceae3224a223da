//! The pairing code that moves an account to a new device: the server address,
//! a one-time ticket and the account key, shown as a QR code and as text
//! (`LOCKSTEP1:` + base64url of a small JSON object). The key never passes
//! through the server: the code goes from screen to camera (or clipboard).

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use qrcode::{QrCode, render::unicode};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crypto::AccountKey;

const PREFIX: &str = "LOCKSTEP1:";

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct Wire {
    server: String,
    ticket: String,
    key: String,
}

#[derive(Debug, Clone)]
pub struct PairingCode {
    pub server: String,
    pub ticket: String,
    pub key: AccountKey,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a Lockstep pairing code ({0}); copy the whole text shown by `lockstep-cli pair show`")]
pub struct PairingCodeError(&'static str);

impl PairingCode {
    pub fn encode(&self) -> Zeroizing<String> {
        let wire =
            Wire { server: self.server.clone(), ticket: self.ticket.clone(), key: self.key.to_base64().to_string() };
        let json = Zeroizing::new(serde_json::to_vec(&wire).expect("strings serialize"));
        Zeroizing::new(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&*json)))
    }

    /// The code, alone or as the one line that holds it in what `pair show` printed
    /// (so that `pair show > code.txt` and `pair redeem < code.txt` work).
    pub fn decode(text: &str) -> Result<Self, PairingCodeError> {
        let line = text.lines().map(str::trim).find(|line| line.starts_with(PREFIX)).unwrap_or(text.trim());
        let body = line.strip_prefix(PREFIX).ok_or(PairingCodeError("it does not start with LOCKSTEP1:"))?;
        let json = Zeroizing::new(URL_SAFE_NO_PAD.decode(body).map_err(|_| PairingCodeError("bad base64"))?);
        let wire: Wire = serde_json::from_slice(&json).map_err(|_| PairingCodeError("bad content"))?;
        let key = AccountKey::from_base64(&wire.key).map_err(|_| PairingCodeError("bad key"))?;
        Ok(Self { server: wire.server.clone(), ticket: wire.ticket.clone(), key })
    }

    /// The code as a QR code drawn with Unicode half blocks, for a terminal.
    pub fn qr(&self) -> String {
        let code = QrCode::new(self.encode().as_bytes()).expect("a pairing code fits in a QR code");
        code.render::<unicode::Dense1x2>()
            .dark_color(unicode::Dense1x2::Light)
            .light_color(unicode::Dense1x2::Dark)
            .quiet_zone(true)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_bad_ones_are_explained() {
        let code = PairingCode {
            server: "http://127.0.0.1:50051".into(),
            ticket: "lsp_abc".into(),
            key: AccountKey::generate(),
        };
        let text = code.encode();
        let back = PairingCode::decode(&format!("  {}\n", &*text)).unwrap();
        assert_eq!((back.server.as_str(), back.ticket.as_str()), ("http://127.0.0.1:50051", "lsp_abc"));
        assert_eq!(back.key, code.key);
        assert!(code.qr().lines().count() > 10);
        let shown = format!("{}\n{}\n\nOn the new device: lockstep-cli pair redeem …\n", code.qr(), &*text);
        assert_eq!(PairingCode::decode(&shown).unwrap().key, code.key, "the whole output of `pair show`");
        assert!(PairingCode::decode("hello").unwrap_err().to_string().contains("LOCKSTEP1"));
        assert!(PairingCode::decode("LOCKSTEP1:!!!").is_err());
    }
}
