//! The stack a fault run stands on: Kafka (one broker, optionally behind a
//! [`Proxy`], or a [`KafkaCluster`] for the replication faults) and a server
//! bootstrapping through it; and what the stack shows as evidence when a run
//! fails (the server's own errors, the end of Kafka's logs).

use std::ops::{Deref, DerefMut};

use crate::{
    kafka::{Kafka, KafkaCluster, KafkaOptions},
    proxy::Proxy,
    server::Server,
};

/// Kafka, optionally behind a proxy, and a server bootstrapping through it.
pub struct Stack {
    // Dropped in this order: the server, then Kafka, then the link.
    pub server: Server,
    /// One broker ([`Deref`]s to it, as the fault suite uses it) or a cluster ([`Stack::cluster`]).
    pub kafka: Brokers,
    pub proxy: Option<Proxy>,
}

#[derive(Default, Clone)]
pub struct StackOptions {
    pub behind_proxy: bool,
    pub storage_tmpfs_mib: Option<u64>,
    /// Stand on a [`KafkaCluster`] of this many nodes instead of one broker; the server
    /// creates user topics and its events topic with replication factor `min(nodes, 3)`.
    pub cluster: Option<usize>,
    pub settings: Vec<(&'static str, &'static str)>,
}

/// The Kafka of a stack: one broker or a cluster.
pub enum Brokers {
    // Boxed: a `Kafka` is several times the size of a `KafkaCluster` (its node inline).
    One(Box<Kafka>),
    Cluster(KafkaCluster),
}

impl Brokers {
    /// Every node's clients' listener.
    pub fn bootstrap(&self) -> &str {
        match self {
            Brokers::One(kafka) => kafka.bootstrap(),
            Brokers::Cluster(cluster) => cluster.bootstrap(),
        }
    }
}

/// The single-broker faults and scenarios (`tests/tests/faults.rs`) use the broker as it
/// is; on a cluster that is a mistake of the scenario, so it panics with what to use instead.
impl Deref for Brokers {
    type Target = Kafka;

    fn deref(&self) -> &Kafka {
        match self {
            Brokers::One(kafka) => kafka,
            Brokers::Cluster(_) => panic!("this stack stands on a cluster: use Stack::cluster()"),
        }
    }
}

impl DerefMut for Brokers {
    fn deref_mut(&mut self) -> &mut Kafka {
        match self {
            Brokers::One(kafka) => kafka,
            Brokers::Cluster(_) => panic!("this stack stands on a cluster: use Stack::cluster_mut()"),
        }
    }
}

impl Stack {
    pub async fn start(options: StackOptions) -> anyhow::Result<Self> {
        if let Some(nodes) = options.cluster {
            anyhow::ensure!(
                !options.behind_proxy && options.storage_tmpfs_mib.is_none(),
                "a cluster stack has no proxy nor tmpfs"
            );
            let cluster = KafkaCluster::start(nodes).await?;
            let replication = nodes.min(3).to_string();
            let mut settings = vec![("LOCKSTEP_KAFKA__REPLICATION_FACTOR", replication.as_str())];
            settings.extend(options.settings.iter().copied());
            let server = Server::start_with_kafka(cluster.bootstrap(), &settings).await?;
            return Ok(Self { server, kafka: Brokers::Cluster(cluster), proxy: None });
        }
        let port = crate::free_port()?;
        let proxy = match options.behind_proxy {
            true => Some(Proxy::start(([127, 0, 0, 1], port).into()).await?),
            false => None,
        };
        let kafka = Kafka::start_with(KafkaOptions {
            port: Some(port),
            advertised_port: proxy.as_ref().map(Proxy::port),
            storage_tmpfs_mib: options.storage_tmpfs_mib,
            ..KafkaOptions::default()
        })
        .await?;
        let bootstrap = proxy.as_ref().map_or_else(|| kafka.bootstrap().to_string(), |proxy| proxy.addr().to_string());
        let server = Server::start_with_kafka(&bootstrap, &options.settings).await?;
        Ok(Self { server, kafka: Brokers::One(Box::new(kafka)), proxy })
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("this stack runs behind a proxy")
    }

    pub fn cluster(&self) -> &KafkaCluster {
        match &self.kafka {
            Brokers::Cluster(cluster) => cluster,
            Brokers::One(_) => panic!("this stack stands on one broker (StackOptions::cluster)"),
        }
    }

    pub fn cluster_mut(&mut self) -> &mut KafkaCluster {
        match &mut self.kafka {
            Brokers::Cluster(cluster) => cluster,
            Brokers::One(_) => panic!("this stack stands on one broker (StackOptions::cluster)"),
        }
    }

    /// Kafka's logs: (name, path), one per node.
    pub fn kafka_logs(&self) -> Vec<(String, std::path::PathBuf)> {
        match &self.kafka {
            Brokers::One(kafka) => vec![("kafka".to_string(), kafka.data_dir().join("kafka.log"))],
            Brokers::Cluster(cluster) => {
                (0..cluster.size()).map(|node| (format!("kafka node {node}"), cluster.log_path(node))).collect()
            }
        }
    }

    /// The server's own errors and last warnings (not librdkafka's connection
    /// noise), and the end of Kafka's logs, as evidence.
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
        for (name, path) in self.kafka_logs() {
            let kafka_log = crate::log_tail(&path);
            let kafka_lines: Vec<&str> = kafka_log.lines().collect();
            if kafka_lines.is_empty() {
                continue;
            }
            evidence.push_str(&format!("  {name} log (last 8 lines):\n"));
            for line in &kafka_lines[kafka_lines.len().saturating_sub(8)..] {
                evidence.push_str(&format!("    {}\n", truncate(line, 400)));
            }
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

fn truncate(line: &str, chars: usize) -> String {
    line.chars().take(chars).collect()
}
