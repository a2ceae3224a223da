//! Kafka client settings every Lockstep process reads (`[kafka]` in each
//! binary's settings file, `<PREFIX>KAFKA__*` in the environment), and the
//! one way every binary loads its settings: defaults, then a TOML file, then
//! environment variables. Every field's doc comment states its default.

use std::{collections::BTreeMap, fmt, net::SocketAddr, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// Kafka bootstrap servers. Default `127.0.0.1:9092` (the local Kafka the run script starts).
    pub bootstrap_servers: String,
    /// Prefix of per-user topics: `<prefix><user id>`. Default `lockstep.user.`.
    pub topic_prefix: String,
    /// Prefix of per-device consumer groups: `<prefix><device id>`. Default `lockstep.device.`.
    pub group_prefix: String,
    /// Replication factor of new user topics. Default 1 (use 3 on a real cluster).
    pub replication_factor: i32,
    /// `retention.ms` of new user topics. Default -1 (keep forever, so a device can be
    /// offline for weeks); a device whose history expired gets a Resync.
    pub topic_retention_ms: i64,
    /// How long a push may wait for Kafka's acknowledgement. Default 10s.
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
    /// Timeout of admin and metadata requests. Default 10s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The longest any one Kafka wait inside a request may take in total, retries included
    /// (offset commits and fetches, watermarks, catch-up reads); past it the request answers
    /// UNAVAILABLE (retryable). A push waits at most `produce_timeout` plus this. Default 15s.
    #[serde(with = "humantime_serde")]
    pub operation_deadline: Duration,
    /// How long after a failed produce a retry of its changes is held back (UNAVAILABLE,
    /// retryable): a produce that timed out may still commit later, when the leader drops a
    /// stalled follower from the ISR (after `replica.lag.time.max.ms`, Kafka's default 30 s, or
    /// when the controller fences the follower). A retry let through before that is appended a
    /// second time. Keep it above `produce_timeout` plus the brokers' `replica.lag.time.max.ms`.
    /// Default 45s.
    #[serde(with = "humantime_serde")]
    pub in_doubt_window: Duration,
    /// Producer `linger.ms`. Default 2.
    pub linger_ms: u32,
    /// Extra librdkafka properties for every client (e.g. `security.protocol`). Default none.
    pub client_config: BTreeMap<String, String>,
    /// Whether deleting an account (or a failed account creation) deletes its topic. Default
    /// true. Set false where the cluster refuses topic deletion (`delete.topic.enable=false`) or
    /// operators delete topics themselves: the account's topic (its ciphertext) then stays.
    pub delete_topics: bool,
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // client_config may carry SASL passwords: show keys only.
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("group_prefix", &self.group_prefix)
            .field("replication_factor", &self.replication_factor)
            .field("topic_retention_ms", &self.topic_retention_ms)
            .field("produce_timeout", &self.produce_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("operation_deadline", &self.operation_deadline)
            .field("in_doubt_window", &self.in_doubt_window)
            .field("linger_ms", &self.linger_ms)
            .field("client_config_keys", &self.client_config.keys().collect::<Vec<_>>())
            .field("delete_topics", &self.delete_topics)
            .finish()
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic_prefix: "lockstep.user.".into(),
            group_prefix: "lockstep.device.".into(),
            replication_factor: 1,
            topic_retention_ms: -1,
            produce_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            operation_deadline: Duration::from_secs(15),
            in_doubt_window: Duration::from_secs(45),
            linger_ms: 2,
            client_config: BTreeMap::new(),
            delete_topics: true,
        }
    }
}

/// An address, or nothing for an empty string (so that an environment
/// variable can turn a listener off).
pub fn optional_addr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
    let text: Option<String> = Option::deserialize(deserializer)?;
    match text.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid settings: {0}")]
pub struct SettingsError(#[from] Box<figment::Error>);

impl SettingsError {
    /// A rule the settings break, in words.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self(Box::new(figment::Error::from(message.into())))
    }
}

/// How every Lockstep binary reads its settings: `defaults`, then `file` (if
/// given; it must exist), then the environment variables `env` selects.
pub fn layered<T: Serialize + serde::de::DeserializeOwned>(
    defaults: T,
    file: Option<&std::path::Path>,
    env: Env,
) -> Result<T, SettingsError> {
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(file) = file {
        if !file.exists() {
            return Err(SettingsError::invalid(format!("settings file {} does not exist", file.display())));
        }
        figment = figment.merge(Toml::file(file));
    }
    Ok(figment.merge(env).extract().map_err(Box::new)?)
}
