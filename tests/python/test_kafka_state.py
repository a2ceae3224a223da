#!/usr/bin/env python3
"""kafka_state.py against a fake AdminClient: errors fail, they never read as "nothing".

    python3 tests/python/test_kafka_state.py

Needs no Kafka and no confluent-kafka (a stand-in module is installed first).
"""

import os
import sys
import types
import unittest


class KafkaError:
    GROUP_ID_NOT_FOUND = 69
    UNKNOWN_TOPIC_OR_PART = 3
    COORDINATOR_NOT_AVAILABLE = 15

    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def __str__(self):
        return f"KafkaError({self._code})"


class KafkaException(Exception):
    pass


def install_stand_in():
    kafka = types.ModuleType("confluent_kafka")
    kafka.KafkaError = KafkaError
    kafka.KafkaException = KafkaException
    kafka.ConsumerGroupTopicPartitions = lambda group: group
    admin = types.ModuleType("confluent_kafka.admin")
    admin.AdminClient = object
    sys.modules["confluent_kafka"] = kafka
    sys.modules["confluent_kafka.admin"] = admin


install_stand_in()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kafka_state  # noqa: E402


class Done:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


def ns(**fields):
    return types.SimpleNamespace(**fields)


class FakeAdmin:
    def __init__(self, topics=None, groups=None, group_errors=(), offsets=None):
        self.topics = topics or {}
        self.groups = groups or []
        self.group_errors = list(group_errors)
        self.offsets = offsets or {}

    def list_topics(self, timeout):
        return ns(topics=self.topics)

    def list_consumer_groups(self, request_timeout):
        return Done(ns(valid=[ns(group_id=g) for g in self.groups], errors=self.group_errors))

    def list_consumer_group_offsets(self, requests, request_timeout):
        return {group: self.offsets[group] for group in requests}


def partitions(*offsets, error=None):
    return Done(ns(topic_partitions=[ns(topic="t", partition=p, offset=o, error=error) for p, o in offsets]))


class KafkaStateTest(unittest.TestCase):
    def test_what_kafka_holds(self):
        admin = FakeAdmin(topics={"t": ns(error=None)}, groups=["g"], offsets={"g": partitions((0, 5))})
        self.assertEqual(
            kafka_state.state(admin, "t", ["g"]),
            {"topic_exists": True, "groups": {"g": {"listed": True, "offsets": {"t:0": 5}}}},
        )

    def test_a_group_kafka_does_not_know_has_no_offsets(self):
        missing = Done(error=KafkaException(KafkaError(KafkaError.GROUP_ID_NOT_FOUND)))
        admin = FakeAdmin(offsets={"g": missing})
        self.assertEqual(
            kafka_state.state(admin, "t", ["g"]),
            {"topic_exists": False, "groups": {"g": {"listed": False, "offsets": {}}}},
        )

    def test_listing_groups_that_fails_is_a_failure_not_an_empty_list(self):
        # Before: `except KafkaException: pass`, and every group read as deleted.
        admin = FakeAdmin(group_errors=[KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE)], offsets={"g": partitions()})
        with self.assertRaises(kafka_state.Failed):
            kafka_state.state(admin, "t", ["g"])

    def test_offsets_that_cannot_be_read_are_a_failure_not_an_error_key(self):
        # Before: {"error": ...}, which the test counted as "no offsets".
        broken = Done(error=KafkaException(KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE)))
        with self.assertRaises(kafka_state.Failed):
            kafka_state.state(FakeAdmin(offsets={"g": broken}), "t", ["g"])
        with self.assertRaises(kafka_state.Failed):
            bad_partition = partitions((0, -1001), error=KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE))
            kafka_state.state(FakeAdmin(offsets={"g": bad_partition}), "t", ["g"])

    def test_topic_metadata_with_an_error_is_a_failure_unless_unknown(self):
        unknown = FakeAdmin(topics={"t": ns(error=KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))})
        self.assertFalse(kafka_state.state(unknown, "t", [])["topic_exists"])
        broken = FakeAdmin(topics={"t": ns(error=KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE))})
        with self.assertRaises(kafka_state.Failed):
            kafka_state.state(broken, "t", [])


if __name__ == "__main__":
    unittest.main()
