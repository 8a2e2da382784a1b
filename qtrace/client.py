"""The CLI's connection to the collector, with RPC failures turned into one-line errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from qtrace.api.v1 import services_pb2_grpc
from qtrace.errors import QtraceError

DEFAULT_COLLECTOR = "127.0.0.1:7070"


def parse_addr(addr: str, listening: bool = False) -> str:
    """HOST:PORT; port 0 (any free port) only for an address to listen on."""
    host, sep, port = addr.rpartition(":")
    low = 0 if listening else 1
    if not sep or not host or not port.isdigit() or not low <= int(port) < 65536:
        raise QtraceError(f"invalid collector address {addr!r}", "use HOST:PORT")
    return addr


@contextmanager
def control(addr: str, timeout: float = 10.0) -> Iterator[Callable[[str, Any], Any]]:
    """Yields ``call(method_name, request)``."""
    target = parse_addr(addr)
    channel = grpc.insecure_channel(target)
    stub = services_pb2_grpc.ControlServiceStub(channel)

    def call(method: str, request: Any) -> Any:
        try:
            return getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise rpc_error(e, target) from None

    try:
        yield call
    finally:
        channel.close()


def rpc_error(e: grpc.RpcError, target: str) -> QtraceError:
    code = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return QtraceError(
            f"cannot reach the collector at {target}",
            "start it with `qtrace collector run` or point --collector at it",
        )
    return QtraceError(f"collector: {e.details()}")
