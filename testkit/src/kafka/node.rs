//! One Apache Kafka JVM: a combined KRaft node (broker and controller) started
//! from the jars `scripts/lib.sh` (`ensure_kafka`) resolved, with the settings
//! `scripts/run` uses (`scripts/kafka/server.properties`, `jvm.options`,
//! `log4j2.properties`, read here at compile time).
//!
//! Every JVM runs under a small shell watchdog whose stdin is a pipe from the
//! test process: when the test process exits, however it exits (panic, abort,
//! SIGKILL), the pipe closes and the watchdog kills the JVM. A [`Guardian`]
//! does the same for a broker's directory, so a killed test run leaves neither
//! a JVM nor its data behind.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use base64::Engine;
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};

use crate::{
    log_tail,
    wait::{eventually, not_yet, ready},
};

/// The Apache Kafka version of `scripts/kafka/pom.xml` and `scripts/lib.sh` (a test keeps them equal).
pub const KAFKA_VERSION: &str = "4.1.1";

/// The settings every local Kafka of Lockstep shares (`scripts/run`'s node included).
pub const SERVER_PROPERTIES: &str = include_str!("../../../scripts/kafka/server.properties");
/// The JVM options of every local Kafka broker, one a line (`#` comments).
pub const JVM_OPTIONS: &str = include_str!("../../../scripts/kafka/jvm.options");
const LOG4J2_PROPERTIES: &str = include_str!("../../../scripts/kafka/log4j2.properties");
const TOOLS_LOG4J2_PROPERTIES: &str = include_str!("../../../scripts/kafka/tools-log4j2.properties");

/// How long a broker (or the cluster) may take from JVM start to serving.
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(90);

/// The directory of Kafka's jars: `$LOCKSTEP_KAFKA_LIBS`, else `libs` of
/// `$LOCKSTEP_KAFKA_HOME` or `~/.cache/lockstep/kafka-<version>` (where `scripts/test`
/// and `scripts/run` put them, through `ensure_kafka` in `scripts/lib.sh`).
pub fn kafka_libs() -> anyhow::Result<PathBuf> {
    if let Some(libs) = std::env::var_os("LOCKSTEP_KAFKA_LIBS") {
        let libs = PathBuf::from(libs);
        anyhow::ensure!(libs.is_dir(), "LOCKSTEP_KAFKA_LIBS={} is not a directory", libs.display());
        return Ok(libs);
    }
    let home = match std::env::var_os("LOCKSTEP_KAFKA_HOME") {
        Some(home) => PathBuf::from(home),
        None => {
            let user_home = std::env::var_os("HOME").context("HOME is not set")?;
            Path::new(&user_home).join(format!(".cache/lockstep/kafka-{KAFKA_VERSION}"))
        }
    };
    let libs = home.join("libs");
    if !home.join("complete").is_file() || !libs.is_dir() {
        bail!(
            "Apache Kafka {KAFKA_VERSION}'s jars are not in {}: run scripts/test (it resolves them once \
             from Maven Central), or `source scripts/lib.sh && ensure_java && ensure_kafka`",
            libs.display()
        );
    }
    Ok(libs)
}

/// `$JAVA_HOME/bin/java`, else `java` on `PATH` (`ensure_java` puts a JDK >= 17 there).
fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|home| Path::new(&home).join("bin/java"))
        .filter(|java| java.is_file())
        .unwrap_or_else(|| PathBuf::from("java"))
}

/// The lines of a `jvm.options`-style text that are options.
pub(crate) fn option_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#'))
}

/// The class data archive `ensure_kafka` recorded beside the jars, if any.
fn class_archive(libs: &Path) -> Option<PathBuf> {
    libs.parent().map(|home| home.join("cds.jsa")).filter(|archive| archive.is_file())
}

/// A broker's JVM options: [`JVM_OPTIONS`] (heap replaced by `LOCKSTEP_KAFKA_HEAP_OPTS`),
/// then `LOCKSTEP_KAFKA_JVM_OPTS`, or for tests by default `-XX:TieredStopAtLevel=1`
/// (C1 only: measured, a start takes under 3 s instead of about 4; benchmarks that
/// measure Kafka's throughput set `LOCKSTEP_KAFKA_JVM_OPTS`, even to a blank), the class
/// data archive, the logging config.
fn broker_jvm_options(libs: &Path, log4j2: &Path) -> Vec<String> {
    let heap = std::env::var("LOCKSTEP_KAFKA_HEAP_OPTS").ok().filter(|heap| !heap.trim().is_empty());
    let mut options: Vec<String> = option_lines(JVM_OPTIONS)
        .filter(|line| heap.is_none() || !(line.starts_with("-Xmx") || line.starts_with("-Xms")))
        .map(String::from)
        .collect();
    options.extend(heap.iter().flat_map(|heap| heap.split_whitespace().map(String::from)));
    match std::env::var("LOCKSTEP_KAFKA_JVM_OPTS") {
        Ok(extra) => options.extend(extra.split_whitespace().map(String::from)),
        Err(_) => options.push("-XX:TieredStopAtLevel=1".into()),
    }
    if let Some(archive) = class_archive(libs) {
        options.push(format!("-XX:SharedArchiveFile={}", archive.display()));
    }
    options.push(format!("-Dlog4j2.configurationFile={}", log4j2.display()));
    options
}

/// A short-lived tool of Kafka's jars (`StorageTool`, `ConfigCommand`): small heap, C1 only.
pub(crate) fn tool_command(libs: &Path, work_dir: &Path, main_class: &str) -> anyhow::Result<Command> {
    let log4j2 = work_dir.join("tools-log4j2.properties");
    if !log4j2.is_file() {
        std::fs::write(&log4j2, TOOLS_LOG4J2_PROPERTIES)?;
    }
    let mut command = Command::new(java());
    command.args(["-Xms32m", "-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]);
    if let Some(archive) = class_archive(libs) {
        command
            .arg(format!("-XX:SharedArchiveFile={}", archive.display()))
            .args(["-Xlog:cds=off", "-Xlog:cds+dynamic=off"]);
    }
    command
        .arg(format!("-Dlog4j2.configurationFile={}", log4j2.display()))
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg(main_class)
        .stdin(Stdio::null());
    Ok(command)
}

/// Runs a tool to its end; fails with its output if it fails.
pub(crate) async fn run_tool(command: Command, what: &str) -> anyhow::Result<String> {
    let output = tokio::process::Command::from(command)
        .output()
        .await
        .with_context(|| format!("cannot run java for {what} (scripts/test installs a JDK)"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    anyhow::ensure!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

/// A fresh Kafka cluster id (a random `Uuid`: 16 bytes, URL-safe base64 without padding).
pub(crate) fn new_cluster_id() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes())
}

/// Where one node listens and keeps its data.
#[derive(Debug, Clone)]
pub(crate) struct NodeConfig {
    pub node_id: u32,
    /// The clients' listener (`CLIENT`): PLAINTEXT, or SASL_PLAINTEXT with SCRAM-SHA-256.
    pub port: u16,
    /// The port `CLIENT` advertises (a proxy's), usually `port`.
    pub advertised_port: u16,
    /// Inter-broker traffic and the kit's own admin requests (`INTERNAL`, always PLAINTEXT).
    pub internal_port: u16,
    pub controller_port: u16,
    /// `controller.quorum.voters`: a static quorum (`1@127.0.0.1:port,…`).
    pub voters: String,
    /// The node's directory: its config, its log, its metadata log.
    pub dir: PathBuf,
    /// `log.dirs` (a tmpfs for the disk-full tests).
    pub storage: PathBuf,
    /// Lines appended to [`SERVER_PROPERTIES`] (a cluster's replication settings).
    pub overrides: Vec<String>,
}

impl NodeConfig {
    /// `server.properties`: [`SERVER_PROPERTIES`], this node's lines, the overrides.
    pub fn properties(&self, authentication: bool) -> String {
        let client_protocol = if authentication { "SASL_PLAINTEXT" } else { "PLAINTEXT" };
        let mut text = format!(
            "{SERVER_PROPERTIES}\n# This node (testkit/src/kafka/node.rs).\nnode.id={id}\n\
             listeners=CLIENT://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=CLIENT://127.0.0.1:{advertised},INTERNAL://127.0.0.1:{internal}\n\
             listener.security.protocol.map=CLIENT:{client_protocol},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=INTERNAL\ncontroller.listener.names=CONTROLLER\n\
             controller.quorum.voters={voters}\nlog.dirs={storage}\nmetadata.log.dir={metadata}\n",
            id = self.node_id,
            port = self.port,
            internal = self.internal_port,
            controller = self.controller_port,
            advertised = self.advertised_port,
            voters = self.voters,
            storage = self.storage.display(),
            metadata = self.dir.join("metadata").display(),
        );
        if authentication {
            text.push_str(
                "sasl.enabled.mechanisms=SCRAM-SHA-256\n\
                 listener.name.client.sasl.enabled.mechanisms=SCRAM-SHA-256\n\
                 listener.name.client.scram-sha-256.sasl.jaas.config=\
                 org.apache.kafka.common.security.scram.ScramLoginModule required;\n",
            );
        }
        for line in &self.overrides {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    pub fn internal_address(&self) -> String {
        format!("127.0.0.1:{}", self.internal_port)
    }

    fn properties_path(&self) -> PathBuf {
        self.dir.join("server.properties")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("kafka.log")
    }
}

/// One node's JVM, started and stopped as the tests need.
pub(crate) struct Node {
    pub config: NodeConfig,
    libs: PathBuf,
    /// The watchdog shell; its stdin is the pipe whose end kills the JVM.
    watchdog: Option<Child>,
    jvm_pid: u32,
}

impl Node {
    pub fn new(config: NodeConfig, libs: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.dir)?;
        std::fs::create_dir_all(&config.storage)?;
        Ok(Self { config, libs, watchdog: None, jvm_pid: 0 })
    }

    pub fn libs(&self) -> &Path {
        &self.libs
    }

    /// Formats the node's log dirs for `cluster_id` (first start only; static quorum,
    /// so no `--standalone`). Returns the command to run (several run at once).
    pub fn format_command(&self, cluster_id: &str) -> anyhow::Result<Command> {
        std::fs::write(self.config.properties_path(), self.config.properties(false))?;
        let mut command = tool_command(&self.libs, &self.config.dir, "kafka.tools.StorageTool")?;
        command.args(["format", &format!("--cluster-id={cluster_id}"), "-c"]).arg(self.config.properties_path());
        Ok(command)
    }

    /// Starts the JVM under its watchdog (not waiting for it to serve).
    pub fn spawn(&mut self, authentication: bool) -> anyhow::Result<()> {
        self.kill();
        std::fs::write(self.config.properties_path(), self.config.properties(authentication))?;
        let log4j2 = self.config.dir.join("log4j2.properties");
        std::fs::write(&log4j2, LOG4J2_PROPERTIES)?;
        // $1: the log; the rest: the JVM's command line. The JVM's pid goes to stdout.
        let script = r#"log=$1; shift
exec 3<&0
"$@" </dev/null >>"$log" 2>&1 3<&- &
jvm=$!
echo "$jvm"
(read _ <&3; kill -9 "$jvm" 2>/dev/null) &
reader=$!
exec 3<&-
wait "$jvm"; status=$?
kill "$reader" 2>/dev/null
exit "$status""#;
        let mut command = Command::new("sh");
        command
            .args(["-c", script, "kafka-watchdog"])
            .arg(self.config.log_path())
            .arg(java())
            .args(broker_jvm_options(&self.libs, &log4j2))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .arg("kafka.Kafka")
            .arg(self.config.properties_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut watchdog = command.spawn().context("cannot start sh (Kafka's watchdog)")?;
        let stdout = watchdog.stdout.take().context("watchdog stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        self.jvm_pid = line.trim().parse().with_context(|| format!("the watchdog did not start java: {line:?}"))?;
        self.watchdog = Some(watchdog);
        Ok(())
    }

    /// The JVM's process id (0 when it is not running).
    pub fn pid(&self) -> u32 {
        if self.watchdog.is_some() { self.jvm_pid } else { 0 }
    }

    pub fn is_running(&self) -> bool {
        self.watchdog.is_some()
    }

    /// How the JVM ended, if it did.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.watchdog.as_mut().and_then(|watchdog| watchdog.try_wait().ok().flatten())
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.config.log_path())
    }

    /// The log's ERROR and FATAL lines (the first 10): why a broker stopped is
    /// rarely in its last lines, which are its shutdown.
    pub fn log_errors(&self) -> String {
        let log = std::fs::read_to_string(self.config.log_path()).unwrap_or_default();
        let errors: Vec<&str> =
            log.lines().filter(|line| line.contains(" ERROR ") || line.contains(" FATAL ")).take(10).collect();
        errors.join("\n")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        anyhow::ensure!(self.is_running(), "kafka node {} is not running", self.config.node_id);
        let sent = Command::new("kill").args([signal, &self.jvm_pid.to_string()]).status()?;
        anyhow::ensure!(sent.success(), "kill {signal} {} failed", self.jvm_pid);
        Ok(())
    }

    /// `kill -9` of the JVM (the watchdog then exits): its data stays.
    pub fn kill(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = Command::new("kill").args(["-KILL", &self.jvm_pid.to_string()]).status();
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
    }

    /// SIGTERM (a controlled shutdown), waiting up to `deadline` for the JVM to exit.
    pub fn terminate(&mut self, deadline: Duration) -> anyhow::Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let _ = self.signal("-CONT");
        self.signal("-TERM")?;
        let started = Instant::now();
        while self.exited().is_none() {
            if started.elapsed() > deadline {
                let tail = self.log_tail();
                self.kill();
                bail!("kafka node {} did not stop within {deadline:?} of SIGTERM:\n{tail}", self.config.node_id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.watchdog = None;
        Ok(())
    }

    /// SIGSTOP: the JVM freezes (connections stay open, nothing answers).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT after [`Node::stop`].
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Removes a broker's directory (unmounting its tmpfs first) once the test
/// process lets go of it: at drop, or when the process dies, through a shell
/// that waits for its stdin pipe to close.
pub(crate) struct Guardian {
    _shell: Child,
    stdin: Option<ChildStdin>,
}

impl Guardian {
    pub fn new(dir: &Path, tmpfs: Option<&Path>) -> anyhow::Result<Self> {
        // The JVMs' watchdogs kill them when the same process dies: a moment for that first.
        let script = r#"read _; sleep 1; if [ -n "$1" ]; then umount -l "$1" 2>/dev/null; fi; rm -rf "$2""#;
        let mut shell = Command::new("sh")
            .args(["-c", script, "kafka-guardian"])
            .arg(tmpfs.map(Path::to_path_buf).unwrap_or_default())
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start sh (the directory guardian)")?;
        let stdin = shell.stdin.take();
        Ok(Self { _shell: shell, stdin })
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        drop(self.stdin.take());
    }
}

/// A plain client of the `INTERNAL` listeners (admin requests, metadata).
/// Waits until every partition of every topic on `bootstrap` has a leader: a single
/// broker that just restarted lists itself before it has taken its partitions back
/// (log recovery after a `kill -9`, `__consumer_offsets` loading).
pub(crate) async fn wait_partitions_led(bootstrap: &str) -> anyhow::Result<()> {
    let client = Arc::new(internal_client(bootstrap)?);
    eventually(START_DEADLINE, "every partition to have a leader", || {
        let client = Arc::clone(&client);
        async move {
            let leaderless = tokio::task::spawn_blocking(move || {
                client.fetch_metadata(None, Duration::from_millis(500)).map(|metadata| {
                    metadata
                        .topics()
                        .iter()
                        .flat_map(|topic| {
                            topic
                                .partitions()
                                .iter()
                                .filter(|partition| partition.leader() < 0 || partition.error().is_some())
                                .map(move |partition| format!("{}-{}", topic.name(), partition.id()))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .await??;
            anyhow::Ok(if leaderless.is_empty() {
                ready(())
            } else {
                not_yet(format!("leaderless: {}", leaderless.join(", ")))
            })
        }
    })
    .await
}

pub(crate) fn internal_client(bootstrap: &str) -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("reconnect.backoff.ms", "20")
        .set("reconnect.backoff.max.ms", "200")
        .set("log_level", "3")
        .create()?)
}

/// Waits until each of `nodes` serves: a metadata request on its own internal listener
/// (which Kafka opens only once the broker is registered and unfenced) lists it. Right
/// after a `kill -9` the others still list the dead incarnation, so asking them would not do.
/// Fails with the nodes' logs if one exits or time runs out.
pub(crate) async fn wait_ready(nodes: &mut [&mut Node]) -> anyhow::Result<()> {
    let started = Instant::now();
    for index in 0..nodes.len() {
        let node_id = i32::try_from(nodes[index].config.node_id)?;
        let client = Arc::new(internal_client(&nodes[index].config.internal_address())?);
        loop {
            for node in nodes.iter_mut() {
                if let Some(status) = node.exited() {
                    bail!(
                        "kafka node {} exited at start ({status}):\n{}\n(last lines:)\n{}",
                        node.config.node_id,
                        node.log_errors(),
                        node.log_tail()
                    );
                }
            }
            let client = Arc::clone(&client);
            let listed = tokio::task::spawn_blocking(move || {
                client
                    .fetch_metadata(None, Duration::from_millis(500))
                    .is_ok_and(|metadata| metadata.brokers().iter().any(|broker| broker.id() == node_id))
            })
            .await?;
            if listed {
                break;
            }
            if started.elapsed() > START_DEADLINE {
                bail!("kafka node {node_id} did not serve within {START_DEADLINE:?}:\n{}", nodes[index].log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}
