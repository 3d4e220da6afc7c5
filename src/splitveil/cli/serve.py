"""`splitveil serve`: the cloud process of a Λ-split (only the trunk's weights), over TLS with a bearer token."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from splitveil.cli.common import (
    check_precision,
    device_option,
    dtype_option,
    err_console,
    load_format_option,
    setup,
)
from splitveil.core.errors import ConfigError
from splitveil.models.loading import LoadFormat
from splitveil.plan.plan import DEFAULT_LM_SPLIT
from splitveil.serve.worker import READY_FD_HELP, ready_writer
from splitveil.transport.network import is_loopback
from splitveil.wire.frame import MAX_FRAME_BYTES


def serve(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    split: str = typer.Option(DEFAULT_LM_SPLIT, "--split", "-s", help="The plan's cuts; this process runs the cloud part (the trunk)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8443, "--port", min=0, max=65535, help="Port to listen on (0 = any free port, printed)."),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="PEM certificate (default: a self-signed localhost one, made once)."),
    tls_key: Path = typer.Option(None, "--tls-key", help="PEM private key for --tls-cert."),
    token_file: Path = typer.Option(None, "--token-file", help="File holding the bearer token clients must present "
                                    "(default: a fresh token in the splitveil cache, path printed)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plaintext WebSockets, no TLS (loopback testing only)."),
    max_sessions: int = typer.Option(64, "--max-sessions", min=1, help="Live sessions at most."),
    max_connections: int = typer.Option(None, "--max-connections", min=1,
                                        help="Open connections at most; more get HTTP 503 (default: 2 x --max-sessions)."),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1,
                                   help="Rows x positions per session at most (default: the model's context)."),
    max_kv_mb: float = typer.Option(None, "--max-kv-mb", min=0.001,
                                    help="KV cache memory of all sessions together, MiB (default: half the machine's RAM)."),
    max_frame_bytes: int = typer.Option(MAX_FRAME_BYTES, "--max-frame-bytes", min=1024, help="Largest frame accepted."),
    idle_timeout: float = typer.Option(300.0, "--idle-timeout", min=0.1, help="Seconds of silence before a session is evicted."),
    no_batch: bool = typer.Option(False, "--no-batch", help="Run each session's steps alone instead of batching them."),
    batch_window_ms: float = typer.Option(2.0, "--batch-window-ms", min=0.0, help="How long to wait for more steps to batch."),
    step_hold_ms: float = typer.Option(None, "--step-hold-ms", min=0.0, help="At most this long (and never longer than a "
                                       "step round computes) a round of decode steps waits for the sessions due to send "
                                       "theirs, so concurrent sessions stay in one batch; 0: never wait. [default: 100; "
                                       "not with --ray]"),
    step_cohorts: int = typer.Option(None, "--step-cohorts", min=1, help="With 4 or more sessions decoding, keep their "
                                     "steps in this many groups, so the server computes one group's round while the "
                                     "others' clients turn their replies around; 1: one round takes every waiting "
                                     "step. [default: 2; not with --ray]"),
    threads: int = typer.Option(1, "--threads", help="Torch threads for the compute thread."),
    dataset: str = typer.Option(None, "--dataset", help="Classifiers (lenet, vgg, resnet; sensor-cnn for basic-motions) only: the data set the "
                                "classifier is trained on (its weights come from the training cache; trained if missing)."),
    defence: str = typer.Option(None, "--defence", help="Vision models only: salt, salt:conv, salt:fc or salt:perm "
                                "(Salted DNNs: the client keeps the salt; this process serves the cloud part)."),
    salt_layer: int = typer.Option(None, "--salt-layer", help="Vision models only: the salt layer's position "
                                   "(default: split - 1)."),
    ray: bool = typer.Option(False, "--ray", help="Run the trunk as a Ray Serve deployment on a local Ray instance; "
                             "this process is the TLS ingress. The limits apply per replica (see docs/deploy.md)."),
    replicas: int = typer.Option(None, "--replicas", min=1, help="With --ray: trunk replicas (default 2)."),
    placement: str = typer.Option(None, "--placement", help="Diffusion models only: serve the cloud part of reference "
                                  "(UNet + scheduler) or unet-split (default: the UNet's trunk; --split A = down blocks "
                                  "in the head)."),
    enclave: bool = typer.Option(False, "--enclave", help="Run the trunk in a trusted executor process behind a sealed "
                                 "channel (SIMULATED attestation); this process only relays ciphertext. Needs --insecure "
                                 "on loopback (see docs/tee-partition.md)."),
    attestation_key: Path = typer.Option(None, "--attestation-key", help="With --enclave: the SIMULATED attestation key "
                                         "file (PEM); created (mode 0600, public half beside it as FILE.pub) when it "
                                         "does not exist, so a client can be pointed at the same path with --attest-key."),
    observe: Path = typer.Option(None, "--observe", help="With --enclave: record every byte this process relays."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    load_format: LoadFormat = load_format_option(),
    ready_fd: int = typer.Option(None, "--ready-fd", min=0, help=READY_FD_HELP),
) -> None:
    """Serve the trunk of a Λ-split over TLS WebSockets: many sessions, each with its own KV cache."""
    from splitveil.plan.plan import parse_cuts
    from splitveil.serve.build import build_cloud_service, tls_for_server, token_for_server
    from splitveil.serve.server import ServerLimits, SplitServer

    cuts = parse_cuts(split)
    check_precision(device, dtype)
    plain_lm = not enclave and not _is_vision_model(model) and not _is_diffusion_model(model)
    if not plain_lm and (device != "cpu" or dtype != "float32" or load_format != LoadFormat.AUTO):
        raise ConfigError("--device, --dtype and --load-format serve an LM trunk (not --enclave, a vision or a "
                          "diffusion model)")
    if ray and device != "cpu":
        raise ConfigError("--ray replicas run on the CPU (Ray gives them no GPU here): drop --device, or drop --ray")
    if not enclave and (attestation_key or observe):
        raise ConfigError("--attestation-key and --observe go with --enclave")
    if insecure and not is_loopback(host):  # every serving path, the enclave relay included
        raise ConfigError(f"refusing plaintext on the non-loopback address {host}: drop --insecure to use TLS")
    if enclave:  # TEE partitioning: the trunk in a trusted executor process (tee/enclave_lm.py)
        from splitveil.tee.enclave_lm import serve_enclave

        return serve_enclave(model=model, cuts=cuts, host=host, port=port, token_file=token_file, insecure=insecure,
                             attestation_key=attestation_key, observe=observe, tls_cert=tls_cert, tls_key=tls_key,
                             threads=threads, max_sessions=max_sessions, max_tokens=max_tokens,
                             announce=typer.echo, report=ready_writer(ready_fd))
    vision = _is_vision_model(model)
    diffusion = _is_diffusion_model(model)
    if placement is not None and not diffusion:
        raise ConfigError("--placement applies to diffusion models only")
    if ray and diffusion:
        raise ConfigError("--ray serves an LM trunk; drop --ray to serve a diffusion model")
    if not vision and (dataset or defence or salt_layer is not None):
        raise ConfigError("--dataset, --defence and --salt-layer apply to vision models (lenet, vgg, resnet) only")
    if vision and (dataset is None or defence is None or len(cuts) != 1):
        raise ConfigError(f"serving {model} needs --dataset, --defence salt[:conv|fc|perm] and one cut (--split K)")
    if insecure and (tls_cert or tls_key):
        raise ConfigError("--insecure turns TLS off; drop --tls-cert/--tls-key or --insecure")
    if replicas is not None and not ray:
        raise ConfigError("--replicas goes with --ray")
    for flag, value in (("--step-hold-ms", step_hold_ms), ("--step-cohorts", step_cohorts)):
        if ray and value is not None:
            raise ConfigError(f"{flag} applies to the single-process server; drop it with --ray (replicas batch "
                              "within --batch-window-ms)")
    if ray and vision:
        raise ConfigError("--ray serves an LM trunk; drop --ray to serve a vision model")
    token, token_path = token_for_server(token_file)
    ssl_context, cert_path, fingerprint = (None, None, None) if insecure else tls_for_server(tls_cert, tls_key)
    setup(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ray:
        _serve_on_ray(model, cuts, replicas or 2, max_sessions=max_sessions, max_tokens=max_tokens, max_kv_mb=max_kv_mb,
                      max_frame_bytes=max_frame_bytes, no_batch=no_batch, batch_window_ms=batch_window_ms,
                      idle_timeout=idle_timeout, threads=threads, max_connections=max_connections, token=token,
                      dtype=dtype, load_format=load_format.value,
                      token_path=token_path, ssl_context=ssl_context, cert_path=cert_path, fingerprint=fingerprint,
                      host=host, port=port, report=ready_writer(ready_fd))
        typer.echo("splitveil serve: stopped")
        return
    with err_console.status(f"loading the cloud part of {model} ..."):
        if diffusion:
            from splitveil.diffusion.serve import diffusion_service

            service = diffusion_service(model, split, placement, max_sessions=max_sessions, max_frame_bytes=max_frame_bytes)
        elif vision:
            service = _salted_vision_service(model, dataset, cuts[0], defence, salt_layer, max_sessions=max_sessions,
                                             max_frame_bytes=max_frame_bytes)
        else:
            service = build_cloud_service(model, cuts, max_sessions=max_sessions, max_tokens=max_tokens,
                                          max_frame_bytes=max_frame_bytes, batch_steps=not no_batch, max_kv_mb=max_kv_mb,
                                          load_format=load_format.value, dtype=dtype, device=device)
    paced = {"step_hold": None if step_hold_ms is None else step_hold_ms / 1000, "step_cohorts": step_cohorts}
    limits = ServerLimits(idle_timeout=idle_timeout, batch_window=batch_window_ms / 1000,
                          max_connections=max_connections or 2 * max_sessions,
                          **{name: value for name, value in paced.items() if value is not None})  # else its defaults
    server = SplitServer(service, token=token, ssl_context=ssl_context, host=host, port=port, limits=limits)
    report = ready_writer(ready_fd)

    def ready(srv: SplitServer) -> None:
        parts = ", ".join(f"part {i} ({p.name})" for i, p in service.parts.items())
        where = f" in {service.info['dtype']} on {service.info['device']}" if "dtype" in service.info else ""
        typer.echo(f"splitveil serve: {model} {parts}, {sum(1 for _ in service.parts.values())} part(s) loaded{where}")
        if fingerprint:
            typer.echo(f"splitveil serve: TLS certificate {cert_path} sha256 {fingerprint}")
        else:
            typer.echo("splitveil serve: WARNING plaintext (--insecure): anyone on this host can read the traffic")
        typer.echo(f"splitveil serve: token file {token_path}")
        typer.echo(f"splitveil serve: limits {service.max_sessions} sessions, {limits.max_connections} connections, "
                   f"{service.max_tokens} positions per session, {service.max_kv_bytes / 2**20:.4g} MiB of KV cache")
        typer.echo(f"splitveil serve: listening on {srv.url}", nl=True)
        report({"ready": True, "url": srv.url, "port": srv.port, "fingerprint": fingerprint})

    from splitveil.serve.server import serve_until_stopped

    serve_until_stopped(server, ready, host=host, port=port)
    typer.echo("splitveil serve: stopped")


def _serve_on_ray(model: str, cuts, replicas: int, *, max_sessions: int, max_tokens, max_kv_mb, max_frame_bytes: int,
                  no_batch: bool, batch_window_ms: float, idle_timeout: float, threads: int, max_connections,
                  dtype: str, load_format: str, **ingress):
    """`serve --ray`: the same limits, per replica (`ReplicaSettings.for_replicas` splits the KV budget's default
    among the replicas)."""
    from splitveil.serve.ray_serve import RayOptions, ReplicaSettings, serve_on_ray
    from splitveil.serve.server import ServerLimits

    if len(cuts) != 2:
        raise ConfigError("--ray serves the trunk of a Λ-split: give --split A,B")
    settings = ReplicaSettings(model=model, cuts=tuple(cuts), max_sessions=max_sessions, max_tokens=max_tokens,
                               max_kv_mb=max_kv_mb,
                               max_frame_bytes=max_frame_bytes, batch_steps=not no_batch,
                               batch_window=batch_window_ms / 1000, idle_timeout=idle_timeout, threads=threads,
                               dtype=dtype, load_format=load_format)
    limits = ServerLimits(idle_timeout=idle_timeout, max_connections=max_connections or 2 * max_sessions * replicas)
    serve_on_ray(settings, RayOptions(replicas=replicas), limits=limits, announce=typer.echo, **ingress)


def _is_diffusion_model(name: str) -> bool:
    from splitveil.diffusion.models import is_diffusion_model

    return is_diffusion_model(name)


def _is_vision_model(name: str) -> bool:
    """Our classifiers: the CNNs for images and the sensor CNN for series (served salted)."""
    from splitveil.models.timeseries import TIME_SERIES_MODELS
    from splitveil.models.vision_zoo import VISION_MODELS

    return name in VISION_MODELS or name in TIME_SERIES_MODELS


def _salted_vision_service(model: str, dataset: str, cut: int, defence: str, salt_layer: int | None, **limits):
    """The cloud part of the salted classifier `attack output --quick` trains (same sizes, same cache entry)."""
    from splitveil.cli.attack_output import _check
    from splitveil.protect.salt_client import vision_service
    from splitveil.experiments.output_privacy import OutputAttackSpec, prepare_models

    kind = _check(dataset, model, cut, defence, salt_layer, None)
    spec = OutputAttackSpec.for_data(dataset, quick=True, model=model, split=cut, salt=kind, salt_layer=salt_layer)
    return vision_service(prepare_models(spec)["salted"], cut, **limits)
