"""`splitveil protections`: every protection splitveil ships, from the one registry of deployments."""

from __future__ import annotations

import typer

from splitveil.core.errors import ConfigError


def protections(
    modality: str = typer.Option(None, "--modality", help="Only this modality: text, image, output or weights."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object {\"protections\": [...]}: per "
                                     "protection its name, modality, summary, what it protects, its parties (name, "
                                     "placement, what it holds, the trust it assumes), its trust assumptions and its "
                                     "adaptive attacker."),
) -> None:
    """Every registered protection: who runs what, what each party holds and whom it trusts, and the attacker that
    knows it (the command that measures it)."""
    from splitveil.cli.common import print_json
    from splitveil.protect.deployment import DEPLOYMENTS, MODALITIES

    if modality is not None and modality not in MODALITIES:
        raise ConfigError(f"unknown --modality {modality!r}; use one of {', '.join(MODALITIES)}")
    described = [cls.listing() for cls in DEPLOYMENTS.all(modality)]
    if json_output:
        print_json({"protections": described})
        return
    for entry in described:
        typer.echo(f"{entry['modality']:<8} {entry['name']}: {entry['summary']}")
        typer.echo(f"         protects: {entry['protects']}")
        for party in entry["parties"]:
            typer.echo(f"         - {party['name']} ({party['placement']}): holds {party['holds']}; {party['trust']}")
        for assumption in entry["assumptions"]:
            typer.echo(f"         assumes: {assumption}")
        typer.echo(f"         attacker: {entry['attacker']['command']} ({', '.join(entry['attacker']['attacks'])})")
