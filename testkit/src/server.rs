//! The real `lockstep` binary for tests: started on port 0 against a test's
//! Kafka, with its own data directory; `kill -9` and restart keep both.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use lockstep_proto::v1::{
    accounts_client::AccountsClient, push_targets_client::PushTargetsClient, sync_client::SyncClient,
};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};

use crate::{
    kafka::Kafka,
    log_tail,
    postgres::Postgres,
    process::Process,
    wait::{eventually, failed, not_yet, ready},
};

const START_DEADLINE: Duration = Duration::from_secs(60);

/// Settings that lift the abuse limits (rate limits, devices per account) for tests and
/// benchmarks that create many accounts and devices from one address; the tests of those
/// limits set their own.
pub const UNTHROTTLED: &[(&str, &str)] = &[
    ("LOCKSTEP_RATE_LIMITS__CREATE_ACCOUNT_PER_ADDRESS__BURST", "1000000"),
    ("LOCKSTEP_RATE_LIMITS__CREATE_ACCOUNT_PER_ADDRESS__PER_HOUR", "1000000000"),
    ("LOCKSTEP_RATE_LIMITS__CREATE_ACCOUNT_TOTAL__BURST", "1000000"),
    ("LOCKSTEP_RATE_LIMITS__CREATE_ACCOUNT_TOTAL__PER_HOUR", "1000000000"),
    ("LOCKSTEP_RATE_LIMITS__PAIRING_TICKET_PER_ACCOUNT__BURST", "1000000"),
    ("LOCKSTEP_RATE_LIMITS__PAIRING_TICKET_PER_ACCOUNT__PER_HOUR", "1000000000"),
    ("LOCKSTEP_RATE_LIMITS__REDEEM_PER_ADDRESS__BURST", "1000000"),
    ("LOCKSTEP_RATE_LIMITS__REDEEM_PER_ADDRESS__PER_HOUR", "1000000000"),
    ("LOCKSTEP_RATE_LIMITS__PUSH_PER_ACCOUNT__BURST", "1000000"),
    ("LOCKSTEP_RATE_LIMITS__PUSH_PER_ACCOUNT__PER_HOUR", "1000000000"),
    ("LOCKSTEP_RATE_LIMITS__FAILED_REGISTRATION_PER_ADDRESS__BURST", "1000000"),
    ("LOCKSTEP_RATE_LIMITS__FAILED_REGISTRATION_PER_ADDRESS__PER_HOUR", "1000000000"),
    ("LOCKSTEP_RATE_LIMITS__DATABASE_CALLS_PER_ACCOUNT__BURST", "1000000"),
    ("LOCKSTEP_RATE_LIMITS__DATABASE_CALLS_PER_ACCOUNT__PER_HOUR", "1000000000"),
    ("LOCKSTEP_RATE_LIMITS__UNKNOWN_TOKEN_LOOKUPS_PER_ADDRESS__BURST", "1000000"),
    ("LOCKSTEP_RATE_LIMITS__UNKNOWN_TOKEN_LOOKUPS_PER_ADDRESS__PER_HOUR", "1000000000"),
    ("LOCKSTEP_ACCOUNTS__MAX_DEVICES_PER_ACCOUNT", "1000000"),
];

pub struct Server {
    binary: PathBuf,
    process: Option<Process>,
    addr: Option<SocketAddr>,
    admin_addr: Arc<Mutex<Option<SocketAddr>>>,
    kafka: String,
    env: Vec<(String, String)>,
    dir: TempDir,
    /// The server's own PostgreSQL when the test kit's backend is PostgreSQL
    /// ([`test_database_is_postgres`]); stopped after the server (fields drop after `drop`).
    postgres: Option<(Postgres, String)>,
}

/// Whether servers started by the test kit keep their accounts in PostgreSQL (each its own
/// server and database) instead of SQLite: `LOCKSTEP_TEST_DATABASE=postgres`. Unset or
/// `sqlite`: SQLite. A test that sets `LOCKSTEP_DATABASE__URL` itself keeps its own.
pub fn test_database_is_postgres() -> anyhow::Result<bool> {
    match std::env::var("LOCKSTEP_TEST_DATABASE").as_deref() {
        Err(_) | Ok("" | "sqlite") => Ok(false),
        Ok("postgres" | "postgresql") => Ok(true),
        Ok(other) => bail!("LOCKSTEP_TEST_DATABASE={other}: use sqlite or postgres"),
    }
}

/// The server binary: `$LOCKSTEP_BIN`, else `<target dir>/debug/lockstep`.
/// Fails when the binary is older than the server's sources, so a test never
/// runs yesterday's server (`cargo build --bins` or scripts/test builds it).
pub fn lockstep_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("LOCKSTEP_BIN") {
        return Ok(PathBuf::from(path));
    }
    workspace_binary("lockstep", "broker")
}

/// A binary of this workspace in target/debug, built from the crate in `crate_dir`,
/// refusing one older than that crate's sources or those of any workspace crate it
/// depends on (read from the Cargo.toml files, so a new dependency needs no edit here).
pub fn workspace_binary(name: &str, crate_dir: &str) -> anyhow::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let binary = target.join("debug").join(name);
    let built = std::fs::metadata(&binary).and_then(|metadata| metadata.modified()).map_err(|_| {
        anyhow::anyhow!("{} is missing: run `cargo build --bins` first (scripts/test does)", binary.display())
    })?;
    for sources in build_inputs(&workspace, crate_dir)? {
        if newest_mtime(&sources) > built {
            bail!(
                "{} is older than {}: run `cargo build --bins` first (scripts/test does)",
                binary.display(),
                sources.display()
            );
        }
    }
    Ok(binary)
}

/// What a build of the crate in `crate_dir` reads: its manifest, build script and every
/// folder but tests and examples, and the same of each workspace crate it depends on.
fn build_inputs(workspace: &Path, crate_dir: &str) -> anyhow::Result<Vec<PathBuf>> {
    let root = std::fs::read_to_string(workspace.join("Cargo.toml"))?;
    // `lockstep-x = { path = "dir" }` in [workspace.dependencies].
    let paths: std::collections::HashMap<&str, &str> = root
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once('=')?;
            let path = rest.split_once("path = \"")?.1.split_once('"')?.0;
            Some((name.trim(), path))
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut pending = vec![crate_dir.to_string()];
    let mut inputs = Vec::new();
    while let Some(dir) = pending.pop() {
        if !seen.insert(dir.clone()) {
            continue;
        }
        let crate_path = workspace.join(&dir);
        let manifest = std::fs::read_to_string(crate_path.join("Cargo.toml"))
            .with_context(|| format!("reading {dir}/Cargo.toml"))?;
        let mut section = "";
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line;
                continue;
            }
            if !matches!(section, "[dependencies]" | "[build-dependencies]") {
                continue;
            }
            let name = line.split(['=', '.', ' ']).next().unwrap_or_default();
            if let Some(path) = paths.get(name) {
                pending.push((*path).to_string());
            }
        }
        for entry in std::fs::read_dir(&crate_path)?.flatten() {
            let file_name = entry.file_name();
            let keep = match file_name.to_str() {
                Some("tests" | "examples" | "benches" | "target") => false,
                Some(other) => entry.path().is_dir() || matches!(other, "Cargo.toml" | "build.rs"),
                None => false,
            };
            if keep {
                inputs.push(entry.path());
            }
        }
    }
    Ok(inputs)
}

fn newest_mtime(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return newest;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let mtime = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|metadata| metadata.modified()).unwrap_or(SystemTime::UNIX_EPOCH)
        };
        newest = newest.max(mtime);
    }
    newest
}

impl Server {
    /// Starts a server against `kafka` with test-friendly settings (1 s heartbeats,
    /// [`UNTHROTTLED`]).
    pub async fn start(kafka: &Kafka) -> anyhow::Result<Self> {
        Self::start_with(kafka, &[]).await
    }

    /// Like [`Server::start`], with extra `LOCKSTEP_*` settings.
    pub async fn start_with(kafka: &Kafka, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_with_kafka(kafka.bootstrap(), env).await
    }

    /// Like [`Server::start_with`] but with the server's own abuse limits (rate limits,
    /// devices per account), not [`UNTHROTTLED`]: for the tests of those limits.
    pub async fn start_with_default_limits(kafka: &Kafka, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut settings =
            vec![("LOCKSTEP_DELIVERY__HEARTBEAT_INTERVAL", "1s"), ("LOCKSTEP_LOG", "info,lockstep_broker=debug")];
        settings.extend_from_slice(env);
        Self::start_binary(lockstep_binary()?, kafka.bootstrap(), &settings).await
    }

    /// Like [`Server::start_with`], bootstrapping from `kafka` (e.g. a proxy in front of Kafka).
    pub async fn start_with_kafka(kafka: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut settings =
            vec![("LOCKSTEP_DELIVERY__HEARTBEAT_INTERVAL", "1s"), ("LOCKSTEP_LOG", "info,lockstep_broker=debug")];
        settings.extend_from_slice(UNTHROTTLED);
        // The test's own settings come last and win.
        settings.extend_from_slice(env);
        Self::start_binary(lockstep_binary()?, kafka, &settings).await
    }

    /// The server `binary` (e.g. a release build for benchmarks) against
    /// `kafka`, with exactly the `LOCKSTEP_*` settings in `env`.
    pub async fn start_binary(binary: PathBuf, kafka: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut settings: Vec<(String, String)> =
            env.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect();
        let mut postgres = None;
        if test_database_is_postgres()? && !settings.iter().any(|(key, _)| key == "LOCKSTEP_DATABASE__URL") {
            let server = tokio::task::spawn_blocking(Postgres::start).await??;
            let url = server.new_database()?;
            let database = url.rsplit('/').next().unwrap_or_default().to_string();
            settings.push(("LOCKSTEP_DATABASE__URL".into(), url));
            postgres = Some((server, database));
        }
        let mut server = Self {
            binary,
            process: None,
            addr: None,
            admin_addr: Arc::default(),
            kafka: kafka.to_string(),
            env: settings,
            dir: tempfile::Builder::new().prefix("lockstep-server-").tempdir()?,
            postgres,
        };
        server.spawn().await?;
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("server was started")
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The address as a client of a TLS server names it.
    pub fn https_endpoint(&self) -> String {
        format!("https://{}", self.addr())
    }

    /// Sends SIGHUP (the server reloads its TLS certificate).
    pub fn hangup(&self) -> anyhow::Result<()> {
        let status = Command::new("kill").args(["-HUP", &self.pid().to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -HUP {} failed", self.pid());
        Ok(())
    }

    /// The server's `--data-dir` (its accounts database).
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`) of the running process.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        *self.admin_addr.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The PostgreSQL server the test kit started for this server, if any.
    pub fn postgres(&self) -> Option<&Postgres> {
        self.postgres.as_ref().map(|(server, _)| server)
    }

    /// Runs `sql` (an UPDATE or DELETE) on the server's accounts database, whichever holds it
    /// (SQLite in the data directory, or the PostgreSQL the test kit started); the rows changed.
    /// For tests that play a server whose database was tampered with.
    pub fn accounts_execute(&self, sql: &str) -> anyhow::Result<u64> {
        match &self.postgres {
            Some((server, database)) => {
                let counted = format!("WITH changed AS ({sql} RETURNING 1) SELECT count(*) FROM changed");
                Ok(server.psql(database, &counted)?.trim().parse()?)
            }
            None => {
                let connection = rusqlite::Connection::open(self.data_dir().join("lockstep.db"))?;
                Ok(connection.execute(sql, [])? as u64)
            }
        }
    }

    /// The first column of the first row of `sql` on the accounts database, as an integer.
    pub fn accounts_count(&self, sql: &str) -> anyhow::Result<i64> {
        match &self.postgres {
            Some((server, database)) => Ok(server.psql(database, sql)?.trim().parse()?),
            None => {
                let connection = rusqlite::Connection::open(self.data_dir().join("lockstep.db"))?;
                Ok(connection.query_row(sql, [], |row| row.get(0))?)
            }
        }
    }

    /// An SQL literal of `bytes` for the accounts database's dialect.
    pub fn accounts_blob_literal(&self, bytes: &[u8]) -> String {
        let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        match &self.postgres {
            Some(_) => format!("'\\x{hex}'::bytea"),
            None => format!("x'{hex}'"),
        }
    }

    /// The accounts database's URL the server was started with (`LOCKSTEP_DATABASE__URL`), if any:
    /// PostgreSQL instead of the SQLite in its data directory.
    pub fn database_url(&self) -> Option<&str> {
        self.env.iter().find(|(key, _)| key == "LOCKSTEP_DATABASE__URL").map(|(_, url)| url.as_str())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("lockstep.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        // A restart listens where the previous process did, so clients reconnect.
        let listen = self.addr.map_or_else(|| "127.0.0.1:0".to_string(), |addr| addr.to_string());
        let mut command = Command::new(&self.binary);
        // The server takes every `LOCKSTEP_*` variable as a setting and refuses unknown
        // ones: it gets only the test's, never the harness's (LOCKSTEP_BIN, LOCKSTEP_FAULT_SEEDS).
        for (variable, _) in std::env::vars_os() {
            if variable.to_string_lossy().starts_with("LOCKSTEP_") {
                command.env_remove(variable);
            }
        }
        // Every server of a test run has its own admin port (the default one is shared).
        if !self.env.iter().any(|(key, _)| key == "LOCKSTEP_ADMIN_LISTEN_ADDR") {
            command.env("LOCKSTEP_ADMIN_LISTEN_ADDR", "127.0.0.1:0");
        }
        command
            .args(["--listen", &listen, "--kafka-brokers", &self.kafka, "--data-dir"])
            .arg(self.data_dir())
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?);
        let mut process = Process::spawn("lockstep", &mut command, &log_path)?;
        let stdout = process.child_mut().stdout.take().context("lockstep stdout")?;
        let (addr_tx, addr_rx) = mpsc::channel();
        let admin_addr = self.admin_addr.clone();
        std::thread::spawn(move || {
            let mut log = log;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("LOCKSTEP_ADMIN_LISTENING ") {
                    *admin_addr.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = addr.trim().parse().ok();
                }
                if let Some(addr) = line.strip_prefix("LOCKSTEP_LISTENING ") {
                    let _ = addr_tx.send(addr.trim().to_string());
                }
                let _ = writeln!(log, "stdout: {line}");
            }
        });
        let addr = eventually(START_DEADLINE, "lockstep listening", || async {
            match addr_rx.try_recv() {
                Ok(addr) => ready(addr),
                Err(mpsc::TryRecvError::Empty) => not_yet("no LOCKSTEP_LISTENING line on its stdout"),
                // Its stdout closed: it exited (dropping `process` reaps it).
                Err(mpsc::TryRecvError::Disconnected) => failed(anyhow::anyhow!("lockstep exited before listening")),
            }
        })
        .await
        .map_err(|error| anyhow::anyhow!("{error:#}:\n{}", log_tail(&log_path)))?;
        self.addr = Some(addr.parse().with_context(|| format!("listening address {addr:?}"))?);
        self.process = Some(process);
        Ok(())
    }

    /// How the server process ended, if it did (a test that expects it alive checks this).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(Process::exited)
    }

    /// The server's process id (0 when it is stopped).
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill9(&mut self) {
        self.process = None;
    }

    /// SIGTERM, then waits for a clean exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> anyhow::Result<bool> {
        match self.process.take() {
            Some(process) => process.terminate(Duration::from_secs(30)),
            None => Ok(false),
        }
    }

    /// Starts the server again on the same address with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }

    /// Runs `lockstep invite <args…>` on this server's database (it may be running) with
    /// the server's own settings; returns its stdout, or fails with its stderr.
    pub fn invite(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = Command::new(&self.binary);
        for (variable, _) in std::env::vars_os() {
            if variable.to_string_lossy().starts_with("LOCKSTEP_") {
                command.env_remove(variable);
            }
        }
        let output = command
            .arg("invite")
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .output()
            .context("cannot run `lockstep invite`")?;
        if !output.status.success() {
            bail!("lockstep invite {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(self.endpoint())?.connect_timeout(Duration::from_secs(5)).connect().await?)
    }

    pub async fn accounts(&self) -> anyhow::Result<AccountsClient<Channel>> {
        Ok(AccountsClient::new(self.channel().await?))
    }

    pub async fn push_targets(&self) -> anyhow::Result<PushTargetsClient<Channel>> {
        Ok(PushTargetsClient::new(self.channel().await?))
    }

    pub async fn sync(&self) -> anyhow::Result<SyncClient<Channel>> {
        Ok(SyncClient::new(self.channel().await?).max_decoding_message_size(64 * 1024 * 1024))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- lockstep log (last lines) ---\n{}", log_tail(&self.log_path()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(crate_dir: &str) -> Vec<String> {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut found: Vec<String> = build_inputs(workspace, crate_dir)
            .unwrap()
            .iter()
            .map(|path| path.strip_prefix(workspace).unwrap().display().to_string())
            .collect();
        found.sort();
        found
    }

    #[test]
    fn a_binary_is_checked_against_the_crates_it_is_built_from_and_no_other() {
        let dashboard = inputs("consumers/dashboard");
        for needed in
            ["consumers/dashboard/src", "kafka/src", "schemas/avro", "schemas/src", "proto/proto", "telemetry/src"]
        {
            assert!(dashboard.iter().any(|input| input == needed), "{needed} missing from {dashboard:?}");
        }
        assert!(!dashboard.iter().any(|input| input.starts_with("broker")), "{dashboard:?}");
        assert!(!dashboard.iter().any(|input| input.ends_with("/tests")), "{dashboard:?}");
        let server = inputs("broker");
        for needed in ["broker/src", "kafka/src", "telemetry/src", "proto/build.rs", "proto/proto"] {
            assert!(server.iter().any(|input| input == needed), "{needed} missing from {server:?}");
        }
        let cli = inputs("client");
        assert!(cli.iter().any(|input| input == "client/src"), "{cli:?}");
        assert!(!cli.iter().any(|input| input.starts_with("broker") || input.starts_with("kafka")), "{cli:?}");
    }
}
