"""A bare asyncio Protocol echo server on uvloop: the floor of what Python can do.

Usage: python bare_uvloop.py PORT [PROCESSES]  (listens on 127.0.0.1; SIGTERM stops it, and
bench/run.py kills the other processes left in its process group)

With PROCESSES > 1 (the bench's workers scenario), that many processes, forked before any
loop exists, each serve on a socket of their own bound with SO_REUSEPORT: the kernel spreads
the connections over them, as N independent servers would share a port.

Falls back to the standard asyncio loop when uvloop is not installed; the first line on
stdout names the loop that runs ("loop: uvloop 0.19.0" or "loop: asyncio"), for the report.
"""

from __future__ import annotations

import asyncio
import os
import sys
from importlib import metadata
from typing import cast


class Echo(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not derive from asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(port: int, reuse_port: bool = False) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        Echo, "127.0.0.1", port, reuse_address=True, reuse_port=reuse_port or None
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1])
    processes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    try:
        import uvloop
    except ImportError:
        uvloop = None
    loop_name = f"uvloop {metadata.version('uvloop')}" if uvloop is not None else "asyncio"
    print(f"loop: {loop_name}", flush=True)
    for _ in range(processes - 1):
        if os.fork() == 0:
            break  # a child serves; the parent forks the next, then serves too
    reuse_port = processes > 1
    if uvloop is None:
        asyncio.run(serve(port, reuse_port))
        return
    # Runner + loop_factory rather than uvloop.run(), which uvloop < 0.18 lacks.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(port, reuse_port))


if __name__ == "__main__":
    main()
