//! One fault run of the fault suite (`tests/tests/faults.rs`): the stack
//! (Kafka, optionally behind a [`Proxy`], and the server), a user's
//! simulated devices and their [`History`]; the faults, each applied through
//! the run so that it collects the evidence that the fault hit; after the
//! faults, the run waits until the devices hold the whole log, checks the
//! invariants and what the run must show ([`crate::outcome`]) and prints its
//! summary line with the evidence (fault windows, the server's own errors).
//! [`Scenario::run`] is the one seed/plan/run/verdict loop of the suite.

use std::{
    collections::BTreeMap,
    io::Write,
    sync::Arc,
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

pub use crate::fault_stack::{Brokers, Stack, StackOptions};
use crate::{
    cluster_faults::Recovery,
    device::Device,
    history::{CommittedAtEnd, History},
    kafka::{TmpfsRefused, committed_offset, read_topic},
    outcome::{
        Evidence, Expect, Fault, FaultWindow, Outcome, PUSHERS_DEADLINE, ProcessGone, counter_sum, skip_allowed,
    },
    proxy::{Proxy, ProxyCounts},
    wait::{eventually, failed, not_yet, ready},
    workload::{Plan, SimDevice, Workload},
};

/// Short Kafka timeouts, so that faults surface as errors within seconds.
pub const FAULT_SETTINGS: &[(&str, &str)] = &[
    ("LOCKSTEP_KAFKA__PRODUCE_TIMEOUT", "3s"),
    ("LOCKSTEP_KAFKA__REQUEST_TIMEOUT", "2s"),
    ("LOCKSTEP_KAFKA__OPERATION_DEADLINE", "5s"),
    // One broker, one replica: a produce is settled when the broker answers or dies, nothing
    // commits later, so a retry may follow as soon as the produce gave up. On a cluster the
    // default holds (see `Scenario::on_cluster`).
    ("LOCKSTEP_KAFKA__IN_DOUBT_WINDOW", "3s"),
];
/// After the faults: how long devices get to receive everything.
pub const SETTLE: Duration = Duration::from_secs(60);

/// The seeds to run each fault with: `LOCKSTEP_FAULT_SEED=K` (K only), else
/// `LOCKSTEP_FAULT_SEEDS=N` (1..=N), else 1 and 2.
pub fn seeds() -> Vec<u64> {
    seeds_or(2)
}

/// Like [`seeds`], with `count` seeds by default.
pub fn seeds_or(count: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("LOCKSTEP_FAULT_SEED").ok().and_then(|seed| seed.parse().ok()) {
        return vec![seed];
    }
    let count = std::env::var("LOCKSTEP_FAULT_SEEDS").ok().and_then(|count| count.parse().ok()).unwrap_or(count);
    (1..=count).collect()
}

/// `HH:MM:SS.mmm` in UTC, as the server's log writes it.
pub(crate) fn utc_time_of_day() -> String {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let millis_of_day = since_epoch.as_millis() % 86_400_000;
    let (hours, minutes) = (millis_of_day / 3_600_000, millis_of_day / 60_000 % 60);
    format!("{hours:02}:{minutes:02}:{:02}.{:03}", millis_of_day / 1000 % 60, millis_of_day % 1000)
}

/// Creates the run's account, retrying while the server answers UNAVAILABLE (retryable, as
/// a device would; seen once on a freshly started cluster under load), each retry noted with
/// the server's log lines of its reference.
async fn create_account_retrying(stack: &Stack, notes: &mut Vec<String>) -> anyhow::Result<Device> {
    let notes = std::sync::Mutex::new(notes);
    eventually(Duration::from_secs(30), "the run's account created", || async {
        let error = match Device::create_account(&stack.server, "device-0").await {
            Ok(device) => return ready(device),
            Err(error) => error,
        };
        let status = error.chain().find_map(|cause| cause.downcast_ref::<tonic::Status>());
        let Some(status) = status.filter(|status| status.code() == tonic::Code::Unavailable) else {
            return failed(error);
        };
        let reference = status.message().rsplit_once("(ref ").map(|(_, rest)| rest.trim_end_matches(')').to_string());
        let server_log = stack.server.log();
        let logged: Vec<&str> = reference
            .as_deref()
            .map(|reference| server_log.lines().filter(|line| line.contains(reference)).take(3).collect())
            .unwrap_or_default();
        let note = format!(
            "{} CreateAccount answered UNAVAILABLE before any fault, retrying: {}; server log: {logged:?}",
            utc_time_of_day(),
            status.message()
        );
        notes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(note);
        not_yet(format!("{error:#}"))
    })
    .await
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
    /// What the run must show besides the invariants.
    pub expect: Expect,
    plan: Plan,
    workload: Option<Workload>,
    /// Changes the run set out to push: its workload's and [`Run::plan_changes`].
    planned: usize,
    windows: Vec<FaultWindow>,
    pub(crate) open_window: Option<OpenWindow>,
    /// Moments to measure recovery from ([`Run::measure_recovery_from`]).
    /// (what it recovers from, when, whose acks count: empty for every device's).
    recovery_marks: Vec<(String, Instant, Vec<String>)>,
}

/// A fault window while it lasts: what was counted when it began.
pub(crate) struct OpenWindow {
    what: String,
    fault: Fault,
    device_errors_before: usize,
    server_errors_before: Option<f64>,
    proxy_before: Option<ProxyCounts>,
    pub(crate) process_gone: Option<ProcessGone>,
    pub(crate) process_stopped: Option<bool>,
    pub(crate) left_isr: Option<bool>,
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
        let mut notes = vec![];
        let first = create_account_retrying(&stack, &mut notes).await?;
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
            notes: notes.into_iter().chain([format!("{} devices ready", utc_time_of_day())]).collect(),
            problems: Vec::new(),
            started: Instant::now(),
            expect: Expect::default(),
            plan: plan.clone(),
            workload: None,
            planned: 0,
            windows: Vec::new(),
            open_window: None,
            recovery_marks: Vec::new(),
        })
    }

    /// Starts every device's pusher and subscriber with the run's plan and seed.
    pub fn start_workload(&mut self) {
        let workload = Workload::start(&self.devices, &self.plan, self.seed);
        self.planned += workload.planned_changes();
        self.workload = Some(workload);
    }

    /// Starts only the devices' subscribers (the scenario pushes by itself).
    pub fn start_subscribers(&mut self) {
        self.workload = Some(Workload::subscribe_only(&self.devices, &self.plan));
    }

    /// Counts `changes` the scenario pushes by itself as planned.
    pub fn plan_changes(&mut self, changes: usize) {
        self.planned += changes;
    }

    /// Opens the window of a fault about to be applied (closing the previous
    /// one): counts what it must change, and notes it in the timeline.
    pub(crate) async fn begin_fault(&mut self, fault: Fault, what: &str) {
        self.close_window().await;
        self.open_window = Some(OpenWindow {
            what: what.to_string(),
            fault,
            device_errors_before: self.history.stats().errors,
            server_errors_before: self.server_errors().await,
            proxy_before: self.stack.proxy.as_ref().map(Proxy::counts),
            process_gone: None,
            process_stopped: None,
            left_isr: None,
        });
        self.timeline(what);
    }

    /// Closes the open fault window, if any, with what was counted since it began.
    async fn close_window(&mut self) {
        let server_errors = self.server_errors().await;
        let Some(open) = self.open_window.take() else { return };
        let evidence = Evidence {
            device_errors: self.history.stats().errors.saturating_sub(open.device_errors_before),
            // A restarted server counts from zero: not comparable then.
            server_errors: match (open.server_errors_before, server_errors) {
                (Some(before), Some(after)) if after >= before => Some((after - before) as u64),
                _ => None,
            },
            process_gone: open.process_gone,
            proxy: match (open.proxy_before, self.stack.proxy.as_ref()) {
                (Some(before), Some(proxy)) => Some(proxy.counts().since(&before)),
                _ => None,
            },
            process_stopped: open.process_stopped,
            left_isr: open.left_isr,
        };
        self.windows.push(FaultWindow { what: open.what, fault: open.fault, evidence });
    }

    /// The server's `lockstep_errors_total` (None while it is down or has none).
    async fn server_errors(&self) -> Option<f64> {
        let admin = self.stack.server.admin_addr()?;
        let scrape = tokio::time::timeout(Duration::from_secs(5), crate::http_get(admin, "/metrics")).await;
        match scrape {
            Ok(Ok((200, metrics))) => Some(counter_sum(&metrics, "lockstep_errors_total").unwrap_or(0.0)),
            _ => None,
        }
    }

    /// `kill -9` of Kafka, observed from outside.
    pub async fn kill_kafka(&mut self) {
        self.begin_fault(Fault::KafkaKilled, "kafka killed").await;
        let (pid, port) = (self.stack.kafka.pid(), self.stack.kafka.port());
        let alive_before = pid_alive(pid);
        self.stack.kafka.kill();
        self.observe_gone(pid, port, alive_before).await;
    }

    /// `kill -9` of the server, observed from outside.
    pub async fn kill_server(&mut self) {
        self.begin_fault(Fault::ServerKilled, "server killed").await;
        let (pid, port) = (self.stack.server.pid(), self.stack.server.addr().port());
        let alive_before = pid_alive(pid);
        self.stack.server.kill9();
        self.observe_gone(pid, port, alive_before).await;
    }

    pub(crate) async fn observe_gone(&mut self, pid: u32, port: u16, alive_before: bool) {
        let gone = ProcessGone {
            pid,
            alive_before,
            pid_gone_after: !pid_alive(pid),
            port_refused_after: port_refused(port).await,
        };
        if let Some(open) = self.open_window.as_mut() {
            open.process_gone = Some(gone);
        }
    }

    pub async fn cut_link(&mut self) {
        self.begin_fault(Fault::LinkCut, "link cut").await;
        self.stack.proxy().cut();
    }

    pub async fn freeze_link(&mut self) {
        self.begin_fault(Fault::LinkFrozen, "link frozen").await;
        self.stack.proxy().freeze();
    }

    /// Delays every chunk on the link by `delay`, each way.
    pub async fn slow_link(&mut self, delay: Duration) {
        self.begin_fault(Fault::LinkSlowed, &format!("link delayed by {delay:?} each way")).await;
        self.stack.proxy().set_delay(delay);
    }

    /// A fault the scenario applies by itself (e.g. filling Kafka's disk).
    pub async fn fault(&mut self, fault: Fault, what: &str) {
        self.begin_fault(fault, what).await;
    }

    /// Ends the fault window now, where what follows must not count as its
    /// evidence (otherwise a window lasts until the next fault or the end).
    pub async fn end_fault(&mut self) {
        self.close_window().await;
    }

    /// The link forwards again, at full speed.
    pub fn restore_link(&mut self) {
        self.stack.proxy().restore();
        self.stack.proxy().set_delay(Duration::ZERO);
        self.timeline("restored");
    }

    pub async fn restart_kafka(&mut self) -> anyhow::Result<()> {
        self.stack.kafka.restart().await?;
        self.timeline("restored");
        Ok(())
    }

    pub async fn restart_server(&mut self) -> anyhow::Result<()> {
        self.stack.server.restart().await?;
        self.timeline("restored");
        Ok(())
    }

    /// Measures, at the end of the run, how long after now the first change was written
    /// and every device held it (`from`: the fault, or its end, it recovers from).
    pub fn measure_recovery_from(&mut self, from: &str) {
        self.recovery_marks.push((from.to_string(), Instant::now(), Vec::new()));
    }

    /// Like [`Run::measure_recovery_from`], timing the first ack of one of `devices` only
    /// (those whose group coordinator the fault hit).
    pub fn measure_recovery_of_acks_from(&mut self, from: &str, devices: Vec<String>) {
        self.recovery_marks.push((from.to_string(), Instant::now(), devices));
    }

    /// Notes a fault (or its end) with the UTC time of day, to match against the server's log.
    pub fn timeline(&mut self, what: &str) {
        if !what.starts_with("restored") {
            self.faults += 1;
        }
        self.notes.push(format!("{} {what}", utc_time_of_day()));
    }

    /// The common shape of a scenario's faults: `rounds` times (the seed picks how many of
    /// the range), a pause of `before` ms, the fault, a pause of `lasting` ms, the repair.
    pub async fn fault_rounds(
        &mut self,
        rounds: std::ops::RangeInclusive<i32>,
        before: std::ops::Range<u64>,
        lasting: std::ops::Range<u64>,
        mut fault: impl AsyncFnMut(&mut Run),
        mut repair: impl AsyncFnMut(&mut Run) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        for _ in 0..self.rng.random_range(rounds) {
            self.pause(before.clone()).await;
            fault(self).await;
            self.pause(lasting.clone()).await;
            repair(self).await?;
        }
        Ok(())
    }

    /// [`Run::restore_link`] as a repair for [`Run::fault_rounds`].
    pub async fn restore_link_now(&mut self) -> anyhow::Result<()> {
        self.restore_link();
        Ok(())
    }

    /// The scenario's own timing (how long before a fault, how long it lasts): the
    /// seed picks it, and waiting it out is the point.
    pub async fn pause(&mut self, millis: std::ops::Range<u64>) {
        tokio::time::sleep(Duration::from_millis(self.rng.random_range(millis))).await;
    }

    /// The user's log as any Kafka client reads it (retried while Kafka comes back).
    pub async fn read_log(&self) -> anyhow::Result<Vec<(i64, String)>> {
        let records = eventually(Duration::from_secs(90), "reading the user's log after the faults", || async {
            read_topic(self.stack.kafka.bootstrap(), &self.topic)
                .await
                .inspect_err(|error| eprintln!("reading the log failed, retrying: {error:#}"))
                .map(Some)
        })
        .await?;
        Ok(records.into_iter().map(|(offset, envelope)| (offset, envelope.change_id)).collect())
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
        for (name, path) in self.stack.kafka_logs() {
            if path.exists() {
                std::fs::copy(path, dir.join(format!("{}.log", name.replace(' ', "-"))))?;
            }
        }
        Ok(dir)
    }

    /// Kafka's committed offset of `device` at the end, retried while Kafka settles.
    async fn committed_at_end(&self, device: &str) -> CommittedAtEnd {
        let group = format!("lockstep.device.{device}");
        eventually(Duration::from_secs(30), format!("{group}'s committed offset"), || async {
            committed_offset(self.stack.kafka.bootstrap(), &group, &self.topic).await.map(Some)
        })
        .await
        .map_err(|error| format!("{error:#}"))
    }

    /// After the faults: lets pushers finish, waits until every device holds
    /// the whole log, then checks the history and what the run must show,
    /// and prints the summary line.
    pub async fn finish(mut self) -> anyhow::Result<Verdict> {
        let Some(mut workload) = self.workload.take() else {
            anyhow::bail!("{}: finish() without a workload (start_workload or start_subscribers)", self.fault);
        };
        let pushers_finished = workload.pushers_done(PUSHERS_DEADLINE).await;
        self.close_window().await;
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
            committed.insert(device.id.clone(), self.committed_at_end(&device.id).await);
        }
        let report = self.history.check(&log, &committed);
        let stats = self.history.stats();
        let outcome = Outcome {
            planned: self.planned,
            acknowledged: stats.pushes_ok,
            log_len: log.len(),
            log_changes: log.iter().map(|(_, id)| id.as_str()).collect::<std::collections::BTreeSet<_>>().len(),
            received: self.history.received_of_log(&log),
            pushers_finished,
            windows: self.windows.clone(),
        };
        self.problems.extend(outcome.problems(&self.expect));
        let recoveries: Vec<Recovery> = self
            .recovery_marks
            .iter()
            .map(|(from, at, acks)| Recovery::measure(&self.history, from, *at, acks))
            .collect();
        for recovery in &recoveries {
            if let Some(problem) = recovery.problem() {
                self.problems.push(problem);
            }
        }
        let ok = report.ok() && self.problems.is_empty();
        let line = format!(
            "fault={} seed={} ops={} {} errors={} faults={} {}{} unwritten={} log={}{} secs={}",
            self.fault,
            self.seed,
            stats.ops,
            outcome.summary(),
            stats.errors,
            self.faults,
            report.verdicts(),
            if self.problems.is_empty() { "" } else { " scenario=FAIL" },
            stats.unwritten,
            log.len(),
            Recovery::summary(&recoveries),
            self.started.elapsed().as_secs()
        );
        println!("{line}");
        let mut details = String::new();
        for problem in &self.problems {
            details.push_str(&format!("  scenario: {problem}\n"));
        }
        for window in &self.windows {
            let hit = if window.fault.hit(&window.evidence).is_ok() { "hit" } else { "MISSED" };
            details.push_str(&format!("  fault \"{}\" {hit}: {}\n", window.what, window.evidence));
        }
        for recovery in &recoveries {
            details.push_str(&format!("  {recovery}\n"));
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

/// Whether process `pid` exists (0: no process).
pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether 127.0.0.1:`port` refuses connections (nothing listens there).
pub async fn port_refused(port: u16) -> bool {
    let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
    matches!(
        tokio::time::timeout(Duration::from_secs(2), connect).await,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// One fault scenario of the suite: what it runs, per seed.
#[derive(Clone)]
pub struct Scenario {
    /// The test's name, as `LOCKSTEP_ALLOW_SKIP` names it.
    pub test: &'static str,
    /// The fault's name in the summary line.
    pub fault: &'static str,
    pub devices: usize,
    pub plan: Plan,
    pub options: StackOptions,
    pub expect: Expect,
    /// Seeds 1..=this unless the environment says otherwise ([`seeds`]).
    pub default_seeds: u64,
}

impl Scenario {
    pub fn new(test: &'static str, fault: &'static str, devices: usize, plan: Plan) -> Self {
        let options = StackOptions { settings: fault_settings(), ..Default::default() };
        Self { test, fault, devices, plan, options, expect: Expect::default(), default_seeds: 2 }
    }

    /// On a cluster of `nodes` Kafka nodes (user topics replicated `min(nodes, 3)` times).
    pub fn on_cluster(mut self, nodes: usize) -> Self {
        self.options.cluster = Some(nodes);
        // A produce that timed out may still commit once the ISR drops a stalled follower:
        // retries wait the server's default window (kafka.in_doubt_window).
        self.options.settings.retain(|(key, _)| *key != "LOCKSTEP_KAFKA__IN_DOUBT_WINDOW");
        self
    }

    /// How many seeds run without `LOCKSTEP_FAULT_SEEDS` or `LOCKSTEP_FAULT_SEED` (default 2).
    pub fn seeds_by_default(mut self, count: u64) -> Self {
        self.default_seeds = count;
        self
    }

    pub fn behind_proxy(mut self) -> Self {
        self.options.behind_proxy = true;
        self
    }

    /// Runs the scenario once per seed: starts the run, lets `faults` start
    /// the workload and apply the faults, finishes and judges every run. A
    /// stack that cannot be set up (no tmpfs) fails the test unless the
    /// caller allows this test to skip (`LOCKSTEP_ALLOW_SKIP=<test>`).
    pub async fn run(&self, mut faults: impl AsyncFnMut(&mut Run) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let mut verdicts = Vec::new();
        for seed in seeds_or(self.default_seeds) {
            let started = Run::start(self.fault, seed, self.options.clone(), self.devices, &self.plan).await;
            let mut run = match started {
                Err(error) if error.downcast_ref::<TmpfsRefused>().is_some() => {
                    if skip_allowed(self.test) {
                        println!("fault={} SKIPPED (allowed by LOCKSTEP_ALLOW_SKIP): {error}", self.fault);
                        return Ok(());
                    }
                    return Err(error.context(format!(
                        "{} cannot run here; LOCKSTEP_ALLOW_SKIP={} lets it skip knowingly",
                        self.test, self.test
                    )));
                }
                other => other?,
            };
            run.expect = self.expect;
            faults(&mut run).await?;
            verdicts.push(run.finish().await?);
        }
        judge(verdicts);
        Ok(())
    }
}
