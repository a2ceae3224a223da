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

/// [`base_config`] for the producer of changes (the gateway's): idempotent, acks=all,
/// `kafka.linger_ms`, no compression (ciphertext does not compress), a delivery timeout of
/// `kafka.produce_timeout`. The benchmark's raw producer (W0) is this one too, so that the
/// latency tax compares like with like.
pub fn change_producer_config(settings: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut config = base_config(settings, client_id);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", settings.linger_ms.to_string())
        .set("compression.type", "none")
        .set("message.timeout.ms", settings.produce_timeout.as_millis().to_string())
        .set("queue.buffering.max.kbytes", "65536");
    config
}

/// `fetch.queue.backoff.ms` of every Lockstep consumer. Once a consumer's local queue
/// holds `queued.min.messages` or `queued.max.messages.kbytes`, librdkafka postpones the
/// partition's next fetch by this much: 1 s by default, so a consumer reading a backlog (a
/// catch-up, a push worker starting on a full events topic) stalled up to a second each
/// time its queue filled, though the queue drains in milliseconds.
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// [`base_config`] for a consumer: [`FETCH_QUEUE_BACKOFF_MS`] unless
/// `kafka.client_config` sets `fetch.queue.backoff.ms` itself.
pub fn consumer_config(settings: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut config = base_config(settings, client_id);
    if !settings.client_config.iter().any(|(key, _)| key == "fetch.queue.backoff.ms") {
        config.set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    }
    config
}

/// `fetch.wait.max.ms` of each Lockstep consumer: how long the broker may hold
/// a fetch that finds no new data. Apache Kafka answers a waiting fetch only
/// when the wait ends or enough bytes arrived, so a short wait is how a reader
/// notices a single new record soon; each wait costs the broker one request
/// per idle reader. `fetch.wait.max.ms` in `kafka.client_config` overrides
/// every one of them (see [`fetch_wait_max_ms`]).
pub mod fetch_wait {
    use std::time::Duration;

    /// The server's follower of the events topic (push target removals a push worker
    /// decided): nobody waits on it, so it asks the broker least often.
    pub const EVENTS_FOLLOWER: Duration = Duration::from_millis(200);
    /// The server's shared catch-up readers: a device catching up waits on each fetch;
    /// a pool of a few readers keeps the request rate small. The benchmark's raw-Kafka
    /// baseline (W0) reads with the same wait.
    pub const CATCH_UP_READER: Duration = Duration::from_millis(100);
    /// The push worker's reader of the events topic: wake-ups should follow an event
    /// within a second.
    pub const PUSH_WORKER: Duration = Duration::from_millis(100);
    /// The dashboard's reader of the events topic: acks show within a second on the page.
    pub const DASHBOARD_EVENTS: Duration = Duration::from_millis(50);
    /// The dashboard's reader of lagging devices' first missing changes: one record of
    /// each user log per wave, a few short waves per refresh.
    pub const DASHBOARD_RECORDS: Duration = Duration::from_millis(20);
}

/// The `fetch.wait.max.ms` value of a consumer whose own wait is `wait` (one of
/// [`fetch_wait`]): the operator's `kafka.client_config` value when set, else `wait`.
pub fn fetch_wait_max_ms(settings: &KafkaSettings, wait: Duration) -> String {
    match settings.client_config.get("fetch.wait.max.ms") {
        Some(operator) => operator.clone(),
        None => wait.as_millis().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_overrides_the_fetch_wait() {
        let mut settings = KafkaSettings::default();
        assert_eq!(fetch_wait_max_ms(&settings, fetch_wait::CATCH_UP_READER), "100");
        settings.client_config.insert("fetch.wait.max.ms".into(), "7".into());
        assert_eq!(fetch_wait_max_ms(&settings, fetch_wait::CATCH_UP_READER), "7");
    }
}
