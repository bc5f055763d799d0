"""A bare asyncio Protocol echo server on uvloop: the floor of what Python can do.

Usage: python bare_uvloop.py PORT  (listens on 127.0.0.1; SIGTERM stops it)

Falls back to the standard asyncio loop when uvloop is not installed; the first line on
stdout names the loop that runs ("loop: uvloop 0.19.0" or "loop: asyncio"), for the report.
"""

from __future__ import annotations

import asyncio
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


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        print("loop: asyncio", flush=True)
        asyncio.run(serve(port))
    else:
        print(f"loop: uvloop {metadata.version('uvloop')}", flush=True)
        # Runner + loop_factory rather than uvloop.run(), which uvloop < 0.18 lacks.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(port))


if __name__ == "__main__":
    main()
