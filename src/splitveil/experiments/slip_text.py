"""What the demo shows of SLIP's prompt deployment: the adaptive exact attack on its executor's view of one prompt
(the deployment itself is `protect.slip.deployment.SlipDealerDeployment`, the text protection "slip-dealer": the
prompt deployment with a mask dealer)."""

from __future__ import annotations

from splitveil.protect.slip.deployment import SlipDealerDeployment


def prompt_deployment_exposure(model_name: str, prompt: str, *, cuts: tuple[int, int], max_new_tokens: int,
                               chat: bool = True, budget: int = 4096, model=None, tokenizer=None) -> dict:
    """For the demo: `prompt` through SLIP's prompt deployment with a mask dealer (fixed point, k = 0; the executor
    and the dealer child processes; the executor's view recorded), and what the adaptive exact attack reads of the user's text from that view: the same attack
    and budget as the demo's undefended line (`budget` candidates per position, the chat template's tokens tried
    first), comparing candidates in the space the cloud receives, and stopping after the first round where public
    weights prove that no token can match (`ExactInversion.output_bound`). Also the answer, its tokens and the decode speed."""
    import time

    from splitveil.attack.text.adaptive import adaptation_for
    from splitveil.attack.text.attacks import ExactInversion, chat_template_hints
    from splitveil.attack.text.target import TextTarget
    from splitveil.metrics.text import token_recovery
    from splitveil.models.causal_lm import CausalLMSplittable
    from splitveil.models.loading import load_causal_lm
    from splitveil.plan.plan import SplitPlan

    if model is None:
        model, tokenizer = load_causal_lm(model_name)
    plan = SplitPlan.lambda_split(*cuts)
    adaptation = adaptation_for("slip-dealer")
    with SlipDealerDeployment(model_name, model, tokenizer, plan, strength=0, wire="fp32") as deployment:
        adaptation.bind(deployment)  # fused groups or not: what the attacker models
        seen = deployment.observe(prompt, max_new_tokens, chat=chat)
        described = deployment.describe()
    public = CausalLMSplittable(model)
    target = TextTarget(public, public.boundary(cuts[0]), public.boundary(cuts[1]))
    attack = ExactInversion(target, candidates=256, max_verified=budget, **adaptation.attack_options("exact", target))
    n = len(seen.prompt_ids)
    hints, user = chat_template_hints(tokenizer, seen.prompt_ids) if chat else ([None] * n, slice(0, n))
    started = time.perf_counter()
    recovered = attack.reconstruct(seen.uplink[:n], hints=hints)
    seconds = time.perf_counter() - started
    return {
        "attack": f"exact inversion adapted to SLIP, at most {budget} candidates per position, stopping after the "
                  f"first round where public weights prove no token can match ("
                  f"{'the residual stream, unnormed: fused groups' if adaptation.fused else 'the normed input'})",
        "positions_unmatchable": sum(s["unmatchable"] for s in attack.search),
        "token_recovery": token_recovery(seen.prompt_ids[user], recovered[user]),
        "recovered_user_text": tokenizer.decode(recovered[user], skip_special_tokens=True).strip(),
        "closest_relative_distance": min(s["closest_relative"] for s in attack.search),
        "seconds": seconds,
        "token_ids": seen.generated_ids,
        "text": tokenizer.decode(seen.generated_ids, skip_special_tokens=True),
        "decode_tokens_per_second": described["decode_tokens_per_second"],
        "round_trips_per_decode_step": described["round_trips_per_decode_step"],
        "frames_received": described["frames_received"],
        "device_cpu_seconds_per_decode_token": described["device_cpu_seconds_per_decode_token"],
        "device_weight_bytes": described["weight_bytes_resident"],
        "trust": described["trust"],
    }
