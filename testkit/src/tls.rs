//! TLS for tests: a certificate authority made on the spot (rcgen), the
//! certificates it issues as PEM files, and a TLS-terminating proxy (the TLS
//! listener of a test's Kafka, whose own listeners are plaintext).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A self-signed CA whose certificate sits in `ca.pem` of a temporary directory.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    dir: tempfile::TempDir,
}

/// A certificate and its key as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let dir = tempfile::Builder::new().prefix("lockstep-ca-").tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), cert.pem())?;
        Ok(Self { params, key, dir })
    }

    /// The CA certificate (PEM), what a client pins.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A server certificate for `names` (DNS names or IP addresses), written as
    /// `<file_stem>.pem` and `<file_stem>.key` in `dir`.
    pub fn issue(&self, names: &[&str], dir: &Path, file_stem: &str) -> anyhow::Result<CertFiles> {
        let params = CertificateParams::new(names.iter().map(|name| name.to_string()).collect::<Vec<_>>())?;
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        let files = CertFiles { cert: dir.join(format!("{file_stem}.pem")), key: dir.join(format!("{file_stem}.key")) };
        // Written to a temporary name and renamed, as certbot does, so a watcher never reads half a file.
        for (path, pem) in [(&files.key, key.serialize_pem()), (&files.cert, cert.pem())] {
            let partial = path.with_extension("partial");
            std::fs::write(&partial, pem)?;
            std::fs::rename(&partial, path)?;
        }
        Ok(files)
    }
}

/// Accepts TLS on a port of 127.0.0.1 and forwards the plaintext to `upstream`.
/// Counts completed handshakes; a client that does not speak TLS gets nothing through.
pub struct TlsTerminator {
    addr: SocketAddr,
    handshakes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsTerminator {
    /// Listens on `port` (0 for any) with the certificate in `files`.
    pub async fn start(port: u16, upstream: SocketAddr, files: &CertFiles) -> anyhow::Result<Self> {
        let chain = CertificateDer::pem_file_iter(&files.cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&files.key)?;
        let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("proxy certificate")?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let handshakes = Arc::new(AtomicU64::new(0));
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(mut client) = acceptor.accept(client).await else { return };
                    counted.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Ok(Self { addr, handshakes, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}
