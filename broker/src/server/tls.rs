//! Optional TLS for the gRPC listener (rustls): the certificate chain and key
//! come from PEM files and are read again on SIGHUP and whenever either
//! file's modification time changes, so a renewed certificate (certbot,
//! cert-manager) is served to new connections without a restart. A reload
//! that fails keeps the previous certificate and logs why.
//!
//! Handshakes run in their own tasks with a deadline and a bound, so a client
//! that opens a TCP connection and says nothing holds neither the accept loop
//! nor more than one handshake slot.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    ServerConfig,
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

use super::connections::{ConnectionLimit, Counted};
use crate::settings::TlsSettings;

/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_CONCURRENT_HANDSHAKES: usize = 256;
/// How long a client may take to finish its handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert_file {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("tls.key_file {path}: {message}")]
    Key { path: PathBuf, message: String },
}

/// The certificate currently served; swapped whole on reload.
#[derive(Debug)]
pub struct CertStore {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    loaded_mtimes: RwLock<(Option<SystemTime>, Option<SystemTime>)>,
}

impl CertStore {
    pub fn load(settings: &TlsSettings) -> Result<Arc<Self>, TlsError> {
        let (Some(cert_file), Some(key_file)) = (&settings.cert_file, &settings.key_file) else {
            return Err(TlsError::Cert {
                path: PathBuf::new(),
                message: "tls needs both cert_file and key_file".into(),
            });
        };
        let mtimes = (mtime(cert_file), mtime(key_file));
        let key = read_certified_key(cert_file, key_file)?;
        Ok(Arc::new(Self {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            current: RwLock::new(Arc::new(key)),
            loaded_mtimes: RwLock::new(mtimes),
        }))
    }

    /// Reads both files again; on failure the previous certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let mtimes = (mtime(&self.cert_file), mtime(&self.key_file));
        let key = read_certified_key(&self.cert_file, &self.key_file)?;
        *lockstep_kafka::locks::write(&self.current) = Arc::new(key);
        *lockstep_kafka::locks::write(&self.loaded_mtimes) = mtimes;
        tracing::info!(cert_file = %self.cert_file.display(), "tls certificate reloaded");
        Ok(())
    }

    fn changed_on_disk(&self) -> bool {
        let now = (mtime(&self.cert_file), mtime(&self.key_file));
        *lockstep_kafka::locks::read(&self.loaded_mtimes) != now
    }

    /// Reloads on SIGHUP and when a file changed (checked every `interval`), until the
    /// process ends.
    pub fn watch(self: Arc<Self>, interval: Duration) {
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let hangup_received = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup_received = std::future::pending::<Option<()>>();
                let forced = tokio::select! {
                    _ = hangup_received => true,
                    _ = tick.tick() => false,
                };
                if !forced && !self.changed_on_disk() {
                    continue;
                }
                if let Err(error) = self.reload() {
                    tracing::error!(%error, "tls certificate not reloaded: still serving the previous one");
                }
            }
        });
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(lockstep_kafka::locks::read(&self.current).clone())
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|metadata| metadata.modified()).ok()
}

fn read_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_error = |message: String| TlsError::Cert { path: cert_file.to_path_buf(), message };
    let key_error = |message: String| TlsError::Key { path: key_file.to_path_buf(), message };
    let chain = CertificateDer::pem_file_iter(cert_file)
        .map_err(|error| cert_error(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| cert_error(error.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| key_error(error.to_string()))?;
    let signing_key = any_supported_type(&key).map_err(|error| key_error(error.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|error| key_error(format!("does not match the certificate: {error}")))?;
    Ok(certified)
}

/// The rustls configuration: HTTP/2 only (gRPC), certificates from `store`.
pub fn server_config(store: Arc<CertStore>) -> ServerConfig {
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(store);
    // h2 first (the server's order wins): gRPC clients and browsers get HTTP/2; a gRPC-Web
    // client that offers only HTTP/1.1 still gets a connection.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// Accepts TCP connections on `listener` (those past `limit` are closed at once), runs
/// each TLS handshake in its own task (bounded, with a deadline) and yields the finished
/// streams to the gRPC server.
pub fn incoming(
    listener: TcpListener,
    config: ServerConfig,
    limit: ConnectionLimit,
) -> ReceiverStream<io::Result<Counted<TlsStream<tokio::net::TcpStream>>>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (streams_tx, streams_rx) = mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if streams_tx.is_closed() {
                return;
            }
            // The slot is held from here to the connection's end, its handshake included.
            let Some(stream) = limit.admit(stream) else { continue };
            // See `server::run` on TCP_NODELAY; dead peers are found by HTTP/2 keepalive pings.
            let _ = stream.get_ref().set_nodelay(true);
            let acceptor = acceptor.clone();
            let streams_tx = streams_tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let (tcp, slot) = stream.into_parts();
                match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = streams_tx.send(Ok(Counted::from_parts(tls, slot))).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "tls handshake failed"),
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(streams_rx)
}
