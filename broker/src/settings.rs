//! Typed settings: defaults, then a TOML file, then `LOCKSTEP_*` environment
//! variables (nested keys joined by `__`, e.g. `LOCKSTEP_LIMITS__MAX_CHANGES_PER_PUSH=100`),
//! then command-line flags. Every field's doc comment states its default.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use figment::providers::Env;
pub use lockstep_kafka::settings::{KafkaSettings, SettingsError};
use lockstep_kafka::settings::{layered, optional_addr};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address the gRPC server listens on. Default `127.0.0.1:50051`; port 0 picks a free port.
    pub listen_addr: SocketAddr,
    /// Directory for the accounts database (`lockstep.db`). Default `./data`.
    pub data_dir: PathBuf,
    /// Admin HTTP listener: Prometheus `/metrics`, `/healthz`, `/readyz`. Keep it private.
    /// Default `127.0.0.1:50052`; port 0 picks a free port; unset (`""` in env) turns it off.
    #[serde(deserialize_with = "optional_addr")]
    pub admin_listen_addr: Option<SocketAddr>,
    pub tls: TlsSettings,
    pub kafka: KafkaSettings,
    pub limits: LimitsSettings,
    pub delivery: DeliverySettings,
    pub accounts: AccountsSettings,
    pub events: EventsSettings,
    pub push: PushSettings,
    pub rate_limits: RateLimitSettings,
    pub web: WebSettings,
    pub database: DatabaseSettings,
}

/// Where the accounts (users, devices, tokens, pairing tickets, invites, push targets, keys)
/// live. Unset: SQLite in `data_dir` (one node). A PostgreSQL URL: shared by every node that
/// names it, with the push dedup index and its reservations (see `store`, `gateway::reservation`).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:5432/database` (env `LOCKSTEP_DATABASE__URL`). Default
    /// unset (SQLite in `data_dir`). The server refuses to start when it cannot connect.
    pub url: Option<String>,
    /// Connections the server keeps to PostgreSQL at most for its statements. Default 8.
    pub max_connections: usize,
    /// With `url` set: connections kept apart for the per-device locks that order acks across
    /// nodes (each is held while an ack reads and commits the device's offset in Kafka), so that
    /// a burst of acks never leaves pushes waiting for a connection. Default 4.
    pub lock_connections: usize,
    /// With `url` set: how long a node's reservation of a change it is producing holds before
    /// another node may take it over (re-reading the user's topic first). Must exceed
    /// `kafka.produce_timeout` + `kafka.in_doubt_window`, the longest a produce may still land
    /// (`gateway::reservation`). Default 60s.
    #[serde(with = "humantime_serde")]
    pub push_reservation_lease: Duration,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self { url: None, max_connections: 8, lock_connections: 4, push_reservation_lease: Duration::from_secs(60) }
    }
}

/// `url` with its password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((credentials, host)) = rest.rsplit_once('@') else { return url.to_owned() };
    match credentials.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// The URL's password is a secret: never printed.
impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("max_connections", &self.max_connections)
            .field("lock_connections", &self.lock_connections)
            .field("push_reservation_lease", &self.push_reservation_lease)
            .finish()
    }
}

/// TLS of the gRPC listener. Off unless both files are set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain (leaf first). Default unset (plaintext).
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the certificate. Default unset.
    pub key_file: Option<PathBuf>,
    /// How often the files are checked for changes (a changed file is loaded for new
    /// connections; SIGHUP reloads at once). Default 30s.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
    /// Listen beyond loopback without TLS (e.g. behind a reverse proxy that terminates TLS);
    /// without it such a server refuses to start. Default false.
    pub allow_plaintext: bool,
}

impl TlsSettings {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self { cert_file: None, key_file: None, watch_interval: Duration::from_secs(30), allow_plaintext: false }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    /// Most changes in one Push. Default 500.
    pub max_changes_per_push: u32,
    /// Largest ciphertext of one change. Default 256 KiB.
    pub max_ciphertext_bytes: u32,
    /// Largest gRPC request message. Default 8 MiB.
    pub max_request_bytes: u32,
    /// Concurrent HTTP/2 streams per connection. Default 64.
    pub max_streams_per_connection: u32,
    /// Live Subscribe streams the server holds at once. Default 20,000.
    pub max_subscriptions: u32,
    /// Live Subscribe streams of one user's devices at once (a device's newer stream ends its
    /// older one). Default 100.
    pub max_subscriptions_per_user: u32,
    /// Open client connections (TLS handshakes included); a connection past it is closed as
    /// soon as it is accepted. Default 10,000.
    pub max_connections: u32,
    /// Calls in handlers at once over all connections (a stream counts until it started);
    /// more are shed with RESOURCE_EXHAUSTED. Default 1,024.
    pub max_concurrent_requests: u32,
    /// Calls in handlers at once on one connection; more wait. Default 32.
    pub max_concurrent_requests_per_connection: u32,
    /// Calls in handlers at once of one device, over all its connections; more are shed with
    /// RESOURCE_EXHAUSTED, so that one device (or one stolen token) cannot take the server's
    /// `max_concurrent_requests` from everyone else. Default 32.
    pub max_concurrent_requests_per_device: u32,
    /// Bytes of Push bodies held at once (counted as they arrive, given back when the push
    /// is answered); past it pushes are shed with RESOURCE_EXHAUSTED. At least
    /// `max_request_bytes`. Default 128 MiB.
    pub max_inflight_push_bytes: u64,
    /// The longest a call may take, its body upload included (a stream: until it started);
    /// then UNAVAILABLE. More than `kafka.produce_timeout` + `kafka.operation_deadline`.
    /// Default 30s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// What a shed call's `x-lockstep-retry-after-ms` asks the client to wait. Default 1s.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Per-device and per-user state of this node (cached committed offsets, push order,
    /// log marks, recent revocations) unused this long is forgotten; it is read again from
    /// Kafka or the database when needed. Default 10m.
    #[serde(with = "humantime_serde")]
    pub idle_state_after: Duration,
    /// From SIGTERM to exit: streams end at once, open calls get most of it, the producer's
    /// and the events' flush the rest. Default 10s.
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
}

impl LimitsSettings {
    /// The server's cap on one encoded response message (Subscribe batches stay
    /// below it: `delivery.batch_max_bytes`).
    pub fn max_response_bytes(&self) -> usize {
        self.max_request_bytes as usize * 2
    }
}

/// Bytes a change adds to a message besides its ciphertext: ids, clocks,
/// nonce and framing are bounded by validation (ids ≤ 128 chars, nonce ≤ 32 bytes).
pub const CHANGE_OVERHEAD_BYTES: usize = 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// Interval of heartbeats on idle streams. Default 15s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Kafka readers shared by all catching-up devices. Default 4.
    pub catchup_readers: usize,
    /// Recent changes kept in memory per user with live subscribers. Default 1,024.
    pub live_cache_changes: usize,
    /// Bytes of ciphertext kept in memory per user with live subscribers. Default 4 MiB.
    pub live_cache_bytes: usize,
    /// Bytes kept in memory by every user's cache together: over it, the user
    /// adding a change gives up its oldest cached changes (its devices then read
    /// them from Kafka). Default 256 MiB.
    pub live_cache_total_bytes: usize,
    /// Most changes in one message to a device. Default 256.
    pub batch_max_changes: usize,
    /// Most encoded bytes in one message to a device (advertised in GetServerInfo); a single
    /// change of the largest legal size always fits; lowered to 2 × `limits.max_request_bytes` − 64 KiB
    /// when that is smaller. Default 4 MiB.
    pub batch_max_bytes: usize,
    /// Messages buffered per device stream before the server waits for the device. Default 4.
    pub stream_buffer: usize,
    /// How long a stream waits for its device to take the next message; then the stream ends
    /// UNAVAILABLE (retryable) and its slot is free. Default 30s.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
}

#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AccountsSettings {
    /// Whether CreateAccount is possible at all. Default true.
    pub allow_registration: bool,
    /// When set, CreateAccount needs this value in `x-lockstep-registration-secret`; an empty
    /// value is refused. Default unset.
    pub registration_secret: Option<String>,
    /// CreateAccount without the secret on a server that listens beyond loopback (anyone who
    /// reaches it can then create accounts, each with a Kafka topic). Default false: without a
    /// secret, only a server listening on loopback takes new accounts.
    pub allow_open_registration: bool,
    /// CreateAccount only with an invite code (`lockstep invite create`), whatever the listen
    /// address: for a server on loopback behind a reverse proxy. Not together with
    /// `registration_secret` or `allow_open_registration`. Default false.
    pub invite_only: bool,
    /// Lifetime of a pairing ticket. Default 10 minutes.
    #[serde(with = "humantime_serde")]
    pub pairing_ticket_ttl: Duration,
    /// Devices (not revoked) one account may have; pairing one more is refused. Default 50.
    pub max_devices_per_account: u32,
    /// How long a node trusts a device token it checked against the accounts database before it
    /// checks it again: the bound on how long a node that missed a DeviceRevoked event (several
    /// nodes on one PostgreSQL) still accepts the revoked token. Default 30 seconds.
    #[serde(with = "humantime_serde")]
    pub token_recheck_interval: Duration,
}

/// What CreateAccount needs on a server, as GetServerInfo advertises it. A valid invite code
/// is enough in every mode but `Closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationMode {
    /// Anyone who reaches the server.
    Open,
    /// The registration secret (or an invite code).
    Secret,
    /// An invite code.
    Invite,
    /// No new accounts at all.
    Closed,
}

impl AccountsSettings {
    /// Whether CreateAccount may proceed without a registration secret on a server
    /// listening on `listen_addr`.
    pub fn open_registration(&self, listen_addr: SocketAddr) -> bool {
        self.allow_open_registration || listen_addr.ip().is_loopback()
    }

    /// What CreateAccount needs on a server listening on `listen_addr`.
    pub fn registration_mode(&self, listen_addr: SocketAddr) -> RegistrationMode {
        if !self.allow_registration {
            RegistrationMode::Closed
        } else if self.invite_only {
            RegistrationMode::Invite
        } else if self.registration_secret.is_some() {
            RegistrationMode::Secret
        } else if self.open_registration(listen_addr) {
            RegistrationMode::Open
        } else {
            // Beyond loopback, anyone could create accounts (and Kafka topics): only if the
            // operator said so.
            RegistrationMode::Invite
        }
    }
}

/// A token bucket: `burst` calls at once, refilled at `per_hour` calls an hour.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub burst: u32,
    pub per_hour: u32,
}

/// Rate limits of the calls an attacker would repeat; a call past its limit is shed with
/// RESOURCE_EXHAUSTED and `x-lockstep-retry-after-ms`. Behind a reverse proxy every device
/// shares the proxy's address: raise the per-address limits there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// CreateAccount per peer IP address. Default burst 5, 20 an hour.
    pub create_account_per_address: Rate,
    /// CreateAccount on the whole server (each one creates a Kafka topic). Default burst 50, 500 an hour.
    pub create_account_total: Rate,
    /// CreatePairingTicket per account. Default burst 10, 60 an hour.
    pub pairing_ticket_per_account: Rate,
    /// RedeemPairingTicket per peer IP address (each one is a guess). Default burst 10, 60 an hour.
    pub redeem_per_address: Rate,
    /// Push per account. Default burst 1,000, 3,600,000 an hour (1,000 a second).
    pub push_per_account: Rate,
    /// CreateAccount refused for a bad invite code or registration secret, per peer address
    /// (each one is a guess); these never take from `create_account_total`, which only
    /// admitted calls use. Default burst 10, 60 an hour.
    pub failed_registration_per_address: Rate,
    /// Calls that cost database or Kafka work per account: SetPushTarget, GetPushTarget,
    /// RemovePushTarget, every Keys call and ListDevices (one Kafka lookup per device).
    /// Default burst 200, 18,000 an hour (5 a second).
    pub database_calls_per_account: Rate,
    /// Database lookups of tokens this node does not know, per peer address. Only with a
    /// shared database (`database.url`): a token paired through another node is looked up
    /// once, then cached, but every made-up token would cost a query. Default burst 100,
    /// 6,000 an hour (100 a minute).
    pub unknown_token_lookups_per_address: Rate,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            create_account_per_address: Rate { burst: 5, per_hour: 20 },
            create_account_total: Rate { burst: 50, per_hour: 500 },
            pairing_ticket_per_account: Rate { burst: 10, per_hour: 60 },
            redeem_per_address: Rate { burst: 10, per_hour: 60 },
            push_per_account: Rate { burst: 1000, per_hour: 3_600_000 },
            failed_registration_per_address: Rate { burst: 10, per_hour: 60 },
            database_calls_per_account: Rate { burst: 200, per_hour: 18_000 },
            unknown_token_lookups_per_address: Rate { burst: 100, per_hour: 6_000 },
        }
    }
}

impl fmt::Debug for AccountsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountsSettings")
            .field("allow_registration", &self.allow_registration)
            .field("registration_secret", &self.registration_secret.as_ref().map(|_| "<hidden>"))
            .field("allow_open_registration", &self.allow_open_registration)
            .field("invite_only", &self.invite_only)
            .field("pairing_ticket_ttl", &self.pairing_ticket_ttl)
            .field("max_devices_per_account", &self.max_devices_per_account)
            .field("token_recheck_interval", &self.token_recheck_interval)
            .finish()
    }
}

/// The metadata-only events topic (see `events/`): what push workers, the
/// dashboard and other nodes consume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventsSettings {
    /// Whether the server publishes events. Default true.
    pub enabled: bool,
    /// The events topic, created at start when missing. Default `lockstep.events`.
    pub topic: String,
    /// Partitions of the events topic when Lockstep creates it (key = user id). Default 16.
    pub partitions: i32,
    /// How often a node renews the `DeviceConnected` lease of each live stream; a lease
    /// runs for three intervals, so a crashed node's devices stop counting as connected
    /// after at most that long. Default 30s.
    #[serde(with = "humantime_serde")]
    pub lease_interval: Duration,
    /// Most distinct pending facts (per user log, per device ack/presence/target) held while
    /// the events topic is unreachable; newer facts about the same thing replace older ones,
    /// so this bounds memory by the fleet's size, not by traffic. Default 1,000,000.
    pub max_pending: usize,
    /// This server's id in events. Default: a random id kept in `<data_dir>/node_id`.
    pub node_id: Option<String>,
    /// Kafka cluster of the events topic, when it is not `kafka.bootstrap_servers` (same
    /// `kafka.client_config`). Default unset: the same cluster.
    pub bootstrap_servers: Option<String>,
}

/// Wake-ups (the push worker reads targets from the events topic).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PushSettings {
    /// The push worker's VAPID public key (base64url, uncompressed P-256 point), advertised in
    /// GetServerInfo so that browsers can subscribe (`lockstep-push vapid-public-key` prints it).
    /// Default unset.
    pub vapid_public_key: Option<String>,
    /// Networks push targets may name although they are inside a network (loopback,
    /// RFC 1918, ULA, link-local, CGNAT, …), e.g. `["127.0.0.1"]` for a local push
    /// service in tests, or a push gateway run inside your network on purpose. Every
    /// other such address is refused by SetPushTarget (INVALID_ARGUMENT). The push worker
    /// has its own list (`http.allow_private_targets`) and checks again. Default empty.
    pub allow_private_targets: Vec<String>,
}

/// Browsers: the gRPC port also serves gRPC-Web (HTTP/1.1 or HTTP/2, `application/grpc-web`
/// and `application/grpc-web-text`), behind the same authentication, limits and error mapping.
/// Pages from another origin may call it only when their origin is listed (CORS).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebSettings {
    /// Origins (`scheme://host[:port]`, no path) whose pages may call the server from a
    /// browser, e.g. `["https://app.example"]`; a preflight from any other origin is refused
    /// (403, no CORS headers). Default empty: closed to every other origin.
    pub allowed_origins: Vec<String>,
    /// How long a browser may keep a preflight's answer. Default 10m.
    #[serde(with = "humantime_serde")]
    pub preflight_max_age: Duration,
}

impl Default for WebSettings {
    fn default() -> Self {
        Self { allowed_origins: Vec::new(), preflight_max_age: Duration::from_secs(600) }
    }
}

impl WebSettings {
    /// Why `origin` cannot be listed in `web.allowed_origins`, if it cannot.
    fn origin_problem(origin: &str) -> Option<&'static str> {
        let Some(rest) = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://")) else {
            return Some("must start with https:// or http://");
        };
        if rest.is_empty() || rest.contains(['/', '?', '#', '*', '@']) || rest.chars().any(|c| c.is_whitespace()) {
            return Some("must be scheme://host[:port], without a path, a wildcard or credentials");
        }
        if http::HeaderValue::from_str(origin).is_err() {
            return Some("is not a valid header value");
        }
        None
    }
}

impl Default for EventsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            topic: "lockstep.events".into(),
            partitions: 16,
            lease_interval: Duration::from_secs(30),
            max_pending: 1_000_000,
            node_id: None,
            bootstrap_servers: None,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("data"),
            admin_listen_addr: Some(SocketAddr::from(([127, 0, 0, 1], 50052))),
            tls: TlsSettings::default(),
            kafka: KafkaSettings::default(),
            limits: LimitsSettings::default(),
            delivery: DeliverySettings::default(),
            accounts: AccountsSettings::default(),
            events: EventsSettings::default(),
            push: PushSettings::default(),
            rate_limits: RateLimitSettings::default(),
            web: WebSettings::default(),
            database: DatabaseSettings::default(),
        }
    }
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            max_changes_per_push: 500,
            max_ciphertext_bytes: 256 * 1024,
            max_request_bytes: 8 * 1024 * 1024,
            max_streams_per_connection: 64,
            max_subscriptions: 20_000,
            max_subscriptions_per_user: 100,
            max_connections: 10_000,
            max_concurrent_requests: 1024,
            max_concurrent_requests_per_connection: 32,
            max_concurrent_requests_per_device: 32,
            max_inflight_push_bytes: 128 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(1),
            idle_state_after: Duration::from_secs(600),
            drain_deadline: Duration::from_secs(10),
        }
    }
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(15),
            catchup_readers: 4,
            live_cache_changes: 1024,
            live_cache_bytes: 4 * 1024 * 1024,
            live_cache_total_bytes: 256 * 1024 * 1024,
            batch_max_changes: 256,
            batch_max_bytes: 4 * 1024 * 1024,
            stream_buffer: 4,
            send_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for AccountsSettings {
    fn default() -> Self {
        Self {
            allow_registration: true,
            registration_secret: None,
            allow_open_registration: false,
            invite_only: false,
            pairing_ticket_ttl: Duration::from_secs(600),
            max_devices_per_account: 50,
            token_recheck_interval: Duration::from_secs(30),
        }
    }
}

impl Settings {
    /// Defaults, then `file` (if given; it must exist), then `LOCKSTEP_*` variables.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, SettingsError> {
        let env = Env::prefixed("LOCKSTEP_")
            // Flags of the binary (clap reads these), not settings keys.
            .ignore(&["KAFKA_BROKERS", "CONFIG", "LISTEN", "LOG_JSON", "LOG"])
            // The test kit's own variables (`LOCKSTEP_TEST_DATABASE`, `LOCKSTEP_TEST_POSTGRES_BIN`…),
            // set for whole test runs, are not settings keys either.
            .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("test_"))
            .split("__");
        let mut settings = layered(Settings::default(), file, env)?;
        // Messages to devices stay under the server's own encoding cap, also
        // when a small `limits.max_request_bytes` lowers it.
        let cap = settings.limits.max_response_bytes().saturating_sub(64 * 1024);
        settings.delivery.batch_max_bytes = settings.delivery.batch_max_bytes.min(cap);
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let fail = |message: &str| Err(SettingsError::invalid(message));
        if let Some(url) = &self.database.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return fail("database.url must be a postgres:// or postgresql:// URL (unset: SQLite in data_dir)");
            }
        }
        if self.database.max_connections == 0 {
            return fail("database.max_connections must be at least 1");
        }
        if self.database.lock_connections == 0 {
            return fail("database.lock_connections must be at least 1");
        }
        if self.database.url.is_some()
            && self.database.push_reservation_lease <= self.kafka.produce_timeout + self.kafka.in_doubt_window
        {
            return fail(
                "database.push_reservation_lease must exceed kafka.produce_timeout + kafka.in_doubt_window (a produce \
                 may land until then; another node taking the reservation over earlier could append it twice)",
            );
        }
        if self.limits.max_changes_per_push == 0 {
            return fail("limits.max_changes_per_push must be at least 1");
        }
        if let Err(error) = lockstep_schemas::target_policy::TargetPolicy::allowing(&self.push.allow_private_targets) {
            return fail(&format!("push.allow_private_targets: {error}"));
        }
        if self.limits.max_ciphertext_bytes == 0 || self.limits.max_ciphertext_bytes >= self.limits.max_request_bytes {
            return fail("limits.max_ciphertext_bytes must be between 1 and limits.max_request_bytes");
        }
        if self.delivery.catchup_readers == 0 || self.delivery.batch_max_changes == 0 {
            return fail("delivery.catchup_readers and delivery.batch_max_changes must be at least 1");
        }
        if self.delivery.stream_buffer == 0
            || self.delivery.heartbeat_interval.is_zero()
            || self.delivery.send_timeout.is_zero()
            || self.limits.max_subscriptions_per_user == 0
            || self.limits.idle_state_after.is_zero()
            || self.limits.drain_deadline.is_zero()
        {
            return fail(
                "delivery.stream_buffer, delivery.heartbeat_interval, delivery.send_timeout, \
                 limits.max_subscriptions_per_user, limits.idle_state_after and limits.drain_deadline must be \
                 non-zero",
            );
        }
        // The largest change, framed, must fit in one message (under the server's own
        // encoding cap, see `load`).
        let largest_change = self.limits.max_ciphertext_bytes as usize + CHANGE_OVERHEAD_BYTES;
        if self.delivery.batch_max_bytes < largest_change {
            return fail(
                "delivery.batch_max_bytes (at most 2 × limits.max_request_bytes − 64 KiB) must hold one change of \
                 limits.max_ciphertext_bytes",
            );
        }
        if self.kafka.operation_deadline.is_zero() || self.kafka.produce_timeout.is_zero() {
            return fail("kafka.operation_deadline and kafka.produce_timeout must be non-zero");
        }
        if self.kafka.in_doubt_window < self.kafka.produce_timeout {
            return fail("kafka.in_doubt_window must be at least kafka.produce_timeout");
        }
        if self.events.topic.trim().is_empty() || self.events.partitions < 1 || self.events.max_pending == 0 {
            return fail("events.topic must not be empty; events.partitions and events.max_pending must be at least 1");
        }
        if self.events.lease_interval < Duration::from_secs(1) {
            return fail("events.lease_interval must be at least 1s");
        }
        let limits = &self.limits;
        if limits.max_connections == 0 {
            return fail("limits.max_connections must be at least 1");
        }
        if limits.max_concurrent_requests == 0
            || limits.max_concurrent_requests_per_connection == 0
            || limits.max_concurrent_requests_per_device == 0
        {
            return fail(
                "limits.max_concurrent_requests, limits.max_concurrent_requests_per_connection and \
                 limits.max_concurrent_requests_per_device must be at least 1",
            );
        }
        if limits.max_inflight_push_bytes < u64::from(limits.max_request_bytes)
            || limits.max_inflight_push_bytes > u64::from(u32::MAX)
        {
            return fail("limits.max_inflight_push_bytes must be between limits.max_request_bytes and 4 GiB");
        }
        if limits.request_timeout <= self.kafka.produce_timeout + self.kafka.operation_deadline {
            return fail("limits.request_timeout must be longer than kafka.produce_timeout + kafka.operation_deadline");
        }
        let rates = &self.rate_limits;
        for (name, rate) in [
            ("create_account_per_address", rates.create_account_per_address),
            ("create_account_total", rates.create_account_total),
            ("pairing_ticket_per_account", rates.pairing_ticket_per_account),
            ("redeem_per_address", rates.redeem_per_address),
            ("push_per_account", rates.push_per_account),
            ("failed_registration_per_address", rates.failed_registration_per_address),
            ("database_calls_per_account", rates.database_calls_per_account),
            ("unknown_token_lookups_per_address", rates.unknown_token_lookups_per_address),
        ] {
            if rate.burst == 0 {
                return fail(&format!("rate_limits.{name}.burst must be at least 1"));
            }
        }
        if self.accounts.invite_only
            && (self.accounts.registration_secret.is_some() || self.accounts.allow_open_registration)
        {
            return fail(
                "accounts.invite_only excludes accounts.registration_secret and accounts.allow_open_registration",
            );
        }
        if self.accounts.registration_secret.as_deref().is_some_and(|secret| secret.trim().is_empty()) {
            // An empty header would match it: leave the secret unset instead.
            return fail("accounts.registration_secret must not be empty (leave it unset for no secret)");
        }
        for origin in &self.web.allowed_origins {
            if let Some(problem) = WebSettings::origin_problem(origin) {
                return fail(&format!("web.allowed_origins: {origin:?} {problem}"));
            }
        }
        if self.accounts.token_recheck_interval.is_zero() {
            return fail("accounts.token_recheck_interval must be more than zero");
        }
        if self.accounts.max_devices_per_account == 0 {
            return fail("accounts.max_devices_per_account must be at least 1");
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return fail("tls.cert_file and tls.key_file must be set together");
        }
        if self.tls.watch_interval.is_zero() {
            return fail("tls.watch_interval must be non-zero");
        }
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return fail("kafka.bootstrap_servers must not be empty");
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
            jail.create_file("lockstep.toml", "listen_addr = \"0.0.0.0:7000\"\n[limits]\nmax_changes_per_push = 10\n")?;
            jail.set_env("LOCKSTEP_LIMITS__MAX_CHANGES_PER_PUSH", "20");
            jail.set_env("LOCKSTEP_DELIVERY__HEARTBEAT_INTERVAL", "3s");
            // Variables read by the binary's flags are not settings keys.
            jail.set_env("LOCKSTEP_LISTEN", "127.0.0.1:0");
            jail.set_env("LOCKSTEP_KAFKA_BROKERS", "kafka:9092");
            jail.set_env("LOCKSTEP_LOG_JSON", "true");
            // Nor are the test kit's.
            jail.set_env("LOCKSTEP_TEST_DATABASE", "postgres");
            jail.set_env("LOCKSTEP_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin");
            let settings = Settings::load(Some(std::path::Path::new("lockstep.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(settings.listen_addr.port(), 7000);
            assert_eq!(settings.limits.max_changes_per_push, 20);
            assert_eq!(settings.delivery.heartbeat_interval, Duration::from_secs(3));
            assert_eq!(settings.limits.max_ciphertext_bytes, 256 * 1024);
            Ok(())
        });
    }

    #[test]
    fn missing_file_and_bad_values_are_errors() {
        figment::Jail::expect_with(|jail| {
            assert!(Settings::load(Some(std::path::Path::new("nope.toml"))).is_err());
            jail.set_env("LOCKSTEP_LIMITS__MAX_CHANGES_PER_PUSH", "0");
            let error = Settings::load(None).unwrap_err().to_string();
            assert!(error.contains("max_changes_per_push"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn private_push_targets_are_allowed_only_by_a_list_of_networks() {
        figment::Jail::expect_with(|jail| {
            assert!(Settings::load(None).map_err(|e| e.to_string())?.push.allow_private_targets.is_empty());
            jail.set_env("LOCKSTEP_PUSH__ALLOW_PRIVATE_TARGETS", r#"["127.0.0.1", "::1/128"]"#);
            let settings = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(settings.push.allow_private_targets, ["127.0.0.1", "::1/128"]);
            jail.set_env("LOCKSTEP_PUSH__ALLOW_PRIVATE_TARGETS", r#"["everything"]"#);
            let error = Settings::load(None).unwrap_err().to_string();
            assert!(error.contains("push.allow_private_targets"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn the_example_config_lists_the_defaults() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/lockstep.example.toml");
        figment::Jail::expect_with(|_jail| {
            let settings = Settings::load(Some(std::path::Path::new(example))).map_err(|e| e.to_string())?;
            assert_eq!(settings, Settings::default());
            Ok(())
        });
    }

    #[test]
    fn without_a_secret_only_loopback_or_an_explicit_choice_opens_registration() {
        let mut accounts = AccountsSettings::default();
        assert!(accounts.open_registration("127.0.0.1:50051".parse().unwrap()));
        assert!(accounts.open_registration("[::1]:50051".parse().unwrap()));
        assert!(!accounts.open_registration("0.0.0.0:50051".parse().unwrap()));
        assert!(!accounts.open_registration("192.0.2.7:50051".parse().unwrap()));
        accounts.allow_open_registration = true;
        assert!(accounts.open_registration("0.0.0.0:50051".parse().unwrap()));
    }

    #[test]
    fn the_registration_mode_follows_the_settings() {
        let (loopback, public) = ("127.0.0.1:50051".parse().unwrap(), "0.0.0.0:50051".parse().unwrap());
        let mut accounts = AccountsSettings::default();
        assert_eq!(accounts.registration_mode(loopback), RegistrationMode::Open);
        assert_eq!(accounts.registration_mode(public), RegistrationMode::Invite);
        accounts.allow_open_registration = true;
        assert_eq!(accounts.registration_mode(public), RegistrationMode::Open);
        accounts.registration_secret = Some("s3cret".into());
        assert_eq!(accounts.registration_mode(loopback), RegistrationMode::Secret);
        assert_eq!(accounts.registration_mode(public), RegistrationMode::Secret);
        let invite_only = AccountsSettings { invite_only: true, ..AccountsSettings::default() };
        assert_eq!(invite_only.registration_mode(loopback), RegistrationMode::Invite);
        let closed = AccountsSettings { allow_registration: false, invite_only: true, ..AccountsSettings::default() };
        assert_eq!(closed.registration_mode(loopback), RegistrationMode::Closed);
    }

    #[test]
    fn invite_only_round_trips_and_excludes_the_other_ways_in() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("lockstep.toml", "[accounts]\ninvite_only = true\n")?;
            let file = std::path::Path::new("lockstep.toml");
            let settings = Settings::load(Some(file)).map_err(|e| e.to_string())?;
            assert!(settings.accounts.invite_only);
            jail.set_env("LOCKSTEP_ACCOUNTS__REGISTRATION_SECRET", "s3cret");
            let error = Settings::load(Some(file)).unwrap_err().to_string();
            assert!(error.contains("invite_only"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn an_empty_registration_secret_is_refused() {
        figment::Jail::expect_with(|jail| {
            for empty in ["", "  "] {
                jail.set_env("LOCKSTEP_ACCOUNTS__REGISTRATION_SECRET", empty);
                let error = Settings::load(None).unwrap_err().to_string();
                assert!(error.contains("accounts.registration_secret"), "{empty:?}: {error}");
            }
            jail.set_env("LOCKSTEP_ACCOUNTS__REGISTRATION_SECRET", "s3cret");
            let settings = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(settings.accounts.registration_secret.as_deref(), Some("s3cret"));
            Ok(())
        });
    }

    #[test]
    fn new_limits_load_and_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LOCKSTEP_LIMITS__MAX_CONNECTIONS", "2");
            jail.set_env("LOCKSTEP_TLS__ALLOW_PLAINTEXT", "true");
            jail.set_env("LOCKSTEP_RATE_LIMITS__DATABASE_CALLS_PER_ACCOUNT", "{burst=3,per_hour=4}");
            let settings = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(settings.limits.max_connections, 2);
            assert!(settings.tls.allow_plaintext);
            assert_eq!(settings.rate_limits.database_calls_per_account, Rate { burst: 3, per_hour: 4 });
            jail.set_env("LOCKSTEP_LIMITS__MAX_CONNECTIONS", "0");
            let error = Settings::load(None).unwrap_err().to_string();
            assert!(error.contains("limits.max_connections"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn web_origins_load_from_file_and_env_and_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("lockstep.toml", "[web]\nallowed_origins = [\"https://app.example\"]\n")?;
            let settings = Settings::load(Some("lockstep.toml".as_ref())).map_err(|e| e.to_string())?;
            assert_eq!(settings.web.allowed_origins, ["https://app.example"]);
            jail.set_env("LOCKSTEP_WEB__ALLOWED_ORIGINS", "[\"http://localhost:8080\"]");
            jail.set_env("LOCKSTEP_WEB__PREFLIGHT_MAX_AGE", "1m");
            let settings = Settings::load(Some("lockstep.toml".as_ref())).map_err(|e| e.to_string())?;
            assert_eq!(settings.web.allowed_origins, ["http://localhost:8080"]);
            assert_eq!(settings.web.preflight_max_age, Duration::from_secs(60));
            for bad in ["*", "app.example", "https://app.example/", "https://*.example", "https://a b"] {
                jail.set_env("LOCKSTEP_WEB__ALLOWED_ORIGINS", format!("[{bad:?}]"));
                let error = Settings::load(None).unwrap_err().to_string();
                assert!(error.contains("web.allowed_origins"), "{bad}: {error}");
            }
            Ok(())
        });
    }

    #[test]
    fn secrets_are_hidden_from_debug() {
        let mut settings = Settings::default();
        settings.accounts.registration_secret = Some("hunter2".into());
        settings.kafka.client_config.insert("sasl.password".into(), "hunter3".into());
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("hunter3"), "{shown}");
    }
}
