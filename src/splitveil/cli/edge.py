"""`splitveil edge`: the OpenAI-compatible HTTP server of the device (head and tail here, the trunk remote)."""

from __future__ import annotations

from pathlib import Path

import typer

from splitveil.cli.common import err_console, load_model, setup, status
from splitveil.cli.generate import Wire
from splitveil.core.errors import ConfigError
from splitveil.transport.network import is_loopback


def edge(
    server: str = typer.Option(None, "--server", help="Run the trunk on this splitveil server (wss://HOST:PORT); head "
                               "and tail run here. Without --split, the server's cuts are used."),
    local: bool = typer.Option(False, "--local", help="Run the trunk in this process instead (the whole model's weights "
                               "are loaded here)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="A registered model name or a local Hugging Face "
                              "model directory; also the model id the API serves."),
    split: str = typer.Option(None, "--split", "-s", help="Cuts A,B (head|trunk|tail); default with --local: 2,28."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (beyond loopback only with --api-key-file)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0 = any free port, printed)."),
    api_key_file: Path = typer.Option(None, "--api-key-file", help="Require 'Authorization: Bearer KEY' with the key in "
                                      "this file (the OpenAI clients' api_key)."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="New tokens when a request gives no max_tokens."),
    wire: Wire = typer.Option(Wire.fp32, "--wire", help="Codec of the hidden states crossing each cut (fp32 is exact)."),
    token_file: Path = typer.Option(None, "--token-file", help="File with the trunk server's bearer token (default: the "
                                    "token file `splitveil serve` made in the splitveil cache)."),
    ca: Path = typer.Option(None, "--ca", help="Trust this certificate for --server (e.g. the server's --tls-cert)."),
    pin: str = typer.Option(None, "--pin", help="Trust exactly the --server certificate with this SHA-256 fingerprint."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a plaintext ws:// --server beyond loopback."),
    threads: int = typer.Option(1, "--threads", help="Torch threads (1 is fastest on a shared 2-core machine)."),
) -> None:
    """Serve the OpenAI chat and completions API on this device, through the split (requests are served one at a time)."""
    import socket

    from splitveil.plan.plan import SplitPlan, parse_cuts

    if bool(server) == local:
        raise ConfigError("give either --server URL (trunk on a splitveil server) or --local (trunk in this process)")
    if local and (token_file or ca or pin or insecure):
        raise ConfigError("--token-file, --ca, --pin and --insecure go with --server, not --local")
    cuts = parse_cuts(split) if split else ((2, 28) if local else None)
    if cuts is not None and len(cuts) != 2:
        raise ConfigError("the edge runs head and tail here: give a Λ-split --split A,B")
    api_key = None
    if api_key_file is not None:
        from splitveil.serve.auth import read_token

        api_key = read_token(api_key_file)
    elif not is_loopback(host):
        raise ConfigError(f"refusing to serve the API on the non-loopback address {host} without --api-key-file")
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    setup(threads)
    plan = SplitPlan.from_cuts(cuts) if cuts else None
    from splitveil.edge.generate import SplitCausalLM

    if server:
        from splitveil.serve.auth import read_token
        from splitveil.serve.build import default_token_file

        token = read_token(token_file or default_token_file())
        with status(f"connecting to {server} ..."):
            lm = SplitCausalLM.connect(server, token=token, model=model, plan=plan, ca_file=ca, pin_sha256=pin,
                                       wire=wire.value, insecure=insecure)
    else:
        hf_model, tokenizer = load_model(model)
        lm = SplitCausalLM(hf_model, plan, tokenizer=tokenizer, wire=wire.value)
    serve_api(lm, listener, model_name=Path(model).name if Path(model).is_dir() else model, api_key=api_key,
              default_max_tokens=max_tokens, threads=threads, trunk=server or "in-process")


def serve_api(lm, listener, *, model_name: str, api_key: str | None, default_max_tokens: int, threads: int,
              trunk: str) -> None:
    """Runs uvicorn on the bound `listener` until SIGINT/SIGTERM."""
    import uvicorn

    from splitveil.edge.openai import EdgeSettings, build_app

    app = build_app(lm, EdgeSettings(model_name=model_name, default_max_tokens=default_max_tokens, api_key=api_key,
                                     threads=threads))
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    typer.echo(f"splitveil edge: {model_name} split {','.join(map(str, lm.plan.cuts))}, trunk {trunk}, wire {lm.wire}")
    typer.echo(f"splitveil edge: OpenAI API on http://{shown}:{port}/v1 (requests are served one at a time)")
    err_console.print("[dim]press Ctrl-C to stop[/dim]")
    try:
        server.run(sockets=[listener])
    finally:
        app.state.engine.close()
        listener.close()
    typer.echo("splitveil edge: stopped")
