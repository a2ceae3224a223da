//! One fault run of the fault suite (`tests/tests/faults.rs`): the stack
//! (Nisshi, optionally behind a [`Proxy`], and the server), a user's
//! simulated devices and their [`History`]; after the faults, the run waits
//! until the devices hold the whole log, checks the invariants and prints its
//! summary line with the evidence (fault timeline, the server's own errors).

use std::{
    collections::BTreeMap,
    io::Write,
    sync::Arc,
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{
    device::Device,
    history::History,
    nisshi::{Nisshi, NisshiOptions, committed_offset, read_topic},
    proxy::Proxy,
    server::Server,
    workload::{Plan, SimDevice, Workload},
};

/// Short Kafka timeouts, so that faults surface as errors within seconds.
pub const FAULT_SETTINGS: &[(&str, &str)] = &[
    ("LOCKSTEP_KAFKA__PRODUCE_TIMEOUT", "3s"),
    ("LOCKSTEP_KAFKA__REQUEST_TIMEOUT", "2s"),
    ("LOCKSTEP_KAFKA__OPERATION_DEADLINE", "5s"),
];
/// After the faults: how long devices get to receive everything.
pub const SETTLE: Duration = Duration::from_secs(60);

/// The seeds to run each fault with: `LOCKSTEP_FAULT_SEED=K` (K only), else
/// `LOCKSTEP_FAULT_SEEDS=N` (1..=N), else 1 and 2.
pub fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("LOCKSTEP_FAULT_SEED").ok().and_then(|seed| seed.parse().ok()) {
        return vec![seed];
    }
    let count = std::env::var("LOCKSTEP_FAULT_SEEDS").ok().and_then(|count| count.parse().ok()).unwrap_or(2);
    (1..=count).collect()
}

/// Nisshi, optionally behind a proxy, and a server bootstrapping through it.
pub struct Stack {
    // Dropped in this order: the server, then Kafka, then the link.
    pub server: Server,
    pub nisshi: Nisshi,
    pub proxy: Option<Proxy>,
}

#[derive(Default)]
pub struct StackOptions {
    pub behind_proxy: bool,
    pub storage_tmpfs_mib: Option<u64>,
    pub settings: Vec<(&'static str, &'static str)>,
}

impl Stack {
    pub async fn start(options: StackOptions) -> anyhow::Result<Self> {
        let port = crate::free_port()?;
        let proxy = match options.behind_proxy {
            true => Some(Proxy::start(([127, 0, 0, 1], port).into()).await?),
            false => None,
        };
        let nisshi = Nisshi::start_with(NisshiOptions {
            port: Some(port),
            advertised_port: proxy.as_ref().map(Proxy::port),
            storage_tmpfs_mib: options.storage_tmpfs_mib,
            ..NisshiOptions::default()
        })
        .await?;
        let kafka = proxy.as_ref().map_or_else(|| nisshi.bootstrap().to_string(), |proxy| proxy.addr().to_string());
        let server = Server::start_with_kafka(&kafka, &options.settings).await?;
        Ok(Self { server, nisshi, proxy })
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("this stack runs behind a proxy")
    }

    /// The server's own errors and last warnings (not librdkafka's connection
    /// noise), and the end of Kafka's log, as evidence.
    pub fn evidence(&self) -> String {
        let server_log = strip_ansi(&self.server.log());
        let own = |level: &str| -> Vec<String> {
            server_log
                .lines()
                .filter(|line| line.contains("lockstep_broker") && line.contains(level))
                .map(|line| truncate(line, 400))
                .collect()
        };
        let (errors, warnings) = (own(" ERROR "), own(" WARN "));
        let mut evidence = format!("  server errors ({}, the first 6):\n", errors.len());
        for line in errors.iter().take(6) {
            evidence.push_str(&format!("    {line}\n"));
        }
        evidence.push_str(&format!("  server warnings ({}, the last 6):\n", warnings.len()));
        for line in &warnings[warnings.len().saturating_sub(6)..] {
            evidence.push_str(&format!("    {line}\n"));
        }
        let nisshi_log = crate::log_tail(&self.nisshi.data_dir().join("nisshi.log"));
        let nisshi_lines: Vec<&str> = nisshi_log.lines().collect();
        if nisshi_lines.is_empty() {
            return evidence;
        }
        evidence.push_str("  nisshi log (last 8 lines):\n");
        for line in &nisshi_lines[nisshi_lines.len().saturating_sub(8)..] {
            evidence.push_str(&format!("    {}\n", truncate(line, 400)));
        }
        evidence
    }
}

/// The server's log without terminal colours.
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ … final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// `HH:MM:SS.mmm` in UTC, as the server's log writes it.
fn utc_time_of_day() -> String {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let millis_of_day = since_epoch.as_millis() % 86_400_000;
    let (hours, minutes) = (millis_of_day / 3_600_000, millis_of_day / 60_000 % 60);
    format!("{hours:02}:{minutes:02}:{:02}.{:03}", millis_of_day / 1000 % 60, millis_of_day % 1000)
}

fn truncate(line: &str, chars: usize) -> String {
    line.chars().take(chars).collect()
}

/// One fault run: the stack, the user's simulated devices, their history.
pub struct Run {
    pub fault: &'static str,
    pub seed: u64,
    pub rng: StdRng,
    pub stack: Stack,
    pub history: Arc<History>,
    pub topic: String,
    pub devices: Vec<SimDevice>,
    pub faults: usize,
    pub notes: Vec<String>,
    /// Expectations of the scenario itself that failed (e.g. the fault did not bite).
    pub problems: Vec<String>,
    pub started: Instant,
}

impl Run {
    /// Starts the stack and a user with `device_count` devices (while nothing is faulty).
    pub async fn start(
        fault: &'static str,
        seed: u64,
        options: StackOptions,
        device_count: usize,
        plan: &Plan,
    ) -> anyhow::Result<Self> {
        let stack = Stack::start(options).await?;
        let first = Device::create_account(&stack.server, "device-0").await?;
        let mut accounts = vec![first.clone()];
        for index in 1..device_count {
            accounts.push(first.pair(&stack.server, &format!("device-{index}")).await?);
        }
        let history = Arc::new(History::new(accounts.iter().map(|device| (device.device_id.clone(), 0))));
        let endpoint = stack.server.endpoint();
        let devices = accounts
            .iter()
            .map(|device| SimDevice::new(device, &endpoint, history.clone(), plan.call_timeout))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            fault,
            seed,
            rng: StdRng::seed_from_u64(seed),
            topic: format!("lockstep.user.{}", first.user_id),
            stack,
            history,
            devices,
            faults: 0,
            notes: vec![format!("{} devices ready", utc_time_of_day())],
            problems: Vec::new(),
            started: Instant::now(),
        })
    }

    /// Notes a fault (or its end) with the UTC time of day, to match against the server's log.
    pub fn timeline(&mut self, what: &str) {
        if !what.starts_with("restored") {
            self.faults += 1;
        }
        self.notes.push(format!("{} {what}", utc_time_of_day()));
    }

    pub async fn pause(&mut self, millis: std::ops::Range<u64>) {
        tokio::time::sleep(Duration::from_millis(self.rng.random_range(millis))).await;
    }

    /// The user's log as any Kafka client reads it (retried while Kafka comes back).
    pub async fn read_log(&self) -> anyhow::Result<Vec<(i64, String)>> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match read_topic(self.stack.nisshi.bootstrap(), &self.topic).await {
                Ok(records) => {
                    return Ok(records.into_iter().map(|(offset, envelope)| (offset, envelope.change_id)).collect());
                }
                Err(error) if Instant::now() < deadline => {
                    eprintln!("reading the log failed, retrying: {error:#}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => return Err(error.context("reading the user's log after the faults")),
            }
        }
    }

    /// Copies the server's and Kafka's logs where they outlive the run:
    /// `<target dir>/fault-runs/<fault>-seed<seed>-<time>/`.
    fn keep_logs(&self) -> std::io::Result<std::path::PathBuf> {
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
            || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"),
            std::path::PathBuf::from,
        );
        let time = utc_time_of_day().replace([':', '.'], "");
        let dir = target.join("fault-runs").join(format!("{}-seed{}-{time}", self.fault, self.seed));
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(self.stack.server.log_path(), dir.join("lockstep.log"))?;
        let nisshi_log = self.stack.nisshi.data_dir().join("nisshi.log");
        if nisshi_log.exists() {
            std::fs::copy(nisshi_log, dir.join("nisshi.log"))?;
        }
        Ok(dir)
    }

    /// After the faults: lets pushers finish, waits until every device holds
    /// the whole log, then checks the history and prints the summary line.
    pub async fn finish(mut self, mut workload: Workload) -> anyhow::Result<Verdict> {
        if !workload.pushers_done(Duration::from_secs(180)).await {
            self.notes.push("pushers did not finish within 180 s".into());
        }
        let log = self.read_log().await?;
        let log_end = log.last().map_or(0, |(offset, _)| offset + 1);
        if !workload.settle(&self.history, log_end, SETTLE).await {
            self.notes.push(format!(
                "devices did not apply the whole log (end {log_end}) within {SETTLE:?}: applied until {:?}",
                self.history.applied_until().values().collect::<Vec<_>>()
            ));
        }
        workload.stop().await;
        let mut committed = BTreeMap::new();
        for device in &self.devices {
            let group = format!("lockstep.device.{}", device.id);
            let offset = committed_offset(self.stack.nisshi.bootstrap(), &group, &self.topic).await.ok().flatten();
            committed.insert(device.id.clone(), offset);
        }
        let report = self.history.check(&log, &committed);
        let stats = self.history.stats();
        let ok = report.ok() && self.problems.is_empty();
        let line = format!(
            "fault={} seed={} ops={} pushes_ok={} errors={} faults={} {}{} unwritten={} log={} secs={}",
            self.fault,
            self.seed,
            stats.ops,
            stats.pushes_ok,
            stats.errors,
            self.faults,
            report.verdicts(),
            if self.problems.is_empty() { "" } else { " scenario=FAIL" },
            stats.unwritten,
            log.len(),
            self.started.elapsed().as_secs()
        );
        println!("{line}");
        let mut details = String::new();
        for problem in &self.problems {
            details.push_str(&format!("  scenario: {problem}\n"));
        }
        if !stats.error_codes.is_empty() {
            details.push_str(&format!("  errors by call: {:?}\n", stats.error_codes));
        }
        for note in &self.notes {
            details.push_str(&format!("  note: {note}\n"));
        }
        if !ok {
            details.push_str(&report.to_string());
            details.push_str(&self.stack.evidence());
            match self.keep_logs() {
                Ok(dir) => details.push_str(&format!("  full logs: {}\n", dir.display())),
                Err(error) => details.push_str(&format!("  could not keep the logs: {error}\n")),
            }
        }
        print!("{details}");
        let _ = std::io::stdout().flush();
        Ok(Verdict { line, details, ok })
    }
}

pub struct Verdict {
    pub line: String,
    pub details: String,
    pub ok: bool,
}

/// Fails the test if any run broke an invariant, listing every run.
pub fn judge(verdicts: Vec<Verdict>) {
    let failed: Vec<&Verdict> = verdicts.iter().filter(|verdict| !verdict.ok).collect();
    if !failed.is_empty() {
        let lines: Vec<String> = verdicts.iter().map(|verdict| verdict.line.clone()).collect();
        let details: Vec<String> =
            failed.iter().map(|verdict| format!("{}\n{}", verdict.line, verdict.details)).collect();
        panic!(
            "{} of {} runs broke an invariant:\n{}\n\n{}",
            failed.len(),
            verdicts.len(),
            lines.join("\n"),
            details.join("\n")
        );
    }
}

pub fn fault_settings() -> Vec<(&'static str, &'static str)> {
    FAULT_SETTINGS.to_vec()
}
