"""A TCP proxy on loopback that a drill can cut and heal: a network partition for one
region's PostgreSQL connections.

``cut()`` closes every proxied connection at once (both sides see the socket die,
mid-transaction or mid-query, as in a real partition) and stops listening, so new
connections are refused until ``heal()`` listens again on the same port. The event
loop runs on its own thread; the public methods are thread-safe and block until
the loop has done what they ask.

Only PostgreSQL is proxied. Kafka clients learn the broker's advertised address
from the bootstrap metadata and reconnect to it directly, so a proxy in front of
the bootstrap address would cut nothing; the partition scenario explains how it
severs a region from the broker instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from typing import Any


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        if listen_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the drill proxy listens on loopback only")
        self.target = (target_host, target_port)
        self.host = listen_host
        self.port = listen_port
        self.cut_active = False
        #: connections accepted and refused (while cut) since start
        self.accepted = 0
        self.severed = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="drill-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._streams: set[asyncio.StreamWriter] = set()

    # ---------------------------------------------------------------- public, thread-safe

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> int:
        """Sever every connection and refuse new ones; returns how many were severed."""
        return int(self._call(self._cut()))

    def heal(self) -> None:
        self._call(self._heal())

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- on the loop

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])

    async def _cut(self) -> int:
        self.cut_active = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        streams, self._streams = list(self._streams), set()
        for writer in streams:
            _abort(writer)
        self.severed += len(streams)
        return len(streams)

    async def _heal(self) -> None:
        self.cut_active = False
        if self._server is None:
            await self._listen()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_active:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        self.accepted += 1
        self._streams.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(writer)
            _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once, with a reset rather than an orderly FIN: a partition does not
    say goodbye."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
