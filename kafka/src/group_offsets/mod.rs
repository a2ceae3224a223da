//! Consumer-group offsets for any number of groups over a few shared Kafka connections.
//!
//! Each device's progress is the committed offset of its own consumer group
//! (`lockstep.device.<uuid>`) on its user's topic. An rdkafka consumer per device would cost about
//! four threads and a socket each, which does not scale to thousands of devices, and rdkafka's
//! `AdminClient` cannot alter other groups' offsets. So this module speaks the Kafka protocol
//! itself (through `kafka-protocol`): one pipelined connection per broker, FindCoordinator per
//! group (cached), and "simple" member-less OffsetCommit/OffsetFetch (generation -1, empty member
//! id), which is what Kafka tools (kcat, kafka-consumer-groups, confluent-kafka) read back.

mod conn;
pub mod security;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conn::{Conn, encode_frame};

use crate::locks::lock;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::{
    ApiKey, DeleteGroupsRequest, DeleteGroupsResponse, FindCoordinatorRequest, FindCoordinatorResponse, GroupId,
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use tracing::debug;

/// The APIs used and the versions this module speaks (inclusive). FindCoordinator v4+ batches
/// keys; OffsetCommit v9+ is for KIP-848 members; OffsetFetch v8+ moves groups into an array.
const APIS: [(ApiKey, &str, i16, i16); 4] = [
    (ApiKey::FindCoordinator, "FindCoordinator", 1, 4),
    (ApiKey::OffsetCommit, "OffsetCommit", 2, 8),
    (ApiKey::OffsetFetch, "OffsetFetch", 1, 7),
    (ApiKey::DeleteGroups, "DeleteGroups", 0, 2),
];
const FIND_COORDINATOR: usize = 0;
const OFFSET_COMMIT: usize = 1;
const OFFSET_FETCH: usize = 2;
const DELETE_GROUPS: usize = 3;
/// Largest response frame accepted; ours are tiny.
const MAX_FRAME: usize = 16 << 20;
/// Requests queued for one connection's writer before callers wait.
const WRITE_QUEUE: usize = 1024;
/// The coordinator cache is cleared when it grows past this many groups.
const MAX_CACHED_COORDINATORS: usize = 200_000;

/// Commits and reads consumer-group offsets for any number of groups over shared connections, as
/// "simple" member-less commits (generation id -1, empty member id). Cheap to clone.
#[derive(Clone)]
pub struct GroupOffsets {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
pub struct GroupOffsetsSettings {
    /// "host:port,host:port"
    pub bootstrap_servers: String,
    pub client_id: String,
    /// Bounds every connect and every request round trip. One attempt of a call takes at most
    /// about 3 × request_timeout (wait for a connect, connect, round trip).
    pub request_timeout: Duration,
    /// Attempts per call, counting the first, for coordinator moves and network errors; they
    /// are 50ms·2^n apart, at most 1s.
    pub max_attempts: u32,
    /// TLS and SASL, from the same properties as rdkafka's (`KafkaSecurity::from_client_config`).
    pub security: security::KafkaSecurity,
}

#[derive(Debug, thiserror::Error)]
pub enum GroupOffsetsError {
    #[error("invalid group offsets settings: {0}")]
    Config(String),
    #[error("cannot connect to kafka broker {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("connection to kafka broker {addr} lost: {reason}")]
    Disconnected { addr: String, reason: String },
    #[error("{api} to kafka broker {addr} timed out after {timeout:?}")]
    Timeout { api: &'static str, addr: String, timeout: Duration },
    /// `topic` is "topic-partition" when the error is about one.
    #[error("{api} for group {group}{} failed: {code} (kafka error code {})",
        .topic.as_deref().map(|t| format!(" on {t}")).unwrap_or_default(), .code.code())]
    Kafka { api: &'static str, group: String, topic: Option<String>, code: ResponseError },
    #[error("kafka broker {addr} supports no version of {api} in {min}..={max}")]
    Unsupported { api: &'static str, addr: String, min: i16, max: i16 },
    #[error("bad response from kafka broker {addr}: {message}")]
    Protocol { addr: String, message: String },
}

impl GroupOffsetsError {
    /// Whether trying the same call again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Kafka { code, .. } => code.is_retriable(),
            other => other.is_transient(),
        }
    }

    /// Errors retried inside a call: the coordinator moved or is loading, or the network failed.
    fn is_transient(&self) -> bool {
        use ResponseError::{CoordinatorLoadInProgress, CoordinatorNotAvailable, NotCoordinator};
        match self {
            Self::Connect { .. } | Self::Disconnected { .. } | Self::Timeout { .. } => true,
            Self::Kafka { code, .. } => {
                matches!(code, NotCoordinator | CoordinatorNotAvailable | CoordinatorLoadInProgress)
            }
            _ => false,
        }
    }
}

type Result<T, E = GroupOffsetsError> = std::result::Result<T, E>;
type ConnSlot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

struct Inner {
    settings: GroupOffsetsSettings,
    bootstrap: Vec<String>,
    client_id: StrBytes,
    /// One slot per broker address; its async lock makes concurrent callers share one connect.
    conns: Mutex<HashMap<String, ConnSlot>>,
    /// group -> coordinator address ("host:port").
    coordinators: Mutex<HashMap<String, String>>,
    next_bootstrap: AtomicUsize,
}

impl GroupOffsets {
    /// Connects to the first reachable bootstrap server (negotiating API versions with
    /// ApiVersions), so that a wrong address fails at startup. Coordinators connect lazily.
    pub async fn connect(settings: GroupOffsetsSettings) -> Result<Self, GroupOffsetsError> {
        let servers = settings.bootstrap_servers.split(',').map(str::trim);
        let bootstrap: Vec<String> = servers.filter(|s| !s.is_empty()).map(Into::into).collect();
        if bootstrap.is_empty() || settings.request_timeout.is_zero() || settings.max_attempts == 0 {
            return Err(GroupOffsetsError::Config(format!(
                "need bootstrap servers, a request timeout and attempts: {settings:?}"
            )));
        }
        let inner = Inner {
            client_id: StrBytes::from_string(settings.client_id.clone()),
            settings,
            bootstrap,
            conns: Mutex::default(),
            coordinators: Mutex::default(),
            next_bootstrap: AtomicUsize::new(0),
        };
        let this = Self { inner: Arc::new(inner) };
        this.any_conn().await?;
        Ok(this)
    }

    /// Commits `next_offset` (the next offset to consume, Kafka's convention) for `group` on
    /// (topic, partition).
    pub async fn commit(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), GroupOffsetsError> {
        let tp = Some((topic, partition));
        self.retry(OFFSET_COMMIT, group, || async move {
            let conn = self.coordinator(group).await?;
            let offset = OffsetCommitRequestPartition::default()
                .with_partition_index(partition)
                .with_committed_offset(next_offset);
            let wanted = OffsetCommitRequestTopic::default()
                .with_name(TopicName(str_bytes(topic)))
                .with_partitions(vec![offset]);
            let req = OffsetCommitRequest::default().with_group_id(GroupId(str_bytes(group))).with_topics(vec![wanted]);
            let resp: OffsetCommitResponse = self.call(&conn, OFFSET_COMMIT, &req).await?;
            let found = resp.topics.iter().filter(|t| t.name.0.as_str() == topic);
            let found = found.flat_map(|t| &t.partitions).find(|p| p.partition_index == partition);
            let code = found.ok_or_else(|| conn.protocol(format!("no {topic}-{partition}")))?;
            check(OFFSET_COMMIT, group, tp, code.error_code)
        })
        .await
    }

    /// The committed offset, or None when the group has none for that partition.
    pub async fn fetch(&self, group: &str, topic: &str, partition: i32) -> Result<Option<i64>, GroupOffsetsError> {
        let tp = Some((topic, partition));
        self.retry(OFFSET_FETCH, group, || async move {
            let conn = self.coordinator(group).await?;
            let wanted = OffsetFetchRequestTopic::default()
                .with_name(TopicName(str_bytes(topic)))
                .with_partition_indexes(vec![partition]);
            let req =
                OffsetFetchRequest::default().with_group_id(GroupId(str_bytes(group))).with_topics(Some(vec![wanted]));
            let resp: OffsetFetchResponse = self.call(&conn, OFFSET_FETCH, &req).await?;
            check(OFFSET_FETCH, group, None, resp.error_code)?;
            let found = resp.topics.iter().filter(|t| t.name.0.as_str() == topic);
            let found = found.flat_map(|t| &t.partitions).find(|p| p.partition_index == partition);
            let found = found.ok_or_else(|| conn.protocol(format!("no {topic}-{partition}")))?;
            check(OFFSET_FETCH, group, tp, found.error_code)?;
            Ok((found.committed_offset >= 0).then_some(found.committed_offset))
        })
        .await
    }

    /// Deletes a group and its offsets (DeleteGroups), e.g. for a revoked device. A group that
    /// does not exist counts as deleted. Brokers without DeleteGroups give `Unsupported`.
    pub async fn delete_group(&self, group: &str) -> Result<(), GroupOffsetsError> {
        self.retry(DELETE_GROUPS, group, || async move {
            let conn = self.coordinator(group).await?;
            let req = DeleteGroupsRequest::default().with_groups_names(vec![GroupId(str_bytes(group))]);
            let resp: DeleteGroupsResponse = self.call(&conn, DELETE_GROUPS, &req).await?;
            let found = resp.results.iter().find(|r| r.group_id.0.as_str() == group);
            let found = found.ok_or_else(|| conn.protocol(format!("no result for {group}")))?;
            match check(DELETE_GROUPS, group, None, found.error_code) {
                Err(GroupOffsetsError::Kafka { code: ResponseError::GroupIdNotFound, .. }) => Ok(()),
                other => other,
            }
        })
        .await
    }

    /// Runs `attempt` until it succeeds, fails for good, or `max_attempts` is reached. Transient
    /// failures forget the group's coordinator and back off 50ms·2^n, at most 1s.
    async fn retry<T, F, Fut>(&self, api: usize, group: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut tries = 0u32;
        loop {
            tries += 1;
            let err = match attempt().await {
                Ok(value) => return Ok(value),
                Err(err) => err,
            };
            if !err.is_transient() || tries >= self.inner.settings.max_attempts {
                return Err(err);
            }
            lock(&self.inner.coordinators).remove(group);
            let delay = Duration::from_millis(50 << (tries - 1).min(5)).min(Duration::from_secs(1));
            let api = APIS[api].1;
            debug!(api, group, tries, ?delay, error = %err, "retrying after transient kafka error");
            tokio::time::sleep(delay).await;
        }
    }

    /// The connection to `group`'s coordinator, found with FindCoordinator unless cached.
    async fn coordinator(&self, group: &str) -> Result<Arc<Conn>> {
        let cached = lock(&self.inner.coordinators).get(group).cloned();
        if let Some(addr) = cached {
            return self.conn(&addr).await;
        }
        let conn = self.any_conn().await?;
        let key = str_bytes(group);
        let v4 = conn.version(FIND_COORDINATOR)? >= 4;
        let req = match v4 {
            true => FindCoordinatorRequest::default().with_coordinator_keys(vec![key]),
            false => FindCoordinatorRequest::default().with_key(key),
        };
        let resp: FindCoordinatorResponse = self.call(&conn, FIND_COORDINATOR, &req).await?;
        let (code, node, host, port) = if v4 {
            let found = resp.coordinators.into_iter().find(|c| c.key.as_str() == group);
            let c = found.ok_or_else(|| conn.protocol(format!("no coordinator for {group}")))?;
            (c.error_code, c.node_id, c.host, c.port)
        } else {
            (resp.error_code, resp.node_id, resp.host, resp.port)
        };
        check(FIND_COORDINATOR, group, None, code)?;
        let addr = match host.contains(':') {
            true => format!("[{}]:{port}", host.as_str()),
            false => format!("{}:{port}", host.as_str()),
        };
        debug!(group, node_id = node.0, addr, "found group coordinator");
        {
            let mut cache = lock(&self.inner.coordinators);
            if cache.len() >= MAX_CACHED_COORDINATORS {
                cache.clear();
            }
            cache.insert(group.to_owned(), addr.clone());
        }
        self.conn(&addr).await
    }

    /// A connection to any bootstrap server, rotating through them.
    async fn any_conn(&self) -> Result<Arc<Conn>> {
        let servers = &self.inner.bootstrap;
        let start = self.inner.next_bootstrap.fetch_add(1, Ordering::Relaxed);
        let mut last = GroupOffsetsError::Config("no bootstrap servers".into());
        for i in 0..servers.len() {
            match self.conn(&servers[(start + i) % servers.len()]).await {
                Ok(conn) => return Ok(conn),
                Err(err) => last = err,
            }
        }
        Err(last)
    }

    /// The live connection to `addr`, (re)connecting if there is none.
    async fn conn(&self, addr: &str) -> Result<Arc<Conn>> {
        let slot = lock(&self.inner.conns).entry(addr.into()).or_default().clone();
        // Waiting behind another caller's connect is bounded too, so waits never add up.
        let timeout = self.inner.settings.request_timeout;
        let mut slot = tokio::time::timeout(timeout, slot.lock()).await.map_err(|_| {
            let addr = addr.to_owned();
            GroupOffsetsError::Timeout { api: "connect", addr, timeout }
        })?;
        if let Some(conn) = slot.as_ref().filter(|c| !c.shared.is_dead()) {
            return Ok(conn.clone());
        }
        *slot = None;
        let conn = Arc::new(
            Conn::open(addr, self.inner.settings.request_timeout, &self.inner.client_id, &self.inner.settings.security)
                .await?,
        );
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// One request/response round trip on `conn` with the negotiated version of `api`.
    async fn call<Req, Resp>(&self, conn: &Conn, api: usize, req: &Req) -> Result<Resp>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable + HeaderVersion,
    {
        let (key, name, version) = (APIS[api].0, APIS[api].1, conn.version(api)?);
        let corr = conn.next_correlation_id.fetch_add(1, Ordering::Relaxed) & i32::MAX;
        let frame = encode_frame(key, version, corr, &self.inner.client_id, req)
            .map_err(|e| conn.protocol(format!("cannot encode {name} v{version}: {e}")))?;
        let timeout = self.inner.settings.request_timeout;
        let mut body = conn.round_trip(corr, frame, name, timeout).await?;
        let header = ResponseHeader::decode(&mut body, Resp::header_version(version))
            .map_err(|e| conn.protocol(format!("{name} response header: {e}")))?;
        if header.correlation_id != corr {
            let got = header.correlation_id;
            return Err(conn.protocol(format!("correlation id {got}, expected {corr}")));
        }
        Resp::decode(&mut body, version).map_err(|e| conn.protocol(format!("{name} v{version} response: {e}")))
    }
}

/// Maps a Kafka error code to a readable error naming the API, group and topic-partition.
fn check(api: usize, group: &str, topic: Option<(&str, i32)>, code: i16) -> Result<()> {
    let Some(code) = ResponseError::try_from_code(code) else {
        return Ok(());
    };
    let (api, group) = (APIS[api].1, group.to_owned());
    let topic = topic.map(|(t, p)| format!("{t}-{p}"));
    Err(GroupOffsetsError::Kafka { api, group, topic, code })
}

fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}
