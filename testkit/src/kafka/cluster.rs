//! Three (or more) combined KRaft nodes on 127.0.0.1 for the replication-fault
//! tests: a static quorum, one cluster id, replication factor 3 with
//! `min.insync.replicas=2` for user and internal topics, unclean leader
//! election off. Node `i` (from 0) has `node.id` `i + 1`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use rdkafka::{
    ClientConfig, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    metadata::Metadata,
};
use tokio::task::JoinSet;

use super::{
    SERVER_PROPERTIES, create_topic,
    node::{
        Guardian, Node, NodeConfig, internal_client, kafka_libs, new_cluster_id, run_tool, tool_command, wait_ready,
    },
};
use crate::free_port;

pub struct KafkaCluster {
    nodes: Vec<Node>,
    bootstrap: String,
    internal_bootstrap: String,
    dir: PathBuf,
    _guardian: Guardian,
}

impl KafkaCluster {
    /// Starts `size` fresh nodes and waits until every one is registered and serving.
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(size >= 1, "a cluster needs a node");
        let libs = kafka_libs()?;
        let dir = tempfile::Builder::new().prefix("lockstep-kafka-cluster-").tempdir()?.keep();
        let guardian = Guardian::new(&dir, None)?;
        let ports: Vec<(u16, u16, u16)> =
            (0..size).map(|_| Ok((free_port()?, free_port()?, free_port()?))).collect::<std::io::Result<_>>()?;
        let voters: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, _, controller))| format!("{}@127.0.0.1:{controller}", i + 1))
            .collect();
        let replicas = size.min(3);
        let min_isr = if replicas >= 3 { 2 } else { 1 };
        let overrides = vec![
            "# A cluster (testkit/src/kafka/cluster.rs).".to_string(),
            format!("default.replication.factor={replicas}"),
            format!("min.insync.replicas={min_isr}"),
            format!("offsets.topic.replication.factor={replicas}"),
            format!("transaction.state.log.replication.factor={replicas}"),
            format!("transaction.state.log.min.isr={min_isr}"),
            format!("share.coordinator.state.topic.replication.factor={replicas}"),
            format!("share.coordinator.state.topic.min.isr={min_isr}"),
            "unclean.leader.election.enable=false".to_string(),
        ];
        let mut nodes = Vec::with_capacity(size);
        for (i, (port, internal_port, controller_port)) in ports.into_iter().enumerate() {
            let node_dir = dir.join(format!("node{}", i + 1));
            let config = NodeConfig {
                node_id: u32::try_from(i + 1)?,
                port,
                advertised_port: port,
                internal_port,
                controller_port,
                voters: voters.join(","),
                storage: node_dir.join("data"),
                dir: node_dir,
                overrides: overrides.clone(),
            };
            nodes.push(Node::new(config, libs.clone())?);
        }
        let cluster_id = new_cluster_id();
        let mut formats = JoinSet::new();
        for node in &nodes {
            formats.spawn(run_tool(node.format_command(&cluster_id)?, "formatting kafka's log"));
        }
        while let Some(result) = formats.join_next().await {
            result??;
        }
        let bootstrap =
            nodes.iter().map(|node| format!("127.0.0.1:{}", node.config.port)).collect::<Vec<_>>().join(",");
        let internal_bootstrap = nodes.iter().map(|node| node.config.internal_address()).collect::<Vec<_>>().join(",");
        let mut cluster = Self { nodes, bootstrap, internal_bootstrap, dir, _guardian: guardian };
        for node in &mut cluster.nodes {
            node.spawn(false)?;
        }
        let mut nodes: Vec<&mut Node> = cluster.nodes.iter_mut().collect();
        wait_ready(&mut nodes).await?;
        Ok(cluster)
    }

    /// Every node's clients' listener.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i`'s clients' port.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].config.port
    }

    /// Node `i`'s JVM process id (0 when it is not running).
    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i].pid()
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// `kill -9` of node `i`; its data stays.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again (after a `kill -9` if it still runs) with its data, and waits
    /// until it serves. After a `kill -9` that takes about 10 s more than a first start: the
    /// controller refuses the new incarnation (DUPLICATE_BROKER_REGISTRATION) until the old
    /// one's session expires (`broker.session.timeout.ms`, 9 s).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].spawn(false)?;
        wait_ready(&mut [&mut self.nodes[i]]).await
    }

    /// SIGTERM to node `i` (a controlled shutdown: it hands over its leaderships), waiting for its exit.
    /// Blocks this thread for that (about 2 s; test code only).
    pub fn stop_gracefully(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].terminate(Duration::from_secs(30))
    }

    /// SIGSTOP to node `i`: it freezes with its connections open (isolated, not dead).
    pub fn stop(&self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].stop()
    }

    /// SIGCONT to node `i` after [`KafkaCluster::stop`].
    pub fn resume(&self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].resume()
    }

    /// Node `i`'s log, last lines.
    pub fn log_tail(&self, i: usize) -> String {
        self.nodes[i].log_tail()
    }

    /// Node `i`'s whole log (to keep it after a failed run).
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.nodes[i].config.log_path()
    }

    /// Creates a topic with the cluster's replication factor (3 for three nodes or more).
    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        self.create_topic_with(name, partitions, &[]).await
    }

    pub async fn create_topic_with(&self, name: &str, partitions: i32, config: &[(&str, &str)]) -> anyhow::Result<()> {
        let replicas = i32::try_from(self.size().min(3))?;
        create_topic(&self.internal_bootstrap, name, partitions, replicas, config).await
    }

    /// Metadata of `topic` (all topics if `None`), asked of any node that answers.
    async fn metadata(&self, topic: Option<&str>) -> anyhow::Result<Metadata> {
        let client = Arc::new(internal_client(&self.internal_bootstrap)?);
        let topic = topic.map(str::to_string);
        tokio::task::spawn_blocking(move || Ok(client.fetch_metadata(topic.as_deref(), Duration::from_secs(10))?))
            .await?
    }

    /// The node that leads `partition` of `topic` (`None` while it has no leader).
    pub async fn leader_of(&self, topic: &str, partition: i32) -> anyhow::Result<Option<usize>> {
        let metadata = self.metadata(Some(topic)).await?;
        let leader = find_partition(&metadata, topic, partition)?.leader();
        Ok(self.index_of(leader))
    }

    /// The nodes in the ISR of `partition` of `topic`, as the controller last published it.
    pub async fn isr_of(&self, topic: &str, partition: i32) -> anyhow::Result<Vec<usize>> {
        let metadata = self.metadata(Some(topic)).await?;
        let isr = find_partition(&metadata, topic, partition)?.isr().to_vec();
        Ok(isr.into_iter().filter_map(|id| self.index_of(id)).collect())
    }

    /// Waits until node `i` is in the ISR of `partition` of `topic` again.
    pub async fn wait_in_isr(&self, topic: &str, partition: i32, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.isr_of(topic, partition).await.is_ok_and(|isr| isr.contains(&i)) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("node {i} not back in the ISR of {topic}/{partition} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node that coordinates `group` (holds its offsets): the leader of its partition of
    /// `__consumer_offsets`, which Kafka picks as `abs(group.hashCode()) % partitions` (Java's
    /// String hash; GroupCoordinatorService.partitionFor). `None` while that partition has no leader.
    pub async fn group_coordinator(&self, group: &str) -> anyhow::Result<Option<usize>> {
        let partitions: i32 = super::node::option_lines(SERVER_PROPERTIES)
            .find_map(|line| line.strip_prefix("offsets.topic.num.partitions="))
            .context("offsets.topic.num.partitions in server.properties")?
            .parse()?;
        let partition = offsets_partition(group, partitions);
        // Kafka creates __consumer_offsets at the first FindCoordinator; while it elects
        // the leaders, offset requests answer NOT_COORDINATOR or COORDINATOR_NOT_AVAILABLE.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let metadata = self.metadata(Some("__consumer_offsets")).await;
            if let Ok(leader) = metadata
                .as_ref()
                .map_err(drop)
                .and_then(|m| find_partition(m, "__consumer_offsets", partition).map(|p| p.leader()).map_err(drop))
            {
                return Ok(self.index_of(leader));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no partition {partition} of __consumer_offsets within 30 s");
            }
            let _ = self.create_offsets_topic(group).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The node coordinating `group` as Kafka's own `ConsumerGroupCommand --describe --state`
    /// reports it (a JVM tool: seconds; the check of [`KafkaCluster::group_coordinator`]).
    /// `None` if the group is unknown or has no coordinator.
    pub async fn group_coordinator_by_kafka_tools(&self, group: &str) -> anyhow::Result<Option<usize>> {
        let node = &self.nodes[0];
        let mut command =
            tool_command(node.libs(), &node.config.dir, "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand")?;
        command.args(["--bootstrap-server", &self.internal_bootstrap, "--describe", "--state", "--group", group]);
        let output = run_tool(command, "kafka ConsumerGroupCommand --describe --state").await?;
        // GROUP  COORDINATOR (ID)  ASSIGNMENT-STRATEGY  STATE  #MEMBERS
        // <group>  127.0.0.1:40123 (2)  …
        let coordinator_id = output
            .lines()
            .find(|line| line.split_whitespace().next() == Some(group))
            .and_then(|line| line.split_once(" ("))
            .and_then(|(_, rest)| rest.split_once(')'))
            .and_then(|(id, _)| id.trim().parse::<i32>().ok());
        Ok(coordinator_id.and_then(|id| self.index_of(id)))
    }

    /// FindCoordinator (through an offset fetch) makes Kafka create `__consumer_offsets`.
    async fn create_offsets_topic(&self, group: &str) -> anyhow::Result<()> {
        let (bootstrap, group) = (self.internal_bootstrap.clone(), group.to_string());
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .create()?;
            let mut partitions = TopicPartitionList::new();
            partitions.add_partition("lockstep-coordinator-probe", 0);
            consumer.committed_offsets(partitions, Duration::from_secs(30))?;
            anyhow::Ok(())
        })
        .await?
    }

    fn index_of(&self, node_id: i32) -> Option<usize> {
        usize::try_from(node_id).ok().filter(|id| (1..=self.size()).contains(id)).map(|id| id - 1)
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!("--- kafka node {} log (last lines) ---\n{}", node.config.node_id, node.log_tail());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_partition<'a>(
    metadata: &'a Metadata,
    topic: &str,
    partition: i32,
) -> anyhow::Result<&'a rdkafka::metadata::MetadataPartition> {
    let topic_metadata =
        metadata.topics().iter().find(|t| t.name() == topic).with_context(|| format!("no metadata for {topic}"))?;
    if let Some(error) = topic_metadata.error() {
        bail!("metadata of {topic}: {error:?}");
    }
    topic_metadata
        .partitions()
        .iter()
        .find(|p| p.id() == partition)
        .with_context(|| format!("no partition {partition} of {topic}"))
}

/// Java's `String.hashCode` (over UTF-16 code units).
fn java_string_hash(text: &str) -> i32 {
    text.encode_utf16().fold(0i32, |hash, unit| hash.wrapping_mul(31).wrapping_add(i32::from(unit)))
}

/// Kafka's `Utils.abs(group.hashCode()) % partitions`.
fn offsets_partition(group: &str, partitions: i32) -> i32 {
    let hash = java_string_hash(group);
    let abs = if hash == i32::MIN { 0 } else { hash.abs() };
    abs % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_string_hash_matches_java() {
        // "hello".hashCode() == 99162322, "".hashCode() == 0, "polygenelubricants" == Integer.MIN_VALUE.
        assert_eq!(java_string_hash("hello"), 99_162_322);
        assert_eq!(java_string_hash(""), 0);
        assert_eq!(java_string_hash("polygenelubricants"), i32::MIN);
        assert_eq!(offsets_partition("polygenelubricants", 5), 0);
    }
}
