//! Wake-ups for tests: the real `lockstep-push` worker, and the local push
//! service `tests/python/push_service.py` (written apart from the worker: it
//! verifies VAPID and decrypts with Python's `http-ece` and `cryptography`), or
//! its fast twin in Go (`tests/go/push_service`) for the benchmark's bursts.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{
    log_tail,
    process::Process,
    server::workspace_binary,
    wait::{eventually, failed, not_yet, ready},
};

/// The worker setting that lets it reach [`PushService`] on 127.0.0.1: push targets
/// inside the network are refused unless listed (issue 25).
pub const WORKER_ALLOWS_LOCAL_PUSH: (&str, &str) = ("LOCKSTEP_PUSH_HTTP__ALLOW_PRIVATE_TARGETS", r#"["127.0.0.1"]"#);
/// The server setting that lets devices name [`PushService`] on 127.0.0.1 in SetPushTarget.
pub const SERVER_ALLOWS_LOCAL_PUSH: (&str, &str) = ("LOCKSTEP_PUSH__ALLOW_PRIVATE_TARGETS", r#"["127.0.0.1"]"#);

/// The worker binary: `$LOCKSTEP_PUSH_BIN`, else `<target dir>/debug/lockstep-push`
/// (refused when older than its sources).
pub fn push_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("LOCKSTEP_PUSH_BIN") {
        return Ok(PathBuf::from(path));
    }
    workspace_binary("lockstep-push", "consumers/push")
}

/// A `lockstep-push` process with its own data directory (its VAPID key);
/// `kill -9` and restart keep both.
pub struct PushWorker {
    binary: PathBuf,
    process: Option<Process>,
    kafka: String,
    env: Vec<(String, String)>,
    dir: TempDir,
    starts: usize,
    vapid_public_key: String,
}

impl PushWorker {
    /// Starts a worker on `kafka` with test-friendly settings (commits every 200 ms, 4 s sessions)
    /// and the extra `LOCKSTEP_PUSH_*` settings in `env`.
    pub async fn start(kafka: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut worker = Self::prepare(kafka, env)?;
        worker.spawn()?;
        Ok(worker)
    }

    /// Like [`PushWorker::start`] without starting it: its data directory and VAPID
    /// key exist (e.g. to give the key to the server first); [`PushWorker::restart`] starts it.
    pub fn prepare(kafka: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::prepare_binary(push_binary()?, kafka, env)
    }

    /// Like [`PushWorker::prepare`] with the worker `binary` (e.g. a release build for benchmarks).
    pub fn prepare_binary(binary: PathBuf, kafka: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut settings = vec![
            ("LOCKSTEP_PUSH_EVENTS__COMMIT_INTERVAL".to_string(), "200ms".to_string()),
            // A killed worker's partitions move to the next one after this: the least Kafka
            // allows (group.min.session.timeout.ms, 6 s; it refuses 4 s with INVALID_SESSION_TIMEOUT).
            ("LOCKSTEP_PUSH_EVENTS__SESSION_TIMEOUT".to_string(), "6s".to_string()),
            ("LOCKSTEP_PUSH_LOG".to_string(), "info,lockstep_push=debug".to_string()),
            ("LOCKSTEP_PUSH_METRICS_LISTEN_ADDR".to_string(), "127.0.0.1:0".to_string()),
        ];
        settings.extend(env.iter().map(|(key, value)| (key.to_string(), value.to_string())));
        let mut worker = Self {
            binary,
            process: None,
            kafka: kafka.to_string(),
            env: settings,
            dir: tempfile::Builder::new().prefix("lockstep-push-").tempdir()?,
            starts: 0,
            vapid_public_key: String::new(),
        };
        // Made before the worker starts, so the two never race to create it.
        worker.vapid_public_key = worker.read_vapid_public_key()?;
        Ok(worker)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("lockstep-push.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Where the running process serves `/metrics` (from its log's last announcement).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.log().lines().rev().find_map(|line| {
            line.split_once("LOCKSTEP_PUSH_METRICS_LISTENING ").and_then(|(_, addr)| addr.trim().parse().ok())
        })
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        // Only the test's settings, never the harness's `LOCKSTEP_*` variables.
        for (variable, _) in std::env::vars_os() {
            if variable.to_string_lossy().starts_with("LOCKSTEP_") {
                command.env_remove(variable);
            }
        }
        command
            .args(["--kafka-brokers", &self.kafka, "--data-dir"])
            .arg(self.data_dir())
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null());
        command
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut command = self.command();
        command.stdout(log.try_clone()?).stderr(log);
        self.process = Some(Process::spawn("lockstep-push", &mut command, &log_path)?);
        self.starts += 1;
        Ok(())
    }

    /// The VAPID public key the worker signs with.
    pub fn vapid_public_key(&self) -> &str {
        &self.vapid_public_key
    }

    /// `lockstep-push vapid-public-key` (makes the key pair when missing).
    fn read_vapid_public_key(&self) -> anyhow::Result<String> {
        let output = self.command().arg("vapid-public-key").stderr(Stdio::piped()).output()?;
        if !output.status.success() {
            bail!("vapid-public-key failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8(output.stdout)?.trim().to_string())
    }

    /// Waits until the worker's log shows `needle` `count` times in all (over restarts).
    pub async fn wait_for_log(&mut self, needle: &str, count: usize, deadline: Duration) -> anyhow::Result<()> {
        // `exited` needs `&mut`; the condition is called again and again.
        let this = std::sync::Mutex::new(&mut *self);
        let logged = eventually(deadline, format!("lockstep-push logging {needle:?} ×{count}"), || async {
            let mut this = this.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let seen = this.log().matches(needle).count();
            if seen >= count {
                return ready(());
            }
            match this.process.as_mut().and_then(Process::exited) {
                Some(status) => failed(anyhow::anyhow!("lockstep-push exited ({status})")),
                None => not_yet(format!("logged {seen} times")),
            }
        })
        .await;
        logged.map_err(|error| anyhow::anyhow!("{error:#}:\n{}", log_tail(&self.log_path())))
    }

    /// Waits until the worker has replayed its partitions and acts (`count`: over restarts).
    pub async fn wait_until_acting(&mut self, count: usize) -> anyhow::Result<()> {
        self.wait_for_log("partitions assigned", count, Duration::from_secs(60)).await
    }

    /// How often the worker was started.
    pub fn starts(&self) -> usize {
        self.starts
    }

    /// `kill -9`: no shutdown, no commit.
    pub fn kill9(&mut self) {
        self.process = None;
    }

    /// Starts the worker (again) with the same data directory and settings.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// SIGTERM, then waits for a clean exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> anyhow::Result<bool> {
        match self.process.take() {
            Some(process) => process.terminate(Duration::from_secs(60)),
            None => Ok(false),
        }
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(Process::exited)
    }
}

impl Drop for PushWorker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- lockstep-push log (last lines) ---\n{}", log_tail(&self.log_path()));
        }
    }
}

/// A subscription of the local push service (its private key stays there).
#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: String,
    pub endpoint: String,
    /// base64url, as a browser's `PushSubscription.toJSON()` gives them.
    pub p256dh: String,
    pub auth: String,
}

/// One request the push service saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub raw: Value,
}

impl Seen {
    pub fn subscription(&self) -> &str {
        self.raw["subscription"].as_str().unwrap_or_default()
    }
    /// Arrival, seconds since the Unix epoch.
    pub fn arrived(&self) -> f64 {
        self.raw["arrived"].as_f64().unwrap_or_default()
    }
    pub fn status(&self) -> i64 {
        self.raw["status"].as_i64().unwrap_or_default()
    }
    /// What went wrong verifying or decrypting (None: VAPID verified, body decrypted).
    pub fn error(&self) -> Option<&str> {
        self.raw["error"].as_str()
    }
    /// The decrypted payload, when there was a body.
    pub fn payload(&self) -> Option<Value> {
        serde_json::from_str(self.raw["payload"].as_str()?).ok()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.raw[name].as_str()
    }
    /// The encrypted body as sent (base64url).
    pub fn ciphertext(&self) -> Vec<u8> {
        use base64::Engine;
        let text = self.raw["ciphertext_b64"].as_str().unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).unwrap_or_default()
    }
}

/// A local push service on a free port, killed when dropped.
pub struct PushService {
    _process: Process,
    origin: String,
    http: reqwest::Client,
    _dir: TempDir,
}

impl PushService {
    /// The Python service (`tests/python/push_service.py`): every control API
    /// (failures on demand, webhooks, rejections).
    pub async fn start() -> anyhow::Result<Self> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/push_service.py");
        let dir = tempfile::Builder::new().prefix("push-service-").tempdir()?;
        let mut command = Command::new("python3");
        command.arg(&script);
        Self::spawn("push_service.py", command, dir).await
    }

    /// The Go service (`tests/go/push_service`, Go's standard library): the same
    /// subscriptions, push endpoint and `requests`, verified and decrypted as
    /// strictly, without the control API, and fast enough that a burst of a
    /// thousand wake-ups measures the worker rather than the service (the
    /// benchmark's W6). Built with `go build` into a temporary directory.
    pub async fn start_go() -> anyhow::Result<Self> {
        let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/go/push_service");
        let dir = tempfile::Builder::new().prefix("push-service-go-").tempdir()?;
        let binary = dir.path().join("push_service");
        let built = Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg(".")
            .current_dir(&source)
            .env("GOTOOLCHAIN", "local")
            .stdin(Stdio::null())
            .output()
            .context("cannot run `go build` (is Go installed?)")?;
        if !built.status.success() {
            bail!("go build of {} failed:\n{}", source.display(), String::from_utf8_lossy(&built.stderr));
        }
        Self::spawn("push_service (Go)", Command::new(&binary), dir).await
    }

    async fn spawn(name: &str, mut command: Command, dir: TempDir) -> anyhow::Result<Self> {
        let log_path = dir.path().join("push_service.log");
        let log = std::fs::File::create(&log_path)?;
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        let mut process = Process::spawn(name, &mut command, &log_path)?;
        let stdout = process.child_mut().stdout.take().context("push service stdout")?;
        let port = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            line.trim().strip_prefix("PORT ").and_then(|port| port.parse::<u16>().ok()).context("no PORT line")
        })
        .await?
        .with_context(|| format!("push service did not start:\n{}", log_tail(&log_path)))?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        Ok(Self { _process: process, origin: format!("http://127.0.0.1:{port}"), http, _dir: dir })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let response = self.http.post(format!("{}{path}", self.origin)).json(&body).send().await?;
        Ok(response.error_for_status()?.json().await?)
    }

    pub async fn subscribe(&self) -> anyhow::Result<Subscription> {
        let answer = self.post("/subscriptions", json!({})).await?;
        let field = |name: &str| answer[name].as_str().map(str::to_string).context("subscription field");
        Ok(Subscription {
            id: field("id")?,
            endpoint: field("endpoint")?,
            p256dh: field("p256dh")?,
            auth: field("auth")?,
        })
    }

    /// A Matrix-gateway webhook: (url, pushkey).
    pub async fn webhook(&self) -> anyhow::Result<(String, String)> {
        let answer = self.post("/webhooks", json!({})).await?;
        Ok((answer["url"].as_str().context("url")?.into(), answer["pushkey"].as_str().context("pushkey")?.into()))
    }

    /// The next `count` push requests (to `subscription`, or any) get `status`.
    pub async fn fail(
        &self,
        status: u16,
        count: u32,
        retry_after: Option<u32>,
        subscription: Option<&str>,
    ) -> anyhow::Result<()> {
        let body =
            json!({ "status": status, "count": count, "retry_after": retry_after, "subscription": subscription });
        self.post("/fail", body).await.map(|_| ())
    }

    /// The webhook lists `pushkey` as rejected from now on.
    pub async fn reject(&self, pushkey: &str) -> anyhow::Result<()> {
        self.post("/reject", json!({ "pushkey": pushkey })).await.map(|_| ())
    }

    /// Every push request seen so far, in arrival order.
    pub async fn requests(&self) -> anyhow::Result<Vec<Seen>> {
        let response = self.http.get(format!("{}/requests", self.origin)).send().await?;
        let all: Vec<Value> = response.error_for_status()?.json().await?;
        Ok(all.into_iter().map(|raw| Seen { raw }).collect())
    }

    /// The requests to one subscription (or webhook pushkey).
    pub async fn requests_to(&self, subscription: &str) -> anyhow::Result<Vec<Seen>> {
        Ok(self.requests().await?.into_iter().filter(|seen| seen.subscription() == subscription).collect())
    }

    /// Waits until `subscription` got at least `count` requests; returns them.
    pub async fn wait_for(&self, subscription: &str, count: usize, deadline: Duration) -> anyhow::Result<Vec<Seen>> {
        eventually(deadline, format!("{count} requests to {subscription}"), || async {
            let seen = self.requests_to(subscription).await?;
            anyhow::Ok(if seen.len() >= count {
                ready(seen)
            } else {
                not_yet(format!("{} requests: {seen:#?}", seen.len()))
            })
        })
        .await
    }
}
