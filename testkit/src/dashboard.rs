//! The real `lockstep-dashboard` binary for tests and benchmarks: started on
//! port 0 against a test's Kafka; `kill -9` and restart on the same address.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::{
    log_tail,
    process::Process,
    server::workspace_binary,
    wait::{eventually, failed, not_yet, ready},
};

const START_DEADLINE: Duration = Duration::from_secs(60);

/// The dashboard binary: `$LOCKSTEP_DASHBOARD_BIN`, else `<target dir>/debug/lockstep-dashboard`
/// (refused when older than its sources).
pub fn dashboard_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("LOCKSTEP_DASHBOARD_BIN") {
        return Ok(PathBuf::from(path));
    }
    workspace_binary("lockstep-dashboard", "consumers/dashboard")
}

pub struct Dashboard {
    binary: PathBuf,
    process: Option<Process>,
    addr: Option<SocketAddr>,
    kafka: String,
    env: Vec<(String, String)>,
    dir: TempDir,
}

impl Dashboard {
    /// Starts the dashboard against `kafka` with `LOCKSTEP_DASHBOARD_*` settings in `env`.
    pub async fn start(kafka: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_binary(dashboard_binary()?, kafka, env).await
    }

    pub async fn start_binary(binary: PathBuf, kafka: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut dashboard = Self {
            binary,
            process: None,
            addr: None,
            kafka: kafka.into(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            dir: tempfile::Builder::new().prefix("lockstep-dashboard-").tempdir()?,
        };
        dashboard.spawn().await?;
        Ok(dashboard)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("dashboard was started")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("dashboard.log")
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let listen = self.addr.map_or_else(|| "127.0.0.1:0".to_string(), |addr| addr.to_string());
        let mut command = Command::new(&self.binary);
        for (variable, _) in std::env::vars_os() {
            if variable.to_string_lossy().starts_with("LOCKSTEP_") {
                command.env_remove(variable);
            }
        }
        command
            .args(["--listen", &listen, "--kafka-brokers", &self.kafka])
            .env("LOCKSTEP_LOG", "info,lockstep_dashboard=debug")
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?);
        let mut process = Process::spawn("lockstep-dashboard", &mut command, &log_path)?;
        let stdout = process.child_mut().stdout.take().context("dashboard stdout")?;
        let (addr_tx, addr_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = log;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("LOCKSTEP_DASHBOARD_LISTENING ") {
                    let _ = addr_tx.send(addr.trim().to_string());
                }
                let _ = writeln!(log, "stdout: {line}");
            }
        });
        let addr = eventually(START_DEADLINE, "lockstep-dashboard listening", || async {
            match addr_rx.try_recv() {
                Ok(addr) => ready(addr),
                Err(mpsc::TryRecvError::Empty) => not_yet("no LOCKSTEP_DASHBOARD_LISTENING line on its stdout"),
                Err(mpsc::TryRecvError::Disconnected) => {
                    failed(anyhow::anyhow!("lockstep-dashboard exited before listening"))
                }
            }
        })
        .await
        .map_err(|error| anyhow::anyhow!("{error:#}:\n{}", log_tail(&log_path)))?;
        self.addr = Some(addr.parse().with_context(|| format!("listening address {addr:?}"))?);
        self.process = Some(process);
        Ok(())
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        self.process = None;
    }

    /// Starts it again on the same address.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }

    /// GET `path` → (status code, body).
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        crate::http_get(self.addr(), path).await
    }

    /// GET `path` as JSON, expecting 200.
    pub async fn json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.get(path).await?;
        if status != 200 {
            bail!("GET {path}: HTTP {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- lockstep-dashboard log (last lines) ---\n{}", log_tail(&self.log_path()));
        }
    }
}

/// `apt-get install -y <package>`, after `apt-get update` if the first try fails.
pub fn apt_install(package: &str) -> bool {
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    install()
        || (Command::new("apt-get").args(["update", "-qq"]).stdin(Stdio::null()).status().is_ok_and(|s| s.success())
            && install())
}

/// Headless Chromium (Debian's `chromium`), for tests that read the DOM a real browser built.
pub mod chromium {
    use std::{
        path::{Path, PathBuf},
        process::{Command, Stdio},
    };

    use anyhow::{Context, bail};

    /// The `chromium` binary, installed with apt-get when it is missing.
    pub fn binary() -> anyhow::Result<PathBuf> {
        let found = |name: &str| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
            })
        };
        if let Some(path) = found("chromium") {
            return Ok(path);
        }
        if !super::apt_install("chromium") {
            bail!("chromium is missing and `apt-get install -y chromium` failed");
        }
        found("chromium").context("chromium not on PATH after installing it")
    }

    fn command(profile: &Path) -> anyhow::Result<Command> {
        let mut command = Command::new(binary()?);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .stdin(Stdio::null());
        Ok(command)
    }

    /// The DOM Chromium built for `url`, serialized (`--dump-dom`).
    pub async fn dump_dom(url: &str) -> anyhow::Result<String> {
        let url = url.to_string();
        tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
            let profile = tempfile::tempdir()?;
            let output = command(profile.path())?.arg("--dump-dom").arg(&url).output()?;
            if !output.status.success() {
                bail!("chromium --dump-dom {url} failed: {}", String::from_utf8_lossy(&output.stderr));
            }
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        })
        .await?
    }

    /// A PNG screenshot of `url` at `width`×`height` into `path`.
    pub async fn screenshot(url: &str, path: &Path, width: u32, height: u32) -> anyhow::Result<()> {
        let (url, path) = (url.to_string(), path.to_path_buf());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let profile = tempfile::tempdir()?;
            let output = command(profile.path())?
                .arg(format!("--screenshot={}", path.display()))
                .arg(format!("--window-size={width},{height}"))
                .arg(&url)
                .output()?;
            if !output.status.success() || !path.is_file() {
                bail!("chromium --screenshot {url} failed: {}", String::from_utf8_lossy(&output.stderr));
            }
            Ok(())
        })
        .await?
    }
}
