//! Names in Kafka: one topic per user, one consumer group per device. The
//! prefixes are settings (`kafka.topic_prefix`, `kafka.group_prefix`); every
//! process that names a user's topic or a device's group asks here.

use crate::settings::KafkaSettings;

/// Name of a user's topic.
pub fn user_topic(settings: &KafkaSettings, user_id: &str) -> String {
    format!("{}{}", settings.topic_prefix, user_id)
}

/// Name of a device's consumer group.
pub fn device_group(settings: &KafkaSettings, device_id: &str) -> String {
    format!("{}{}", settings.group_prefix, device_id)
}
