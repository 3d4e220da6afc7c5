"""`splitveil edge`: the OpenAI-compatible HTTP server of the device (head and tail here, the trunk remote)."""

from __future__ import annotations

from pathlib import Path

import typer

from splitveil.cli.common import (
    attest_key_option,
    attest_option,
    check_precision,
    connect_server,
    device_option,
    dtype_option,
    err_console,
    load_model,
    setup,
)
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
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0 = any free port, printed)."),
    api_key_file: Path = typer.Option(None, "--api-key-file", help="Take the API key from this file; when it does not "
                                      "exist yet, write a new random key to it (mode 0600). Without it, a new random "
                                      "key is printed at start. Requests send it as 'Authorization: Bearer KEY' (the "
                                      "OpenAI clients' api_key)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve without an API key (loopback addresses only): any "
                                 "process on this machine can then use the API."),
    allow_host: list[str] = typer.Option(None, "--allow-host", help="Also serve requests whose Host header is this "
                                         "name (NAME for any port, or NAME:PORT), e.g. the name of a proxy in front; "
                                         "repeatable. Served without it: the bound address and localhost, with the "
                                         "port (and any IP address when listening on all interfaces)."),
    max_request_bytes: int = typer.Option(None, "--max-request-bytes", min=1024, help="Largest request body (default "
                                          "1 MiB); larger ones get 413 and are read no further."),
    max_pending: int = typer.Option(None, "--max-pending", min=1, help="Requests waiting or running at once (default "
                                    "32; --concurrency of them generate at once, the rest wait); more get 429."),
    body_timeout: float = typer.Option(None, "--body-timeout", min=0.1, help="Seconds a client may take to send a "
                                       "request body (default 30); slower ones get 408."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="New tokens when a request gives no max_tokens."),
    wire: Wire = typer.Option(Wire.fp32, "--wire", help="Codec of the hidden states crossing each cut (fp32 is exact)."),
    token_file: Path = typer.Option(None, "--token-file", help="File with the trunk server's bearer token (default: the "
                                    "token file `splitveil serve` made in the splitveil cache)."),
    ca: Path = typer.Option(None, "--ca", help="Trust this certificate for --server (e.g. the server's --tls-cert)."),
    pin: str = typer.Option(None, "--pin", help="Trust exactly the --server certificate with this SHA-256 fingerprint."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a plaintext ws:// --server beyond loopback."),
    attest: str = attest_option(),
    attest_key: Path = attest_key_option(),
    concurrency: int = typer.Option(8, "--concurrency", min=1, max=256, help="Requests generating at once, each with "
                                    "its own trunk session and connection (opened when first needed); later requests "
                                    "wait for a free one. The trunk server batches their decode steps."),
    speculate: str = typer.Option("off", "--speculate", help="Speculative decoding for every request: prompt-lookup "
                                  "(copies from the prompt), self (head and tail with the trunk skipped) or off; "
                                  "greedy output unchanged, sampled output keeps its distribution."),
    draft_tokens: int = typer.Option(3, "--draft-tokens", min=1, max=64, help="With --speculate: the most tokens one "
                                     "pass verifies."),
    draft_policy: str = typer.Option("adaptive", "--draft-policy", help="With --speculate: adaptive (as many drafts "
                                     "as pay, measured) or fixed (every draft found, up to --draft-tokens)."),
    threads: int = typer.Option(1, "--threads", help="Torch threads (1 is fastest on a shared 2-core machine)."),
    device: str = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Serve the OpenAI chat and completions API on this device, through the split (--concurrency requests at once,
    each with its own trunk session; the trunk server batches their decode steps).

    Requests need the API key (printed at start, or in --api-key-file) and a Host header naming this edge."""
    import ipaddress
    import socket

    from splitveil.edge.openai import EdgeSettings
    from splitveil.edge.openai.guard import host_entry
    from splitveil.plan.plan import SplitPlan, parse_cuts

    check_precision(device, dtype)
    if bool(server) == local:
        raise ConfigError("give either --server URL (trunk on a splitveil server) or --local (trunk in this process)")
    if local and (token_file or ca or pin or insecure or attest or attest_key):
        raise ConfigError("--token-file, --ca, --pin, --insecure and --attest go with --server, not --local")
    if attest_key is not None and attest is None:
        raise ConfigError("--attest-key goes with --attest")
    cuts = parse_cuts(split) if split else ((2, 28) if local else None)
    if cuts is not None and len(cuts) != 2:
        raise ConfigError("the edge runs head and tail here: give a Λ-split --split A,B")
    if no_auth and api_key_file is not None:
        raise ConfigError("give --no-auth or --api-key-file, not both")
    if no_auth and not is_loopback(host):
        raise ConfigError(f"refusing --no-auth on the non-loopback address {host}: anyone who reaches it could use the "
                          "API (drop --no-auth: a key is made and printed)")
    from splitveil.edge.generate import GenerationConfig

    GenerationConfig(speculate=speculate, draft_tokens=draft_tokens, draft_policy=draft_policy)  # an unknown drafter: one line, nothing started
    allowed_extra = tuple(_allow_host_entry(name) for name in allow_host or ())
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    api_key, key_line = (None, None) if no_auth else api_key_for(api_key_file)
    setup(threads)
    plan = SplitPlan.from_cuts(cuts) if cuts else None
    from splitveil.edge.generate import SplitCausalLM

    if server:
        lm = connect_server(server, model=model, plan=plan, token_file=token_file, ca=ca, pin=pin, wire=wire.value,
                            insecure=insecure, attest=attest, attest_key=attest_key, dtype=dtype, device=device)
    else:
        hf_model, tokenizer = load_model(model, dtype=dtype, device=device)
        lm = SplitCausalLM(hf_model, plan, tokenizer=tokenizer, wire=wire.value)
    if speculate != "off":
        lm.check_speculation()
    bound, bound_port = listener.getsockname()[:2]
    limits = {name: value for name, value in (("max_request_bytes", max_request_bytes), ("max_pending", max_pending),
                                              ("body_timeout", body_timeout)) if value is not None}  # else EdgeSettings' defaults
    settings = EdgeSettings(
        model_name=Path(model).name if Path(model).is_dir() else model, default_max_tokens=max_tokens,
        api_key=api_key, threads=threads, concurrency=concurrency, speculate=speculate,
        draft_tokens=draft_tokens, draft_policy=draft_policy, **limits,
        allowed_hosts=(host_entry(bound, bound_port), host_entry("localhost", bound_port), *allowed_extra),
        any_ip_host=ipaddress.ip_address(bound).is_unspecified)
    serve_api(lm, listener, settings, trunk=server or "in-process", key_line=key_line)


def api_key_for(api_key_file: Path | None) -> tuple[str, str]:
    """The API key and the start-up line that tells the user where it is: read from `api_key_file`, or new and random
    (written to `api_key_file`, mode 0600, when that does not exist yet; else printed, as Jupyter prints its token)."""
    import os

    from splitveil.serve.auth import new_token, read_token

    if api_key_file is None:
        key = new_token()
        return key, f"splitveil edge: API key: {key} (send 'Authorization: Bearer KEY'; the OpenAI clients' api_key)"
    if api_key_file.exists():
        return read_token(api_key_file), f"splitveil edge: API key from {api_key_file}"
    key = new_token()
    try:
        api_key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(api_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made meanwhile by someone else: use theirs
        return read_token(api_key_file), f"splitveil edge: API key from {api_key_file}"
    except OSError as error:
        raise ConfigError(f"cannot write the API key file {api_key_file}: {error.strerror or error}") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key, f"splitveil edge: new API key written to {api_key_file} (mode 0600)"


def _allow_host_entry(name: str) -> str:
    from splitveil.edge.openai.guard import host_entry, parse_host

    parsed = parse_host(name)
    if parsed is None:
        raise ConfigError(f"bad --allow-host {name!r}: give a host name or address, optionally with :PORT")
    return host_entry(*parsed)


def serve_api(lm, listener, settings, *, trunk: str, key_line: str | None) -> None:
    """Runs uvicorn on the bound `listener` until SIGINT/SIGTERM."""
    import uvicorn

    from splitveil.edge.openai import build_app

    app = build_app(lm, settings)
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    listener.listen(config.backlog)  # connections wait in the backlog from the "OpenAI API on" line until uvicorn runs
    typer.echo(f"splitveil edge: {settings.model_name} split {','.join(map(str, lm.plan.cuts))}, trunk {trunk}, "
               f"wire {lm.wire}")
    typer.echo(key_line or "splitveil edge: WARNING no API key (--no-auth): any process on this machine can use it")
    typer.echo(f"splitveil edge: OpenAI API on http://{shown}:{port}/v1 ({settings.concurrency} requests at once)")
    err_console.print("[dim]press Ctrl-C to stop[/dim]")
    try:
        server.run(sockets=[listener])
    finally:
        app.state.engine.close()
        listener.close()
    typer.echo("splitveil edge: stopped")
