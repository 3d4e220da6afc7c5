"""Speculative decoding across a split: draft on the device, verify k positions in one pass through the split.

Every decode step of a split costs one round trip to the cloud (SLIP's masked deployment: one per offloaded linear
group). A *drafter* on the device guesses the next k tokens; the device then sends the last token and the k drafts
through the split as one k+1-position forward (one round trip; SLIP: one masked pass per group), reads the logits at
every position from its own tail, and keeps the longest prefix of drafts the model agrees with plus one token of
its own. The positions it rejected are rolled back in every part (the cloud's by a TRUNCATE frame, sent with the
next forward). Greedy output is the model's own greedy output; sampled output has the distribution of sequential
sampling (the speculative sampling rule: accept a draft x with probability min(1, p(x) / q(x)), otherwise sample
from the normalised max(0, p - q)), where p is the model's distribution after temperature, top-k and top-p and q
the drafter's.

Drafters (`DRAFTERS`): `prompt-lookup` (the continuation of the latest earlier occurrence of the last n tokens in
the prompt and the answer so far; deterministic, q is one-hot), `self` (the device's own head and tail with the
trunk skipped: no weights beyond what the device holds). `DraftPolicy` sets k per pass from the measured
acceptance of each drafting source and the measured cost of a pass: it drafts more over a slow link and nothing
when drafts do not pay, so a prompt the drafter cannot predict costs little.
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from splitveil.core.errors import ConfigError
from splitveil.core.registry import Registry
from splitveil.edge.sampling import token_probabilities

DRAFTERS: Registry = Registry("drafter")
SPECULATE_CHOICES = ("off", "prompt-lookup", "self")


@dataclass
class Sampling:
    """How tokens are chosen: greedy, or sampled from the processed distribution with `generator`."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return token_probabilities(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


class Drafter(ABC):
    """Guesses the next tokens on the device."""

    name = "drafter"
    #: True when drafting costs real work (the policy then sets the count before drafting, not after)
    costly = False
    #: what the latest drafts came from (acceptance is tracked per source: prompt lookup's match length)
    source: str = "drafter"

    @abstractmethod
    def draft(self, context: list[int], count: int, sampling: Sampling) -> tuple[list[int], torch.Tensor | None]:
        """Up to `count` tokens that may follow `context` (prompt and answer so far), and the distribution each was
        drawn from ([n, V]), or None when the drafts are deterministic (q one-hot on each draft)."""

    def close(self) -> None:
        """Releases what the drafter holds (its caches)."""


@DRAFTERS.register("prompt-lookup")
class PromptLookup(Drafter):
    """The tokens that followed the latest earlier occurrence of the context's last n tokens (n = `max_ngram` down
    to `min_ngram`): answers that copy from the prompt (summaries, rewrites, code edits) are drafted for free.

    When no n-gram of the context's end occurs earlier, the answer may have just replaced one word of the text it
    copies ("friday" -> "Friday" in a rewrite): the `max_ngram` tokens before the last one are looked up instead,
    and the drafts are what follows the occurrence one token on (source `subst-n`). Only a full `max_ngram` match
    counts: after shorter ones the guess was never accepted (0 of 40 tries in `bench link`), and every source the
    policy has not measured yet costs a few exploratory passes.
    """

    name = "prompt-lookup"

    def __init__(self, lm=None, *, max_ngram: int = 3, min_ngram: int = 1, substitution: bool = True):
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.substitution = max_ngram, min_ngram, substitution

    def _follow(self, context: list[int], end: int, skip: int, count: int, *, shortest: int | None = None
                ) -> tuple[list[int], int]:
        """What follows (after `skip` tokens) the latest earlier occurrence of the longest n-gram ending at `end`
        (n from `max_ngram` down to `shortest`, default `min_ngram`)."""
        for n in range(min(self.max_ngram, end - 1), (shortest or self.min_ngram) - 1, -1):
            tail = context[end - n : end]
            for start in range(end - n - 1, -1, -1):  # latest occurrence first
                if context[start : start + n] == tail:
                    after = start + n + skip
                    follow = context[after : min(after + count, end)]
                    if follow:
                        return follow, n
        return [], 0

    def draft(self, context: list[int], count: int, sampling: Sampling) -> tuple[list[int], None]:
        follow, n = self._follow(context, len(context), 0, count)
        if follow:
            self.source = f"ngram-{n}"
            return follow, None
        if self.substitution:
            # the last token replaced the one after the occurrence: draft from the occurrence's second next token
            follow, n = self._follow(context, len(context) - 1, 1, count, shortest=self.max_ngram)
            if follow:
                self.source = f"subst-{n}"
                return follow, None
        return [], None


@DRAFTERS.register("self")
class SelfDraft(Drafter):
    """The device's own head and tail with the trunk skipped (a Λ-split's edge parts, own KV caches): drafts cost
    the device a few layers per token and no weight beyond its own. Cheap, but weak on a model whose trunk does most
    of the work: `DraftPolicy` stops drafting when its drafts are rejected."""

    name = "self"
    costly = True
    source = "self"

    def __init__(self, lm):
        from splitveil.models.splittable import Part

        stages = lm.stages
        if len(stages) != 3 or not isinstance(stages[0], Part) or not isinstance(stages[-1], Part):
            raise ConfigError("--speculate self needs a Λ-split with head and tail on this device (two cuts); use "
                              "--speculate prompt-lookup")
        self.head, self.tail = stages[0].clone(), stages[-1].clone()
        self.tail.last_logits_only = True
        self.fed: list[int] = []  # tokens whose positions the drafter's caches hold

    @torch.inference_mode()
    def _feed(self, tokens: list[int]) -> torch.Tensor:
        logits = self.tail(self.head(torch.tensor([tokens], dtype=torch.long)))
        self.fed += tokens
        return logits[0, -1]

    def draft(self, context: list[int], count: int, sampling: Sampling) -> tuple[list[int], torch.Tensor | None]:
        common = 0
        for a, b in zip(self.fed, context[:-1]):  # the last context token is fed again: its logits are needed
            if a != b:
                break
            common += 1
        if common < len(self.fed):
            self.head.truncate(common)
            self.tail.truncate(common)
            self.fed = self.fed[:common]
        logits = self._feed(context[common:])
        drafts, dists = [], []
        for index in range(count):
            if sampling.do_sample:
                probs = sampling.probabilities(logits)
                token = int(torch.multinomial(probs, 1, generator=sampling.generator))
                dists.append(probs)
            else:
                token = int(torch.argmax(logits.float()))
            drafts.append(token)
            if index + 1 < count:
                logits = self._feed([token])
        return drafts, (torch.stack(dists) if dists else None)

    def close(self) -> None:
        self.head.reset()
        self.tail.reset()
        self.fed = []


def make_drafter(name: str, lm) -> Drafter:
    return DRAFTERS.get(name)(lm)


def accept(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, sampling: Sampling) -> list[int]:
    """The tokens one verification pass yields: the accepted drafts, then one token of the model's own.

    Args:
        logits: [k + 1, V]: row i is the model's next-token logits after the pass's i-th position (the last
            committed token, then each draft).
        drafts: the k drafts.
        q: [k, V] the distribution each draft was drawn from, or None for deterministic drafts (one-hot).
        sampling: greedy, or the sampling settings and generator.

    Greedy: drafts are accepted while they equal the model's argmax, and the argmax at the first mismatch (or after
    the last draft) is the extra token, so the output is the model's greedy output. Sampling: the speculative
    sampling rule, whose output has the model's distribution whatever q is.
    """
    out: list[int] = []
    for index, draft in enumerate(drafts):
        row = logits[index].float()
        if not sampling.do_sample:
            token = int(torch.argmax(row))
            out.append(token)
            if token != draft:
                return out
            continue
        p = sampling.probabilities(row)
        q_row = None if q is None else q[index].float()
        q_draft = 1.0 if q_row is None else float(q_row[draft])
        ratio = float(p[draft]) / q_draft if q_draft > 0 else 0.0
        if float(torch.rand((), generator=sampling.generator)) < min(1.0, ratio):
            out.append(draft)
            continue
        residual = p.clone()
        if q_row is None:
            residual[draft] = 0.0
        else:
            residual = (residual - q_row).clamp_min(0.0)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p
        out.append(int(torch.multinomial(residual, 1, generator=sampling.generator)))
        return out
    last = logits[len(drafts)].float()
    if sampling.do_sample:
        out.append(int(torch.multinomial(sampling.probabilities(last), 1, generator=sampling.generator)))
    else:
        out.append(int(torch.argmax(last)))
    return out


@dataclass
class DraftPolicy:
    """How many drafts the next pass verifies: the count that maximises the expected tokens per second of the pass.

    A pass with k drafts yields 1 + a tokens, where a is how many drafts the model accepts; with a per-draft
    acceptance rate alpha (each draft accepted given the ones before it were), the expected yield is
    1 + alpha + ... + alpha^k. It costs t(k) seconds: one round trip per remote party plus the compute of k + 1
    positions. The policy picks k = argmax yield(k) / t(k), so it drafts more when the network is slow (a round
    trip is dear, a verified position cheap) and stops drafting from a source whose drafts are rarely accepted.

    Both factors are measured as decoding goes: alpha per drafting *source* (prompt lookup's match length, or the
    self drafter), from a Beta(1, 1) prior; t(k) from the passes' own wall time (the median of the last `window`
    passes with k drafts, robust to a stray slow pass; a straight line through those medians for counts not tried
    yet; before two counts are seen, `prior_slope` of a plain step per position, which a faster cloud or a slower
    link then corrects). Drafting must promise `margin` (10%) more tokens per second than a plain step: at break-even
    the estimates' noise decides, and a wrong call costs a real slowdown (chat prompts at 80 ms, where one accepted
    draft in five about pays for its position, measured 0.91-1.02x without it). The first pass's time is not used
    (it carries one-off costs). A declined source is probed with one draft every `probe_every` declines, so neither
    estimate goes stale on a noisy early measurement.
    With `adaptive=False` every pass carries all the drafts found (the classic fixed-length prompt lookup): the
    baseline, and deterministic where a test needs drafts verified whatever the timing.
    """

    limit: int  # the most drafts per pass (--draft-tokens)
    adaptive: bool = True  # False (--draft-policy fixed): every pass carries all the drafts found, up to `limit`
    prior_slope: float = 0.14  # a position's cost as a fraction of a plain step, until measured
    window: int = 5  # passes per draft count whose median is its wall time
    probe_every: int = 8  # declines of available drafts between two one-draft probes
    margin: float = 0.1  # drafts must promise this much more than a plain step: both estimates are noisy
    acceptance: dict = field(default_factory=dict)  # source -> (accepted, tried)
    seconds: dict = field(default_factory=dict)  # drafts in a pass -> the last `window` wall times of such passes
    passes: int = 0
    declined: int = 0

    def __post_init__(self):
        if not 1 <= self.limit <= 64:
            raise ConfigError(f"--draft-tokens must be between 1 and 64, got {self.limit}")

    def budget(self, room: int) -> int:
        """The most drafts the next pass may carry with `room` tokens still allowed (a pass yields drafts + 1)."""
        return max(0, min(self.limit, room - 1))

    def rate(self, source) -> float:
        accepted, tried = self.acceptance.get(source, (0, 0))
        return (accepted + 1) / (tried + 2)

    def pass_seconds(self, drafts: int, points: list | None = None) -> float:
        """The expected wall time of a pass with `drafts` drafts (relative units before any pass is measured);
        `points` is `timings()`, passed in by a caller that asks for several counts."""
        points = self.timings() if points is None else points
        measured = dict(points)
        if drafts in measured:
            return measured[drafts]
        if len(points) >= 2:
            n = len(points)
            mean_k = sum(k for k, _ in points) / n
            mean_t = sum(t for _, t in points) / n
            spread = sum((k - mean_k) ** 2 for k, _ in points)
            slope = max(0.0, sum((k - mean_k) * (t - mean_t) for k, t in points) / spread)
            return max(mean_t + slope * (drafts - mean_k), 1e-6)
        if points:
            known, t = points[0]
            base = t / (1 + self.prior_slope * known)
        else:
            base = 1.0
        return base * (1 + self.prior_slope * drafts)

    def timings(self) -> list[tuple[int, float]]:
        """(drafts, median wall time) of every draft count measured so far, by count."""
        return sorted((k, statistics.median(times)) for k, times in self.seconds.items())

    def choose(self, available: int, source) -> int:
        """How many of `available` drafts from `source` the next pass should carry (call once per pass)."""
        if not self.adaptive:
            return min(available, self.limit)
        alpha, points = self.rate(source), self.timings()
        plain = 1.0 / self.pass_seconds(0, points)
        best, best_rate = 0, plain * (1 + self.margin)  # drafting must beat a plain step by the margin
        expected = 1.0
        for k in range(1, available + 1):
            expected += alpha**k
            rate = expected / self.pass_seconds(k, points)
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0 and available > 0:
            self.declined += 1
            if self.declined % self.probe_every == 0:
                return 1
        return best

    def update(self, source, drafted: int, accepted: int, seconds: float) -> None:
        """Records a pass: its drafts (from `source`), how many the model accepted, and its wall time."""
        if self.passes > 0:
            self.seconds[drafted] = (self.seconds.get(drafted, []) + [seconds])[-self.window :]
        self.passes += 1
        if drafted:
            got, tried = self.acceptance.get(source, (0, 0))
            # each draft is a trial given the ones before it were accepted: the first rejected one ends the pass
            self.acceptance[source] = (got + accepted, tried + min(accepted + 1, drafted))


@dataclass
class SpeculationStats:
    """What `--json` reports of speculative decoding."""

    drafter: str
    draft_tokens: int
    draft_policy: str = "adaptive"
    passes: int = 0  # forward passes after the prefill (each one round trip per remote party)
    passes_with_drafts: int = 0
    drafted: int = 0
    accepted: int = 0
    by_source: dict = field(default_factory=dict)  # source -> [accepted, tried] (DraftPolicy.acceptance)

    def to_dict(self, generated: int) -> dict:
        decode_tokens = max(generated - 1, 0)
        return {"drafter": self.drafter, "draft_tokens": self.draft_tokens, "draft_policy": self.draft_policy,
                "passes": self.passes,
                "passes_with_drafts": self.passes_with_drafts, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
                "tokens_per_pass": round(decode_tokens / self.passes, 4) if self.passes else None,
                "acceptance_by_source": {source: {"accepted": got, "tried": tried}
                                         for source, (got, tried) in sorted(self.by_source.items())}}
