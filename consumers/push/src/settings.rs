//! Typed settings of the push worker: defaults, then a TOML file, then
//! `LOCKSTEP_PUSH_*` environment variables (nested keys joined by `__`, e.g.
//! `LOCKSTEP_PUSH_KAFKA__BOOTSTRAP_SERVERS=kafka:9092`), then command-line
//! flags. Every field's doc comment states its default.
//!
//! The server's own `LOCKSTEP_PUSH__VAPID_PUBLIC_KEY` is a different variable
//! (the server's `[push]` section); give each process only its own variables.

use std::{fmt, path::PathBuf, time::Duration};

use figment::providers::Env;
pub use lockstep_kafka::settings::SettingsError;
use lockstep_kafka::settings::{KafkaSettings, layered, optional_addr};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Directory of the VAPID key pair (`vapid_private_key`, mode 0600) when
    /// `vapid.private_key` is unset. Default `./data-push`.
    pub data_dir: PathBuf,
    /// Prometheus `/metrics` and `/healthz`. Default `127.0.0.1:50053`; port 0 picks a free
    /// port; `""` turns it off.
    #[serde(deserialize_with = "optional_addr")]
    pub metrics_listen_addr: Option<std::net::SocketAddr>,
    /// This worker's id in the `WakeUp` events it publishes. Default: `push-` and a random id.
    pub worker_id: Option<String>,
    /// Kafka connection (the same keys as the server's `[kafka]` section; only
    /// `bootstrap_servers`, `topic_prefix`, `group_prefix`, `request_timeout` and
    /// `client_config` matter here). Default: the server's defaults.
    pub kafka: KafkaSettings,
    pub events: EventsSettings,
    pub wake: WakeSettings,
    pub http: HttpSettings,
    pub vapid: VapidSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventsSettings {
    /// The events topic the server publishes to. Default `lockstep.events`.
    pub topic: String,
    /// The worker's consumer group; instances in one group split the partitions. Default
    /// `lockstep.push-worker`.
    pub group: String,
    /// How often the offsets of acted-on events are committed. Default 1s.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Events buffered between the Kafka poll thread and the worker. Default 1,024.
    pub channel_capacity: usize,
    /// The group's `session.timeout.ms`: how soon a crashed instance's partitions move to
    /// the others. Default 10s.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WakeSettings {
    /// Least time between two wake-ups of one device. Default 60s.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// HTTP requests to push services in flight at once. A wake-up holds one only while
    /// its request is in flight, never while it waits to retry. Default 64.
    pub max_concurrent: usize,
    /// HTTP requests in flight to one origin (scheme, host, port) at once, so that one push
    /// service never takes every slot. Default 32.
    pub max_per_origin: usize,
    /// Requests in flight at once to origins whose last attempt was slow (no answer, or one
    /// after `slow_after`); the same number again for first requests to origins not heard
    /// from yet (one each). However many origins are slow, origins that answer keep at
    /// least `max_concurrent` − 2 × this. Default 16.
    pub max_concurrent_slow: usize,
    /// An origin whose answer took longer than this (or never came) is slow until it
    /// answers within it again. Default 2s.
    #[serde(with = "humantime_serde")]
    pub slow_after: Duration,
    /// Attempts per wake-up, counting the first, for 5xx answers, timeouts and 429. Default 5.
    pub max_attempts: u32,
    /// First retry delay after a 5xx or a timeout; doubled per attempt, with ±50 % jitter.
    /// Default 500ms.
    #[serde(with = "humantime_serde")]
    pub retry_base_delay: Duration,
    /// Longest retry delay (also caps a `Retry-After`). Default 60s.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// Devices tracked at most (their state is a few hundred bytes each); events about
    /// further devices are dropped with a warning. Default 1,000,000.
    pub max_devices: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Timeout of one request to a push service, connect included. Default 10s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// `TTL` header: how long a push service keeps an undelivered wake-up. Default 24h.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// `Urgency` header (RFC 8030 §5.3). Default `normal`.
    pub urgency: String,
    /// `Topic` header: constant, so a push service replaces an undelivered wake-up
    /// instead of queueing another. Default `lockstep-sync`.
    pub topic: String,
    /// Most bytes of a push service's answer body read (only a webhook's
    /// `{"rejected": [...]}` matters); the rest is never read. Default 65,536.
    pub max_response_bytes: usize,
    /// Networks push targets may reach although they are inside a network (loopback,
    /// RFC 1918, ULA, link-local, CGNAT, …), e.g. `["127.0.0.1"]` for a local push service
    /// in tests. Every other such address is refused, whether the target names it or its
    /// host name resolves to it (refused addresses are dropped from every DNS answer;
    /// redirects are never followed). Default empty.
    pub allow_private_targets: Vec<String>,
}

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VapidSettings {
    /// The VAPID `sub` claim: a contact for push services. Default `mailto:admin@localhost`.
    pub subject: String,
    /// The VAPID private key (base64url of the 32-byte P-256 scalar). Default unset: the key
    /// pair is made on first run in `data_dir`.
    pub private_key: Option<String>,
    /// Lifetime of a VAPID JWT (`exp`), at most 24h. Default 12h.
    #[serde(with = "humantime_serde")]
    pub token_lifetime: Duration,
}

impl fmt::Debug for VapidSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VapidSettings")
            .field("subject", &self.subject)
            .field("private_key", &self.private_key.as_ref().map(|_| "<hidden>"))
            .field("token_lifetime", &self.token_lifetime)
            .finish()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data-push"),
            metrics_listen_addr: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 50053))),
            worker_id: None,
            kafka: KafkaSettings::default(),
            events: EventsSettings::default(),
            wake: WakeSettings::default(),
            http: HttpSettings::default(),
            vapid: VapidSettings::default(),
        }
    }
}

impl Default for EventsSettings {
    fn default() -> Self {
        Self {
            topic: "lockstep.events".into(),
            group: "lockstep.push-worker".into(),
            commit_interval: Duration::from_secs(1),
            channel_capacity: 1024,
            session_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for WakeSettings {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(60),
            max_concurrent: 64,
            max_per_origin: 32,
            max_concurrent_slow: 16,
            slow_after: Duration::from_secs(2),
            max_attempts: 5,
            retry_base_delay: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(60),
            max_devices: 1_000_000,
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            ttl: Duration::from_secs(24 * 3600),
            urgency: "normal".into(),
            topic: "lockstep-sync".into(),
            max_response_bytes: 64 * 1024,
            allow_private_targets: Vec::new(),
        }
    }
}

impl Default for VapidSettings {
    fn default() -> Self {
        Self {
            subject: "mailto:admin@localhost".into(),
            private_key: None,
            token_lifetime: Duration::from_secs(12 * 3600),
        }
    }
}

impl Settings {
    /// Defaults, then `file` (if given; it must exist), then `LOCKSTEP_PUSH_*` variables.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, SettingsError> {
        let env = Env::prefixed("LOCKSTEP_PUSH_")
            // Flags of the binary (clap reads these), not settings keys.
            .ignore(&["KAFKA_BROKERS", "CONFIG", "DATA_DIR", "LOG_JSON", "LOG"])
            // `LOCKSTEP_PUSH__…` is the server's `[push]` section, not ours.
            .filter(|key| !key.as_str().starts_with('_'))
            .split("__");
        let settings = layered(Settings::default(), file, env)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Where targets may point (`http.allow_private_targets`).
    pub fn target_policy(&self) -> Result<lockstep_schemas::target_policy::TargetPolicy, String> {
        lockstep_schemas::target_policy::TargetPolicy::allowing(&self.http.allow_private_targets)
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        let fail = |message: &str| Err(SettingsError::invalid(message));
        if self.events.topic.trim().is_empty() || self.events.group.trim().is_empty() {
            return fail("events.topic and events.group must not be empty");
        }
        if self.events.channel_capacity == 0 || self.events.commit_interval.is_zero() {
            return fail("events.channel_capacity and events.commit_interval must be non-zero");
        }
        if self.events.session_timeout < Duration::from_secs(1) {
            return fail("events.session_timeout must be at least 1s");
        }
        if self.wake.max_concurrent == 0 || self.wake.max_attempts == 0 || self.wake.max_devices == 0 {
            return fail("wake.max_concurrent, wake.max_attempts and wake.max_devices must be at least 1");
        }
        if self.wake.max_per_origin == 0 || self.wake.max_concurrent_slow == 0 || self.wake.slow_after.is_zero() {
            return fail("wake.max_per_origin, wake.max_concurrent_slow and wake.slow_after must be non-zero");
        }
        if self.http.max_response_bytes == 0 {
            return fail("http.max_response_bytes must be at least 1");
        }
        if let Err(error) = self.target_policy() {
            return fail(&format!("http.allow_private_targets: {error}"));
        }
        if self.vapid.token_lifetime.is_zero() || self.vapid.token_lifetime > Duration::from_secs(24 * 3600) {
            return fail("vapid.token_lifetime must be between 1s and 24h (RFC 8292)");
        }
        if !(self.vapid.subject.starts_with("mailto:") || self.vapid.subject.starts_with("https://")) {
            return fail("vapid.subject must be a mailto: or https: URI");
        }
        if !["very-low", "low", "normal", "high"].contains(&self.http.urgency.as_str()) {
            return fail("http.urgency must be very-low, low, normal or high");
        }
        let topic_ok = !self.http.topic.is_empty()
            && self.http.topic.len() <= 32
            && self.http.topic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !topic_ok {
            return fail("http.topic must be 1 to 32 characters of the base64url alphabet (RFC 8030 §5.4)");
        }
        if self.http.request_timeout.is_zero() {
            return fail("http.request_timeout must be non-zero");
        }
        Ok(())
    }
}

#[cfg(test)]
// figment::Jail's closures return figment::Error, which is large; fine in tests.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("push.toml", "[wake]\nmin_interval = \"10s\"\nmax_concurrent = 3\n")?;
            jail.set_env("LOCKSTEP_PUSH_WAKE__MAX_CONCURRENT", "7");
            jail.set_env("LOCKSTEP_PUSH_EVENTS__TOPIC", "t.events");
            jail.set_env("LOCKSTEP_PUSH_KAFKA_BROKERS", "kafka:9092");
            // The server's setting, in a shared environment: not ours, not an error.
            jail.set_env("LOCKSTEP_PUSH__VAPID_PUBLIC_KEY", "BPub");
            let settings = Settings::load(Some(std::path::Path::new("push.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(settings.wake.min_interval, Duration::from_secs(10));
            assert_eq!(settings.wake.max_concurrent, 7);
            assert_eq!(settings.events.topic, "t.events");
            assert_eq!(settings.events.group, "lockstep.push-worker");
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LOCKSTEP_PUSH_VAPID__TOKEN_LIFETIME", "25h");
            let error = Settings::load(None).unwrap_err().to_string();
            assert!(error.contains("token_lifetime"), "{error}");
            jail.set_env("LOCKSTEP_PUSH_VAPID__TOKEN_LIFETIME", "1h");
            jail.set_env("LOCKSTEP_PUSH_NO_SUCH_KEY", "1");
            assert!(Settings::load(None).is_err());
            Ok(())
        });
    }

    #[test]
    fn private_targets_are_allowed_only_by_a_list_of_networks() {
        figment::Jail::expect_with(|jail| {
            assert!(Settings::load(None).map_err(|e| e.to_string())?.http.allow_private_targets.is_empty());
            jail.set_env("LOCKSTEP_PUSH_HTTP__ALLOW_PRIVATE_TARGETS", r#"["127.0.0.1"]"#);
            let settings = Settings::load(None).map_err(|e| e.to_string())?;
            assert!(settings.target_policy().unwrap().permits("127.0.0.1".parse().unwrap()));
            jail.set_env("LOCKSTEP_PUSH_HTTP__ALLOW_PRIVATE_TARGETS", r#"["10.0.0.0/33"]"#);
            let error = Settings::load(None).unwrap_err().to_string();
            assert!(error.contains("allow_private_targets"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn the_private_key_is_hidden_from_debug() {
        let mut settings = Settings::default();
        settings.vapid.private_key = Some("c2VjcmV0LXNjYWxhcg".into());
        let shown = format!("{settings:?}");
        assert!(!shown.contains("c2VjcmV0LXNjYWxhcg"), "{shown}");
    }
}
