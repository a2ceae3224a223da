#!/usr/bin/env python3
"""What an independent Kafka client (confluent-kafka's AdminClient) sees.

    python3 kafka_state.py <bootstrap> <topic> <group> [<group> ...]

Prints one JSON object: {"topic_exists": bool, "groups": {group: {"listed": bool,
"offsets": {"topic:partition": offset}}}}. A group's committed offsets are read
with list_consumer_group_offsets (no consumer joins the group).
"""

import json
import sys

try:
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException
    from confluent_kafka.admin import AdminClient
except ImportError as e:
    sys.exit(f"needs confluent-kafka ({e}): pip install confluent-kafka")


def main():
    bootstrap, topic, groups = sys.argv[1], sys.argv[2], sys.argv[3:]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = admin.list_topics(timeout=15).topics
    listed = set()
    try:
        found = admin.list_consumer_groups(request_timeout=15).result()
        listed = {g.group_id for g in found.valid}
    except KafkaException:
        pass
    state = {"topic_exists": topic in topics, "groups": {}}
    for group in groups:
        offsets = {}
        try:
            futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)], request_timeout=15)
            for tp in futures[group].result().topic_partitions:
                if tp.offset >= 0:
                    offsets[f"{tp.topic}:{tp.partition}"] = tp.offset
        except KafkaException as e:
            offsets = {"error": str(e)}
        state["groups"][group] = {"listed": group in listed, "offsets": offsets}
    json.dump(state, sys.stdout)


if __name__ == "__main__":
    main()
