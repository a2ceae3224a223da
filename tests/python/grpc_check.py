"""A second, independent gRPC client (Python grpcio) against a running Lockstep.

Compiles the project's .proto files with grpcio-tools, then drives the API the
way a non-Rust device would. Exits non-zero with a message on any mismatch.
Usage: grpc_check.py HOST:PORT PROTO_DIR
"""

import os
import sys
import tempfile

import grpc
from grpc_tools import protoc



def check(condition: bool, message: object) -> None:
    """Like `assert`, but also under `python -O`."""
    if not condition:
        sys.exit(f"check failed: {message}")

def main(address: str, proto_dir: str) -> None:
    out = tempfile.mkdtemp(prefix="lockstep-py-")
    protos = [os.path.join("lockstep", "v1", name) for name in ("accounts.proto", "sync.proto")]
    code = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}", *protos])
    if code != 0:
        sys.exit(f"protoc failed on {protos}")
    sys.path.insert(0, out)
    from lockstep.v1 import accounts_pb2, accounts_pb2_grpc, sync_pb2, sync_pb2_grpc  # noqa: E402

    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)

    # Standard gRPC health checking, with hand-encoded messages (no generated code).
    health = channel.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=lambda m: m, response_deserializer=lambda m: m
    )
    reply = health(b"", timeout=5)
    check(reply == b"\x08\x01", f"health: expected SERVING, got {reply!r}")

    accounts = accounts_pb2_grpc.AccountsStub(channel)
    sync = sync_pb2_grpc.SyncStub(channel)
    created = accounts.CreateAccount(accounts_pb2.CreateAccountRequest(device_name="py-phone"), timeout=10)
    phone = [("authorization", f"Bearer {created.device_token}")]
    ticket = accounts.CreatePairingTicket(accounts_pb2.CreatePairingTicketRequest(), metadata=phone, timeout=10)
    paired = accounts.RedeemPairingTicket(
        accounts_pb2.RedeemPairingTicketRequest(ticket=ticket.ticket, device_name="py-laptop"), timeout=10
    )
    check(paired.user_id == created.user_id, 'paired.user_id == created.user_id')
    laptop = [("authorization", f"Bearer {paired.device_token}")]

    changes = [
        sync_pb2.Change(
            change_id=f"py-change-{index}",
            record_id=f"py-record-{index}",
            collection="notes",
            op=sync_pb2.OP_UPSERT if index % 2 == 0 else sync_pb2.OP_DELETE,
            hlc=(1_700_000_000_000 << 16) + index,
            key_epoch=3,
            nonce=bytes(range(24)),
            ciphertext=os.urandom(100 + index),
        )
        for index in range(5)
    ]
    pushed = sync.Push(sync_pb2.PushRequest(changes=changes), metadata=phone, timeout=10)
    offsets = [result.offset for result in pushed.results]
    check(offsets == [0, 1, 2, 3, 4], f"offsets {offsets}")
    again = sync.Push(sync_pb2.PushRequest(changes=changes[:1]), metadata=phone, timeout=10)
    check(again.results[0].duplicate and again.results[0].offset == 0, again)

    stream = sync.Subscribe(sync_pb2.SubscribeRequest(), metadata=laptop, timeout=30)
    delivered = []
    for event in stream:
        if event.WhichOneof("event") == "changes":
            delivered.extend(event.changes.changes)
        if len(delivered) >= len(changes):
            break
    stream.cancel()
    check([d.offset for d in delivered] == offsets, '[d.offset for d in delivered] == offsets')
    for sent, got in zip(changes, delivered):
        check(got.change == sent, f"change at offset {got.offset} differs")
        check(got.origin_device_id == created.device_id, 'got.origin_device_id == created.device_id')

    acked = sync.Ack(sync_pb2.AckRequest(offset=4), metadata=laptop, timeout=10)
    check(acked.committed_offset == 5, acked)

    try:
        sync.Push(sync_pb2.PushRequest(changes=changes), timeout=10)
        sys.exit("a push without a token was accepted")
    except grpc.RpcError as error:
        check(error.code() == grpc.StatusCode.UNAUTHENTICATED, error)
    try:
        sync.Ack(sync_pb2.AckRequest(offset=99), metadata=laptop, timeout=10)
        sys.exit("an ack beyond the log was accepted")
    except grpc.RpcError as error:
        check(error.code() == grpc.StatusCode.OUT_OF_RANGE, error)
        check("beyond the end of the log" in error.details(), error.details())
        retryable = dict(error.trailing_metadata()).get("x-lockstep-retryable")
        check(retryable == "false", retryable)
    print("grpcio client: ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
