"""The CLI's connection to the collector, with RPC failures turned into one-line errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from qtrace.api.v1 import services_pb2_grpc
from qtrace.channel import Credentials, describe, open_channel
from qtrace.errors import QtraceError

DEFAULT_COLLECTOR = "127.0.0.1:7070"

# Set once per command from the global --tls-*/--token options (see qtrace.cli).
_credentials: Credentials | None = None


def use_credentials(creds: Credentials) -> None:
    global _credentials
    _credentials = creds


def credentials() -> Credentials:
    return _credentials if _credentials is not None else Credentials.from_env()


def parse_addr(addr: str, listening: bool = False) -> str:
    """HOST:PORT; port 0 (any free port) only for an address to listen on."""
    host, sep, port = addr.rpartition(":")
    low = 0 if listening else 1
    if not sep or not host or not port.isdigit() or not low <= int(port) < 65536:
        raise QtraceError(f"invalid collector address {addr!r}", "use HOST:PORT")
    return addr


def channel(addr: str) -> grpc.Channel:
    """A channel to the collector with this command's credentials."""
    return open_channel(parse_addr(addr), credentials())


@contextmanager
def control(addr: str, timeout: float = 10.0) -> Iterator[Callable[[str, Any], Any]]:
    """Yields ``call(method_name, request)``."""
    target = parse_addr(addr)
    ch = channel(target)
    stub = services_pb2_grpc.ControlServiceStub(ch)

    def call(method: str, request: Any) -> Any:
        try:
            return getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise rpc_error(e, target) from None

    try:
        yield call
    finally:
        ch.close()


def rpc_error(e: grpc.RpcError, target: str) -> QtraceError:
    return describe(e, target, credentials())
