#!/usr/bin/env python3
"""What an independent Kafka client (confluent-kafka's AdminClient) sees.

    python3 kafka_state.py <bootstrap> <topic> <group> [<group> ...]

Prints one JSON object: {"topic_exists": bool, "groups": {group: {"listed": bool,
"offsets": {"topic:partition": offset}}}}. A group's committed offsets are read
with list_consumer_group_offsets (no consumer joins the group).

Any error is a failure (a message on stderr, exit status 2), never an empty
answer: an empty set must mean Kafka said "nothing", not that asking failed.
The one answer that is not an error is GROUP_ID_NOT_FOUND for a group's
offsets: the group does not exist, so it has no offsets ({}).
"""

import json
import sys

try:
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
except ImportError as e:
    sys.exit(f"needs confluent-kafka ({e}): pip install confluent-kafka")


class Failed(Exception):
    """Kafka could not be asked: the state is unknown."""


def topic_exists(admin, topic):
    metadata = admin.list_topics(timeout=15)
    found = metadata.topics.get(topic)
    if found is None:
        return False
    if found.error is not None:
        if found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return False
        raise Failed(f"metadata of {topic}: {found.error}")
    return True


def listed_groups(admin):
    result = admin.list_consumer_groups(request_timeout=15).result()
    if result.errors:
        raise Failed(f"listing consumer groups: {[str(error) for error in result.errors]}")
    return {group.group_id for group in result.valid}


def group_offsets(admin, group):
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)], request_timeout=15)
    try:
        partitions = futures[group].result().topic_partitions
    except KafkaException as e:
        if e.args and e.args[0].code() == KafkaError.GROUP_ID_NOT_FOUND:
            return {}
        raise Failed(f"offsets of group {group}: {e}") from e
    offsets = {}
    for tp in partitions or []:
        if tp.error is not None:
            raise Failed(f"offset of group {group} on {tp.topic}:{tp.partition}: {tp.error}")
        if tp.offset >= 0:
            offsets[f"{tp.topic}:{tp.partition}"] = tp.offset
    return offsets


def state(admin, topic, groups):
    listed = listed_groups(admin)
    result = {"topic_exists": topic_exists(admin, topic), "groups": {}}
    for group in groups:
        result["groups"][group] = {"listed": group in listed, "offsets": group_offsets(admin, group)}
    return result


def main():
    bootstrap, topic, groups = sys.argv[1], sys.argv[2], sys.argv[3:]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        answer = state(admin, topic, groups)
    except (Failed, KafkaException) as e:
        print(f"kafka_state.py: {e}", file=sys.stderr)
        sys.exit(2)
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
