"""`splitveil demo`: the main job. SmolLM2 Λ-split: head and tail here, the trunk in a TLS server on 127.0.0.1."""

from __future__ import annotations

import typer

from splitveil.cli.common import load_model, print_json, setup, status
from splitveil.plan.plan import DEFAULT_LM_SPLIT

SLIP_TOKENS = 16  # tokens generated through the prompt deployment (its decode runs ~1.7 tok/s on 2 CPU cores)
DEMO_PROMPT = "Write a short note to my doctor about my blood pressure readings this week: 150/95 on Monday, 145/92 today."


def exposure(split_lm, prompt_ids: list[int], answer_ids: list[int], *, budget: int = 4096) -> dict:
    """What the server could read of this very generation: the exact inversion of the uplink it received, with a
    budget of `budget` verified candidates per position (a lower bound: the unbudgeted attack sweeps the whole
    vocabulary), and the downlink read through the public tail."""
    import time

    import torch

    from splitveil.attack.text.attacks import ExactInversion, TailReadout, chat_template_hints
    from splitveil.metrics.text import token_recovery

    head, remote, tail = split_lm.stages
    uplink = torch.cat(remote.history, dim=1)[0]  # [positions, H]: exactly what the server received
    tokenizer = split_lm.tokenizer
    n = len(prompt_ids)
    hints, user = chat_template_hints(tokenizer, prompt_ids)  # the template's public tokens are tried first
    attack = ExactInversion(head, candidates=256, max_verified=budget)
    started = time.perf_counter()
    recovered = attack.reconstruct(uplink[:n], hints=hints)
    seconds = time.perf_counter() - started
    downlink = torch.cat(remote.replies, dim=1)[0]  # [positions, H]: exactly what the server sent back
    answer_read = TailReadout(tail).reconstruct(downlink)[n - 1 : n - 1 + len(answer_ids)]
    return {
        "attack": f"exact inversion, at most {budget} candidates per position",
        "token_recovery": token_recovery(prompt_ids[user], recovered[user]),
        "recovered_user_text": tokenizer.decode(recovered[user], skip_special_tokens=True).strip(),
        "answer_recovery": token_recovery(answer_ids, answer_read),
        "seconds": seconds,
    }


def demo(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registered model name or local model directory."),
    split: str = typer.Option(DEFAULT_LM_SPLIT, "--split", "-s", help="Λ-split cuts: head = layers before A, tail = layers from B."),
    prompt: str = typer.Option(DEMO_PROMPT, "--prompt", "-p", help="The user's (private) prompt, sent as a chat message."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n", min=1, help="Tokens to generate."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
) -> None:
    """Start a TLS trunk server on 127.0.0.1, run a Λ-split generation through it, compare with the unsplit model."""
    from splitveil.edge.generate import SplitCausalLM
    from splitveil.plan.plan import parse_cuts
    from splitveil.serve.process import ServerProcess

    cuts = parse_cuts(split)
    if len(cuts) != 2:
        raise typer.BadParameter("the demo runs a Λ-split: give two cuts, like 2,28", param_hint="--split")
    if not prompt.strip():
        raise typer.BadParameter("the prompt is empty", param_hint="--prompt")
    setup(threads)
    with status("starting the trunk server (TLS, fresh token) ...", quiet=json_output):
        server = ServerProcess(model, cuts).__enter__()
    try:
        with status(f"connecting to {server.url} ...", quiet=json_output):
            split_lm = SplitCausalLM.connect(server.url, token=server.token, model=model, ca_file=server.cert)
        split_lm.stages[1].keep_replies = True  # to show what the server could read of the answer
        with status("generating through the server ...", quiet=json_output):
            split_result = split_lm.generate(prompt, chat=True, max_new_tokens=max_new_tokens)
        split_lm.close()
        with status("attacking what the server received ...", quiet=json_output):
            privacy = exposure(split_lm, split_result.prompt_ids, split_result.token_ids)
    finally:
        server.__exit__(None, None, None)
    hf_model, tokenizer = load_model(model, quiet=json_output)
    with status("generating with the unsplit model ...", quiet=json_output):
        plain_result = SplitCausalLM(hf_model, tokenizer=tokenizer).generate(prompt, chat=True, max_new_tokens=max_new_tokens)
    from splitveil.experiments.slip_text import prompt_deployment_exposure

    with status("the same prompt through SLIP's prompt deployment (executor and mask dealer child processes, TLS) ...",
                quiet=json_output):
        masked = prompt_deployment_exposure(model, prompt, cuts=cuts, max_new_tokens=min(max_new_tokens, SLIP_TOKENS),
                                            model=hf_model, tokenizer=tokenizer)
    up, down = split_result.bytes_per_decode_step
    layers = hf_model.config.num_hidden_layers
    summary = {
        "model": model,
        "plan": split_lm.plan.to_dict(),
        "layers": {"head": cuts[0], "trunk": cuts[1] - cuts[0], "tail": layers - cuts[1]},
        "transport": f"TLS WebSocket to {server.url}",
        "server_certificate_sha256": server.fingerprint,
        "prompt": prompt,
        "text": split_result.text,
        "identical_to_unsplit": split_result.token_ids == plain_result.token_ids,
        "new_tokens": len(split_result.token_ids),
        "bytes_per_token_up": up,
        "bytes_per_token_down": down,
        "prefill_bytes_up": split_result.bytes_up - split_result.decode_bytes_up,
        "round_trips": split_result.round_trips,
        "privacy": privacy,
        "split_tokens_per_second": split_result.decode_tokens_per_second,
        "unsplit_tokens_per_second": plain_result.decode_tokens_per_second,
    }
    summary["speed_ratio"] = summary["split_tokens_per_second"] / summary["unsplit_tokens_per_second"]
    summary["prompt_deployment"] = {
        "offloaded": f"the linear layers of layers {cuts[0]}..{cuts[1] - 1} and the LM head, on fixed-point inputs masked "
                     f"with ChaCha20 from a per-session seed (k = 0)",
        "privacy": {key: masked[key] for key in ("attack", "token_recovery", "recovered_user_text",
                                                 "closest_relative_distance", "seconds", "frames_received")},
        "new_tokens": len(masked["token_ids"]),
        "same_tokens_as_unsplit": masked["token_ids"] == plain_result.token_ids[: len(masked["token_ids"])],
        "tokens_per_second": masked["decode_tokens_per_second"],
        "round_trips_per_decode_step": masked["round_trips_per_decode_step"],
        "device_cpu_seconds_per_decode_token": masked["device_cpu_seconds_per_decode_token"],
        "unsplit_cpu_seconds_per_decode_token": plain_result.cpu_seconds_decode / max(plain_result.decode_tokens, 1),
        "device_weight_bytes": masked["device_weight_bytes"],
        "model_weight_bytes": plain_result.weight_bytes_resident,
        "trust": masked["trust"],
    }
    if json_output:
        print_json(summary)
        return
    out = typer.echo
    head, trunk, tail = summary["layers"].values()
    out(f"splitveil demo: {model}, Λ-split {cuts[0]},{cuts[1]} = head {head} layers | trunk {trunk} layers | tail {tail} layers")
    out(f"  this process ran head and tail; `splitveil serve` (pid {server.process.pid}) ran the trunk behind "
        f"{summary['transport']} (certificate sha256 {server.fingerprint[:16]}..., bearer token)")
    out(f"  prompt : {prompt}")
    out(f"  answer : {split_result.text.strip()}")
    out(f"  identical to the unsplit model: {'yes' if summary['identical_to_unsplit'] else 'NO'} "
        f"({summary['new_tokens']} greedy tokens, fp32 wire)")
    out(f"  bytes per token: {up:.0f} up, {down:.0f} down (prefill sent {summary['prefill_bytes_up']} bytes up; "
        f"{summary['round_trips']} round trips)")
    out(f"  privacy: the server can read {privacy['token_recovery']:.0%} of your prompt's tokens from what it received "
        f"({privacy['attack']}, {privacy['seconds']:.0f} s): \"{privacy['recovered_user_text']}\"")
    out(f"           and {privacy['answer_recovery']:.0%} of the answer through the public tail; see `splitveil attack text`")
    out(f"  decode speed: split over TLS {summary['split_tokens_per_second']:.1f} tok/s, unsplit "
        f"{summary['unsplit_tokens_per_second']:.1f} tok/s (ratio {summary['speed_ratio']:.3f})")
    slip = summary["prompt_deployment"]
    seen = slip["privacy"]
    out(f"  prompt deployment (SLIP with a mask dealer, `generate --split {cuts[0]},{cuts[1]} --protect prompt --dealer "
        f"local`): {slip['offloaded']} in an executor child process over TLS; a dealer child process deals the masks' terms")
    out(f"  privacy: the executor can read {seen['token_recovery']:.0%} of your prompt's tokens from the "
        f"{seen['frames_received']} frames it received ({seen['attack']}; closest candidate at "
        f"{seen['closest_relative_distance']:.3f} of the row's norm, {seen['seconds']:.0f} s): \"{seen['recovered_user_text']}\"")
    cpu, local = slip["device_cpu_seconds_per_decode_token"] or float("nan"), slip["unsplit_cpu_seconds_per_decode_token"]
    out(f"  device's share: {cpu * 1000:.1f} ms of CPU per decode token against {local * 1000:.1f} unsplit here "
        f"({cpu / local:.2f}x); weights held {slip['device_weight_bytes'] / 2**20:.0f} MiB of the model's "
        f"{slip['model_weight_bytes'] / 2**20:.0f} MiB ({slip['device_weight_bytes'] / slip['model_weight_bytes']:.0%})")
    out(f"  cost: decode {slip['tokens_per_second'] or 0:.2f} tok/s against {summary['unsplit_tokens_per_second']:.1f} unsplit, "
        f"{slip['round_trips_per_decode_step'] or 0:.0f} round trips per decode step; first {slip['new_tokens']} tokens "
        f"identical to the unsplit model: {'yes' if slip['same_tokens_as_unsplit'] else 'NO'}")
    out(f"  trust: {slip['trust']}")
