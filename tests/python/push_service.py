#!/usr/bin/env python3
"""A local RFC 8030 push service for Lockstep's push tests, written apart from
the worker (Python `http-ece` + `cryptography`, nothing shared with the Rust
code): it makes subscriptions (its own P-256 key pair and 16-byte auth secret
each), verifies each request's VAPID JWT (RFC 8292) with the `k=` key,
decrypts the `aes128gcm` body (RFC 8291) with the subscription's private key,
records the headers and arrival times, and answers 410, 429 (+ Retry-After),
413 or 500 when told to.

Usage: push_service.py [--port 0]; prints `PORT <n>` once listening.

Control API (JSON):
  POST /subscriptions                  -> {"id","endpoint","p256dh","auth"} (base64url)
  POST /webhooks                       -> {"id","url","pushkey"} (Matrix push gateway shape)
  POST /fail {"status":429,"count":1,"retry_after":"2","subscription":id?}
        the next `count` push requests (to that subscription, or any) get `status`
  POST /reject {"pushkey": key}        the webhook lists that pushkey as rejected
  GET  /requests                       -> every push request seen, in arrival order
  POST /push/<id>                      the push endpoint (what the worker calls)
  POST /_matrix/push/v1/notify         the webhook endpoint
"""

import argparse
import base64
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import http_ece
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

LOCK = threading.Lock()
SUBSCRIPTIONS = {}  # id -> {"private_key", "auth"}
REJECTED = set()
FAILURES = []  # [{"status", "count", "retry_after", "subscription"}]
REQUESTS = []


def b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_vapid(header, origin):
    """Returns (claims, None) or (None, error)."""
    if not header or not header.startswith("vapid "):
        return None, "no vapid authorization"
    params = {}
    for part in header[len("vapid "):].split(","):
        key, _, value = part.strip().partition("=")
        params[key] = value
    token, k = params.get("t"), params.get("k")
    if not token or not k:
        return None, "vapid without t= or k="
    try:
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64u(k))
        header_b64, claims_b64, signature_b64 = token.split(".")
        jose = json.loads(unb64u(header_b64))
        if jose.get("alg") != "ES256":
            return None, f"alg {jose.get('alg')}"
        signature = unb64u(signature_b64)
        if len(signature) != 64:
            return None, "signature is not r||s"
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        public.verify(der, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
        claims = json.loads(unb64u(claims_b64))
    except InvalidSignature:
        return None, "bad vapid signature"
    except Exception as error:  # noqa: BLE001 - any malformed token is a failure
        return None, f"malformed vapid: {error}"
    now = time.time()
    if claims.get("aud") != origin:
        return None, f"aud {claims.get('aud')!r} != {origin!r}"
    if not isinstance(claims.get("exp"), int) or not now < claims["exp"] <= now + 24 * 3600:
        return None, f"exp {claims.get('exp')} not within 24h"
    if not str(claims.get("sub", "")).startswith(("mailto:", "https:")):
        return None, f"sub {claims.get('sub')!r}"
    return claims, None


def take_failure(subscription):
    with LOCK:
        for failure in FAILURES:
            if failure["count"] > 0 and failure.get("subscription") in (None, subscription):
                failure["count"] -= 1
                return failure
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=None, headers=None):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def origin(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def do_GET(self):
        if self.path == "/requests":
            with LOCK:
                return self.answer(200, list(REQUESTS))
        self.answer(404, {"error": "no such path"})

    def do_POST(self):
        arrived = time.time()
        body = self.read_body()
        if self.path == "/subscriptions":
            key = ec.generate_private_key(ec.SECP256R1())
            auth = os.urandom(16)
            sid = b64u(os.urandom(9))
            with LOCK:
                SUBSCRIPTIONS[sid] = {"private_key": key, "auth": auth}
            public = key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            return self.answer(200, {
                "id": sid,
                "endpoint": f"{self.origin()}/push/{sid}",
                "p256dh": b64u(public),
                "auth": b64u(auth),
            })
        if self.path == "/webhooks":
            pushkey = b64u(os.urandom(9))
            return self.answer(200, {"id": pushkey, "url": f"{self.origin()}/_matrix/push/v1/notify", "pushkey": pushkey})
        if self.path == "/fail":
            failure = json.loads(body)
            with LOCK:
                FAILURES.append(failure)
            return self.answer(200, {})
        if self.path == "/reject":
            with LOCK:
                REJECTED.add(json.loads(body)["pushkey"])
            return self.answer(200, {})
        if self.path.startswith("/push/"):
            return self.push(self.path[len("/push/"):], body, arrived)
        if self.path == "/_matrix/push/v1/notify":
            return self.webhook(body, arrived)
        self.answer(404, {"error": "no such path"})

    def push(self, sid, body, arrived):
        record = {
            "subscription": sid,
            "arrived": arrived,
            "ttl": self.headers.get("TTL"),
            "urgency": self.headers.get("Urgency"),
            "topic": self.headers.get("Topic"),
            "content_encoding": self.headers.get("Content-Encoding"),
            "body_len": len(body),
            "ciphertext_b64": b64u(body),
            "payload": None,
            "error": None,
            "status": None,
        }
        with LOCK:
            subscription = SUBSCRIPTIONS.get(sid)
        claims, error = verify_vapid(self.headers.get("Authorization"), self.origin())
        if subscription is None:
            record["error"] = "unknown subscription"
            status = 404
        elif error is not None:
            record["error"] = error
            status = 401
        else:
            record["vapid_sub"] = claims.get("sub")
            if body:
                try:
                    plain = http_ece.decrypt(
                        body, private_key=subscription["private_key"], auth_secret=subscription["auth"],
                        version="aes128gcm",
                    )
                    record["payload"] = plain.decode()
                except Exception as failure:  # noqa: BLE001
                    record["error"] = f"cannot decrypt: {failure}"
            status = 400 if record["error"] else 201
        failure = take_failure(sid) if status == 201 else None
        headers = {}
        if failure is not None:
            status = failure["status"]
            if failure.get("retry_after") is not None:
                headers["Retry-After"] = str(failure["retry_after"])
        record["status"] = status
        with LOCK:
            REQUESTS.append(record)
        self.answer(status, {} if status < 300 else {"error": "told to fail"}, headers)

    def webhook(self, body, arrived):
        record = {"subscription": None, "arrived": arrived, "webhook": None, "error": None, "status": 200}
        try:
            notification = json.loads(body)
            record["webhook"] = notification
            keys = [d["pushkey"] for d in notification["notification"]["devices"]]
            record["subscription"] = keys[0]
        except Exception as failure:  # noqa: BLE001
            record["error"] = f"bad notification: {failure}"
            keys = []
        failure = take_failure(record["subscription"])
        headers = {}
        if failure is not None:
            record["status"] = failure["status"]
            if failure.get("retry_after") is not None:
                headers["Retry-After"] = str(failure["retry_after"])
        with LOCK:
            rejected = [key for key in keys if key in REJECTED]
            REQUESTS.append(record)
        self.answer(record["status"], {"rejected": rejected}, headers)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
