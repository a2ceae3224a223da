//! User topics: one per user, one partition, created with the account (never
//! by auto-creation), and their watermarks.

use std::{sync::Arc, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    error::RDKafkaErrorCode,
};

use crate::settings::KafkaSettings;
use crate::{KafkaError, base_config};

/// The log's bounds: the first offset still stored and the offset the next
/// record will get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    pub log_start: i64,
    pub log_end: i64,
}

#[derive(Clone)]
pub struct Topics {
    admin: Arc<AdminClient<DefaultClientContext>>,
    metadata: Arc<BaseConsumer>,
    settings: KafkaSettings,
}

impl Topics {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let admin =
            base_config(settings, "lockstep-admin").create().map_err(KafkaError::client("admin client creation"))?;
        let metadata = base_config(settings, "lockstep-metadata")
            .set("enable.auto.commit", "false")
            .set("group.id", "lockstep.metadata")
            .create()
            .map_err(KafkaError::client("metadata client creation"))?;
        Ok(Self { admin: Arc::new(admin), metadata: Arc::new(metadata), settings: settings.clone() })
    }

    /// Waits until the cluster answers a metadata request.
    pub async fn wait_until_reachable(&self, deadline: Duration) -> Result<(), KafkaError> {
        let started = std::time::Instant::now();
        loop {
            let metadata = self.metadata.clone();
            let answer = tokio::task::spawn_blocking(move || {
                metadata.fetch_metadata(None, Duration::from_secs(2)).map(|found| found.brokers().len())
            })
            .await
            .map_err(|error| KafkaError::Task(error.to_string()))?;
            match answer {
                Ok(brokers) if brokers > 0 => return Ok(()),
                Ok(_) => tracing::info!("kafka answered without brokers, retrying"),
                Err(error) if started.elapsed() >= deadline => {
                    return Err(KafkaError::Client { operation: "metadata", source: error });
                }
                Err(error) => tracing::info!(%error, "kafka not reachable yet, retrying"),
            }
            if started.elapsed() >= deadline {
                return Err(KafkaError::Timeout("waiting for the cluster"));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Creates the topic of a new user. An existing topic of that name is an
    /// error: user ids are fresh UUIDs, so it would belong to someone else.
    pub async fn create_user_topic(&self, topic: &str) -> Result<(), KafkaError> {
        let retention = self.settings.topic_retention_ms.to_string();
        // `delete`, whatever the cluster's default: compaction would leave holes in
        // the offsets, which delivery and the devices treat as lost changes.
        let new_topic = NewTopic::new(topic, 1, TopicReplication::Fixed(self.settings.replication_factor))
            .set("retention.ms", &retention)
            .set("cleanup.policy", "delete");
        let options = AdminOptions::new()
            .request_timeout(Some(self.settings.request_timeout))
            .operation_timeout(Some(self.settings.request_timeout));
        let results =
            self.admin.create_topics([&new_topic], &options).await.map_err(KafkaError::client("create topic"))?;
        for result in results {
            if let Err((topic, code)) = result {
                return Err(KafkaError::Topic { operation: "create topic", topic, code });
            }
        }
        self.wait_until_served(topic).await;
        Ok(())
    }

    /// Waits (at most `request_timeout`) until the broker serves a topic just
    /// created: Kafka answers CreateTopics once its controller committed the
    /// topic, and its brokers' metadata follows a moment later (seconds on a
    /// busy machine). A device's first push or subscribe must not find the topic
    /// "missing" meanwhile (it would be created again and an incident logged).
    async fn wait_until_served(&self, topic: &str) {
        let deadline = std::time::Instant::now() + self.settings.request_timeout;
        loop {
            match self.watermarks(topic).await {
                Ok(_) => return,
                Err(error) if std::time::Instant::now() >= deadline => {
                    tracing::warn!(topic, %error, "a new topic is not served yet; going on");
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Creates a shared topic (the events topic) with `partitions` unless it
    /// exists, with the cluster's default retention.
    pub async fn ensure_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaError> {
        let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(self.settings.replication_factor));
        let options = AdminOptions::new()
            .request_timeout(Some(self.settings.request_timeout))
            .operation_timeout(Some(self.settings.request_timeout));
        let results =
            self.admin.create_topics([&new_topic], &options).await.map_err(KafkaError::client("create topic"))?;
        for result in results {
            match result {
                Ok(_) => tracing::info!(topic, partitions, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(KafkaError::Topic { operation: "create topic", topic, code }),
            }
        }
        Ok(())
    }

    pub async fn delete_topic(&self, topic: &str) -> Result<(), KafkaError> {
        let options = AdminOptions::new().operation_timeout(Some(self.settings.request_timeout));
        let results = self.admin.delete_topics(&[topic], &options).await.map_err(KafkaError::client("delete topic"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((topic, code)) => {
                    return Err(KafkaError::Topic { operation: "delete topic", topic, code });
                }
            }
        }
        Ok(())
    }

    pub async fn watermarks(&self, topic: &str) -> Result<Watermarks, KafkaError> {
        let metadata = self.metadata.clone();
        let owned_topic = topic.to_string();
        // Two requests at most (the second only after a failure), together
        // within `request_timeout`, so a blocking thread is never held longer.
        let timeout = self.settings.request_timeout / 2;
        let fetched = tokio::task::spawn_blocking(move || {
            let fetched = metadata.fetch_watermarks(&owned_topic, 0, timeout);

            // Tell a topic that does not exist from a broker that does not answer.
            let missing = fetched.is_err()
                && metadata.fetch_metadata(Some(&owned_topic), timeout).is_ok_and(|found| {
                    found.topics().iter().any(|found| {
                        found.name() == owned_topic
                            && (found.partitions().is_empty()
                                || found.error().is_some_and(|error| {
                                    RDKafkaErrorCode::from(error) == RDKafkaErrorCode::UnknownTopicOrPartition
                                }))
                    }) || found.topics().is_empty()
                });
            (fetched, missing)
        })
        .await
        .map_err(|error| KafkaError::Task(error.to_string()))?;
        match fetched {
            (Ok((log_start, log_end)), _) => Ok(Watermarks { log_start, log_end }),
            (Err(_), true) => Err(KafkaError::TopicMissing { topic: topic.to_string() }),
            (Err(source), false) => Err(KafkaError::Client { operation: "fetch watermarks", source }),
        }
    }

    /// The watermarks of a user's topic. A topic that vanished (deleted by an
    /// operator or a tool) is created again, empty: the account stays usable,
    /// and `log_guard` finds out what the log lost and has the devices repair it.
    pub async fn user_log_watermarks(&self, topic: &str) -> Result<Watermarks, KafkaError> {
        match self.watermarks(topic).await {
            Err(KafkaError::TopicMissing { .. }) => {
                tracing::error!(topic, "a user's topic is missing from kafka: creating it again, empty");
                match self.create_user_topic(topic).await {
                    Ok(()) | Err(KafkaError::Topic { code: RDKafkaErrorCode::TopicAlreadyExists, .. }) => {}
                    Err(error) => return Err(error),
                }
                // The new topic takes a moment to show in metadata.
                let deadline = std::time::Instant::now() + self.settings.request_timeout;
                loop {
                    match self.watermarks(topic).await {
                        Err(KafkaError::TopicMissing { .. }) | Err(KafkaError::Client { .. })
                            if std::time::Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        other => return other,
                    }
                }
            }
            other => other,
        }
    }
}
