"""`splitveil link`: the link emulator between a client and a server (delay, jitter, bandwidth, resets)."""

from __future__ import annotations

import typer

from splitveil.cli.common import err_console


def link(
    listen: str = typer.Option(..., "--listen", help="HOST:PORT this proxy listens on (clients connect here; port 0 = "
                               "any free port, printed)."),
    to: str = typer.Option(..., "--to", help="HOST:PORT of the server every connection is forwarded to."),
    rtt: float = typer.Option(0.0, "--rtt", min=0, help="Round-trip time to add, in milliseconds (half each way)."),
    jitter: float = typer.Option(0.0, "--jitter", min=0, help="Each chunk's one-way delay varies uniformly by up to "
                                 "this many milliseconds (order is kept, as TCP keeps it); at most half the RTT."),
    bw: float = typer.Option(None, "--bw", help="Bandwidth of each direction in Mbit/s (default: unlimited)."),
    reset_after: int = typer.Option(None, "--reset-after", help="Reset a connection (RST to both sides) once it has "
                                    "carried this many bytes, both directions together."),
    resets: int = typer.Option(1, "--resets", min=0, help="With --reset-after: how many connections are reset in all "
                               "(later ones, e.g. a client's reconnection, are left alone)."),
    seed: int = typer.Option(None, "--seed", help="Seed of the jitter draws (default: random)."),
) -> None:
    """Emulate a network link between a client and a server on this machine (a user-space TCP proxy).

    Example: `splitveil link --listen 127.0.0.1:9001 --to 127.0.0.1:9000 --rtt 80 --bw 50`, then point the client at
    port 9001. Runs until interrupted (Ctrl-C or SIGTERM)."""
    import asyncio
    import signal

    from splitveil.transport.link import Link, LinkSpec, parse_address

    spec = LinkSpec(rtt_ms=rtt, jitter_ms=jitter, bandwidth_mbit=bw, reset_after=reset_after, resets=resets, seed=seed)
    emulator = Link(spec, parse_address(to, "--to"), listen=parse_address(listen, "--listen"))

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, emulator.stop)

        def ready(running: Link) -> None:
            err_console.print(f"link: {running.listen[0]}:{running.port} -> {to}: {spec.describe()}", highlight=False)

        await emulator.serve_forever(ready)

    asyncio.run(main())
