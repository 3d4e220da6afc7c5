"""Entry point: runs the typer app and turns user errors into one line on stderr and exit status 2."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # every thread torch starts gets one OpenMP thread (--threads raises it)
    import typer

    try:  # typer >= 0.29 vendors click; its exceptions live there
        from typer._click import exceptions as click
    except ImportError:  # pragma: no cover - older typer on plain click
        import click

    from splitveil.cli.app import app
    from splitveil.core.errors import SplitveilError

    command = typer.main.get_command(app)
    try:
        result = command.main(args=optional_values(sys.argv[1:] if argv is None else list(argv)), prog_name="splitveil", standalone_mode=False)
    except click.NoArgsIsHelpError as error:
        print(error.format_message(), file=sys.stderr)
        return 2
    except click.UsageError as error:
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
        print(f"splitveil: error: {' '.join(error.format_message().split())}{hint}", file=sys.stderr)
        return 2
    except click.ClickException as error:
        print(f"splitveil: error: {' '.join(error.format_message().split())}", file=sys.stderr)
        return error.exit_code
    except SplitveilError as error:
        print(f"splitveil: error: {error.message}", file=sys.stderr)
        return error.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("splitveil: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


OPTIONAL_VALUES = {"--attest": "local"}  # options whose value may be left out, and what they then mean


def optional_values(args: list[str]) -> list[str]:
    """`--attest` alone (followed by another option or nothing) means `--attest local`; click has no optional
    values, so the argument list is completed before it parses it."""
    completed = []
    for index, arg in enumerate(args):
        if arg == "--":
            return completed + args[index:]
        following = args[index + 1] if index + 1 < len(args) else None
        if arg in OPTIONAL_VALUES and (following is None or following.startswith("-")):
            completed.append(f"{arg}={OPTIONAL_VALUES[arg]}")
        else:
            completed.append(arg)
    return completed


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
