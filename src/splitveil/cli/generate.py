"""`splitveil generate`: text generation through a split (or unsplit) model."""

from __future__ import annotations

from enum import Enum
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
    load_format_option,
    load_model,
    print_json,
    setup,
    status,
)
from splitveil.cli.slip import PAD_HELP, Protect
from splitveil.core.errors import ConfigError
from splitveil.models.loading import LoadFormat


class Wire(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt (text)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="A registered model name (smollm2-135m) or a local Hugging Face model directory."),
    split: str = typer.Option(None, "--split", "-s", help="Cuts after A (and B) decoder layers: 'A,B' = Λ-split head|trunk|tail (head and tail on this device), 'A' = edge|cloud."),
    no_split: bool = typer.Option(False, "--no-split", help="Run the unsplit model (the baseline) instead."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1, help="How many tokens to generate at most."),
    wire: Wire = typer.Option(Wire.fp32, "--wire", help="Codec of the hidden states crossing each cut (fp32 is exact)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template as a user message."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (> 0); implies --sample when not 1."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass in (0, 1]; implies --sample when below 1."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = all); implies --sample when set."),
    seed: int = typer.Option(None, "--seed", help="Seed for sampling (reproducible output)."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop when the generated text contains this string (repeatable)."),
    server: str = typer.Option(None, "--server", help="Run the cloud part on this splitveil server (wss://HOST:PORT); "
                               "head and tail stay here. Without --split, the server's cuts are used."),
    token_file: Path = typer.Option(None, "--token-file", help="File with the server's bearer token (default: the "
                                    "token file `splitveil serve` made in the splitveil cache)."),
    ca: Path = typer.Option(None, "--ca", help="Trust this certificate (e.g. the server's --tls-cert)."),
    pin: str = typer.Option(None, "--pin", help="Trust exactly the server certificate with this SHA-256 fingerprint "
                            "(checked right after the TLS handshake, before the token is sent)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a plaintext ws:// --server beyond loopback (the token "
                                  "and hidden states cross the network in clear)."),
    attest: str = attest_option(),
    attest_key: Path = attest_key_option(),
    protect: str = typer.Option(None, "--protect", help="A text protection of `splitveil protections`, with --split A,B: "
                                "prompt (or slip): SLIP's prompt deployment, the same path as `splitveil slip generate "
                                "--protect prompt`: the linear layers of layers A..B-1 run in an untrusted executor (a "
                                "child process over TLS, or --server URL of `splitveil slip serve`) on one-time-masked "
                                "fixed-point inputs, greedy, secure rank 0; noise, permute or randcut (a cut defence "
                                "at --strength, the trunk in process); enclave (the trunk in a trusted executor child "
                                "process behind a relay, SIMULATED attestation); none (the plain split)."),
    strength: float = typer.Option(0.0, "--strength", min=0.0, help="With --protect noise|permute|randcut: the "
                                   "defence's strength (as in `attack text --defence`)."),
    pad_to: int = typer.Option(None, "--pad-to", min=1, help="With --protect prompt: " + PAD_HELP),
    dealer: str = typer.Option(None, "--dealer", help="With --protect prompt: who deals the mask terms W r. local: a "
                               "mask dealer child process (TLS), so this device holds no linear weight of the offloaded "
                               "layers and computes none of their products; wss://HOST:PORT: a `splitveil slip dealer` "
                               "server; device (the default): this device loads the weights and computes W r itself. "
                               "TRUST: the dealer and the executor must not collude (together they unmask every input)."),
    dealer_token_file: Path = typer.Option(None, "--dealer-token-file", help="The dealer's bearer token file (with "
                                           "--dealer URL; default: the cache's)."),
    dealer_ca: Path = typer.Option(None, "--dealer-ca", help="Trust this certificate for --dealer URL."),
    head: str = typer.Option(None, "--head", help="With --dealer local|URL: masked (default; the LM head is one more "
                             "masked group through executor and dealer) or device (computed here from the tied "
                             "embedding)."),
    fuse: str = typer.Option(None, "--fuse", help="With --dealer local|URL: auto (default: fused groups where the "
                             "model allows, Llama-family: the products between two non-linear steps travel together, "
                             "2 round trips per offloaded layer instead of 4; the executor and the dealer multiply "
                             "about twice the weights), on (refuse a model that does not allow it) or off."),
    load_format: LoadFormat = load_format_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    speculate: str = typer.Option("off", "--speculate", help="Speculative decoding: draft tokens on this device and "
                                  "verify them in one pass through the split (one round trip for several tokens; the "
                                  "rejected positions are rolled back). prompt-lookup: copy what followed the last "
                                  "words earlier in the prompt or answer (summaries, rewrites); self: this device's head "
                                  "and tail with the trunk skipped; off. Greedy output is unchanged; sampled output "
                                  "keeps its distribution."),
    draft_tokens: int = typer.Option(3, "--draft-tokens", min=1, max=64, help="With --speculate: the most tokens one "
                                     "pass verifies."),
    draft_policy: str = typer.Option("adaptive", "--draft-policy", help="With --speculate: adaptive drafts as many "
                                     "tokens as pay, from the measured acceptance and the measured cost of a pass (more "
                                     "over a slow link, none when drafts are rejected); fixed drafts every token found, "
                                     "up to --draft-tokens."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object: token_ids, text, bytes_up, bytes_down, "
                                     "round_trips, seconds (with --protect: the fields of `slip generate --json`)."),
    threads: int = typer.Option(1, "--threads", help="Torch threads (1 is fastest on a shared 2-core machine)."),
) -> None:
    """Generate text through a split model: the cloud part in-process (--split), on a server (--server), or unsplit (--no-split)."""
    from splitveil.plan.plan import SplitPlan, parse_cuts

    if not prompt.strip():
        raise ConfigError("the prompt is empty: pass --prompt 'some text'")
    check_precision(device, dtype)
    if protect is not None and (dtype != "float32" or device != "cpu"):
        raise ConfigError("--protect runs this device's side in float32 on the CPU: drop --dtype/--device (a SLIP "
                          "executor or dealer takes its own: `splitveil slip serve|dealer --device --dtype`)")
    do_sample = sample or temperature != 1.0 or top_p < 1.0 or top_k > 0
    config_fields = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
                     "top_k": top_k, "top_p": top_p, "seed": seed, "stop": tuple(stop or ()), "speculate": speculate,
                     "draft_tokens": draft_tokens, "draft_policy": draft_policy}
    if (dealer is not None or head is not None or fuse is not None) and protect not in (Protect.prompt.value, "slip"):
        raise ConfigError("--dealer, --head and --fuse go with --protect prompt")
    if dealer is not None and dealer != "device":
        return _generate_dealt(model, prompt=prompt, split=split, dealer=dealer, head=head or "masked", fuse=fuse or "auto",
                               server=server,
                               token_file=token_file, ca=ca, pin=pin, dealer_token_file=dealer_token_file,
                               dealer_ca=dealer_ca, pad_to=pad_to or 1, chat=chat, json_output=json_output,
                               threads=threads, load_format=load_format.value,
                               config=config_fields)
    if head is not None or fuse is not None:
        raise ConfigError(f"{'--head' if head is not None else '--fuse'} goes with a dealer: give --dealer local or "
                          f"--dealer URL")
    if dealer_token_file or dealer_ca:
        raise ConfigError("--dealer-token-file and --dealer-ca go with --dealer URL")
    if load_format.value != "auto" and protect is not None:
        raise ConfigError("--load-format dummy with --protect runs only with --dealer local|URL")
    if protect is not None and protect not in (Protect.prompt.value, "slip", Protect.weights.value):
        return _generate_deployment(protect, strength, model=model, prompt=prompt, split=split, server=server,
                                    no_split=no_split, wire=wire, chat=chat, json_output=json_output, threads=threads,
                                    config_fields=config_fields)
    if strength:
        raise ConfigError("--strength goes with --protect noise|permute|randcut")
    if protect is not None:
        protect = Protect.prompt if protect == "slip" else Protect(protect)
        if speculate != "off":
            raise ConfigError("--speculate with --protect prompt needs the mask dealer: add --dealer local (or a URL)")
        _check_protect(protect, split=split, no_split=no_split, wire=wire, sampling=do_sample or seed is not None,
                       stop=bool(stop), insecure=insecure, server=server, trust=bool(token_file or ca or pin))
        _generate_protected(model, prompt=prompt, split=split, max_new_tokens=max_new_tokens, chat=chat, server=server,
                            pad_to=pad_to or 1, token_file=token_file, ca=ca, pin=pin, json_output=json_output,
                            threads=threads)
        return
    if pad_to is not None:
        raise ConfigError("--pad-to pads the prompt SLIP's executor sees: it goes with --protect prompt")
    if no_split and (split or server):
        raise ConfigError("--no-split runs the unsplit model here; drop --split/--server or --no-split")
    if insecure and not server:
        raise ConfigError("--insecure only concerns a ws:// --server; drop it")
    if not no_split and not split and not server:
        raise ConfigError("give --split A,B (e.g. --split 2,28), --server URL or --no-split")
    if (attest is not None or attest_key is not None) and not server:
        raise ConfigError("--attest and --attest-key attest a --server; give --server URL")
    if attest_key is not None and attest is None:
        raise ConfigError("--attest-key goes with --attest")
    plan = SplitPlan.unsplit() if no_split else (SplitPlan.from_cuts(parse_cuts(split)) if split else None)
    from splitveil.edge.generate import GenerationConfig, SplitCausalLM

    config = GenerationConfig(**config_fields)
    setup(threads)
    if server:
        runner = connect_server(server, model=model, plan=plan, token_file=token_file, ca=ca, pin=pin, wire=wire.value,
                                insecure=insecure, attest=attest, attest_key=attest_key, quiet=json_output,
                                load_format=load_format.value, dtype=dtype, device=device)
    else:
        hf_model, tokenizer = load_model(model, quiet=json_output, load_format=load_format, dtype=dtype, device=device)
        runner = SplitCausalLM(hf_model, plan, tokenizer=tokenizer, wire=wire.value)
    try:
        result = runner.generate(prompt, config, chat=chat)
    finally:
        runner.close()
    _report(result, runner.plan, wire=wire.value, model=model, json_output=json_output,
            precision={"dtype": dtype, "device": device, "load_format": load_format.value,
                       "server_precision": runner.server_info() if server else None})


def _report(result, plan, *, wire: str, model: str, json_output: bool, protection: dict | None = None,
            precision: dict | None = None) -> None:
    """Prints the generation: the text and a summary line, or one JSON object."""
    if json_output:
        print_json({
            "token_ids": result.token_ids,
            "text": result.text,
            "bytes_up": result.bytes_up,
            "bytes_down": result.bytes_down,
            "round_trips": result.round_trips,
            "round_trips_per_token": round(result.round_trips / max(len(result.token_ids), 1), 4),
            "speculation": result.speculation,
            "seconds": round(result.seconds, 6),
            "prefill_seconds": round(result.prefill_seconds, 6),
            "decode_seconds": round(result.decode_seconds, 6),
            "finish_reason": result.finish_reason,
            "prompt_tokens": len(result.prompt_ids),
            **result.cost_fields(),
            "plan": result.plan,
            "wire": wire,
            "model": model,
            **(precision or {}),
            **({"protection": protection} if protection else {}),
        })
        return
    typer.echo(result.text)
    steps = max(len(result.token_ids), 1)
    err_console.print(
        f"[dim]{len(result.token_ids)} tokens in {result.seconds:.2f} s ({len(result.token_ids) / result.seconds:.1f} tok/s), "
        f"plan {plan.describe()}, wire {wire}, up {result.bytes_up} B, down {result.bytes_down} B "
        f"({result.bytes_up / steps:.0f} / {result.bytes_down / steps:.0f} B per token), {result.round_trips} round trips[/dim]"
    )
    if result.speculation:
        spec = result.speculation
        err_console.print(f"[dim]speculation {spec['drafter']}: {spec['accepted']} of {spec['drafted']} drafted tokens "
                          f"accepted, {spec['tokens_per_pass']} tokens per pass over {spec['passes']} passes[/dim]")
    if protection:
        err_console.print(f"[dim]protection {protection['name']} (strength {protection['strength']:g}): the cloud holds "
                          f"{protection['cloud_holds']}; {'; '.join(protection['assumptions'])}[/dim]")


def _generate_deployment(name: str, strength: float, *, model: str, prompt: str, split, server, no_split: bool, wire,
                         chat: bool, json_output: bool, threads: int, config_fields: dict) -> None:
    """`generate --protect NAME`: one session of the registered text deployment NAME (the same deployment `attack
    text --defence NAME` attacks), generating as every split does."""
    from splitveil.edge.generate import GenerationConfig
    from splitveil.plan.plan import SplitPlan, parse_cuts
    from splitveil.protect.text import deployment_for

    deployment_class = deployment_for(name)
    if server or no_split or not split:
        raise ConfigError(f"--protect {name} runs the protected split here and its own cloud side: give --split A,B "
                          "(not --server or --no-split)")
    cuts = parse_cuts(split)
    if len(cuts) != 2:
        raise ConfigError(f"--protect {name} protects a Λ-split: give --split A,B")
    deployment_class.check(strength, cuts)
    config = GenerationConfig(**config_fields)
    setup(threads)
    hf_model, tokenizer = load_model(model, quiet=json_output)
    with deployment_class(model, hf_model, tokenizer, SplitPlan.lambda_split(*cuts), strength=strength,
                          wire=wire.value) as deployment:
        session = deployment.session()
        try:
            result = session.generate(prompt, config, chat=chat)
        finally:
            session.close()
        protection = {"name": deployment.name, "strength": strength, "cloud_holds": deployment.cloud_holds,
                      "assumptions": list(deployment.assumptions)}
        plan = session.lm.plan
    _report(result, plan, wire=wire.value, model=model, json_output=json_output, protection=protection)


def _check_protect(protect: Protect, *, split, no_split: bool, wire: Wire, sampling: bool, stop: bool, insecure: bool,
                   server, trust: bool) -> None:
    """Flags that do not go with --protect prompt: one ConfigError line (exit 2) before anything loads."""
    if protect != Protect.prompt:
        raise ConfigError("--protect weights protects every layer: run `splitveil slip generate --protect weights`")
    if no_split or not split:
        raise ConfigError("--protect prompt offloads the trunk's linear layers masked: give --split A,B, not --no-split")
    if wire != Wire.fp32:
        raise ConfigError("--wire does not apply to --protect prompt: the cloud receives masked ring elements")
    if sampling or stop:
        raise ConfigError("--protect prompt decodes greedily: drop --sample/--temperature/--top-p/--top-k/--seed/--stop")
    if insecure:
        raise ConfigError("--protect prompt always uses TLS: drop --insecure")
    if trust and not server:
        raise ConfigError("--token-file, --ca and --pin go with --server")


def _generate_protected(model: str, *, prompt: str, split: str, max_new_tokens: int, chat: bool, server, token_file,
                        ca, pin, json_output: bool, threads: int, pad_to: int = 1) -> None:
    """`generate --split A,B --protect prompt`: `splitveil slip generate --protect prompt` with the same flags."""
    from transformers import AutoConfig

    from splitveil.cli.slip import print_summary, resolve_config, run_protected
    from splitveil.models.loading import resolve_model_dir

    setup(threads)
    model_config = AutoConfig.from_pretrained(resolve_model_dir(model))
    config = resolve_config(model_config, protect=Protect.prompt, rank=None, energy=None, split=split, fixed_point=True,
                            repetitions=2, pad_to=pad_to)
    summary = run_protected(model, config, protect=Protect.prompt, prompt=prompt, max_new_tokens=max_new_tokens,
                            chat=chat, server=server, token_file=token_file, ca=ca, pin=pin, quiet=json_output)
    print_summary(summary, json_output=json_output)


def _generate_dealt(model: str, *, prompt: str, split, dealer: str, head: str, fuse: str, server, token_file, ca, pin,
                    dealer_token_file, dealer_ca, pad_to: int, chat: bool, json_output: bool, threads: int,
                    load_format: str, config: dict) -> None:
    """`generate --protect prompt --dealer local|URL`: SLIP's prompt deployment with a mask dealer; this device holds
    no linear weight of the offloaded layers (`protect.slip.dealt`)."""
    from transformers import AutoConfig

    from splitveil.cli.slip import NON_COLLUSION, resolve_config
    from splitveil.edge.generate import GenerationConfig
    from splitveil.models.loading import resolve_model_dir
    from splitveil.protect.slip.dealt import HEADS, DealtDevice
    from splitveil.serve.auth import read_token
    from splitveil.serve.build import default_token_file

    if head not in HEADS:
        raise ConfigError(f"--head must be one of {', '.join(HEADS)}, not {head!r}")
    if dealer != "local" and not dealer.startswith(("wss://", "ws://")):
        raise ConfigError(f"--dealer takes local, device or a dealer's URL (wss://HOST:PORT), not {dealer!r}")
    if dealer == "local" and (dealer_token_file or dealer_ca):
        raise ConfigError("--dealer-token-file and --dealer-ca go with --dealer URL")
    if not server and (token_file or ca or pin):
        raise ConfigError("--token-file, --ca and --pin go with --server")
    if not split:
        raise ConfigError("--protect prompt offloads the trunk's linear layers masked: give --split A,B")
    generation = GenerationConfig(**config)
    setup(threads)
    model_config = AutoConfig.from_pretrained(resolve_model_dir(model, load_format=load_format))
    slip_config = resolve_config(model_config, protect=Protect.prompt, rank=None, energy=None, split=split,
                                 fixed_point=True, repetitions=2, pad_to=pad_to)
    from dataclasses import replace

    slip_config = replace(slip_config, include_head=head == "masked")
    executor = (server, read_token(token_file or default_token_file()), ca, pin) if server else None
    dealer_at = None if dealer == "local" else (dealer, read_token(dealer_token_file or default_token_file()), dealer_ca, None)
    with DealtDevice(model, slip_config, executor=executor, dealer=dealer_at, load_format=load_format, fuse=fuse,
                     status=lambda text: status(text, quiet=json_output)) as device:
        result, figures = device.generate(prompt, generation, chat=chat)
    if json_output:
        print_json({"token_ids": result.token_ids, "text": result.text, "finish_reason": result.finish_reason,
                    "prompt_tokens": len(result.prompt_ids), "model": model, "protect": "prompt",
                    "offloaded_layers": list(slip_config.layers), "load_format": load_format,
                    "bytes_up": result.bytes_up, "bytes_down": result.bytes_down, "round_trips": result.round_trips,
                    "round_trips_per_token": round(result.round_trips / max(len(result.token_ids), 1), 4),
                    "speculation": result.speculation, "seconds": round(result.seconds, 6), "prefill_seconds": round(result.prefill_seconds, 6),
                    "decode_seconds": round(result.decode_seconds, 6), **result.cost_fields(), **figures})
        return
    typer.echo(result.text)
    per_token = result.cpu_seconds_decode / result.decode_tokens if result.decode_tokens else float("nan")
    err_console.print(
        f"[dim]slip prompt with a mask dealer ({figures['dealer']}), layers {slip_config.layers[0]}..{slip_config.layers[1] - 1} "
        f"and the {figures['head']} head offloaded{' (fused groups)' if figures['fused'] else ''}: "
        f"{len(result.token_ids)} tokens, "
        f"{result.decode_tokens / result.decode_seconds if result.decode_seconds > 0 else 0:.2f} tok/s decode, "
        f"device CPU {per_token * 1000:.1f} ms per decode token, device weights {result.weight_bytes_resident / 2**20:.0f} MiB, "
        f"{figures['round_trips_per_decode_step'] or 0:.0f} executor round trips per step, dealer wait "
        f"{(figures['dealer_wait_seconds_per_decode_step'] or 0) * 1000:.2f} ms per step; {NON_COLLUSION}[/dim]")
