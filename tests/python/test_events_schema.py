#!/usr/bin/env python3
"""The Python checkers keep up with the events schema: events_check.py's
KIND_FIELDS names every record of the body union in schemas/avro/event.avsc,
with its fields, and nothing else.

    python3 tests/python/test_events_schema.py

Needs neither Kafka nor fastavro: the schema is read as JSON and the checker's
table as Python source (events_check.py is not imported).
"""

import ast
import json
import os
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
EVENT_AVSC = os.path.join(HERE, "..", "..", "schemas", "avro", "event.avsc")
EVENTS_CHECK = os.path.join(HERE, "events_check.py")


def body_union(schema):
    """{record name: [field names]} of the body union's branches, in schema order."""
    body = next(field for field in schema["fields"] if field["name"] == "body")
    return {branch["name"]: [field["name"] for field in branch["fields"]] for branch in body["type"]}


def checker_table(path, name):
    """The literal assigned to `name` at the top level of the Python file at `path`."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} has no {name}")


def lag(schema_kinds, checker_kinds):
    """What the checker lacks or holds besides the schema, one line each."""
    problems = []
    for kind, fields in schema_kinds.items():
        if kind not in checker_kinds:
            problems.append(f"{kind}: in the schema, not in the checker")
        elif sorted(checker_kinds[kind]) != sorted(fields):
            problems.append(f"{kind}: schema fields {sorted(fields)}, checker {sorted(checker_kinds[kind])}")
    problems.extend(f"{kind}: in the checker, not in the schema" for kind in checker_kinds if kind not in schema_kinds)
    return problems


class EventsCheckFollowsTheSchema(unittest.TestCase):
    def test_events_check_knows_every_kind_and_field(self):
        with open(EVENT_AVSC, encoding="utf-8") as f:
            schema_kinds = body_union(json.load(f))
        self.assertTrue(schema_kinds, "the body union has branches")
        problems = lag(schema_kinds, checker_table(EVENTS_CHECK, "KIND_FIELDS"))
        self.assertEqual(problems, [], "tests/python/events_check.py lags behind schemas/avro/event.avsc")

    def test_lag_notices_a_new_kind_a_new_field_and_a_stale_kind(self):
        schema = {"WakeUp": ["device_id", "log_end"], "Brand": ["device_id"]}
        checker = {"WakeUp": ["device_id"], "Gone": ["device_id"]}
        self.assertEqual(
            lag(schema, checker),
            [
                "WakeUp: schema fields ['device_id', 'log_end'], checker ['device_id']",
                "Brand: in the schema, not in the checker",
                "Gone: in the checker, not in the schema",
            ],
        )
        self.assertEqual(lag(schema, {"WakeUp": ["log_end", "device_id"], "Brand": ["device_id"]}), [])


if __name__ == "__main__":
    unittest.main()
