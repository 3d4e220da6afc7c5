"""`splitveil slip`: SLIP's masked, decomposed linear layers across a trusted and an untrusted process."""

from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path

import typer

from splitveil.cli.common import err_console, print_json, setup, status
from splitveil.core.errors import ConfigError
from splitveil.models.precision import torch_device
from splitveil.serve.worker import READY_FD_HELP, ready_writer
from splitveil.wire.frame import MAX_FRAME_BYTES

RING_DEVICE_HELP = ("Where the products run: cpu (default), cuda, cuda:N or auto. They stay exact ring arithmetic "
                    "(int64 values split into float64 limbs) on any device, so there is no --dtype here.")

app = typer.Typer(help="SLIP: each linear layer split into a small secret part and a residual computed elsewhere on "
                       "one-time-masked inputs (protects the weights, or the prompt).", no_args_is_help=True)


class Protect(str, Enum):
    weights = "weights"
    prompt = "prompt"


class Mode(str, Enum):
    fixed = "fixed"
    float = "float"


def resolve_config(model_config, *, protect: Protect, rank: int | None, energy: float | None, split: str | None,
                   fixed_point: bool, repetitions: int, soundness_bits: int = 40, pad_to: int = 1,
                   mask_rank: int = 0):
    """The SlipConfig a command line asks for (bad combinations are ConfigErrors: exit 2, one line)."""
    from splitveil.protect.slip.cost import default_rank
    from splitveil.protect.slip.trusted import SlipConfig

    layers_total = model_config.num_hidden_layers
    if rank is not None and energy is not None:
        raise ConfigError("give --rank or --energy, not both")
    if rank is not None and rank < 0:
        raise ConfigError(f"--rank must be >= 0, got {rank}")
    if energy is not None and not 0.0 <= energy < 1.0:
        raise ConfigError(f"--energy must be in [0, 1), got {energy}")
    mode = "fixed" if fixed_point else "float"
    if protect == Protect.weights:
        if split:
            raise ConfigError("--split belongs to --protect prompt; the weights deployment protects every layer")
        if rank is None and energy is None:
            rank = default_rank(model_config, repetitions=repetitions)
        return SlipConfig(mode=mode, rank=rank, energy=energy, layers=(0, layers_total), include_head=True,
                          repetitions=repetitions, soundness_bits=soundness_bits, pad_to=pad_to, mask_rank=mask_rank)
    if mask_rank:
        raise ConfigError("--mask-rank hardens the weights deployment's split; the prompt deployment has no secure part")
    layers = (0, layers_total)
    if split:
        from splitveil.plan.plan import parse_cuts

        cuts = parse_cuts(split)
        if len(cuts) != 2:
            raise ConfigError("--split for --protect prompt takes two cuts A,B: layers A..B-1 are offloaded masked")
        if not 0 <= cuts[0] < cuts[1] <= layers_total:
            raise ConfigError(f"--split {split} does not fit the model's {layers_total} layers (0 <= A < B <= {layers_total})")
        layers = (cuts[0], cuts[1])
    return SlipConfig(mode=mode, rank=rank if rank is not None or energy is not None else 0, energy=energy,
                      layers=layers, include_head=False, repetitions=repetitions, soundness_bits=soundness_bits,
                      pad_to=pad_to)


FLOAT_HELP = ("Ring Z_2^64 with uniform one-time masks (information-theoretic hiding, exact Freivalds and range "
              "checks) or float64 with large masks: statistical hiding only, and its check accepts errors within a "
              "tolerance (~1e-3 on every output passes), so --float is for benchmarks, not for integrity.")
MASK_RANK_HELP = ("Weights deployment: harden the split with a secret random rank-r term in the secure part, so that "
                  "the executor's residual is full rank and its null spaces no longer reveal the secret subspaces "
                  "(`splitveil attack weights --attack nullspace`; r = 4 keeps SmolLM2's secure share under 5%). "
                  "0 = the plain split.")
PAD_HELP = ("Pad the prompt's products with dummy rows (masked like the rest, computed on by the executor, dropped "
            "here) to a multiple of N rows: the executor sees the prompt length rounded up to N. Tokens are unchanged.")


@app.command("generate")
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt (text)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="A registered model name or a local model directory."),
    protect: Protect = typer.Option(..., "--protect", help="weights: this process is the model owner's secure side, the "
                                    "executor holds W_residual; prompt: this process is the user's device, the executor "
                                    "is the cloud."),
    rank: int = typer.Option(None, "--rank", "-k", help="Secure rank k per matrix (weights default: the largest k with a "
                             "predicted secure FLOPs share <= 4.5% at 32 positions; prompt default: 0)."),
    energy: float = typer.Option(None, "--energy", help="Instead of --rank: keep the components holding this fraction of "
                                 "each matrix's squared spectrum."),
    split: str = typer.Option(None, "--split", "-s", help="Prompt deployment: A,B offloads the linear layers of layers "
                              "A..B-1; the rest and the head run wholly here (default: every layer)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1, help="How many tokens to generate at most."),
    fixed_point: bool = typer.Option(True, "--fixed-point/--float", help=FLOAT_HELP),
    repetitions: int = typer.Option(2, "--repetitions", "-t", min=0, help="The fewest Freivalds check vectors per "
                                    "product (drawn afresh for every session)."),
    soundness_bits: int = typer.Option(40, "--soundness-bits", min=0, max=256, help="Fixed point: each product gets as "
                                       "many check vectors as its range needs for a wrong reply to pass with "
                                       "probability <= 2^-B (0: exactly --repetitions)."),
    pad_to: int = typer.Option(1, "--pad-to", min=1, help=PAD_HELP),
    mask_rank: int = typer.Option(0, "--mask-rank", min=0, help=MASK_RANK_HELP),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    server: str = typer.Option(None, "--server", help="Use the executor at this URL (`splitveil slip serve`) instead "
                               "of starting one as a child process."),
    token_file: Path = typer.Option(None, "--token-file", help="The executor's bearer token file (with --server)."),
    ca: Path = typer.Option(None, "--ca", help="Trust this certificate (with --server)."),
    pin: str = typer.Option(None, "--pin", help="Trust exactly the certificate with this SHA-256 fingerprint (with --server)."),
    log_frames: Path = typer.Option(None, "--log-frames", help="Have the child executor record every frame it receives "
                                    "into this file (its whole view)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object: token_ids, text, secure_flops_share, "
                                     "round_trips, offline_seconds, online_seconds, ..."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Generate greedily with every protected linear layer computed by the untrusted executor on masked inputs."""
    from splitveil.models.loading import resolve_model_dir

    if not prompt.strip():
        raise ConfigError("the prompt is empty: pass --prompt 'some text'")
    if server and log_frames:
        raise ConfigError("--log-frames records a child executor's view; drop it with --server")
    if not server and (token_file or ca or pin):
        raise ConfigError("--token-file, --ca and --pin go with --server")
    setup(threads)
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(resolve_model_dir(model))
    config = resolve_config(model_config, protect=protect, rank=rank, energy=energy, split=split,
                            fixed_point=fixed_point, repetitions=repetitions, soundness_bits=soundness_bits,
                            pad_to=pad_to, mask_rank=mask_rank)
    summary = run_protected(model, config, protect=protect, prompt=prompt, max_new_tokens=max_new_tokens, chat=chat,
                            server=server, token_file=token_file, ca=ca, pin=pin, log_frames=log_frames,
                            quiet=json_output)
    print_summary(summary, json_output=json_output)


def run_protected(model: str, config, *, protect: Protect, prompt: str, max_new_tokens: int, chat: bool = False,
                  server: str | None = None, token_file: Path | None = None, ca: Path | None = None,
                  pin: str | None = None, log_frames: Path | None = None, quiet: bool = False) -> dict:
    """One protected generation (`slip generate`, and `generate --protect prompt`): the executor at `server`, or
    started as a child process (TLS, 127.0.0.1); returns the summary `--json` prints."""
    from splitveil.protect.slip.runtime import ExecutorProcess, connect_client, protect_registered, run_generation

    with status(f"loading and decomposing {model} ...", quiet=quiet):
        slip, tokenizer, bundle_dir, decompose_seconds = protect_registered(model, config)
    sha = json.loads((bundle_dir / "manifest.json").read_text())["sha256"]
    if server:
        from splitveil.serve.auth import read_token
        from splitveil.serve.build import default_token_file

        client, transport = connect_client(server, token=read_token(token_file or default_token_file()), mode=config.mode,
                                           residual_sha256=sha, groups=len(slip.groups), ca_file=ca, pin_sha256=pin)
        try:
            result = run_generation(slip, tokenizer, client, transport, prompt, max_new_tokens=max_new_tokens, chat=chat)
        finally:
            client.close()
            transport.close()
        startup = None
    else:
        with status("starting the untrusted executor ...", quiet=quiet):
            executor = ExecutorProcess(bundle_dir, config.mode, log_frames=log_frames).__enter__()
        try:
            client, transport = connect_client(executor.url, token=executor.token, mode=config.mode, residual_sha256=sha,
                                               groups=len(slip.groups), ca_file=executor.cert)
            try:
                result = run_generation(slip, tokenizer, client, transport, prompt, max_new_tokens=max_new_tokens, chat=chat)
            finally:
                client.close()
                transport.close()
        finally:
            executor.__exit__(None, None, None)
        startup = round(executor.startup_seconds, 3)
    return {
        **result, "model": model, "protect": protect.value, "mode": config.mode, "rank": slip.secure_rank(),
        "config": config.to_dict(), "groups": len(slip.groups), "decompose_seconds": round(decompose_seconds, 3),
        "executor_startup_seconds": startup, "executor": server or "child process (TLS, 127.0.0.1)",
    }


def print_summary(summary: dict, *, json_output: bool) -> None:
    """The answer on stdout and one dim line of figures on stderr, or the whole summary as JSON."""
    if json_output:
        print_json(summary)
        return
    typer.echo(summary["text"])
    err_console.print(
        f"[dim]slip {summary['protect']} ({summary['mode']}, rank {summary['rank']}, {summary['groups']} linear groups): "
        f"{len(summary['token_ids'])} tokens, online {summary['online_seconds']:.2f} s "
        f"({summary['decode_tokens_per_second'] or 0:.2f} tok/s decode), offline {summary['offline_seconds']:.2f} s, "
        f"{summary['round_trips']} round trips ({summary['round_trips_per_decode_step'] or 0:.0f} per decode step), "
        f"secure FLOPs share {summary['secure_flops_share']:.4f}"
        + (f", each product checked to 2^-{summary['freivalds_soundness_bits']}"
           if summary.get("freivalds_soundness_bits") is not None else "") + "[/dim]")


# -- the options `slip serve` and `slip dealer` share (both are TLS servers with a bearer token) ----------------


def _tls_cert_option():
    return typer.Option(None, "--tls-cert", help="PEM certificate (default: a self-signed localhost one).")


def _tls_key_option():
    return typer.Option(None, "--tls-key", help="PEM private key for --tls-cert.")


def _token_file_option():
    return typer.Option(None, "--token-file", help="File holding the bearer token (default: the cache's).")


def _max_sessions_option():
    return typer.Option(16, "--max-sessions", min=1, help="Live sessions at most.")


def _max_frame_bytes_option():
    return typer.Option(MAX_FRAME_BYTES, "--max-frame-bytes", min=4096, help="Largest frame accepted.")


def _idle_timeout_option():
    return typer.Option(300.0, "--idle-timeout", min=0.1, help="Seconds of silence before a session is evicted.")


def _insecure_option():
    return typer.Option(False, "--insecure", help="Plaintext WebSockets, no TLS (loopback testing only).")


@app.command("serve")
def serve(
    bundle: Path = typer.Option(..., "--bundle", help="The residual-only bundle folder that `slip export-bundle --out "
                                "DIR` wrote (manifest.json, residual.safetensors). A folder holding anything else, such as "
                                "the owner's cache with the decomposition, is refused."),
    mode: Mode = typer.Option(Mode.fixed, "--mode", help="fixed (ring) or float (for benchmarks, not for integrity: its "
                              "check is tolerance-based); must match the trusted side."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8444, "--port", min=0, max=65535, help="Port to listen on (0 = any free port, printed)."),
    tls_cert: Path = _tls_cert_option(),
    tls_key: Path = _tls_key_option(),
    token_file: Path = _token_file_option(),
    log_frames: Path = typer.Option(None, "--log-frames", help="Record every frame received into this file."),
    max_sessions: int = _max_sessions_option(),
    max_frame_bytes: int = _max_frame_bytes_option(),
    idle_timeout: float = _idle_timeout_option(),
    insecure: bool = _insecure_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads for the compute thread."),
    device: str = typer.Option("cpu", "--device", help=RING_DEVICE_HELP),
    ready_fd: int = typer.Option(None, "--ready-fd", min=0, help=READY_FD_HELP),
) -> None:
    """The untrusted executor: multiplies masked inputs by W_residual, over TLS with a bearer token."""
    from splitveil.protect.slip.bundle import check_residual_only
    from splitveil.protect.slip.executor import build_executor_service
    from splitveil.protect.slip.runtime import FrameLog

    check_residual_only(bundle)  # before anything else: never load a folder that holds W_secure's factors
    _check_listen(host, insecure, tls_cert, tls_key)
    torch_device(device)
    setup(threads)
    record = FrameLog(log_frames) if log_frames else None
    service = build_executor_service(bundle, mode=mode.value, max_sessions=max_sessions, max_frame_bytes=max_frame_bytes,
                                     device=device)
    if record is not None:
        service.observers.append(record.append)  # the server side's one observation hook
    try:
        _serve("slip serve", service, [f"{service.info.get('model')} residual of {len(service.shapes)} linear groups, "
                                       f"{mode.value} mode on {service.info['device']}, frames up to "
                                       f"{service.max_frame_bytes} bytes"],
               host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, token_file=token_file, insecure=insecure,
               idle_timeout=idle_timeout, max_sessions=max_sessions, ready_fd=ready_fd)
    finally:
        if record is not None:
            record.close()


def _check_listen(host: str, insecure: bool, tls_cert: Path | None, tls_key: Path | None) -> None:
    from splitveil.transport.network import is_loopback

    if insecure and not is_loopback(host):
        raise ConfigError(f"refusing plaintext on the non-loopback address {host}: drop --insecure to use TLS")
    if insecure and (tls_cert or tls_key):
        raise ConfigError("--insecure turns TLS off; drop --tls-cert/--tls-key or --insecure")


def _serve(command: str, service, lines: list[str], *, host: str, port: int, tls_cert, tls_key, token_file,
           insecure: bool, idle_timeout: float, max_sessions: int, ready_fd: int | None) -> None:
    """Serves `service` (TLS unless --insecure, bearer token, one session per connection) until stopped, printing
    `lines` and the address when ready."""
    from splitveil.serve.build import tls_for_server, token_for_server
    from splitveil.serve.server import ServerLimits, SplitServer, serve_until_stopped

    token, token_path = token_for_server(token_file)
    ssl_context, cert_path, fingerprint = (None, None, None) if insecure else tls_for_server(tls_cert, tls_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = ServerLimits(idle_timeout=idle_timeout, batch_window=0.0, max_connections=2 * max_sessions)
    server = SplitServer(service, token=token, ssl_context=ssl_context, host=host, port=port, limits=limits)
    report = ready_writer(ready_fd)

    def ready(srv: SplitServer) -> None:
        for line in lines:
            typer.echo(f"splitveil {command}: {line}")
        if fingerprint:
            typer.echo(f"splitveil {command}: TLS certificate {cert_path} sha256 {fingerprint}")
        else:
            typer.echo(f"splitveil {command}: WARNING plaintext (--insecure): anyone on this host can read the traffic")
        typer.echo(f"splitveil {command}: token file {token_path}")
        typer.echo(f"splitveil {command}: listening on {srv.url}")
        report({"ready": True, "url": srv.url, "port": srv.port, "fingerprint": fingerprint})

    serve_until_stopped(server, ready, host=host, port=port)
    typer.echo(f"splitveil {command}: stopped")


NON_COLLUSION = ("trust assumption: the dealer and the executor do not collude (together they would unmask every "
                 "input); each alone learns nothing of the prompt")


@app.command("dealer")
def dealer(
    bundle: Path = typer.Option(..., "--bundle", help="The public-weights bundle (`slip export-bundle --protect prompt "
                                "--out DIR`, secure rank 0: W itself) the executor serves too."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8445, "--port", min=0, max=65535, help="Port to listen on (0 = any free port, printed)."),
    tls_cert: Path = _tls_cert_option(),
    tls_key: Path = _tls_key_option(),
    token_file: Path = _token_file_option(),
    max_sessions: int = _max_sessions_option(),
    max_rows: int = typer.Option(4096, "--max-rows", min=1, help="Rows of one group one request may ask for."),
    max_frame_bytes: int = _max_frame_bytes_option(),
    idle_timeout: float = _idle_timeout_option(),
    insecure: bool = _insecure_option(),
    threads: int = typer.Option(1, "--threads", help="Torch threads for the compute thread."),
    device: str = typer.Option("cpu", "--device", help=RING_DEVICE_HELP),
    ready_fd: int = typer.Option(None, "--ready-fd", min=0, help=READY_FD_HELP),
) -> None:
    """SLIP's mask dealer: holds the public weights W and deals the terms W r of the masks r = PRG(seed, group, row)
    for the rows a device asks for, ahead of use, so that the device holds no linear weight. The device sends each
    session's seed at OPEN over TLS; the dealer sees nothing that depends on the prompt but its length. Trust
    assumption: the dealer and the executor do not collude (together they would unmask every input)."""
    from splitveil.protect.slip.bundle import check_residual_only
    from splitveil.protect.slip.dealer import build_dealer_service

    check_residual_only(bundle)
    _check_listen(host, insecure, tls_cert, tls_key)
    torch_device(device)
    setup(threads)
    service = build_dealer_service(bundle, max_sessions=max_sessions, max_frame_bytes=max_frame_bytes,
                                   max_rows_per_request=max_rows, device=device)
    _serve("slip dealer", service, [f"deals mask terms for {service.info.get('model')}'s {len(service.shapes)} linear "
                                    f"groups (public weights) on {service.info['device']}, up to {max_rows} rows per "
                                    f"group and request",
                                    NON_COLLUSION],
           host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, token_file=token_file, insecure=insecure,
           idle_timeout=idle_timeout, max_sessions=max_sessions, ready_fd=ready_fd)


@app.command("export-bundle")
def export_bundle(
    out: Path = typer.Option(..., "--out", "-o", help="A new (or empty) folder for the executor's bundle."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="A registered model name or a local model directory."),
    protect: Protect = typer.Option(Protect.weights, "--protect", help="The deployment whose executor gets the bundle "
                                    "(its defaults choose the rank, as in `slip generate`)."),
    rank: int = typer.Option(None, "--rank", "-k", help="Secure rank k per matrix (defaults as in `slip generate`)."),
    energy: float = typer.Option(None, "--energy", help="Instead of --rank: keep this fraction of each matrix's "
                                 "squared spectrum."),
    split: str = typer.Option(None, "--split", "-s", help="Prompt deployment: the offloaded layers A,B."),
    repetitions: int = typer.Option(2, "--repetitions", "-t", min=0, help="As in `slip generate` (the default rank "
                                    "counts the checks' cost)."),
    mask_rank: int = typer.Option(0, "--mask-rank", min=0, help=MASK_RANK_HELP),
    dealer: bool = typer.Option(False, "--dealer", help="--protect prompt: the public-weights bundle of a device with "
                                "a mask dealer (`generate --dealer wss://... --server wss://...`): serve the same folder "
                                "with `slip serve` and `slip dealer`. Give the device's --head and --fuse."),
    head: str = typer.Option("masked", "--head", help="With --dealer: masked (the LM head is one more group, the "
                             "device's default) or device."),
    fuse: str = typer.Option("auto", "--fuse", help="With --dealer: auto, on or off, as the device's --fuse (fused "
                             "groups: two round trips per layer)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object: out, files, model, sha256, groups."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Write the untrusted executor's residual-only bundle (W_residual per linear group and a manifest, nothing of
    W_secure) to a folder of its own, for `splitveil slip serve --bundle DIR`. The decomposition stays in the owner's
    cache."""
    from transformers import AutoConfig

    from splitveil.models.loading import resolve_model_dir
    from splitveil.protect.slip.runtime import export_bundle as write_bundle

    setup(threads)
    model_config = AutoConfig.from_pretrained(resolve_model_dir(model))
    config = resolve_config(model_config, protect=protect, rank=rank, energy=energy, split=split, fixed_point=True,
                            repetitions=repetitions, mask_rank=mask_rank)
    if dealer:
        from dataclasses import replace

        from splitveil.plan.parts import empty_causal_lm
        from splitveil.protect.slip.dealt import HEADS
        from splitveil.protect.slip.fused import resolve_fuse

        if protect != Protect.prompt or rank or energy:
            raise ConfigError("--dealer writes the prompt deployment's public bundle: give --protect prompt, no rank")
        if head not in HEADS:
            raise ConfigError(f"--head must be one of {', '.join(HEADS)}, not {head!r}")
        config = replace(config, rank=0, include_head=head == "masked",
                         fuse=resolve_fuse(empty_causal_lm(model)[0], fuse))
    with status(f"loading and decomposing {model} ...", quiet=json_output):
        manifest = write_bundle(model, config, out, dealt=dealer)
    summary = {"out": str(out), "files": sorted(p.name for p in out.iterdir()), "model": manifest["model"],
               "sha256": manifest["sha256"], "groups": len(manifest["groups"]), "config": config.to_dict()}
    if json_output:
        print_json(summary)
        return
    typer.echo(f"splitveil slip export-bundle: W_residual of {summary['groups']} linear groups (sha256 "
               f"{summary['sha256'][:16]}...) written to {out}; serve it with `splitveil slip serve --bundle {out}`")


class Part(str, Enum):
    weights = "weights"
    prompt = "prompt"
    both = "both"


@app.command("eval")
def evaluate(
    what: Part = typer.Option(Part.both, "--protect", help="Which deployment to evaluate."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="The causal LM."),
    cnn: str = typer.Option("lenet", "--cnn", help="The CNN of the weights deployment's extraction attack."),
    prompts_file: Path = typer.Option(None, "--prompts", help="A file of prompts, one per line (default: the built-in "
                                      "private prompts)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer ranks, prompts and samples (minutes, not an hour)."),
    out: Path = typer.Option(Path("benchmarks/results"), "--out", help="Where records and plots go."),
    allow_dirty: bool = typer.Option(False, "--allow-dirty", help="Run even though tracked files differ from the last commit."),
    json_output: bool = typer.Option(False, "--json", help="Print the records as one JSON object."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """SLIP's safety and cost evaluation: residual-only quality against k, fine-tune extraction against scratch, secure
    FLOPs share and latency (weights); the adaptive attack on the executor's logged view, uniformity, device cost
    (prompt). Writes slip_weights.json / slip_prompt.json and PNG plots."""
    from splitveil.cli.common import stamp_run
    from splitveil.experiments import slip_eval
    from splitveil.core.records import environment, write_json
    from splitveil.experiments.text_privacy import EVALUATION_PROMPTS
    from splitveil.protect.slip.trusted import SlipConfig

    stamp_run(allow_dirty)
    setup(threads)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise ConfigError(f"no such file: {prompts_file}")
        prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"{prompts_file} holds no prompts")
    else:
        prompts = list(EVALUATION_PROMPTS)
    if quick:
        prompts = prompts[:2]
    say = (lambda _message: None) if json_output else (lambda message: err_console.print(f"[dim]{message}[/dim]"))
    records = {}
    tag = "_quick" if quick else ""
    from transformers import AutoConfig

    from splitveil.models.loading import resolve_model_dir

    model_config = AutoConfig.from_pretrained(resolve_model_dir(model))
    if what in (Part.weights, Part.both):
        weights_fixed = resolve_config(model_config, protect=Protect.weights, rank=None, energy=None, split=None,
                                       fixed_point=True, repetitions=2)
        weights_float = SlipConfig(**{**weights_fixed.__dict__, "mode": "float"})
        record = {"environment": environment(), "config": weights_fixed.to_dict()}
        ranks = [0, 1, 4, 16, 64] if quick else [0, 1, 2, 4, 8, weights_fixed.rank, 16, 32, 64, 128]
        record["residual_perplexity"] = slip_eval.residual_perplexity_curve(model, sorted(set(ranks)), progress=say,
                                                                            heldout_chars=1500 if quick else 3000)
        record["cnn"] = slip_eval.cnn_safety(model_name=cnn, stolen=(100, 1000) if quick else (100, 300, 1000, 3000),
                                             progress=say)
        prompt = "The capital of France is"
        record["unprotected"] = slip_eval.unprotected_run(model, prompt, 16)
        record["runs"] = {mode.mode: slip_eval.slip_run(model, mode, prompt, 16, ignore_eos=True)
                          for mode in (weights_float, weights_fixed)}
        record["agreement_fixed_vs_fp32"] = slip_eval.greedy_agreement(model, weights_fixed, prompts, 8 if quick else 32)
        record["agreement_float_vs_fp32"] = slip_eval.greedy_agreement(model, weights_float, prompts, 8 if quick else 32)
        write_json(out / f"slip_weights{tag}.json", record)
        slip_eval.plot_weights(record, out / f"slip_weights{tag}.png")
        records["weights"] = record
    if what in (Part.prompt, Part.both):
        prompt_config = resolve_config(model_config, protect=Protect.prompt, rank=None, energy=None, split="2,28",
                                       fixed_point=True, repetitions=2)
        record = {"environment": environment(), "config": prompt_config.to_dict()}
        record["view_attack"] = slip_eval.prompt_view_attack(model, prompt_config, prompts, candidates=32 if quick else 64,
                                                             progress=say)
        record["unprotected"] = slip_eval.unprotected_run(model, prompts[0], 16)  # 16 tokens, EOS ignored (latency)
        record["run"] = slip_eval.slip_run(model, prompt_config, prompts[0], 16, ignore_eos=True)
        record["blind_read"] = slip_eval.demo_prompt_line(model, prompts[0], split=prompt_config.layers, max_new_tokens=8,
                                                          chat=True)
        write_json(out / f"slip_prompt{tag}.json", record)
        slip_eval.plot_prompt(record, out / f"slip_prompt{tag}.png")
        records["prompt"] = record
    if json_output:
        print_json(records)
        return
    for name, record in records.items():
        err_console.print(f"slip eval {name}: written to {out}/slip_{name}{tag}.json")
