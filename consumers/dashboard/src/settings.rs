//! Typed settings: defaults, then a TOML file, then `LOCKSTEP_DASHBOARD_*`
//! environment variables (nested keys joined by `__`, e.g.
//! `LOCKSTEP_DASHBOARD_STATUS__STALL_AFTER=30s`). Every field's doc comment
//! states its default.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path, time::Duration};

use figment::providers::Env;
pub use lockstep_kafka::settings::SettingsError;
use lockstep_kafka::settings::{KafkaSettings, layered};
use serde::{Deserialize, Serialize};

use crate::status::StatusSettings;

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where the page, the JSON API and `/metrics` listen. Default `127.0.0.1:8090`.
    pub listen_addr: SocketAddr,
    /// The admin token: needed for everything but `/healthz` and `/login`, as
    /// `Authorization: Bearer <token>` or through the sign-in form at `/login` (which
    /// sets a session cookie derived from it; a token in the URL is not accepted).
    /// Required when `listen_addr` is not a loopback address. Default unset.
    pub admin_token: Option<String>,
    /// Host names (or addresses) the dashboard answers to besides loopback ones
    /// (`localhost`, 127.0.0.0/8, `::1`) and its own listen address, e.g.
    /// `["dashboard", "ops.example.org"]`. Requests naming any other `Host` are refused
    /// (421), so that a web page cannot read the dashboard through DNS rebinding.
    /// Default empty.
    pub allowed_hosts: Vec<String>,
    /// Mark the session cookie `Secure` (browsers then send it over HTTPS only): set it
    /// when TLS is terminated in front of the dashboard. Requests that arrive with
    /// `X-Forwarded-Proto: https` get a `Secure` cookie anyway. Default false.
    pub secure_cookie: bool,
    /// How often the page reloads itself (`<meta http-equiv=refresh>`). Default 5s.
    #[serde(with = "humantime_serde")]
    pub page_refresh: Duration,
    /// Most device rows on the fleet page (worst first; filters narrow them). Default 500.
    pub table_rows: usize,
    pub kafka: DashboardKafkaSettings,
    pub events: DashboardEventsSettings,
    pub refresh: RefreshSettings,
    pub status: StatusSettings,
}

/// The cluster holding the user topics and the device groups.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardKafkaSettings {
    /// Default `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// As the server's `kafka.topic_prefix`. Default `lockstep.user.`.
    pub topic_prefix: String,
    /// As the server's `kafka.group_prefix`. Default `lockstep.device.`.
    pub group_prefix: String,
    /// Timeout of one metadata, watermark or offset request. Default 10s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Extra librdkafka properties (e.g. `security.protocol`); values are never logged. Default none.
    pub client_config: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardEventsSettings {
    /// The events topic. Default `lockstep.events`.
    pub topic: String,
    /// The dashboard's consumer group id. It never commits: every start reads the
    /// topic from the beginning (events state absolute values). Default `lockstep.dashboard`.
    pub group: String,
    /// The events topic's cluster when it is not `kafka.bootstrap_servers`. Default unset.
    pub bootstrap_servers: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RefreshSettings {
    /// How often log ends, log starts and committed offsets are read from Kafka
    /// (events update them in between). Default 5s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Kafka requests in flight at once during a refresh. Default 16.
    pub concurrency: usize,
    /// Most records read from user topics per refresh to learn the age of the
    /// oldest unacked change (results are cached). Default 500.
    pub max_record_reads: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 8090)),
            admin_token: None,
            allowed_hosts: Vec::new(),
            secure_cookie: false,
            page_refresh: Duration::from_secs(5),
            table_rows: 500,
            kafka: DashboardKafkaSettings::default(),
            events: DashboardEventsSettings::default(),
            refresh: RefreshSettings::default(),
            status: StatusSettings::default(),
        }
    }
}

impl Default for DashboardKafkaSettings {
    fn default() -> Self {
        let server = KafkaSettings::default();
        Self {
            bootstrap_servers: server.bootstrap_servers,
            topic_prefix: server.topic_prefix,
            group_prefix: server.group_prefix,
            request_timeout: Duration::from_secs(10),
            client_config: BTreeMap::new(),
        }
    }
}

impl Default for DashboardEventsSettings {
    fn default() -> Self {
        Self { topic: "lockstep.events".into(), group: "lockstep.dashboard".into(), bootstrap_servers: None }
    }
}

impl Default for RefreshSettings {
    fn default() -> Self {
        Self { interval: Duration::from_secs(5), concurrency: 16, max_record_reads: 500 }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("listen_addr", &self.listen_addr)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<redacted>"))
            .field("allowed_hosts", &self.allowed_hosts)
            .field("secure_cookie", &self.secure_cookie)
            .field("page_refresh", &self.page_refresh)
            .field("table_rows", &self.table_rows)
            .field("kafka", &self.kafka)
            .field("events", &self.events)
            .field("refresh", &self.refresh)
            .field("status", &self.status)
            .finish()
    }
}

impl fmt::Debug for DashboardKafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DashboardKafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("group_prefix", &self.group_prefix)
            .field("request_timeout", &self.request_timeout)
            .field("client_config", &self.client_config.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Settings {
    /// Defaults, then `file` (if given; it must exist), then `LOCKSTEP_DASHBOARD_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let env = Env::prefixed("LOCKSTEP_DASHBOARD_")
            // Flags of the binary (clap reads these), not settings keys.
            .ignore(&["CONFIG", "LISTEN", "KAFKA_BROKERS", "LOG_JSON"])
            .split("__");
        let settings = layered(Settings::default(), file, env)?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        let fail = |message: &str| Err(SettingsError::invalid(message));
        if !self.listen_addr.ip().is_loopback() && self.admin_token.as_deref().is_none_or(|t| t.len() < 16) {
            return fail("admin_token (at least 16 characters) is required when listen_addr is not a loopback address");
        }
        let bad_host = |host: &String| {
            host.trim().is_empty()
                || host.contains(['/', ' '])
                || (host.contains(':') && host.trim_matches(['[', ']']).parse::<std::net::Ipv6Addr>().is_err())
        };
        if self.allowed_hosts.iter().any(bad_host) {
            return fail("allowed_hosts: each entry is a host name or address, without a port or scheme");
        }
        if self.refresh.interval.is_zero() || self.refresh.concurrency == 0 || self.page_refresh.is_zero() {
            return fail("refresh.interval, refresh.concurrency and page_refresh must be non-zero");
        }
        if !(0.0..=1.0).contains(&self.status.at_risk_fraction) || self.status.offsets_retention.is_zero() {
            return fail("status.at_risk_fraction must be within 0..=1 and status.offsets_retention non-zero");
        }
        if self.kafka.bootstrap_servers.trim().is_empty() || self.events.topic.trim().is_empty() {
            return fail("kafka.bootstrap_servers and events.topic must not be empty");
        }
        Ok(())
    }

    /// The server's Kafka settings these stand for (for the broker's Kafka helpers).
    pub fn server_kafka(&self) -> KafkaSettings {
        KafkaSettings {
            bootstrap_servers: self.kafka.bootstrap_servers.clone(),
            topic_prefix: self.kafka.topic_prefix.clone(),
            group_prefix: self.kafka.group_prefix.clone(),
            request_timeout: self.kafka.request_timeout,
            client_config: self.kafka.client_config.clone(),
            ..KafkaSettings::default()
        }
    }

    /// The Kafka settings of the events topic's cluster.
    pub fn events_kafka(&self) -> KafkaSettings {
        let mut kafka = self.server_kafka();
        if let Some(bootstrap) = &self.events.bootstrap_servers {
            kafka.bootstrap_servers = bootstrap.clone();
        }
        kafka
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "dashboard.toml",
                "table_rows = 10\n[status]\nstall_after = \"30s\"\n[kafka]\nbootstrap_servers = \"k:1\"\n",
            )?;
            jail.set_env("LOCKSTEP_DASHBOARD_STATUS__STALL_AFTER", "3s");
            jail.set_env("LOCKSTEP_DASHBOARD_EVENTS__TOPIC", "ev");
            let settings = Settings::load(Some(Path::new("dashboard.toml"))).expect("loads");
            assert_eq!(settings.table_rows, 10);
            assert_eq!(settings.status.stall_after, Duration::from_secs(3));
            assert_eq!(settings.events.topic, "ev");
            assert_eq!(settings.kafka.bootstrap_servers, "k:1");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("dashboard.toml", "[status]\nstal_after = \"3s\"\n")?;
            assert!(Settings::load(Some(Path::new("dashboard.toml"))).is_err());
            Ok(())
        });
    }

    #[test]
    fn a_public_address_needs_a_token_and_the_token_is_never_printed() {
        let mut settings = Settings { listen_addr: "0.0.0.0:8090".parse().unwrap(), ..Settings::default() };
        assert!(settings.validate().is_err());
        settings.admin_token = Some("short".into());
        assert!(settings.validate().is_err());
        settings.admin_token = Some("a-long-enough-admin-token".into());
        settings.validate().expect("valid with a token");
        assert!(!format!("{settings:?}").contains("a-long-enough"));
    }

    #[test]
    fn the_example_file_states_the_defaults() {
        let example = include_str!("../../../config/dashboard.example.toml");
        use figment::{
            Figment,
            providers::{Format, Toml},
        };
        let parsed: Settings = Figment::from(Toml::string(example)).extract().expect("example parses");
        assert_eq!(parsed, Settings::default());
    }
}
