//! A real local Apache Kafka for tests: one combined KRaft node (broker and
//! controller) on free ports of 127.0.0.1, its data in a temporary directory
//! (so a restart keeps everything), killed when dropped. It replaced Nisshi,
//! the pre-release broker the project used before.
//!
//! A JVM broker takes seconds to start: tests that only need a broker share
//! one per test binary ([`Kafka::shared`]) and keep apart through their own
//! topic and group prefixes; a test that stops, kills or breaks its broker
//! starts its own. [`KafkaCluster`] is three nodes for replication faults.
//!
//! The jars come from `ensure_kafka` (`scripts/lib.sh`, run by `scripts/test`).

mod cluster;
mod node;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

pub use cluster::KafkaCluster;
use node::{Guardian, Node, NodeConfig, new_cluster_id, run_tool, tool_command, wait_partitions_led, wait_ready};
pub use node::{JVM_OPTIONS, KAFKA_VERSION, SERVER_PROPERTIES, kafka_libs};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
};
use tokio::sync::OnceCell;

use lockstep_broker::kafka::group_offsets::{GroupOffsets, GroupOffsetsSettings};

use crate::{
    free_port,
    tmpfs::Tmpfs,
    wait::{eventually, failed, not_yet, ready},
};
pub use crate::{
    records::{EventRecord, committed_offset, delete_records_before, read_events, read_topic},
    tmpfs::TmpfsRefused,
};

/// How to start a broker other than [`Kafka::start`]'s way.
#[derive(Debug, Clone, Default)]
pub struct KafkaOptions {
    /// Listen on this port of 127.0.0.1 (one a proxy already forwards to). Default: a free port.
    pub port: Option<u16>,
    /// Advertise this port of 127.0.0.1 instead of the listener's, so that clients
    /// (which connect to the advertised address) go through a proxy listening there.
    pub advertised_port: Option<u16>,
    /// Keep the log (`log.dirs`) on a tmpfs of this many MiB mounted for this broker
    /// (the metadata log stays outside). Needs root; where mounting is refused,
    /// starting fails with [`TmpfsRefused`].
    pub storage_tmpfs_mib: Option<u64>,
    /// Require SASL SCRAM-SHA-256 on the clients' listener (inter-broker and
    /// controller traffic stay on internal PLAINTEXT listeners).
    pub authentication: bool,
}

pub struct Kafka {
    node: Node,
    bootstrap: String,
    authentication: bool,
    // Dropped in this order: the JVM (`node`), the tmpfs, then the directory.
    _tmpfs: Option<Tmpfs>,
    dir: PathBuf,
    _guardian: Guardian,
}

impl Kafka {
    /// Starts a fresh, empty broker.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(KafkaOptions::default()).await
    }

    /// The broker of this test process, started on first use and shared by every test
    /// of the binary that only needs a broker (isolated by their own topic and group
    /// names). Never restart, kill or reconfigure it: start your own for that. It dies
    /// with the test process, and its data goes with it.
    pub async fn shared() -> anyhow::Result<&'static Kafka> {
        static SHARED: OnceCell<Kafka> = OnceCell::const_new();
        SHARED.get_or_try_init(Kafka::start).await
    }

    /// Starts a fresh, empty broker as `options` say.
    pub async fn start_with(options: KafkaOptions) -> anyhow::Result<Self> {
        let libs = kafka_libs()?;
        let dir = tempfile::Builder::new().prefix("lockstep-kafka-").tempdir()?.keep();
        let (storage, tmpfs) = match options.storage_tmpfs_mib {
            Some(mib) => {
                let storage = dir.join("storage");
                (storage.clone(), Some(Tmpfs::mount(&storage, mib)?))
            }
            None => (dir.join("data"), None),
        };
        let guardian = Guardian::new(&dir, tmpfs.as_ref().map(|_| storage.as_path()))?;
        let port = match options.port {
            Some(port) => port,
            None => free_port()?,
        };
        let controller_port = free_port()?;
        let config = NodeConfig {
            node_id: 1,
            port,
            advertised_port: options.advertised_port.unwrap_or(port),
            internal_port: free_port()?,
            controller_port,
            voters: format!("1@127.0.0.1:{controller_port}"),
            dir: dir.clone(),
            storage,
            overrides: Vec::new(),
        };
        let node = Node::new(config, libs)?;
        run_tool(node.format_command(&new_cluster_id())?, "formatting kafka's log").await?;
        let mut kafka = Self {
            node,
            bootstrap: format!("127.0.0.1:{port}"),
            authentication: options.authentication,
            _tmpfs: tmpfs,
            dir,
            _guardian: guardian,
        };
        kafka.spawn().await?;
        kafka.load_group_coordinator().await?;
        Ok(kafka)
    }

    /// A fresh broker creates its offsets topic at the first group request and answers
    /// COORDINATOR_NOT_AVAILABLE until it has loaded it, which under load outlasts a
    /// client's few retries. Tests start once that is done, as on any broker in service.
    async fn load_group_coordinator(&self) -> anyhow::Result<()> {
        let offsets = GroupOffsets::connect(GroupOffsetsSettings {
            bootstrap_servers: self.node.config.internal_address(),
            client_id: "lockstep-testkit".into(),
            request_timeout: Duration::from_secs(5),
            max_attempts: 1,
            security: Default::default(),
        })
        .await?;
        eventually(Duration::from_secs(60), "kafka's group coordinator to load", || async {
            match offsets.fetch("lockstep.testkit.coordinator", "lockstep.testkit.coordinator", 0).await {
                Ok(_) => ready(()),
                Err(error) if error.is_retryable() => not_yet(error),
                Err(error) => failed(error),
            }
        })
        .await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.node.spawn(self.authentication)?;
        wait_ready(&mut [&mut self.node]).await?;
        wait_partitions_led(&self.node.config.internal_address()).await
    }

    /// The broker's own listener. Clients that bootstrap here still connect to
    /// the advertised address afterwards.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    pub fn port(&self) -> u16 {
        self.node.config.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of the log (`log.dirs`; the tmpfs, if there is one).
    pub fn storage_dir(&self) -> &Path {
        &self.node.config.storage
    }

    /// The broker's JVM process id (0 when it is stopped).
    pub fn pid(&self) -> u32 {
        self.node.pid()
    }

    /// Creates a topic the way an operator would (tests that bypass Lockstep).
    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        self.create_topic_with(name, partitions, &[]).await
    }

    pub async fn create_topic_with(&self, name: &str, partitions: i32, config: &[(&str, &str)]) -> anyhow::Result<()> {
        create_topic(&self.node.config.internal_address(), name, partitions, 1, config).await
    }

    /// `kill -9`: the broker stops at once; its data stays.
    pub fn kill(&mut self) {
        self.node.kill();
    }

    /// Starts the broker again on the same ports with the same data
    /// (after a `kill -9` if it still runs), and waits until it serves. After a
    /// `kill -9` that takes about 12 s: the restarted controller refuses the broker's
    /// new incarnation (DUPLICATE_BROKER_REGISTRATION) until the old one's session
    /// expires (`broker.session.timeout.ms`, 9 s).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// SIGTERM (what `scripts/run` sends on Ctrl-C), waiting for the exit;
    /// then starts the broker again on the same ports with the same data.
    pub async fn restart_gracefully(&mut self) -> anyhow::Result<()> {
        // Blocks this thread for the controlled shutdown (about 2 s; test code only).
        self.node.terminate(Duration::from_secs(30))?;
        self.spawn().await
    }

    /// From the next (re)start on, require SASL SCRAM-SHA-256 on the clients' listener or not.
    pub fn set_authentication(&mut self, required: bool) {
        self.authentication = required;
    }

    /// Stores a SCRAM-SHA-256 user, through Kafka's `ConfigCommand` on the internal listener
    /// (the Admin API's AlterUserScramCredentials, which rdkafka lacks).
    pub async fn create_scram_user(&self, name: &str, password: &str) -> anyhow::Result<()> {
        create_scram_user(&self.node, &self.node.config.internal_address(), name, password).await
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        self.node.kill();
        if std::thread::panicking() {
            eprintln!("--- kafka log (last lines) ---\n{}", self.node.log_tail());
        }
        // `_tmpfs` unmounts after this; the directory goes now (the guardian would, a second later).
        if self._tmpfs.is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Creates `name` through the admin API on `bootstrap`.
async fn create_topic(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    replication: i32,
    config: &[(&str, &str)],
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
    for (key, value) in config {
        topic = topic.set(key, value);
    }
    let results =
        admin.create_topics([&topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))).await?;
    for result in results {
        result.map_err(|(topic, code)| anyhow::anyhow!("creating topic {topic}: {code}"))?;
    }
    Ok(())
}

/// `kafka-configs --alter --add-config SCRAM-SHA-256=[password=…] --entity-type users`.
async fn create_scram_user(node: &Node, bootstrap: &str, name: &str, password: &str) -> anyhow::Result<()> {
    let mut command = tool_command(node.libs(), &node.config.dir, "kafka.admin.ConfigCommand")?;
    command
        .args(["--bootstrap-server", bootstrap, "--alter", "--entity-type", "users", "--entity-name", name])
        .args(["--add-config", &format!("SCRAM-SHA-256=[iterations=4096,password={password}]")]);
    run_tool(command, "kafka ConfigCommand (SCRAM user)").await?;
    Ok(())
}

#[cfg(test)]
mod tests;
