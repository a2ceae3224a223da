//! The processes a benchmark round drives: Nisshi (local Kafka), the
//! `lockstep` server and `redis-server`, each on a free port of 127.0.0.1
//! with its data in a temporary directory. Killed when dropped.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tempfile::TempDir;

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(child: &mut Child, port: u16, what: &str, log: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited at start ({status}):\n{}", tail(log));
        }
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("{what} did not answer on port {port} within 30 s:\n{}", tail(log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

pub struct Nisshi {
    child: Option<Child>,
    pub bootstrap: String,
    _dir: TempDir,
}

impl Nisshi {
    pub fn start(binary: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("lockstep-bench-nisshi-").tempdir()?;
        let port = free_port()?;
        let bootstrap = format!("127.0.0.1:{port}");
        let url = format!("tcp://{bootstrap}");
        let log_path = dir.path().join("nisshi.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new(binary);
        command
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://kafka.db", "--silent"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for variable in
            ["OTEL_EXPORTER_OTLP_ENDPOINT", "CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE"]
        {
            command.env_remove(variable);
        }
        let mut child = command.spawn().with_context(|| format!("cannot start {}", binary.display()))?;
        if let Err(error) = wait_for_port(&mut child, port, "nisshi", &log_path) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(error);
        }
        Ok(Self { child: Some(child), bootstrap, _dir: dir })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Nisshi {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

pub struct Lockstep {
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl Lockstep {
    /// Starts the server against `kafka` with its data in `data_dir` (kept by the caller).
    pub fn start(binary: &Path, kafka: &str, data_dir: &Path, env: &[(&str, String)]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let log_path = data_dir.join("lockstep.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut command = Command::new(binary);
        command
            .args(["--listen", "127.0.0.1:0", "--kafka-brokers", kafka, "--data-dir"])
            .arg(data_dir)
            .envs(env.iter().map(|(key, value)| (*key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?);
        let mut child = command.spawn().with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().context("lockstep stdout")?;
        let (addr_tx, addr_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = log;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("LOCKSTEP_LISTENING ") {
                    let _ = addr_tx.send(addr.trim().to_string());
                }
                let _ = writeln!(log, "stdout: {line}");
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("lockstep did not start:\n{}", tail(&log_path));
            }
        };
        Ok(Self { child: Some(child), addr: addr.parse().context("LOCKSTEP_LISTENING address")? })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Lockstep {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

pub struct Redis {
    child: Option<Child>,
    pub url: String,
    _dir: TempDir,
}

impl Redis {
    pub fn start(binary: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("lockstep-bench-redis-").tempdir()?;
        let port = free_port()?;
        let log_path = dir.path().join("redis.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""])
            .args(["--protected-mode", "no", "--daemonize", "no", "--dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        if let Err(error) = wait_for_port(&mut child, port, "redis-server", &log_path) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(error);
        }
        Ok(Self { child: Some(child), url: format!("redis://127.0.0.1:{port}/"), _dir: dir })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Resident memory of a process in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// CPU time (user + system) a process used so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = &stat[stat.rfind(')').context("stat comm")? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); after the comm field, index 11 and 12.
    Ok(fields.get(11).context("utime")?.parse::<u64>()? + fields.get(12).context("stime")?.parse::<u64>()?)
}

pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

/// The first line a command prints, or why it could not run.
pub fn command_line(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(output) => {
            let text = if output.stdout.is_empty() { output.stderr } else { output.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string()
        }
        Err(error) => format!("({program}: {error})"),
    }
}

/// CPU ticks of several processes at one moment.
pub struct CpuSnapshot(Vec<(&'static str, u32, u64)>);

impl CpuSnapshot {
    pub fn take(processes: &[(&'static str, u32)]) -> Self {
        Self(
            processes
                .iter()
                .filter(|(_, pid)| *pid != 0)
                .filter_map(|&(name, pid)| cpu_ticks(pid).ok().map(|ticks| (name, pid, ticks)))
                .collect(),
        )
    }

    /// CPU seconds each process used since the snapshot.
    pub fn since(&self) -> Vec<(&'static str, f64)> {
        let per_second = clock_ticks_per_second() as f64;
        self.0
            .iter()
            .filter_map(|&(name, pid, before)| {
                cpu_ticks(pid).ok().map(|now| (name, now.saturating_sub(before) as f64 / per_second))
            })
            .collect()
    }
}
