"""`splitveil generate`: text generation through a split (or unsplit) model."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from splitveil.cli.common import err_console, load_model, print_json, setup, status
from splitveil.core.errors import ConfigError


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
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object: token_ids, text, bytes_up, bytes_down, round_trips, seconds."),
    threads: int = typer.Option(1, "--threads", help="Torch threads (1 is fastest on a shared 2-core machine)."),
) -> None:
    """Generate text through a split model: the cloud part in-process (--split), on a server (--server), or unsplit (--no-split)."""
    from splitveil.plan.plan import SplitPlan, parse_cuts

    if not prompt.strip():
        raise ConfigError("the prompt is empty: pass --prompt 'some text'")
    if no_split and (split or server):
        raise ConfigError("--no-split runs the unsplit model here; drop --split/--server or --no-split")
    if insecure and not server:
        raise ConfigError("--insecure only concerns a ws:// --server; drop it")
    if not no_split and not split and not server:
        raise ConfigError("give --split A,B (e.g. --split 2,28), --server URL or --no-split")
    plan = SplitPlan.unsplit() if no_split else (SplitPlan.from_cuts(parse_cuts(split)) if split else None)
    do_sample = sample or temperature != 1.0 or top_p < 1.0 or top_k > 0
    from splitveil.edge.generate import GenerationConfig, SplitCausalLM

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, stop=tuple(stop or ()),
    )
    setup(threads)
    if server:
        from splitveil.serve.auth import read_token
        from splitveil.serve.build import default_token_file

        token = read_token(token_file or default_token_file())
        with status(f"connecting to {server} ...", quiet=json_output):
            runner = SplitCausalLM.connect(server, token=token, model=model, plan=plan, ca_file=ca, pin_sha256=pin,
                                           wire=wire.value, insecure=insecure)
    else:
        hf_model, tokenizer = load_model(model, quiet=json_output)
        runner = SplitCausalLM(hf_model, plan, tokenizer=tokenizer, wire=wire.value)
    try:
        result = runner.generate(prompt, config, chat=chat)
    finally:
        runner.close()
    plan = runner.plan
    if json_output:
        print_json({
            "token_ids": result.token_ids,
            "text": result.text,
            "bytes_up": result.bytes_up,
            "bytes_down": result.bytes_down,
            "round_trips": result.round_trips,
            "seconds": round(result.seconds, 6),
            "prefill_seconds": round(result.prefill_seconds, 6),
            "decode_seconds": round(result.decode_seconds, 6),
            "finish_reason": result.finish_reason,
            "prompt_tokens": len(result.prompt_ids),
            "plan": result.plan,
            "wire": wire.value,
            "model": model,
        })
        return
    typer.echo(result.text)
    steps = max(len(result.token_ids), 1)
    err_console.print(
        f"[dim]{len(result.token_ids)} tokens in {result.seconds:.2f} s ({len(result.token_ids) / result.seconds:.1f} tok/s), "
        f"plan {plan.describe()}, wire {wire.value}, up {result.bytes_up} B, down {result.bytes_down} B "
        f"({result.bytes_up / steps:.0f} / {result.bytes_down / steps:.0f} B per token), {result.round_trips} round trips[/dim]"
    )
