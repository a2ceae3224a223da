"""gRPC reflection as Python's grpcio-reflection sees it: it speaks only v1alpha
(grpc.reflection.v1alpha.ServerReflection), as do older grpcurl and several GUI clients.

Lists the services through reflection and resolves a method of each Lockstep
service from the descriptors the server sends. Exits non-zero with a message
on any mismatch.
Usage: reflection_check.py HOST:PORT
"""

import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def check(condition: bool, message: object) -> None:
    """Like `assert`, but also under `python -O`."""
    if not condition:
        sys.exit(f"check failed: {message}")


def main(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        try:
            services = set(database.get_services())
        except grpc.RpcError as error:
            sys.exit(f"v1alpha reflection refused: {error.code()} {error.details()}")
        for expected in ("lockstep.v1.Sync", "lockstep.v1.Accounts", "lockstep.v1.Keys", "lockstep.v1.PushTargets"):
            check(expected in services, f"{expected} not listed: {sorted(services)}")
        pool = DescriptorPool(database)
        push = pool.FindMethodByName("lockstep.v1.Sync.Push")
        check(push.input_type.full_name == "lockstep.v1.PushRequest", push.input_type.full_name)
        create = pool.FindMethodByName("lockstep.v1.Accounts.CreateAccount")
        check(create.output_type.full_name == "lockstep.v1.CreateAccountResponse", create.output_type.full_name)
    print(f"v1alpha reflection: ok ({len(services)} services)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
