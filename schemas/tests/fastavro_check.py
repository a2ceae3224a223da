#!/usr/bin/env python3
"""Independent cross-check of lockstep-schemas' wire format with fastavro.

Run by tests/fastavro.rs:  python3 fastavro_check.py <change_envelope.avsc> <workdir>

<workdir> holds
  rust_<n>.bin         single-object encoded envelopes written by the Rust crate;
  python_inputs.json   envelopes (JSON, bytes as hex) for fastavro to encode.
This script
  - checks each rust_<n>.bin starts with C3 01 + fastavro's own CRC-64-AVRO
    fingerprint of the schema's Parsing Canonical Form, decodes the body with
    fastavro.schemaless_reader and reports the fields;
  - writes py_<i>.bin for every input: C3 01 + fingerprint + schemaless_writer
    body;
  - prints one JSON object on stdout:
    {"fingerprint": hex, "canonical_form": str, "decoded": {file: envelope}}.
Exits non-zero with a message on stderr on any mismatch.
"""

import datetime
import io
import json
import os
import sys

try:
    import fastavro
    from fastavro.schema import fingerprint, to_parsing_canonical_form
except ImportError as e:  # the Rust test shows this message
    sys.exit(f"fastavro is not available ({e}); install it with: pip install fastavro")

MAGIC = b"\xc3\x01"
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def fail(msg):
    sys.exit(f"fastavro_check: {msg}")


def to_millis(value):
    # fastavro turns timestamp-millis into an aware datetime; undo it exactly.
    if isinstance(value, datetime.datetime):
        return (value - EPOCH) // datetime.timedelta(milliseconds=1)
    return value


def to_json(record):
    out = dict(record)
    out["received_at"] = to_millis(record["received_at"])
    out["nonce"] = record["nonce"].hex()
    out["ciphertext"] = record["ciphertext"].hex()
    return out


def from_json(envelope):
    record = dict(envelope)
    record["nonce"] = bytes.fromhex(envelope["nonce"])
    record["ciphertext"] = bytes.fromhex(envelope["ciphertext"])
    return record


def main():
    if len(sys.argv) != 3:
        fail("usage: fastavro_check.py <schema.avsc> <workdir>")
    avsc_path, workdir = sys.argv[1], sys.argv[2]
    with open(avsc_path, encoding="utf-8") as f:
        schema = fastavro.parse_schema(json.load(f))
    canonical_form = to_parsing_canonical_form(schema)
    fp_hex = fingerprint(canonical_form, "CRC-64-AVRO")  # little-endian hex
    header = MAGIC + bytes.fromhex(fp_hex)

    decoded = {}
    names = sorted(n for n in os.listdir(workdir) if n.startswith("rust_") and n.endswith(".bin"))
    if not names:
        fail(f"no rust_*.bin files in {workdir}")
    for name in names:
        with open(os.path.join(workdir, name), "rb") as f:
            data = f.read()
        if data[:2] != MAGIC:
            fail(f"{name}: magic is {data[:2].hex()}, expected c301")
        if data[2:10] != header[2:]:
            fail(f"{name}: fingerprint is {data[2:10].hex()}, fastavro computes {fp_hex}")
        body = io.BytesIO(data[10:])
        record = fastavro.schemaless_reader(body, schema, None)
        if body.tell() != len(data) - 10:
            fail(f"{name}: {len(data) - 10 - body.tell()} trailing byte(s) after the datum")
        decoded[name] = to_json(record)

    with open(os.path.join(workdir, "python_inputs.json"), encoding="utf-8") as f:
        inputs = json.load(f)
    for i, envelope in enumerate(inputs):
        body = io.BytesIO()
        fastavro.schemaless_writer(body, schema, from_json(envelope))
        with open(os.path.join(workdir, f"py_{i}.bin"), "wb") as f:
            f.write(header + body.getvalue())

    json.dump(
        {"fingerprint": fp_hex, "canonical_form": canonical_form, "decoded": decoded},
        sys.stdout,
    )


if __name__ == "__main__":
    main()
