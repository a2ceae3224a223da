//! TLS and SASL for the group-offsets client, read from the same librdkafka
//! properties (`kafka.client_config`) that configure rdkafka, so one setting
//! secures every connection to Kafka: `security.protocol`
//! (`plaintext`, `ssl`, `sasl_plaintext`, `sasl_ssl`), `ssl.ca.location`
//! (else the system's roots), `ssl.certificate.location` + `ssl.key.location`
//! (a client certificate), `sasl.mechanism` (`PLAIN`, `SCRAM-SHA-256`,
//! `SCRAM-SHA-512`), `sasl.username`, `sasl.password`. Anything this client
//! cannot honour (e.g. `GSSAPI`, `ssl.endpoint.identification.algorithm=none`)
//! is refused at start-up rather than silently ignored.

use std::{collections::BTreeMap, fmt, sync::Arc};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use hmac::{Hmac, Mac};
use rand::Rng;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use sha2::{Digest, Sha256, Sha512};

use super::GroupOffsetsError;

/// How the group-offsets client protects its connections.
#[derive(Clone, Default)]
pub struct KafkaSecurity {
    pub tls: Option<Arc<ClientConfig>>,
    pub sasl: Option<SaslCredentials>,
}

impl fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSecurity")
            .field("tls", &self.tls.is_some())
            .field("sasl", &self.sasl.as_ref().map(|sasl| sasl.mechanism))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Clone)]
pub struct SaslCredentials {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Secret,
}

/// A password that never shows in `Debug`.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<hidden>")
    }
}

impl KafkaSecurity {
    /// Reads the librdkafka security properties in `client_config`.
    pub fn from_client_config(client_config: &BTreeMap<String, String>) -> Result<Self, GroupOffsetsError> {
        let config = |message: String| GroupOffsetsError::Config(message);
        let get = |key: &str| client_config.get(key).map(|value| value.trim());
        let protocol = get("security.protocol").unwrap_or("plaintext").to_ascii_lowercase();
        let (tls, sasl) = match protocol.as_str() {
            "plaintext" => (false, false),
            "ssl" => (true, false),
            "sasl_plaintext" => (false, true),
            "sasl_ssl" => (true, true),
            other => return Err(config(format!("security.protocol {other:?} is not supported"))),
        };
        let tls = if tls { Some(Arc::new(tls_config(client_config)?)) } else { None };
        let sasl = if sasl {
            let mechanism = match get("sasl.mechanism").or(get("sasl.mechanisms")).unwrap_or("GSSAPI") {
                "PLAIN" => SaslMechanism::Plain,
                "SCRAM-SHA-256" => SaslMechanism::ScramSha256,
                "SCRAM-SHA-512" => SaslMechanism::ScramSha512,
                other => {
                    return Err(config(format!(
                        "sasl.mechanism {other:?} is not supported (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 are)"
                    )));
                }
            };
            let username = get("sasl.username").ok_or_else(|| config("sasl.username is missing".into()))?;
            let password =
                client_config.get("sasl.password").ok_or_else(|| config("sasl.password is missing".into()))?;
            Some(SaslCredentials { mechanism, username: username.to_string(), password: Secret(password.clone()) })
        } else {
            None
        };
        Ok(Self { tls, sasl })
    }
}

fn tls_config(client_config: &BTreeMap<String, String>) -> Result<ClientConfig, GroupOffsetsError> {
    let config = |message: String| GroupOffsetsError::Config(message);
    if client_config.get("ssl.endpoint.identification.algorithm").is_some_and(|value| value.trim() == "none") {
        return Err(config(
            "ssl.endpoint.identification.algorithm=none is not supported: brokers' names are checked".into(),
        ));
    }
    let mut roots = RootCertStore::empty();
    match client_config.get("ssl.ca.location") {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|error| config(format!("ssl.ca.location {path}: {error}")))?
            {
                let cert = cert.map_err(|error| config(format!("ssl.ca.location {path}: {error}")))?;
                roots.add(cert).map_err(|error| config(format!("ssl.ca.location {path}: {error}")))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    if roots.is_empty() {
        return Err(config("no CA certificate to check Kafka brokers against (set ssl.ca.location)".into()));
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|error| config(error.to_string()))?
        .with_root_certificates(roots);
    match (client_config.get("ssl.certificate.location"), client_config.get("ssl.key.location")) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|error| config(format!("ssl.certificate.location {cert}: {error}")))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|error| config(format!("ssl.key.location {key}: {error}")))?;
            builder.with_client_auth_cert(chain, key).map_err(|error| config(format!("client certificate: {error}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(config("ssl.certificate.location and ssl.key.location must be set together".into())),
    }
}

/// The name a broker's certificate must carry: the host part of `host:port`.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = match addr.rsplit_once(':') {
        Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_string()).map_err(|error| format!("{host:?} is not a valid server name: {error}"))
}

/// `PLAIN` (RFC 4616): the one message a client sends.
pub fn plain_message(username: &str, password: &str) -> Vec<u8> {
    format!("\0{username}\0{password}").into_bytes()
}

/// The client side of SCRAM (RFC 5802, without channel binding), one exchange.
pub struct Scram {
    mechanism: SaslMechanism,
    password: String,
    client_first_bare: String,
    client_nonce: String,
    /// Set by `client_final`: what the server's final message must prove.
    expected_server_signature: Option<Vec<u8>>,
}

impl Scram {
    pub fn new(mechanism: SaslMechanism, username: &str, password: &str) -> Self {
        let nonce: [u8; 24] = rand::rng().random();
        Self::with_nonce(mechanism, username, password, BASE64.encode(nonce))
    }

    fn with_nonce(mechanism: SaslMechanism, username: &str, password: &str, client_nonce: String) -> Self {
        let username = username.replace('=', "=3D").replace(',', "=2C");
        let client_first_bare = format!("n={username},r={client_nonce}");
        Self {
            mechanism,
            password: password.to_string(),
            client_first_bare,
            client_nonce,
            expected_server_signature: None,
        }
    }

    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// The answer to the server's first message (its nonce, salt, iterations).
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, String> {
        let server_first = std::str::from_utf8(server_first).map_err(|_| "server-first is not UTF-8".to_string())?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attribute in server_first.split(',') {
            match attribute.split_once('=') {
                Some(("r", value)) => nonce = Some(value),
                Some(("s", value)) => salt = Some(BASE64.decode(value).map_err(|_| "bad salt".to_string())?),
                Some(("i", value)) => iterations = value.parse::<u32>().ok(),
                Some(("e", value)) => return Err(format!("server refused: {value}")),
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err("server-first lacks r, s or i".into());
        };
        // A low count would let an eavesdropper brute-force the password cheaply.
        if !nonce.starts_with(&self.client_nonce) || !(4096..=10_000_000).contains(&iterations) {
            return Err("server-first has a foreign nonce or an unacceptable iteration count".into());
        }
        let salted = self.pbkdf2(&salt, iterations);
        let client_key = self.hmac(&salted, b"Client Key");
        let stored_key = self.hash(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = self.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&client_signature).map(|(key, sig)| key ^ sig).collect();
        let server_key = self.hmac(&salted, b"Server Key");
        self.expected_server_signature = Some(self.hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Checks the server's final message: it proves the server knew the password too.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(server_final).map_err(|_| "server-final is not UTF-8".to_string())?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(format!("server refused: {error}"));
        }
        let signature = text
            .strip_prefix("v=")
            .and_then(|value| BASE64.decode(value.split(',').next().unwrap_or_default()).ok())
            .ok_or_else(|| "server-final lacks its signature".to_string())?;
        match &self.expected_server_signature {
            Some(expected) if *expected == signature => Ok(()),
            _ => Err("the server's SCRAM signature is wrong".into()),
        }
    }

    fn hmac(&self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self.mechanism {
            SaslMechanism::ScramSha512 => {
                let mut mac = Hmac::<Sha512>::new_from_slice(key).expect("hmac takes any key length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
            _ => {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }

    fn hash(&self, data: &[u8]) -> Vec<u8> {
        match self.mechanism {
            SaslMechanism::ScramSha512 => Sha512::digest(data).to_vec(),
            _ => Sha256::digest(data).to_vec(),
        }
    }

    fn pbkdf2(&self, salt: &[u8], iterations: u32) -> Vec<u8> {
        match self.mechanism {
            SaslMechanism::ScramSha512 => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(self.password.as_bytes(), salt, iterations, &mut out);
                out.to_vec()
            }
            _ => {
                let mut out = [0u8; 32];
                pbkdf2::pbkdf2_hmac::<Sha256>(self.password.as_bytes(), salt, iterations, &mut out);
                out.to_vec()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example exchange.
    #[test]
    fn scram_sha_256_matches_rfc_7677() {
        let mut scram = Scram::with_nonce(SaslMechanism::ScramSha256, "user", "pencil", "rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(scram.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final = scram.client_final(server_first).unwrap();
        assert_eq!(
            String::from_utf8(client_final).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        scram.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").unwrap();
        assert!(scram.verify_server_final(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").is_err());
    }

    #[test]
    fn scram_refuses_a_foreign_nonce_and_weak_iterations() {
        let mut scram = Scram::with_nonce(SaslMechanism::ScramSha512, "user", "pencil", "abc".into());
        assert!(scram.client_final(b"r=xyz123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096").is_err());
        assert!(scram.client_final(b"r=abc123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1").is_err());
        assert!(scram.client_final(b"r=abc123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096").is_ok());
    }

    #[test]
    fn properties_are_read_and_unsupported_ones_refused() {
        let config = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect::<BTreeMap<_, _>>()
        };
        let plain = KafkaSecurity::from_client_config(&config(&[])).unwrap();
        assert!(plain.tls.is_none() && plain.sasl.is_none());
        let sasl = KafkaSecurity::from_client_config(&config(&[
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "lockstep"),
            ("sasl.password", "hunter2"),
        ]))
        .unwrap();
        assert_eq!(sasl.sasl.as_ref().unwrap().mechanism, SaslMechanism::ScramSha512);
        assert!(!format!("{sasl:?}").contains("hunter2"));
        for refused in [
            config(&[("security.protocol", "SASL_PLAINTEXT"), ("sasl.mechanism", "GSSAPI")]),
            config(&[("security.protocol", "SASL_PLAINTEXT"), ("sasl.mechanism", "PLAIN")]),
            config(&[("security.protocol", "SSL"), ("ssl.ca.location", "/nonexistent.pem")]),
            config(&[("security.protocol", "SSL"), ("ssl.endpoint.identification.algorithm", "none")]),
            config(&[("security.protocol", "kerberos")]),
        ] {
            assert!(KafkaSecurity::from_client_config(&refused).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn server_names_come_from_the_host() {
        assert_eq!(
            server_name("kafka-1.example.org:9093").unwrap(),
            ServerName::try_from("kafka-1.example.org").unwrap()
        );
        assert!(matches!(server_name("127.0.0.1:9093").unwrap(), ServerName::IpAddress(_)));
        assert!(matches!(server_name("[::1]:9093").unwrap(), ServerName::IpAddress(_)));
    }
}
