#!/usr/bin/env python3
"""Independent cross-check of the events wire format with fastavro.

Run by tests/fastavro.rs:  python3 fastavro_events.py <event.avsc> <workdir> [<event.v1.avsc>]

For every rust_<n>.bin in <workdir> (single-object encoded events written by
the Rust crate) it checks the header against fastavro's own fingerprint,
decodes the body, encodes the decoded record again with fastavro and checks
the bytes are identical. Prints {"fingerprint": hex, "decoded": {file: {...}}}
with the union branch names fastavro resolved. Given the superseded schema
<event.v1.avsc> too, it also reads every file with that schema as the reader
(Avro resolution: "decoded_v1"), and writes py_v1_connected.bin, a
DeviceConnected as a writer of the old schema encodes it (its own fingerprint).
"""

import datetime
import io
import json
import os
import sys

try:
    import fastavro
    from fastavro.schema import fingerprint, to_parsing_canonical_form
except ImportError as e:
    sys.exit(f"fastavro is not available ({e}); install it with: pip install fastavro")

MAGIC = b"\xc3\x01"


def jsonable(value):
    if isinstance(value, tuple):  # (record name, record) with return_record_name
        return {"branch": value[0], "record": jsonable(value[1])}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime.datetime):
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (value - epoch) // datetime.timedelta(milliseconds=1)
    return value


def main():
    avsc_path, workdir = sys.argv[1], sys.argv[2]
    with open(avsc_path, encoding="utf-8") as f:
        schema = fastavro.parse_schema(json.load(f))
    fp_hex = fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
    decoded = {}
    for name in sorted(n for n in os.listdir(workdir) if n.startswith("rust_")):
        with open(os.path.join(workdir, name), "rb") as f:
            data = f.read()
        if data[:2] != MAGIC or data[2:10].hex() != fp_hex:
            sys.exit(f"{name}: header {data[:10].hex()}, fastavro expects c301{fp_hex}")
        body = io.BytesIO(data[10:])
        record = fastavro.schemaless_reader(body, schema, None, return_record_name=True)
        if body.tell() != len(data) - 10:
            sys.exit(f"{name}: trailing bytes after the datum")
        again = io.BytesIO()
        fastavro.schemaless_writer(again, schema, record)
        if again.getvalue() != data[10:]:
            sys.exit(f"{name}: fastavro re-encodes the record to different bytes")
        decoded[name] = jsonable(record)
    report = {"fingerprint": fp_hex, "decoded": decoded}
    if len(sys.argv) > 3:
        with open(sys.argv[3], encoding="utf-8") as f:
            previous = fastavro.parse_schema(json.load(f))
        report["decoded_v1"] = {}
        for name in decoded:
            with open(os.path.join(workdir, name), "rb") as f:
                body = io.BytesIO(f.read()[10:])
            record = fastavro.schemaless_reader(body, schema, previous, return_record_name=True)
            report["decoded_v1"][name] = jsonable(record)
        old = {
            "user_id": "user-1",
            "node_id": "node-old",
            "at": 1_732_470_000_999,
            "body": ("lockstep.events.v1.DeviceConnected", {"device_id": "phone", "lease_until": 1_732_470_090_000}),
        }
        out = io.BytesIO()
        fastavro.schemaless_writer(out, previous, old)
        previous_fp = fingerprint(to_parsing_canonical_form(previous), "CRC-64-AVRO")
        with open(os.path.join(workdir, "py_v1_connected.bin"), "wb") as f:
            f.write(MAGIC + bytes.fromhex(previous_fp) + out.getvalue())
        report["previous_fingerprint"] = previous_fp
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
