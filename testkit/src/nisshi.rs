//! A real local Kafka for tests: one Nisshi process per test, on a free
//! port of 127.0.0.1, with sqlite storage in a temporary directory (so a
//! restart keeps everything). Killed when dropped.
//!
//! The fault tests start it with [`NisshiOptions`]: behind a proxy (it
//! advertises the proxy's port), or with its data on a small tmpfs that fills up.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::bail;
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
};
use tempfile::TempDir;

use crate::{free_port, process::Process, tmpfs::Tmpfs};
pub use crate::{
    records::{EventRecord, committed_offset, read_events, read_topic},
    tmpfs::TmpfsRefused,
};

/// Nisshi's command line as the test kit starts it (`scripts/run` runs Apache
/// Kafka now, see [`crate::kafka`]): `{listener}` and
/// `{advertised}` are `tcp://HOST:PORT` URLs; the sqlite path is relative to
/// the working directory.
pub const NISSHI_ARGS: &[&str] = &[
    "broker",
    "--listener-url",
    "{listener}",
    "--advertised-listener-url",
    "{advertised}",
    "--storage-engine",
    "sqlite://kafka.db",
    "--silent",
];

/// Variables Nisshi reads as settings: cleared, so that a developer's
/// environment cannot point the local broker elsewhere.
pub const NISSHI_CLEARED_ENV: &[&str] =
    &["OTEL_EXPORTER_OTLP_ENDPOINT", "CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE"];

/// The command that starts `binary` listening on `listener`, advertising
/// `advertised`, storing in `storage_dir` (output still to be directed).
pub fn nisshi_command(binary: &Path, listener: &str, advertised: &str, storage_dir: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .args(NISSHI_ARGS.iter().map(|arg| arg.replace("{listener}", listener).replace("{advertised}", advertised)))
        .current_dir(storage_dir)
        .stdin(Stdio::null());
    for variable in NISSHI_CLEARED_ENV {
        command.env_remove(variable);
    }
    command
}

/// How long Nisshi may take to answer after it was started.
const START_DEADLINE: Duration = Duration::from_secs(30);

pub struct Nisshi {
    binary: PathBuf,
    process: Option<Process>,
    port: u16,
    bootstrap: String,
    advertised: String,
    /// Where the sqlite file lives (Nisshi's working directory).
    storage: PathBuf,
    authentication: bool,
    /// Unmounted after the process is killed and before `dir` is removed.
    _tmpfs: Option<Tmpfs>,
    dir: TempDir,
}

/// How to start a broker other than [`Nisshi::start`]'s way.
#[derive(Debug, Clone, Default)]
pub struct NisshiOptions {
    /// Listen on this port of 127.0.0.1 (one a proxy already forwards to). Default: a free port.
    pub port: Option<u16>,
    /// Advertise this port of 127.0.0.1 instead of the listener's, so that clients
    /// (which connect to the advertised address) go through a proxy listening there.
    pub advertised_port: Option<u16>,
    /// Keep the sqlite data on a tmpfs of this many MiB mounted for this broker.
    /// Needs root; where mounting is refused, starting fails with [`TmpfsRefused`].
    pub storage_tmpfs_mib: Option<u64>,
    /// This `nisshi` binary instead of [`nisshi_binary`]'s.
    pub binary: Option<PathBuf>,
    /// Require SASL (`--authentication`): every request but ApiVersions and the SASL
    /// exchange is refused until the connection authenticated.
    pub authentication: bool,
}

/// The `nisshi` binary: `$NISSHI_BIN`, else `nisshi` on `PATH`, else `~/.cargo/bin/nisshi`.
pub fn nisshi_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("NISSHI_BIN") {
        return Ok(PathBuf::from(path));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nisshi");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let candidate = Path::new(&home).join(".cargo/bin/nisshi");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "nisshi is not installed: run scripts/test (it installs it) or \
         `cargo install nisshi --version 0.7.0-pre.2 --locked --features libsql,dynostore`"
    )
}

impl Nisshi {
    /// Starts a fresh, empty broker.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(NisshiOptions::default()).await
    }

    /// Starts a fresh, empty broker as `options` say.
    pub async fn start_with(options: NisshiOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("lockstep-nisshi-").tempdir()?;
        let port = match options.port {
            Some(port) => port,
            None => free_port()?,
        };
        let (storage, tmpfs) = match options.storage_tmpfs_mib {
            Some(mib) => {
                let storage = dir.path().join("storage");
                let tmpfs = Tmpfs::mount(&storage, mib)?;
                (storage, Some(tmpfs))
            }
            None => (dir.path().to_path_buf(), None),
        };
        let advertised_port = options.advertised_port.unwrap_or(port);
        let binary = match options.binary {
            Some(binary) => binary,
            None => nisshi_binary()?,
        };
        let mut nisshi = Self {
            binary,
            process: None,
            port,
            bootstrap: format!("127.0.0.1:{port}"),
            advertised: format!("tcp://127.0.0.1:{advertised_port}"),
            storage,
            authentication: options.authentication,
            _tmpfs: tmpfs,
            dir,
        };
        nisshi.spawn().await?;
        Ok(nisshi)
    }

    /// The broker's own listener. Clients that bootstrap here still connect to
    /// the advertised address afterwards.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory holding the sqlite file (the tmpfs, if there is one).
    pub fn storage_dir(&self) -> &Path {
        &self.storage
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log_path = self.dir.path().join("nisshi.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let listener = format!("tcp://{}", self.bootstrap);
        let mut command = nisshi_command(&self.binary, &listener, &self.advertised, &self.storage);
        if self.authentication {
            command.arg("--authentication");
        }
        command.stdout(log.try_clone()?).stderr(log);
        let mut process = Process::spawn("nisshi", &mut command, &log_path)?;
        process.wait_for_port(self.port, START_DEADLINE).await?;
        self.process = Some(process);
        Ok(())
    }

    /// The broker's process id (0 when it is stopped).
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    /// Creates a topic the way an operator would (tests that bypass Lockstep).
    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        self.create_topic_with(name, partitions, &[]).await
    }

    pub async fn create_topic_with(&self, name: &str, partitions: i32, config: &[(&str, &str)]) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create()?;
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (key, value) in config {
            topic = topic.set(key, value);
        }
        let results = admin
            .create_topics([&topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))))
            .await?;
        for result in results {
            result.map_err(|(topic, code)| anyhow::anyhow!("creating topic {topic}: {code}"))?;
        }
        Ok(())
    }

    /// `kill -9`: the broker stops at once; its sqlite file stays.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Starts the broker again on the same port with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// From the next (re)start on, require SASL (`--authentication`) or not.
    pub fn set_authentication(&mut self, required: bool) {
        self.authentication = required;
    }

    /// Stores a SCRAM-SHA-256 user (the one mechanism this Nisshi build offers) with
    /// Nisshi's own CLI, over the broker's listener (before authentication is required).
    pub async fn create_scram_user(&self, name: &str, password: &str) -> anyhow::Result<()> {
        let output = tokio::process::Command::new(&self.binary)
            .args(["user", "create", "--broker", &format!("tcp://{}", self.bootstrap), name, password])
            .args(["--mechanism", "scram256"])
            .output()
            .await?;
        anyhow::ensure!(output.status.success(), "nisshi user create: {}", String::from_utf8_lossy(&output.stderr));
        Ok(())
    }

    /// SIGTERM (what `scripts/run` sends on Ctrl-C), waiting for the exit;
    /// then starts the broker again on the same port with the same data.
    pub async fn restart_gracefully(&mut self) -> anyhow::Result<()> {
        if let Some(process) = self.process.take() {
            process.terminate(Duration::from_secs(30))?;
        }
        self.spawn().await
    }
}

impl Drop for Nisshi {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- nisshi log (last lines) ---\n{}", crate::log_tail(&self.dir.path().join("nisshi.log")));
        }
        // Then `_tmpfs` unmounts (nothing holds it open any more), then `dir` goes.
    }
}
