//! How every Lockstep process configures its librdkafka clients, and the one
//! place where consumers' fetch waits are tuned.

use std::time::Duration;

use rdkafka::ClientConfig;

use crate::settings::KafkaSettings;

/// The base librdkafka configuration every Lockstep client starts from.
pub fn base_config(settings: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("client.id", client_id)
        .set("socket.keepalive.enable", "true");
    for (key, value) in &settings.client_config {
        config.set(key, value);
    }
    config
}

/// `fetch.wait.max.ms` of each Lockstep consumer: how long the broker may hold
/// a fetch that finds no new data. Shorter waits notice new records sooner on
/// a broker that does not answer a waiting fetch as soon as data arrives (Apache
/// Kafka does not), and cost the broker one request per wait for each idle
/// partition. `kafka.client_config` (`fetch.wait.max.ms`) overrides every one
/// of them; see [`set_fetch_wait`].
pub mod fetch_wait {
    use std::time::Duration;

    /// The server's follower of the events topic (push target removals): nobody waits
    /// on it, so it asks the broker least often.
    pub const EVENTS_FOLLOWER: Duration = Duration::from_millis(200);
    /// The server's shared catch-up readers: a device catching up waits on each
    /// fetch, and a pool of a few readers keeps the request rate small.
    pub const CATCH_UP_READER: Duration = Duration::from_millis(100);
    /// The push worker's reader of the events topic: a wake-up is worth sending within a
    /// fraction of a second of the change, no sooner.
    pub const PUSH_WORKER: Duration = Duration::from_millis(100);
    /// The dashboard's reader of the events topic: acks show within a second on the page.
    pub const DASHBOARD_EVENTS: Duration = Duration::from_millis(50);
    /// The dashboard's reader of single records (a lagging device's first missing change):
    /// one short read per device per refresh, so a refresh waits at most this per device.
    pub const DASHBOARD_RECORDS: Duration = Duration::from_millis(20);
}

/// Sets `fetch.wait.max.ms` to `wait` (one of [`fetch_wait`]) unless the operator set it
/// in `kafka.client_config`.
pub fn set_fetch_wait<'a>(
    config: &'a mut ClientConfig,
    settings: &KafkaSettings,
    wait: Duration,
) -> &'a mut ClientConfig {
    if !settings.client_config.contains_key("fetch.wait.max.ms") {
        config.set("fetch.wait.max.ms", wait.as_millis().to_string());
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_overrides_the_fetch_wait() {
        let mut settings = KafkaSettings::default();
        let mut config = base_config(&settings, "test");
        set_fetch_wait(&mut config, &settings, fetch_wait::CATCH_UP_READER);
        assert_eq!(config.get("fetch.wait.max.ms"), Some("100"));
        settings.client_config.insert("fetch.wait.max.ms".into(), "7".into());
        let mut config = base_config(&settings, "test");
        set_fetch_wait(&mut config, &settings, fetch_wait::CATCH_UP_READER);
        assert_eq!(config.get("fetch.wait.max.ms"), Some("7"));
    }
}
