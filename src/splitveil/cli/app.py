"""The typer application; each command lives in its own module and only calls library functions."""

from __future__ import annotations

import typer

from splitveil.cli import attack, bench, demo, edge, generate, serve, slip
from splitveil.cli import partition
# the modules that add commands to the `attack` and `bench` groups (each imports its group; nothing imports them back)
from splitveil.cli import attack_diffusion, attack_image, attack_output, attack_weights, bench_hardening  # noqa: F401
from splitveil.cli.protections import protections
from splitveil.cli.generate_image import generate_image
from splitveil.cli.link import link

app = typer.Typer(
    name="splitveil",
    help=(
        "Privacy-preserving split inference: run a real model cut across device and cloud, exactly, "
        "and measure what crosses each cut."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("generate")(generate.generate)
app.command("generate-image")(generate_image)
app.command("serve")(serve.serve)
app.command("edge")(edge.edge)
app.command("demo")(demo.demo)
app.command("protections")(protections)
app.command("link")(link)
app.add_typer(bench.app, name="bench")
app.add_typer(attack.app, name="attack")
app.add_typer(slip.app, name="slip")
app.add_typer(partition.app, name="partition")
