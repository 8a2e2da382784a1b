"""A delaying TCP proxy: the network between the root and one leaf, behind the
``net-delay`` fault.

Run as ``python -m searchsvc.netdelay --upstream HOST:PORT [--host H] [--port P]``.
It names itself ``qt-netdelay``, listens on ``H:P`` (port 0: any), prints
``ready PORT`` once listening and forwards every connection it accepts to
``HOST:PORT`` over an upstream connection of its own, byte for byte both ways,
for as long as either side keeps it open (so keep-alive works; it never parses
what it forwards).  It serves one command per stdin line:

* ``hold PORT MS``: the next bytes that come back on the upstream connection
  whose local port is ``PORT`` (the client port the upstream server sees) are
  held for ``MS`` milliseconds (at most :data:`MAX_HOLD_MS`) from their arrival
  before they go on, then it prints ``holding``; bytes behind them wait their
  turn.  Only that direction is ever held: the upstream server (a leaf) sends
  the command while answering, before it writes the answer, and the answer is
  what its client (the root) then waits for.  With no such connection open it
  prints ``error ...`` instead.
* anything else: print ``error ...`` and carry on.

It exits with status 0 on EOF of stdin or on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from searchsvc.server import set_process_name

PROCESS_NAME = "qt-netdelay"
MAX_HOLD_MS = 60_000
CHUNK = 1 << 16


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_hold(line: str) -> tuple[int, int] | None:
    """``(port, ms)`` of a ``hold PORT MS`` command, ms clamped to MAX_HOLD_MS; else None."""
    match line.split():
        case ["hold", port, ms] if port.isdecimal() and ms.isdecimal():
            return int(port), min(int(ms), MAX_HOLD_MS)
        case _:
            return None


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdecimal():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class Holds:
    """Open upstream connections by local port, each with the hold it has armed.

    Used only from the event loop's thread, so it needs no lock."""

    def __init__(self) -> None:
        self._armed: dict[int, int | None] = {}

    def opened(self, port: int) -> None:
        self._armed[port] = None

    def closed(self, port: int) -> None:
        self._armed.pop(port, None)

    def arm(self, port: int, ms: int) -> bool:
        if port not in self._armed:
            return False
        self._armed[port] = ms
        return True

    def take(self, port: int) -> int | None:
        ms = self._armed.get(port)
        if ms is not None:
            self._armed[port] = None
        return ms


async def pump(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    holds: Holds | None = None,
    port: int = 0,
) -> None:
    """Copy ``src`` to ``dst`` until EOF, then half-close ``dst``; with ``holds``,
    first hold each chunk as long as ``port``'s armed hold says."""
    try:
        while data := await src.read(CHUNK):
            if holds is not None and (ms := holds.take(port)) is not None:
                # This sleep is the simulated fault: the bytes are in the network.
                await asyncio.sleep(ms / 1000)
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except OSError:
        # A reset on one side resets the other, as a dead path would.
        dst.transport.abort()


class Proxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.holds = Holds()
        self._bridges: set[asyncio.Task[None]] = set()

    async def bridge(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        # Strongly held while it runs: once the client has sent EOF, nothing
        # else holds this task (a stream's protocol holds its reader weakly),
        # and a collected task would leave the upstream connection open for ever.
        task = asyncio.current_task()
        assert task is not None
        self._bridges.add(task)
        try:
            # Cancelled only at shutdown.  Returning instead keeps Python 3.11's
            # stream callback from logging the cancellation as an error.
            with contextlib.suppress(asyncio.CancelledError):
                await self._bridge(c_reader, c_writer)
        finally:
            self._bridges.discard(task)

    async def _bridge(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.transport.abort()
            return
        port = int(u_writer.get_extra_info("sockname")[1])
        # Registered before any request byte goes upstream, so before the
        # upstream server can ask for a hold on it.
        self.holds.opened(port)
        try:
            await asyncio.gather(
                pump(c_reader, u_writer), pump(u_reader, c_writer, self.holds, port)
            )
        finally:
            self.holds.closed(port)
            for writer in (c_writer, u_writer):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    def command(self, line: str) -> str:
        hold = parse_hold(line)
        if hold is None:
            return f"error: expected 'hold PORT MS', got {line.strip()!r}"
        port, ms = hold
        if not self.holds.arm(port, ms):
            return f"error: no upstream connection from port {port}"
        return "holding"


async def run(proxy: Proxy, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(proxy.bridge, host, port, backlog=128)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def control() -> None:
        # A broken pipe means the parent is gone: nobody is left to ask for holds.
        with contextlib.suppress(BrokenPipeError):
            while line := await stdin.readline():
                say(proxy.command(line.decode(errors="replace")))

    say(f"ready {server.sockets[0].getsockname()[1]}")
    commands = asyncio.create_task(control())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([commands, stopped], return_when=asyncio.FIRST_COMPLETED)
    server.close()
    # Until none is left: a connection accepted just before the close starts
    # its bridge task only after a turn of the loop.
    while others := asyncio.all_tasks() - {asyncio.current_task()}:
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    set_process_name(PROCESS_NAME)
    parser = argparse.ArgumentParser(prog="searchsvc.netdelay")
    parser.add_argument(
        "--upstream", type=parse_hostport, required=True, help="HOST:PORT to forward to"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any)")
    args = parser.parse_args(argv)
    asyncio.run(run(Proxy(args.upstream), args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
