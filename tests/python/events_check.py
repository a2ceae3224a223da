#!/usr/bin/env python3
"""Reads Lockstep's events topic with an independent Kafka client
(`confluent-kafka`, no consumer group commits) and decodes every record with
`fastavro` from `schemas/avro/event.avsc`, checking the single-object header
against fastavro's own CRC-64-AVRO fingerprint.

Usage: events_check.py <bootstrap> <topic> <event.avsc> < forbidden.txt
forbidden.txt: one hex string per line, byte strings that must appear in no
record (ciphertexts, nonces, record ids, collection names).

Prints {"events": [{"partition","offset","user_id","node_id","kind",
"body"}...], "forbidden_found": [hex...]}.

Every event kind it reads must be one of KIND_FIELDS, with exactly those
fields: a kind or a field the schema gained is refused until it is added here
(after checking it carries no content). test_events_schema.py fails while
KIND_FIELDS lags behind the schema's body union.
"""

import datetime
import io
import json
import sys
import time

import fastavro
from confluent_kafka import Consumer, TopicPartition
from fastavro.schema import fingerprint, to_parsing_canonical_form

MAGIC = b"\xc3\x01"

# The record names of the body union in schemas/avro/event.avsc, and each one's fields.
KIND_FIELDS = {
    "LogAppended": ["log_generation", "first_offset", "log_end", "count", "origin_device_id", "first_received_at"],
    "DeviceAcked": ["device_id", "log_generation", "committed_offset"],
    "DeviceConnected": ["device_id", "lease_until", "stream_started_at"],
    "DeviceDisconnected": ["device_id"],
    "DeviceAdded": ["device_id"],
    "DeviceRevoked": ["device_id"],
    "PushTargetSet": ["device_id", "target"],
    "PushTargetRemoved": ["device_id", "reason"],
    "WakeUp": ["device_id", "log_end", "outcome", "http_status"],
}


def jsonable(value):
    if isinstance(value, tuple):  # (record name, record) with return_record_name
        return {"branch": value[0].rsplit(".", 1)[-1], "record": jsonable(value[1])}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime.datetime):
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (value - epoch) // datetime.timedelta(milliseconds=1)
    return value


def main():
    bootstrap, topic, avsc_path = sys.argv[1], sys.argv[2], sys.argv[3]
    forbidden = [bytes.fromhex(line.strip()) for line in sys.stdin if line.strip()]
    with open(avsc_path, encoding="utf-8") as f:
        schema = fastavro.parse_schema(json.load(f))
    header = MAGIC + bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))

    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        # Never joins or commits: assign() only, so the group id is a formality.
        "group.id": "lockstep-events-check",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    })
    metadata = consumer.list_topics(topic, timeout=10)
    partitions = sorted(metadata.topics[topic].partitions)
    ends = {}
    for partition in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        if high > low:
            ends[partition] = high
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    events, found, done = [], set(), set()
    deadline = time.time() + 60
    while len(done) < len(ends) and time.time() < deadline:
        message = consumer.poll(0.2)
        if message is None or message.error():
            continue
        raw = message.value()
        for needle in forbidden:
            if needle in raw:
                found.add(needle.hex())
        if raw[:10] != header:
            sys.exit(f"partition {message.partition()} offset {message.offset()}: header {raw[:10].hex()}")
        body = io.BytesIO(raw[10:])
        record = jsonable(fastavro.schemaless_reader(body, schema, None, return_record_name=True))
        if body.tell() != len(raw) - 10:
            sys.exit("trailing bytes after the datum")
        kind, fields = record["body"]["branch"], sorted(record["body"]["record"])
        if sorted(KIND_FIELDS.get(kind, [])) != fields:
            sys.exit(f"events_check.py does not know {kind} with fields {fields}: update KIND_FIELDS")
        events.append({
            "partition": message.partition(),
            "offset": message.offset(),
            "user_id": record["user_id"],
            "node_id": record["node_id"],
            "kind": record["body"]["branch"],
            "body": record["body"]["record"],
        })
        if message.offset() + 1 >= ends[message.partition()]:
            done.add(message.partition())
    consumer.close()
    if len(done) < len(ends):
        sys.exit(f"read {len(events)} events; partitions {sorted(set(ends) - done)} did not finish")
    json.dump({"events": events, "forbidden_found": sorted(found)}, sys.stdout)


if __name__ == "__main__":
    main()
