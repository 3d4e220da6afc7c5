"""Echo servers for measuring protocol overhead: our TLS WebSocket service with a part that computes nothing,
and a raw asyncio TCP echo of the same bytes. Run as `python -m splitveil.experiments.echo_servers KIND ...`."""

from __future__ import annotations

import asyncio
import struct
import sys

from splitveil.models.splittable import Part


class EchoPart(Part):
    """A part that returns its input: the service's overhead with no compute."""

    start, end = 1, 2

    def forward(self, x):
        return x

    def clone(self) -> "EchoPart":
        return self


def serve_ours(port: int, cert: str, key: str, token: str, hidden: int) -> None:
    from splitveil.serve.server import SplitServer
    from splitveil.serve.service import PartService
    from splitveil.transport.tls import server_context

    service = PartService({1: EchoPart()}, hidden_size=hidden, info={"cuts": [1, 2]})
    server = SplitServer(service, token=token, ssl_context=server_context(cert, key), port=port)
    asyncio.run(server.serve(ready=lambda _: print("listening", flush=True)))


def serve_tcp(port: int) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = struct.unpack("<I", await reader.readexactly(4))
                writer.write(struct.pack("<I", length) + await reader.readexactly(length))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", port)
        print("listening", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    if sys.argv[1] == "ours":
        serve_ours(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        serve_tcp(int(sys.argv[2]))
