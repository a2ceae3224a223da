//! A device as a person or script drives it: the `lockstep-cli` binary with
//! its own store in a temporary directory.

use std::{path::PathBuf, process::Stdio};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::{
    io::AsyncWriteExt,
    process::{Child, Command},
};

use crate::server::{Server, workspace_binary};

pub fn cli_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("lockstep-cli", "client")
}

pub struct Cli {
    pub name: String,
    pub store: PathBuf,
    binary: PathBuf,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Cli {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        Ok(Self {
            name: name.into(),
            store: dir.path().join("client.db"),
            binary: cli_binary()?,
            env: Vec::new(),
            _dir: dir,
        })
    }

    /// Every command of this device runs with `key=value` in its environment.
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// A file in this device's temporary directory (e.g. a passphrase file).
    pub fn write_file(&self, name: &str, content: &str) -> anyhow::Result<PathBuf> {
        let path = self._dir.path().join(name);
        std::fs::write(&path, content)?;
        Ok(path)
    }

    /// The command with this device's store; `--json` when asked.
    pub fn command(&self, args: &[&str], json: bool) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg("--store").arg(&self.store);
        if json {
            command.arg("--json");
        }
        command
            .args(args)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    async fn output(&self, args: &[&str], json: bool) -> anyhow::Result<std::process::Output> {
        self.command(args, json).output().await.with_context(|| format!("{}: starting {args:?}", self.name))
    }

    /// Runs a command with `input` on its stdin; returns its output, failed or not.
    pub async fn output_with_input(
        &self,
        args: &[&str],
        json: bool,
        input: &str,
    ) -> anyhow::Result<std::process::Output> {
        let mut command = self.command(args, json);
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().with_context(|| format!("{}: starting {args:?}", self.name))?;
        let mut stdin = child.stdin.take().context("a piped stdin")?;
        stdin.write_all(input.as_bytes()).await?;
        drop(stdin);
        Ok(child.wait_with_output().await?)
    }

    /// Runs a command with `--json` and `input` on its stdin, that must succeed; returns its document.
    pub async fn json_with_input(&self, args: &[&str], input: &str) -> anyhow::Result<Value> {
        let output = self.output_with_input(args, true, input).await?;
        if !output.status.success() {
            bail!("{}: {args:?} failed: {}", self.name, String::from_utf8_lossy(&output.stderr));
        }
        serde_json::from_slice(&output.stdout).with_context(|| format!("{}: {args:?} printed no JSON", self.name))
    }

    /// Runs a command that must succeed; returns its stdout.
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.output(args, false).await?;
        if !output.status.success() {
            bail!("{}: {args:?} failed: {}", self.name, String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Runs a command with `--json` that must succeed; returns its document.
    pub async fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let output = self.output(args, true).await?;
        if !output.status.success() {
            bail!("{}: {args:?} failed: {}", self.name, String::from_utf8_lossy(&output.stderr));
        }
        serde_json::from_slice(&output.stdout).with_context(|| format!("{}: {args:?} printed no JSON", self.name))
    }

    /// Runs a command that must fail; returns its stderr.
    pub async fn fail(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.output(args, false).await?;
        if output.status.success() {
            bail!("{}: {args:?} succeeded but should have failed", self.name);
        }
        Ok(String::from_utf8(output.stderr)?)
    }

    /// Starts a command in the background with progress on a piped stderr.
    pub fn spawn(&self, args: &[&str]) -> anyhow::Result<Child> {
        let mut command = self.command(args, false);
        command.stdout(Stdio::null()).stderr(Stdio::piped()).env("LOCKSTEP_PROGRESS", "1");
        Ok(command.spawn()?)
    }

    /// A new account on `server` with this device as its first device.
    pub async fn init(name: &str, server: &Server) -> anyhow::Result<Self> {
        let cli = Self::new(name)?;
        cli.json(&["init", "--server", &server.endpoint(), "--name", name]).await?;
        Ok(cli)
    }

    /// A new device paired through a code shown by this one (on its stdin, as a person pastes it).
    pub async fn pair(&self, name: &str) -> anyhow::Result<Self> {
        self.pair_as(Self::new(name)?).await
    }

    /// `device` (a new store, its environment set) paired through a code shown by this one.
    pub async fn pair_as(&self, device: Self) -> anyhow::Result<Self> {
        let shown = self.json(&["pair", "show"]).await?;
        let code = shown["code"].as_str().context("pair show --json has a code")?;
        device.json_with_input(&["pair", "redeem", "--name", &device.name], code).await?;
        Ok(device)
    }

    pub async fn sync(&self) -> anyhow::Result<Value> {
        self.json(&["sync"]).await
    }

    /// Every record, deleted ones included, as `list --json --deleted` prints them.
    pub async fn records(&self) -> anyhow::Result<Value> {
        self.json(&["list", "--deleted"]).await
    }

    pub async fn get(&self, id: &str) -> anyhow::Result<Value> {
        self.json(&["get", id]).await
    }
}
