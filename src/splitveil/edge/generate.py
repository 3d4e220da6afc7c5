"""SplitCausalLM: generation through a split plan, used like transformers' `generate`.

The device runs every part placed on the edge (Λ-split: head and tail); each other part is reached through a
transport (in-process loopback by default; a network transport for a remote server). Only the hidden states of
new positions cross a cut: the prompt's positions once at prefill, then one position per decode step, because
every part keeps the KV cache of its own layers.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from splitveil.core.errors import ConfigError, PlanError
from splitveil.models.causal_lm import CausalLMSplittable
from splitveil.models.footprint import peak_rss_bytes, resident_weight_bytes
from splitveil.plan.plan import Placement, SplitPlan, apply
from splitveil.serve.service import PartService
from splitveil.transport.base import Transport
from splitveil.transport.loopback import LoopbackTransport
from splitveil.edge.sampling import select_token
from splitveil.edge.speculative import Sampling
from splitveil.wire.codecs import FLOAT_CODECS
from splitveil.edge.remote import RemoteStage


DRAFT_POLICIES = ("adaptive", "fixed")


@dataclass(frozen=True)
class GenerationConfig:
    """What `generate` does; mirrors the transformers arguments that matter for split inference."""

    max_new_tokens: int = 32
    do_sample: bool = False  # greedy when False
    temperature: float = 1.0  # > 0, sampling only
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int | None = None  # sampling seed (None = nondeterministic)
    eos_token_ids: tuple[int, ...] | None = None  # None = the model's own end-of-sequence tokens
    stop: tuple[str, ...] = ()  # stop when the generated text contains one of these
    speculate: str = "off"  # a drafter (edge.speculative.DRAFTERS: prompt-lookup, self) or "off"
    draft_tokens: int = 3  # the most drafted tokens one verification pass checks (see docs/service.md on the default)
    draft_policy: str = "adaptive"  # adaptive: as many drafts as pay (edge.speculative.DraftPolicy); fixed: all found

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.speculate != "off":
            from splitveil.edge.speculative import DRAFTERS

            DRAFTERS.get(self.speculate)  # a ConfigError naming the drafters there are
        if not 1 <= self.draft_tokens <= 64:
            raise ConfigError(f"draft_tokens must be between 1 and 64, got {self.draft_tokens}")
        if self.draft_policy not in DRAFT_POLICIES:
            raise ConfigError(f"unknown draft policy {self.draft_policy!r}: choose {' or '.join(DRAFT_POLICIES)}")


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    text: str  # decoded generated text ("" without a tokenizer)
    prompt_ids: list[int]
    bytes_up: int  # device -> remote, whole frames
    bytes_down: int  # remote -> device
    round_trips: int
    seconds: float  # prefill + decoding wall time (model loading excluded)
    prefill_seconds: float
    decode_seconds: float
    finish_reason: str  # "length", "eos" or "stop"
    plan: dict = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each decode step
    decode_bytes_up: int = 0  # of bytes_up, what the decode steps sent (prefill, open and close excluded)
    decode_bytes_down: int = 0
    cpu_seconds_prefill: float = 0.0  # this process's CPU time (all its threads) during the prefill
    cpu_seconds_decode: float = 0.0  # ... and during the decode steps (token selection included)
    peak_rss_bytes: int = 0  # this process's peak resident set size when the generation ended
    weight_bytes_resident: int = 0  # model weights this process holds (meta parts excluded, tied weights once)
    speculation: dict | None = None  # with --speculate: drafter, passes, drafted and accepted tokens, tokens per pass

    @property
    def decode_tokens(self) -> int:
        """Tokens made by decode steps (the first token comes from the prefill; a speculative pass makes several)."""
        return max(len(self.token_ids) - 1, 0)

    def cost_fields(self) -> dict:
        """What the generation cost this process, as every `generate --json` reports it (so any two runs compare)."""
        return {"decode_tokens": self.decode_tokens, "cpu_seconds_prefill": round(self.cpu_seconds_prefill, 6),
                "cpu_seconds_decode": round(self.cpu_seconds_decode, 6),
                "cpu_seconds_per_decode_token": round(self.cpu_seconds_decode / self.decode_tokens, 6)
                if self.decode_tokens else None,
                "peak_rss_bytes": self.peak_rss_bytes, "weight_bytes_resident": self.weight_bytes_resident}

    @property
    def bytes_per_decode_step(self) -> tuple[float, float]:
        """(up, down) bytes per decode step and cut direction, averaged over the decode steps."""
        steps = max(len(self.step_seconds), 1)
        return self.decode_bytes_up / steps, self.decode_bytes_down / steps

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.token_ids) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")

    def to_json(self) -> dict:
        return asdict(self)


class StopStrings:
    """Finds the first stop string in the text of the tokens generated so far, decoding only a tail window.

    Called after every new token, it gives what searching the whole decoded text would give (the start of the
    earliest stop string, or None) without re-decoding the whole text each time: a new occurrence must end in the
    text the newest token added or changed, so a window of the last tokens whose text holds the longest stop string
    plus `margin` characters (for characters split over several tokens, and the first token of a window decoding
    differently, e.g. without its leading space) finds it. Only on a hit is the whole text decoded, once, for the
    exact position. The window grows while its text is too short (tokens that decode to nothing).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], *, margin: int = 16):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.need = max(len(s) for s in self.stop) + margin  # characters of text a window must hold
        self.window = 4  # tokens; adapts to the tokens' text length

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def find(self, generated: list[int]) -> int | None:
        """Start of the earliest stop string in the decoded `generated`, or None."""
        size = min(self.window, len(generated))
        while True:
            text = self._decode(generated[-size:])
            if len(text) >= self.need or size == len(generated):
                break
            size = min(2 * size, len(generated))
        self.window = max(size, 4)
        if not any(s in text for s in self.stop):
            return None
        text = self._decode(generated)
        hits = [text.find(s) for s in self.stop if s in text]
        return min(hits) if hits else None


class _Monolithic:
    """The unsplit transformers model with its own KV cache: the baseline every split is compared with."""

    def __init__(self, model):
        self.model = model
        self.last_logits_only = True

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    @property
    def positions(self) -> int:
        return self.cache.get_seq_length()

    def truncate(self, length: int) -> None:
        """Keeps the first `length` positions of the KV cache (speculative decoding's rollback)."""
        if not 0 <= length <= self.positions:
            raise ConfigError(f"cannot keep {length} of {self.positions} positions")
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise ConfigError("this model has sliding-window layers, whose cache cannot roll back")
        if length < self.positions:
            self.cache.crop(length - self.positions)  # transformers' crop takes the (negative) positions to drop

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids.to(self.model.device), past_key_values=self.cache, use_cache=True,
                            logits_to_keep=1 if self.last_logits_only else 0)
        return output.logits.float()  # as a split's tail returns them (exact from bf16 and fp16)


@contextmanager
def _every_position(part):
    """While inside, `part` (which holds the LM head) returns the logits of every position, not only the last."""
    keep, part.last_logits_only = part.last_logits_only, False
    try:
        yield part
    finally:
        part.last_logits_only = keep


class RowLogits:
    """The logits after each of T positions, computed from the final-normed hidden states when first read: the first
    row alone (a verification pass whose first draft is rejected reads no other), then every other row in one
    product (the LM head is the device's largest matrix: each product reads all of it)."""

    def __init__(self, hidden: torch.Tensor, head):
        self.hidden, self.head = hidden, head
        self.rows: torch.Tensor | None = None  # rows [0, computed)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @torch.inference_mode()
    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.rows is None:
            self.rows = self.head(self.hidden[:1])
        if index >= self.rows.shape[0]:
            self.rows = torch.cat([self.rows, self.head(self.hidden[self.rows.shape[0] :])])
        return self.rows[index]


class SplitCausalLM:
    """A causal LM run through a split plan; `generate` works like the unsplit model's.

    Args:
        model: a transformers causal LM, or a `CausalLMSplittable` around one.
        plan: the split; None (or an unsplit plan) runs the plain transformers model.
        tokenizer: needed for text prompts, decoded text, stop strings and the chat template.
        wire: codec of the hidden states that cross each cut: fp32 (exact), fp16 or bf16.
        transport: how remote parts are reached; default: an in-process service behind a loopback transport.
    """

    def __init__(self, model, plan: SplitPlan | None = None, *, tokenizer=None, wire: str = "fp32", transport: Transport | None = None,
                 defence=None):
        self.splittable = model if isinstance(model, CausalLMSplittable) else CausalLMSplittable(model)
        self.model = self.splittable.model
        self.tokenizer = tokenizer
        if wire not in FLOAT_CODECS:
            raise ConfigError(f"unknown wire codec {wire!r}; use one of {', '.join(FLOAT_CODECS)}")
        self.wire = wire
        self.plan = plan if plan is not None else SplitPlan.unsplit()
        self.service: PartService | None = None
        self.head_batcher = None  # a LogitsBatcher shared with forks (the edge's lanes), or None
        self.lane_steps = None  # (head, tail) StepBatchers shared with forks, or None
        if not self.plan.cuts:
            self.stages: list = [_Monolithic(self.model)]
            self.transport = transport
            return
        if self.plan.placement[0] != Placement.EDGE:
            raise PlanError("the first part must run on the edge: the device holds the input")
        if defence is not None and hasattr(defence, "session_plan"):  # a defence that moves the cut
            if len(self.plan.cuts) != 2:
                raise PlanError(f"the {defence.name} defence needs a Λ-split (two cuts)")
            self.plan = defence.session_plan(self.plan)
        parts = apply(self.splittable, self.plan)
        remote = {index: part for index, part in enumerate(parts) if self.plan.placement[index] != Placement.EDGE}
        if defence is not None and hasattr(defence, "cloud_part"):  # the cloud runs what the defence gives it
            remote = {index: defence.cloud_part(part) for index, part in remote.items()}
        for part in [*parts, *remote.values()]:
            part.last_logits_only = True
        if transport is None:
            self.service = PartService(
                remote,
                hidden_size=self.splittable.hidden_size,
                info={"cuts": list(self.plan.cuts)},
                max_tokens=getattr(self.splittable.config, "max_position_embeddings", None) or 8192,
            )
            transport = LoopbackTransport(self._locked_handler())
        self.transport = transport
        expect = {"cuts": list(self.plan.cuts), "hidden_size": self.splittable.hidden_size}
        vocab_size = int(self.splittable.lm_head.weight.shape[0])
        last = len(parts) - 1
        self.stages = [
            part if self.plan.placement[index] == Placement.EDGE else RemoteStage(
                transport, index, wire, expect=expect, ends_model=index == last,
                output_size=vocab_size if index == last else self.splittable.hidden_size)
            for index, part in enumerate(parts)
        ]
        if defence is not None:  # the uplink leaves the device through the defence
            from splitveil.edge.defended import DefendedStage

            self.stages[0] = DefendedStage(self.stages[0], defence)
            if hasattr(defence, "unapply") and len(self.stages) > 2:
                self.stages[-1] = DefendedStage(self.stages[-1], defence, incoming=True)

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        token: str,
        model: str = "smollm2-135m",
        plan: SplitPlan | None = None,
        ca_file=None,
        pin_sha256: str | None = None,
        wire: str = "fp32",
        tokenizer="auto",
        timeout: float = 60.0,
        recover_seconds: float = 30.0,
        insecure: bool = False,
        attestation=None,
        expected_measurement: bytes | None = None,
        load_format: str = "auto",
        dtype: str = "float32",
        device: str = "cpu",
    ) -> "SplitCausalLM":
        """A split LM whose cloud parts run on the server at `url` (wss://host:port).

        Only the device's parts' weights are loaded. Without `plan`, the server's own cuts are used.
        `tokenizer="auto"` loads the model's tokenizer; None runs without one (token-id prompts only).
        The connection (TLS, certificate check, token) is made first, before any weights are loaded.
        `insecure` allows a plaintext ws:// URL to a host beyond loopback.
        With `attestation` (the trusted attestation key's public half, an `AttestationKey`) and
        `expected_measurement`, the server must be a trusted executor (`serve --enclave`) that proves that
        measurement: every frame then travels sealed to it, and a server that does not prove it gets nothing.
        `dtype` and `device` place this device's parts (the server chose its own; the wire converts at the cuts).
        """
        from splitveil.edge.remote import probe_server
        from splitveil.models.loading import config_digest, load_tokenizer
        from splitveil.plan.parts import load_causal_lm_parts
        from splitveil.transport.network import WebSocketTransport

        if (attestation is None) != (expected_measurement is None):
            raise ConfigError("an attested connection needs both the attestation key and the expected measurement")
        transport = WebSocketTransport(url, token=token, ca_file=ca_file, pin_sha256=pin_sha256, timeout=timeout,
                                       insecure=insecure)
        transport.connect()
        if attestation is not None:
            from splitveil.tee.executor import SealedTransport

            transport = SealedTransport(transport, attestation=attestation, expected_measurement=expected_measurement)
            try:
                transport.connect()  # OPEN, then the quote checked: nothing of the prompt is sent before
            except BaseException:
                transport.close()
                raise
        try:
            if plan is None:
                cuts = probe_server(transport).get("cuts")
                if not cuts:
                    raise ConfigError(f"{url} did not say which cuts it serves; give the plan (--split)")
                plan = SplitPlan.from_cuts(tuple(cuts))
            edge = tuple(i for i, place in enumerate(plan.placement) if place == Placement.EDGE)
            splittable, plan = load_causal_lm_parts(model, plan.cuts, edge, load_format=load_format, dtype=dtype,
                                                    device=device)
            if tokenizer == "auto":
                tokenizer = load_tokenizer(model, load_format=load_format)
            lm = cls(splittable, plan, tokenizer=tokenizer, wire=wire, transport=transport)
            for stage in lm.stages:
                if isinstance(stage, RemoteStage):
                    stage.recover_seconds = recover_seconds
                    stage.expect["model_config_sha256"] = config_digest(model, load_format=load_format)
            return lm
        except BaseException:
            transport.close()
            raise

    def _locked_handler(self):
        """The in-process service's `handle`, one frame at a time whichever generator (fork) sends it."""
        lock = self._service_lock = getattr(self, "_service_lock", None) or threading.Lock()
        service = self.service

        def handle(frame: bytes) -> bytes:
            with lock:
                return service.handle(frame)

        return handle

    def fork(self) -> "SplitCausalLM":
        """Another generator over the same weights, for a concurrent generation: its own edge parts (own KV caches)
        and its own session with the remote parts, over a new connection to the same server (same trust, same
        checks) or, in process, through the same service (its frames one at a time: the service is not
        thread-safe). A sealed (attested) connection cannot be forked."""
        from splitveil.edge.defended import DefendedStage
        from splitveil.transport.network import WebSocketTransport

        if any(isinstance(stage, DefendedStage) for stage in self.stages):
            raise ConfigError("a split with a cut defence serves one generation at a time (its secrets are per session)")
        if self.service is not None:
            transport = LoopbackTransport(self._locked_handler())
        elif isinstance(self.transport, WebSocketTransport):
            transport = self.transport.another()
            transport.connect()
        elif self.transport is None:
            transport = None
        else:
            raise ConfigError(f"a split over a {type(self.transport).__name__} serves one generation at a time")
        from splitveil.models.splittable import Part

        if self.head_batcher is None and isinstance(self.stages[-1], Part):  # the lanes' LM heads, in one product
            from splitveil.edge.head_batch import Lanes, LogitsBatcher, StepBatcher

            lanes = Lanes()
            self.head_batcher = LogitsBatcher(self.splittable.logits, lanes=lanes)
            # the lanes' decode steps through this device's head and tail parts, each a batched step
            self.lane_steps = (StepBatcher(lanes=lanes), StepBatcher(lanes=lanes))
        fork = SplitCausalLM(self.splittable, self.plan, tokenizer=self.tokenizer, wire=self.wire, transport=transport)
        fork.head_batcher, fork.lane_steps = self.head_batcher, self.lane_steps
        fork.service, fork._service_lock = self.service, getattr(self, "_service_lock", None)
        for mine, theirs in zip(self.stages, fork.stages):
            if isinstance(mine, RemoteStage) and isinstance(theirs, RemoteStage):
                theirs.recover_seconds, theirs.expect = mine.recover_seconds, dict(mine.expect)
        return fork

    def server_info(self) -> dict:
        """The precision the remote parts said they run in at OPEN (`dtype`, `device`; empty before a session or
        for a server that does not say)."""
        for stage in self.stages:
            info = getattr(stage, "info", None) if isinstance(stage, RemoteStage) else None
            if info:
                return {key: info[key] for key in ("dtype", "device") if key in info}
        return {}

    def close(self) -> None:
        """Ends any remote session and closes the transport."""
        self._end()
        if self.transport is not None:
            self.transport.close()

    # -- the loop -------------------------------------------------------------------------------------------

    def _begin(self) -> None:
        for stage in self.stages:
            if isinstance(stage, RemoteStage):
                stage.close()
                stage.open()
            else:
                stage.reset()

    def _end(self) -> None:
        for stage in self.stages:
            if isinstance(stage, RemoteStage):
                stage.close()

    def step(self, input_ids: torch.Tensor, *, all_positions: bool = False) -> torch.Tensor:
        """Runs new positions [1, T] through every stage; returns the next-token logits [V] (with `all_positions`:
        [T, V], the logits after every new position, which the last stage must then run on this device)."""
        x = input_ids
        lanes = self.lane_steps if input_ids.shape[1] == 1 and not all_positions else None  # a lane's decode step
        for index, stage in enumerate(self.stages[:-1]):
            x = lanes[0](stage, x) if lanes is not None and index == 0 else stage(x)
        last = self.stages[-1]
        if lanes is not None and getattr(last, "has_head", False):  # tail layers and LM head, batched across lanes
            return lanes[1](last, x)[0, -1]
        batcher = self.head_batcher
        if not all_positions and batcher is None:
            return last(x)[0, -1]
        if isinstance(last, RemoteStage):
            if not all_positions:
                return last(x)[0, -1]
            raise ConfigError("verifying drafts needs every position's logits: the LM head must run on this device")
        part = getattr(last, "stage", last)  # a defended stage wraps the part
        if hasattr(part, "defer_head"):  # a tail part: the LM head runs on the rows read (batched across lanes)
            part.defer_head = True
            try:
                hidden = last(x)[0]
            finally:
                part.defer_head = False
            head = batcher or self.splittable.logits
            return head(hidden[-1:])[0] if not all_positions else RowLogits(hidden, head)
        if not all_positions:
            return last(x)[0, -1]
        with _every_position(part):
            return last(x)[0]

    def truncate(self, length: int) -> None:
        """Rolls every stage back to its first `length` positions (a remote one with the next forward)."""
        for stage in self.stages:
            stage.truncate(length)

    def check_speculation(self) -> None:
        """Raises a ConfigError when this split cannot verify drafts (no logits at every position here, a cut
        defence, or caches that cannot roll back)."""
        from splitveil.edge.defended import DefendedStage

        if any(isinstance(stage, DefendedStage) for stage in self.stages):
            raise ConfigError("speculative decoding does not run with a cut defence yet; use --speculate off")
        if isinstance(self.stages[-1], RemoteStage):
            raise ConfigError("speculative decoding needs the LM head on this device (a Λ-split, or the unsplit "
                              "model); this plan runs it remotely")
        if not self.splittable.can_roll_back:
            raise ConfigError("this model has sliding-window or linear-attention layers, whose caches cannot roll "
                              "back rejected drafts; use --speculate off")

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced next-token logits [T, V] at every position of `token_ids`, through the split (one session).

        Used for perplexity: the utility a defence costs on text the model did not generate itself.
        """
        return self.forward_logits(torch.tensor([list(token_ids)], dtype=torch.long))[0]

    def encode_prompt(self, prompt: str, *, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError("a text prompt needs a tokenizer")
        if not prompt or not prompt.strip():
            raise ConfigError("the prompt is empty")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ConfigError("this model's tokenizer has no chat template; drop --chat")
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return list(ids)

    def _eos_ids(self, config: GenerationConfig) -> set[int]:
        if config.eos_token_ids is not None:
            return set(config.eos_token_ids)
        found: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                found.add(value)
            elif isinstance(value, (list, tuple)):
                found.update(int(v) for v in value)
        return found

    def generate(
        self,
        prompt: str | list[int] | torch.Tensor,
        config: GenerationConfig | None = None,
        *,
        chat: bool = False,
        on_token=None,
        **overrides,
    ) -> GenerationResult:
        """Generates up to `max_new_tokens` after `prompt` (text or token ids).

        Keyword overrides are GenerationConfig fields (max_new_tokens, do_sample, temperature, top_k, top_p, seed,
        eos_token_ids, stop). `on_token(generated)`, if given, is called with the token ids generated so far after
        each new token (for streaming); an exception it raises ends the generation (remote sessions are closed).
        """
        config = GenerationConfig(**{**asdict(config or GenerationConfig()), **overrides})
        if isinstance(prompt, str):
            prompt_ids = self.encode_prompt(prompt, chat=chat)
        else:
            prompt_ids = [int(t) for t in (prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if config.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer")
        generator = None
        if config.do_sample:
            generator = torch.Generator()
            generator.manual_seed(config.seed if config.seed is not None else int(time.time_ns() % 2**63))
        eos_ids = self._eos_ids(config)
        stops = StopStrings(self.tokenizer, config.stop) if any(config.stop) else None
        stats_before = self.transport.stats.snapshot() if self.transport is not None else None

        if config.speculate != "off":
            self.check_speculation()

        if self.head_batcher is not None:
            self.head_batcher.enter()
        try:
            return self._generate(prompt_ids, config, on_token=on_token, generator=generator,
                                  eos_ids=eos_ids, stops=stops, stats_before=stats_before)
        finally:
            if self.head_batcher is not None:
                self.head_batcher.leave()

    def _generate(self, prompt_ids, config, *, on_token, generator, eos_ids, stops, stats_before):
        speculation = None
        self._begin()
        generated: list[int] = []
        step_seconds: list[float] = []
        finish = "length"
        text_end = None

        def emit(token: int) -> bool:
            """Appends a generated token; True when the generation ends with it."""
            nonlocal finish, text_end
            generated.append(token)
            if on_token is not None:
                on_token(generated)
            if token in eos_ids:
                finish = "eos"
                return True
            if stops is not None:
                text_end = stops.find(generated)
                if text_end is not None:
                    finish = "stop"
                    return True
            return len(generated) >= config.max_new_tokens

        sampling = Sampling(config.do_sample, config.temperature, config.top_k, config.top_p, generator)
        started = time.perf_counter()
        cpu_started = time.process_time()
        try:
            logits = self.step(torch.tensor([prompt_ids], dtype=torch.long))
            prefill_done = time.perf_counter()
            cpu_prefill_done = time.process_time()
            after_prefill = self.transport.stats.snapshot() if self.transport is not None else None
            token = select_token(logits, do_sample=config.do_sample, temperature=config.temperature,
                                 top_k=config.top_k, top_p=config.top_p, generator=generator)
            if config.speculate == "off":
                while not emit(token):
                    step_started = time.perf_counter()
                    logits = self.step(torch.tensor([[token]], dtype=torch.long))
                    step_seconds.append(time.perf_counter() - step_started)
                    token = select_token(logits, do_sample=config.do_sample, temperature=config.temperature,
                                         top_k=config.top_k, top_p=config.top_p, generator=generator)
            else:
                speculation = self._speculate(prompt_ids, token, generated, emit, config, sampling, step_seconds)
            finished = time.perf_counter()
            cpu_finished = time.process_time()
            decoded = self.transport.stats.since(after_prefill) if self.transport is not None else None
        finally:
            self._end()

        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if text_end is not None:
                text = text[:text_end]
        moved = self.transport.stats.since(stats_before) if self.transport is not None else None
        return GenerationResult(
            token_ids=generated,
            text=text,
            prompt_ids=prompt_ids,
            bytes_up=moved.bytes_up if moved else 0,
            bytes_down=moved.bytes_down if moved else 0,
            round_trips=moved.round_trips if moved else 0,
            seconds=finished - started,
            prefill_seconds=prefill_done - started,
            decode_seconds=finished - prefill_done,
            finish_reason=finish,
            plan=self.plan.to_dict(),
            step_seconds=step_seconds,
            decode_bytes_up=decoded.bytes_up if decoded else 0,
            decode_bytes_down=decoded.bytes_down if decoded else 0,
            cpu_seconds_prefill=cpu_prefill_done - cpu_started,
            cpu_seconds_decode=cpu_finished - cpu_prefill_done,
            peak_rss_bytes=peak_rss_bytes(),
            weight_bytes_resident=resident_weight_bytes(self.model),
            speculation=speculation.to_dict(len(generated)) if speculation is not None else None,
        )

    def _speculate(self, prompt_ids: list[int], token: int, generated: list[int], emit, config: GenerationConfig,
                   sampling, step_seconds: list[float]):
        """The decode loop with drafts (see `edge.speculative`): each pass sends the last token and the drafts through
        the split at once, keeps what the model agrees with plus one token of its own, and rolls back the rest."""
        from splitveil.edge.speculative import DraftPolicy, SpeculationStats, accept, make_drafter

        drafter = make_drafter(config.speculate, self)
        policy = DraftPolicy(config.draft_tokens, adaptive=config.draft_policy == "adaptive")
        stats = SpeculationStats(config.speculate, config.draft_tokens, config.draft_policy)
        try:
            done = emit(token)
            while not done:
                context = prompt_ids + generated
                held = len(context) - 1  # positions every stage holds: all but the newest token
                budget = policy.budget(config.max_new_tokens - len(generated))
                if drafter.costly:  # every draft costs work: set the count first
                    count = policy.choose(budget, drafter.source)
                    drafts, q = drafter.draft(context, count, sampling) if count else ([], None)
                else:  # free drafts: see what there is, then keep what pays
                    drafts, q = drafter.draft(context, budget, sampling) if budget else ([], None)
                    keep = policy.choose(len(drafts), drafter.source)
                    drafts, q = drafts[:keep], (q[:keep] if q is not None else None)
                step_started = time.perf_counter()
                if drafts:
                    logits = self.step(torch.tensor([[token, *drafts]], dtype=torch.long), all_positions=True)
                    new = accept(logits, drafts, q, sampling)
                    if len(new) <= len(drafts):  # a draft was rejected: its position and those after it go
                        self.truncate(held + len(new))
                else:
                    logits = self.step(torch.tensor([[token]], dtype=torch.long))
                    new = [select_token(logits, do_sample=sampling.do_sample, temperature=sampling.temperature,
                                        top_k=sampling.top_k, top_p=sampling.top_p, generator=sampling.generator)]
                step_seconds.append(time.perf_counter() - step_started)
                stats.passes += 1
                if drafts:
                    stats.passes_with_drafts += 1
                    stats.drafted += len(drafts)
                    stats.accepted += len(new) - 1
                policy.update(drafter.source, len(drafts), len(new) - 1, step_seconds[-1])
                for token in new:
                    done = emit(token)
                    if done:
                        break
        finally:
            drafter.close()
            stats.by_source = dict(policy.acceptance)
        return stats

    @torch.inference_mode()
    def forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [1, T, V] for every position of `input_ids` [1, T], through the split (one session).

        Works for every plan: a part on this device that holds the LM head returns every position's logits; a
        remote one returns only the last position's (as in generation), so it gets the positions one at a time
        (T round trips, exact to float tolerance: the same KV-cached path as decoding).
        """
        if not self.plan.cuts:
            stage = self.stages[0]
            if isinstance(stage, _Monolithic):
                return self.model(input_ids=input_ids).logits
            stage.reset()  # a stage of its own (SLIP's fused dealt device): every position through it
            with _every_position(stage):
                return stage(input_ids)
        self._begin()
        try:
            x = input_ids
            for stage in self.stages[:-1]:
                x = stage(x)
            last = self.stages[-1]
            if isinstance(last, RemoteStage):
                return torch.cat([last(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1)
            part = getattr(last, "stage", last)  # a defended stage wraps the part
            with _every_position(part):
                return last(x)
        finally:
            self._end()
