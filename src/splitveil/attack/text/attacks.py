"""Hidden-state -> token attacks on what the cloud sees.

- `NearestEmbedding`: each uplink state's nearest row of the public embedding matrix (cosine). A baseline: it is
  exact only when the head is the embedding alone (cut 0).
- `ExactInversion`: sequential exact inversion through the public head. Position by position, with the KV cache of
  the prefix recovered so far, rank every vocabulary token by a first-order (gradient) estimate of
  ||head(prefix + token) - observed||^2, verify the best candidates in one batch through the real head part, and
  accept the first whose output matches the observation within tolerance; otherwise re-rank from the closest and
  repeat, and finally take the closest seen. Decoder LMs are injective (SipIt, arXiv 2510.15511), so a match is
  the token.
- `TailReadout`: the downlink through the public tail: the answer the device will pick, read by the cloud.
"""

from __future__ import annotations

import time

import torch

from splitveil.attack.base import Attack, ThreatModel
from splitveil.attack.text.target import TextTarget, text_target
from splitveil.core.errors import ConfigError
from splitveil.core.registry import Registry
from splitveil.models.causal_lm import CausalLMPart

TEXT_ATTACKS: Registry = Registry("text attack")


def nearest_tokens(observed: torch.Tensor, unit_embeddings: torch.Tensor) -> list[int]:
    """Pure: for each state [T, H], the row of the unit-normalised embedding matrix [V, H] with the highest cosine."""
    states = torch.nn.functional.normalize(observed.float(), dim=-1)
    return (states @ unit_embeddings.T).argmax(-1).tolist()


#: relative distance ||head(token) - observed|| / ||observed|| below which a candidate counts as the observed token,
#: per wire codec. The true token's distance measured on SmolLM2 (depths 1, 8, 15): fp32 <= 7.8e-6 (batched vs
#: sequential arithmetic), fp16 <= 3.4e-4, bf16 <= 2.7e-3 (rounding); each tolerance leaves a margin of 3x or more.
#: A looser one accepts wrong tokens where the state is dominated by token-independent massive activations: at
#: depth 15 the first position's state (norm ~22,000, an attention sink) of "Alert" lies 4.6e-3 from "Write"'s.
WIRE_TOLERANCE = {"fp32": 1e-4, "fp16": 1.5e-3, "bf16": 8e-3}


def wire_tolerance(wire: str) -> float:
    """The exact attack's match tolerance for hidden states sent in `wire` (fp32, fp16 or bf16)."""
    try:
        return WIRE_TOLERANCE[wire]
    except KeyError:
        raise ConfigError(f"no match tolerance for wire {wire!r}; known: {', '.join(WIRE_TOLERANCE)}") from None


def chat_template_hints(tokenizer, prompt_ids: list[int]) -> tuple[list[int | None], slice]:
    """The chat template's public tokens around the user's text, as the attacker expects them: (hints for the exact
    attack's `reconstruct`, None where the user's text is; the slice of the user's text in `prompt_ids`)."""
    template = tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    n = len(prompt_ids)
    prefix = 0
    while prefix < min(len(template), n) and template[prefix] == prompt_ids[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(template), n) - prefix and template[-1 - suffix] == prompt_ids[-1 - suffix]:
        suffix += 1
    return [*prompt_ids[:prefix], *([None] * (n - prefix - suffix)), *prompt_ids[n - suffix:]], slice(prefix, n - suffix)


def merge_rankings(rankings: list[torch.Tensor]) -> torch.Tensor:
    """Pure: token ids ordered by their best rank over several score vectors [V] (higher score = better)."""
    ranks = torch.stack([torch.argsort(torch.argsort(scores, descending=True)) for scores in rankings])  # 0 = best
    return torch.argsort(ranks.min(0).values, stable=True)


def granted(attack: Attack, target: TextTarget | CausalLMPart):
    """The capabilities `attack`'s threat model grants from `target` (a TextTarget, or a bare part offering its own
    weights); ConfigError when the target cannot give them."""
    return text_target(target).grant(attack.threat_model, attack.name)


@TEXT_ATTACKS.register("nearest")
class NearestEmbedding(Attack):
    """Nearest embedding row (cosine) to each observed uplink state."""

    name = "nearest"
    threat_model = ThreatModel(observes="uplink", knows_head_weights=True,
                               description="a cloud that knows the public embedding matrix")

    def __init__(self, target: TextTarget | CausalLMPart):
        head = granted(self, target).head  # a private copy of the public head
        self.embeddings = torch.nn.functional.normalize(head.input_embeddings.detach().float(), dim=-1)  # [V, H]

    @torch.inference_mode()
    def reconstruct(self, observed: torch.Tensor) -> list[int]:
        """observed: [T, H] uplink states of T positions -> T token ids."""
        return nearest_tokens(observed, self.embeddings)


@TEXT_ATTACKS.register("exact")
class ExactInversion(Attack):
    """Sequential exact inversion of the uplink with the public head (gradient ranking + batched verification).

    Per position: rank the vocabulary by a first-order estimate of the loss from a start token (the nearest
    embedding), verify the best `candidates` through the real head; if none matches, rank again from the closest
    tokens found so far, merge the rankings, and verify in that order in chunks until a token matches or
    `max_verified` tokens were tried (default: the whole vocabulary, which makes the attack exact on an undefended
    fp32 uplink); then take the closest seen.

    Args:
        target: what the split offers (a `TextTarget`, or the head part itself); the attack is granted a private
            copy of the public head (embedding and the layers before the cut) and keeps its own prefix cache in it.
        candidates: tokens verified in the first round and per chunk afterwards.
        restarts: extra starting points whose rankings are merged after the first round.
        max_verified: budget of verified tokens per position (None = the whole vocabulary).
        tolerance: a candidate matches when ||head(candidate) - observed|| <= tolerance x ||observed||: the wire's
            rounding (`wire_tolerance`; the default suits fp16 and fp32) or the noise the attacker expects.
        ranker: optional scores [T, V] for observed states [T, H] (e.g. a learned readout's logits): its best
            tokens are verified first and its ranking is merged with the gradient's. It changes the cost, never the
            answer: every accepted token is still verified through the head.
        transform: what a defence does to the head's output before it crosses, as the attacker models it from public
            weights (differentiable; e.g. SLIP's cloud receives layer A's normed input): candidates are compared with
            the observation after it. None compares the head's output itself.
        output_bound: an upper bound on the norm of every candidate's (transformed) output, from public weights
            (e.g. a norm layer's: max|w| sqrt(H)). Every candidate then lies at least ||observed|| - output_bound
            from the observation; when that exceeds the match limit, no token can match, so the search stops after
            its first round and takes the closest seen (as when the budget runs out). None: no bound, full search.
    """

    name = "exact"
    threat_model = ThreatModel(observes="uplink", knows_head_weights=True,
                               description="a cloud that knows the public weights of the layers before the cut")

    def __init__(self, target: TextTarget | CausalLMPart, *, candidates: int = 256, restarts: int = 3,
                 max_verified: int | None = None, tolerance: float = WIRE_TOLERANCE["fp16"], ranker=None,
                 transform=None, output_bound: float | None = None):
        self.head = granted(self, target).head  # a private copy of the public head, with its own prefix cache
        self.ranker = ranker
        self.transform = transform if transform is not None else (lambda states: states)
        self.output_bound = output_bound
        self.search: list[dict] = []  # per position of the last reconstruct: verified, closest distance, unmatchable
        self.embeddings = self.head.input_embeddings.detach()  # [V, H]
        self.unit_embeddings = torch.nn.functional.normalize(self.embeddings.float(), dim=-1)  # first guesses
        vocab = self.embeddings.shape[0]
        self.candidates = min(candidates, vocab)
        self.restarts = restarts
        self.max_verified = vocab if max_verified is None else min(max_verified, vocab)
        self.tolerance = tolerance
        self.seconds_per_token = float("nan")
        self.verified = 0  # candidates pushed through the head in all

    def _distances(self, token_ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.transform(self.head.fork_forward(self.embeddings[token_ids].unsqueeze(1))[:, 0])  # [B, H]
        self.verified += len(token_ids)
        return (out - target).norm(dim=-1)

    def _scores(self, start_token: int, target: torch.Tensor) -> torch.Tensor:
        """First-order change of ||head(e) - target||^2 when e moves from the start token's embedding to each row."""
        embed = self.embeddings[start_token].clone().requires_grad_(True)
        with torch.enable_grad():
            out = self.transform(self.head.fork_forward(embed.view(1, 1, -1))[0])[0]
            (grad,) = torch.autograd.grad((out - target).pow(2).sum(), embed)
        return self.embeddings @ grad

    def _limit(self, target: torch.Tensor) -> float:
        """The largest distance at which a candidate counts as the observed state's token."""
        return self.tolerance * (float(target.norm()) or 1.0)

    def _invert_position(self, target: torch.Tensor, first_guess: int, prior: torch.Tensor | None = None) -> int:
        limit = self._limit(target)
        tried = torch.zeros(self.embeddings.shape[0], dtype=torch.bool)
        seen: dict[int, float] = {}

        def verify(token_ids: torch.Tensor) -> int | None:
            token_ids = token_ids[~tried[token_ids]]
            if not len(token_ids):
                return None
            tried[token_ids] = True
            distances = self._distances(token_ids, target)
            seen.update(zip(token_ids.tolist(), distances.tolist()))
            index = int(distances.argmin())
            return int(token_ids[index]) if float(distances[index]) <= limit else None

        with torch.no_grad():
            first = torch.topk(prior if prior is not None else -self._scores(first_guess, target), self.candidates).indices
        hit = verify(torch.cat([torch.tensor([first_guess]), first]))
        if hit is not None:
            return hit
        if self.unmatchable(target):  # proven: no token's output comes within the limit, searching on changes nothing
            return min(seen, key=seen.get)
        starts = [t for t, _ in sorted(seen.items(), key=lambda item: item[1])[: self.restarts]]
        with torch.no_grad():
            rankings = [-self._scores(s, target) for s in [first_guess, *starts]] + ([prior] if prior is not None else [])
            order = merge_rankings(rankings)
        for chunk in torch.split(order, self.candidates):
            if int(tried.sum()) >= self.max_verified:
                break
            hit = verify(chunk)
            if hit is not None:
                return hit
        return min(seen, key=seen.get)

    def unmatchable(self, target: torch.Tensor) -> bool:
        """Whether `output_bound` proves that no token matches `target`: every candidate output has norm <= bound,
        so its distance is >= ||target|| - bound (triangle inequality), which exceeds the match limit."""
        return self.output_bound is not None and float(target.norm()) - self.output_bound > self._limit(target)

    def reconstruct(self, observed: torch.Tensor, hints: list[int | None] | None = None) -> list[int]:
        """observed: [T, H] uplink states of consecutive positions from the start -> T token ids.

        `hints` are tokens the attacker expects at some positions (e.g. the public chat template); each is verified
        first and accepted only if it matches, so a wrong hint costs one candidate and changes nothing.
        """
        started = time.perf_counter()
        self.head.reset()
        self.search = []
        with torch.no_grad():
            priors = self.ranker(observed.float()) if self.ranker is not None else None  # [T, V]
            guesses = priors.argmax(-1).tolist() if priors is not None else nearest_tokens(observed, self.unit_embeddings)
        recovered: list[int] = []
        for position in range(observed.shape[0]):
            target = observed[position].float()
            hint = hints[position] if hints is not None and position < len(hints) else None
            token = None
            if hint is not None:
                distance = float(self._distances(torch.tensor([hint]), target)[0])
                token = hint if distance <= self._limit(target) else None
            verified_before = self.verified
            if token is None:
                token = self._invert_position(target, guesses[position], None if priors is None else priors[position])
            self.search.append({"verified": self.verified - verified_before,
                                "closest_relative": float(self._distances(torch.tensor([token]), target)[0])
                                / (float(target.norm()) or 1.0), "unmatchable": self.unmatchable(target)})
            self.verified -= 1  # the line above only measures the accepted token's distance again
            recovered.append(token)
            self.head(torch.tensor([[token]]))  # commit: the prefix cache grows by the recovered token
        self.seconds_per_token = (time.perf_counter() - started) / max(observed.shape[0], 1)
        return recovered


class TailReadout(Attack):
    """The downlink read through the public tail: the greedy token the device will pick at each step."""

    name = "tail-readout"
    threat_model = ThreatModel(observes="downlink", knows_tail_weights=True,
                               description="a cloud that knows the public weights of the layers after the trunk")

    def __init__(self, target: TextTarget | CausalLMPart):
        self.tail = granted(self, target).tail  # a private copy of the public tail, all positions' logits

    @torch.inference_mode()
    def reconstruct(self, observed: torch.Tensor) -> list[int]:
        """observed: [T, H] downlink states, in order from the first position -> the argmax token after each."""
        self.tail.reset()
        return self.tail(observed.unsqueeze(0))[0].argmax(-1).tolist()
