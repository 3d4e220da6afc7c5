"""The device of SLIP's prompt deployment with a mask dealer: no linear weight on the device.

`DealtSlipModel` builds the causal LM with the linear weights of the offloaded layers (and of the LM head with
`head="masked"`) on the meta device: loading reads embeddings, norms and whatever stays whole on the device from
the safetensors file, nothing else. Each offloaded linear group becomes a `DealtGroup`, whose product is

    x  --encode-->  x_e  --(+ r)-->  executor: W (x_e + r)  --(- W r from the dealer)-->  W x_e  --decode-->  y

with r = PRG(session seed, group, row) (`dealer.MaskStream`) and W r streamed by the dealer ahead of use
(`dealer.DealerClient`). Every unmasked product is checked before use: Freivalds' test with the session's vectors
(`keys.SessionKeys`: s W computed once per model from the public weights) and the range of the true product. A
wrong executor reply or a wrong dealer term both make W x_e wrong, so both are caught; the check then tells which
party it was (the reply against x_e + r, the term against r) and the session ends.

Everything else (embeddings, norms, rotary embeddings, attention, the KV cache, activations, residual adds, the
logits' sampling) runs on the device, as in the plain prompt deployment.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import torch

from splitveil.core.errors import ConfigError
from splitveil.protect.slip.cost import SlipCost, other_flops
from splitveil.protect.slip.decompose import LinearGroup, causal_lm_groups
from splitveil.protect.slip.errors import FixedPointOverflow, VerificationError
from splitveil.protect.slip.freivalds import bits_per_vector, vectors_needed
from splitveil.protect.slip.fused import check_fuse
from splitveil.protect.slip.keys import GroupKeys, SessionKeys
from splitveil.protect.slip.trusted import PREPARED_BITS_PER_VECTOR, SharedInputGroup, SlipConfig, SlipLinear

HEADS = ("masked", "device")


def ring_ranges(encoded: np.ndarray, runtimes: list["DealtGroup"]) -> list[int]:
    """R per group: a bound on every entry of encoded[g] [P, n] W_g^T in ring integers (Cauchy-Schwarz: max_p
    ||x_p||_2 times max_i ||W_i||_2, with a relative margin for the float64 arithmetic), for the groups `runtimes`
    and their ring-encoded inputs [G, P, n]. Raises FixedPointOverflow when a product could leave the ring's signed
    range (its decoded value would wrap)."""
    if encoded.size == 0:
        return [0] * len(runtimes)
    values = encoded.astype(np.float64)
    norms = np.sqrt((values * values).sum(axis=2).max(axis=1))
    bounds = [int(float(norm) * runtime.keys.row_norm * (1 + 1e-9)) + 1 for norm, runtime in zip(norms, runtimes)]
    for bound, runtime in zip(bounds, runtimes):
        if bound >= 2**63 - 1:
            raise FixedPointOverflow(f"linear group {runtime.group.group_id}: a product could reach "
                                     f"{bound * runtime.scale_y:.3g}, beyond the fixed-point range; use fewer "
                                     f"fractional bits")
    return bounds


class DealtGroup(SharedInputGroup):
    """One offloaded linear group of the dealt device: masks and terms from the dealer's session, the product from
    the executor, the check from the session's keys."""

    def __init__(self, group: LinearGroup, biases: list[torch.Tensor | None], keys: GroupKeys, config: SlipConfig,
                 cost: SlipCost):
        self.group = group
        self.config = config
        self.cost = cost
        self.keys = keys
        self.biases = biases
        self.fixed_point = config.fixed_point
        bounds = np.cumsum([0, *group.out_features])
        self.slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self.scale_x = float(2**self.fixed_point.frac_bits_x)
        self.scale_y = float(2.0**-self.fixed_point.product_bits)
        self.client = None  # SlipClient (the executor)
        self.dealer = None  # DealerClient
        self.session_keys: SessionKeys | None = None
        self.weakest_bits: int | None = None
        self.vectors_used = 0
        self.products = 0
        self.pending: list[tuple] = []  # (encoded, product, sent, reply, r, u) of products not checked yet

    def new_session(self) -> None:
        self.session_keys = SessionKeys(self.keys, -(-self.config.soundness_bits // PREPARED_BITS_PER_VECTOR)
                                        if self.config.soundness_bits else max(self.config.repetitions, 1))
        self.weakest_bits = None

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """x [P, n] float32 -> y [P, m] float32 = W x + b: masked through the executor, unmasked with the dealer's
        terms. The product is checked when the forward pass ends (`DealtSlipModel.verify`), before any token is
        chosen from it."""
        rows, n = x.shape
        m = self.group.total_out
        sent_rows = self._begin_product(rows)
        scaled = x.detach().numpy().astype(np.float64)
        scaled *= self.scale_x
        encoded = np.rint(scaled, out=scaled).astype(np.int64)
        if sent_rows > rows:  # dummy rows: masked like the rest, dropped here
            encoded = np.concatenate([encoded, np.zeros((sent_rows - rows, n), dtype=np.int64)])
        r, u = self.dealer.take(self.group.group_id, sent_rows)
        sent = encoded + r  # wraps mod 2^64
        reply = self.client.multiply_array(self.group.group_id, sent, m)
        product = reply - u
        self.pending.append((encoded, product, sent, reply, r, u))
        y = torch.from_numpy((product[:rows] * self.scale_y).astype(np.float32))
        for part, bias in zip(self.slices, self.biases):
            if bias is not None:
                y[:, part] += bias
        cost = self.cost
        cost.mask_flops += 2 * sent_rows * (n + m)
        cost.untrusted_flops += 2 * sent_rows * m * n
        cost.dealer_flops += 2 * sent_rows * m * n
        cost.products += 1
        cost.rows += sent_rows
        return y

    def check_one(self, encoded: np.ndarray, product: np.ndarray) -> tuple[int, int, str | None]:
        """Checks one product on its own: (its range R, the vectors used, what failed or None)."""
        (bound,) = ring_ranges(encoded[None], [self])
        vectors = self.count(bound)
        if not self.session_keys.passes(product, encoded, vectors):
            return bound, vectors, "failed the Freivalds check"
        if int(product.min()) < -bound or int(product.max()) > bound:
            return bound, vectors, f"left the product's range (|y| <= {bound:.3g})"
        return bound, vectors, None

    def vectors_for(self, bound: int) -> int:
        config = self.config
        return vectors_needed(config.soundness_bits, bound, least=config.repetitions) if config.soundness_bits \
            else config.repetitions

    def count(self, bound: int, vectors: int | None = None) -> int:
        """Counts one checked product of range `bound` (vectors: as many as it needs, or more); returns the vectors."""
        vectors = self.vectors_for(bound) if vectors is None else vectors
        bits = vectors * bits_per_vector(bound)
        self.weakest_bits = bits if self.weakest_bits is None else min(self.weakest_bits, bits)
        self.vectors_used += vectors
        self.products += 1
        return vectors

    def _fail(self, sent, reply, r, u, vectors: int, what: str):
        """Ends the session after a failed check, naming the party whose numbers were wrong."""
        keys = self.session_keys
        culprits = []
        if not keys.passes(reply, sent, vectors):
            culprits.append("the executor's reply (W (x + r))")
        if not keys.passes(u, r, vectors):
            culprits.append("the dealer's terms (W r)")
        who = " and ".join(culprits) or "the executor's reply or the dealer's terms (their sum is out of range)"
        message = (f"linear group {self.group.group_id}: the unmasked product {what}: {who} did not match the public "
                   f"weights; this session is over and nothing more is sent in it")
        self.client.fail(message)
        raise VerificationError(message)


class DealtGroups:
    """The offloaded groups of a dealt device, connected to an executor and a dealer: their products, the dealer's
    windows, and the check of every product when a forward pass ends.

    Args:
        groups: the offloaded groups, each with its members' biases (None where a member has none).
        keys: each group's Freivalds keys (`keys.load_or_build_keys`).
        config: mode fixed, rank 0.
    """

    def __init__(self, groups: list[tuple[LinearGroup, list]], keys: list[GroupKeys], config: SlipConfig):
        if config.mode != "fixed" or (config.rank or config.energy):
            raise ConfigError("a mask dealer serves the prompt deployment: fixed point, secure rank 0")
        self.config = config
        self.cost = SlipCost()
        self.groups = [group for group, _ in groups]
        self.runtimes = [DealtGroup(group, biases, group_keys, config, self.cost)
                         for (group, biases), group_keys in zip(groups, keys)]
        self.client = None
        self.dealer = None
        self._session = None
        self.classes: dict[tuple[int, int], list[DealtGroup]] = {}  # groups of one shape, checked together
        for runtime in self.runtimes:
            self.classes.setdefault((runtime.group.in_features, runtime.group.total_out), []).append(runtime)
        self._stacked: dict[tuple[int, int], tuple] = {}  # per class: this session's (S, S W), stacked

    def attach(self, client, dealer) -> None:
        """Routes every group through `client` (the executor's `SlipClient`) and `dealer` (a `DealerClient`)."""
        self.client, self.dealer = client, dealer
        for runtime in self.runtimes:
            runtime.client, runtime.dealer = client, dealer

    def begin_forward(self, rows: int, head_rows: int) -> None:
        """Before a forward pass whose layer groups take `rows` rows each and the LM head `head_rows`: opens a
        dealer session with every new executor session and asks the dealer for the rows this forward will take
        (and the windows ahead)."""
        session = self.client.session_key()
        first = session is not self._session
        if first:
            self._session = session
            self._stacked.clear()  # the groups draw fresh check vectors in this session
            self.dealer.open()
        self.dealer.before_forward([runtime.padded_rows(rows if runtime.group.layer is not None else head_rows,
                                                        first=first) for runtime in self.runtimes])

    def verify(self) -> None:
        """Checks every product of the forward pass that just ended (Freivalds' test with the session's vectors, and
        the range of the true product), one batched test per shape of group. A failure ends the session and names
        the group and the party whose numbers were wrong (`VerificationError`)."""
        for shape, runtimes in self.classes.items():
            pending = [runtime for runtime in runtimes if runtime.pending]
            if not pending:
                continue
            try:
                if len({runtime.pending[0][0].shape for runtime in pending}) == 1 and \
                        all(len(runtime.pending) == 1 for runtime in pending):
                    self._verify_class(shape, pending)
                else:
                    for runtime in pending:
                        for item in runtime.pending:
                            self._verify_alone(runtime, item)
            finally:
                for runtime in pending:
                    runtime.pending = []

    def _verify_alone(self, runtime: "DealtGroup", item: tuple) -> None:
        encoded, product, sent, reply, r, u = item
        self.cost.check_flops += 2 * encoded.shape[0] * (encoded.shape[1] + product.shape[1]) * 2
        _, vectors, failed = runtime.check_one(encoded, product)
        if failed is not None:
            runtime._fail(sent, reply, r, u, vectors, failed)

    def _verify_class(self, shape: tuple[int, int], runtimes: list["DealtGroup"]) -> None:
        encoded = np.stack([runtime.pending[0][0] for runtime in runtimes])  # [G, P, n]
        products = np.stack([runtime.pending[0][1] for runtime in runtimes])  # [G, P, m]
        bounds = ring_ranges(encoded, runtimes)
        vectors = max(runtime.vectors_for(bound) for runtime, bound in zip(runtimes, bounds))
        s, sw = self._stack(shape, runtimes, vectors)
        passed = (products @ s.transpose(0, 2, 1) == encoded @ sw.transpose(0, 2, 1)).all(axis=(1, 2))  # wraps mod 2^64
        highs, lows = products.max(axis=(1, 2)), products.min(axis=(1, 2))
        rows, n = encoded.shape[1], shape[0]
        self.cost.check_flops += len(runtimes) * (2 * rows * vectors * (n + shape[1]) + rows * (2 * n + shape[1]))
        for runtime, bound, ok, high, low in zip(runtimes, bounds, passed, highs, lows):
            runtime.count(bound, vectors)
            failed = None if ok else "failed the Freivalds check"
            if failed is None and (int(low) < -bound or int(high) > bound):
                failed = f"left the product's range (|y| <= {bound:.3g})"
            if failed is not None:
                _, product, sent, reply, r, u = runtime.pending[0]
                runtime._fail(sent, reply, r, u, vectors, failed)

    def _stack(self, shape: tuple[int, int], runtimes: list["DealtGroup"], vectors: int) -> tuple[np.ndarray, np.ndarray]:
        """The session's check vectors of a class of groups, stacked ([G, t, m], [G, t, n]), at least `vectors`."""
        cached = self._stacked.get(shape)  # emptied when a session begins
        if cached is None or cached[0].shape[1] < vectors:
            keys = [runtime.session_keys for runtime in runtimes]
            for key in keys:
                key.ensure(vectors)
            cached = (np.stack([k.s for k in keys]), np.stack([k.sw for k in keys]))
            self._stacked[shape] = cached
        return cached[0][:, :vectors], cached[1][:, :vectors]

    def soundness_bits(self) -> int | None:
        bits = [runtime.weakest_bits for runtime in self.runtimes if runtime.weakest_bits is not None]
        return min(bits) if bits else None


class DealtSlipModel(DealtGroups):
    """A transformers causal LM on the device with every offloaded linear map replaced by a `DealtGroup` (any
    family `causal_lm_groups` knows; Llama-family models use the fused device of `fused.py` by default).

    Args:
        model: the causal LM with the offloaded linear weights on the meta device (`load_dealt_model`).
        groups: the offloaded groups and their modules (`causal_lm_groups` on that model).
        keys: each group's Freivalds keys (`keys.load_or_build_keys`).
        config: mode fixed, rank 0, the offloaded layers, include_head for the masked LM head.
    """

    def __init__(self, model, groups: list[tuple[LinearGroup, list]], keys: list[GroupKeys], config: SlipConfig):
        with_biases = []
        for group, modules in groups:
            biases = [getattr(module, "bias", None) for module in modules]
            with_biases.append((group, [b.detach().clone() if b is not None and b.device.type != "meta" else None
                                        for b in biases]))
        super().__init__(with_biases, keys, config)
        self.model = model
        owners = {id(child): (parent, attr) for parent in model.modules() for attr, child in parent.named_children()}
        for (group, modules), runtime in zip(groups, self.runtimes):
            for member, (name, module) in enumerate(zip(group.members, modules)):
                parent, attr = owners[id(module)]
                setattr(parent, attr, SlipLinear(runtime, member, name))
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        model.register_forward_hook(self._after_forward, always_call=True)

    def _before_forward(self, module, args, kwargs) -> None:
        """Counts the device's other FLOPs and prepares the dealer's rows (`begin_forward`)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or self.client is None:
            return
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        self.cost.other_flops += other_flops(self.model.config, ids.shape[-1], past) * ids.shape[0]
        self.begin_forward(ids.shape[-1] * ids.shape[0], ids.shape[0])

    def _after_forward(self, module, args, output):
        self.verify()


def offloaded_parameter_names(model, groups: list[tuple[LinearGroup, list]]) -> set[str]:
    names = {id(module): name for name, module in model.named_modules()}
    return {f"{names[id(module)]}.{kind}" for _, modules in groups for module in modules for kind in ("weight", "bias")}


def load_dealt_model(model_name: str, config: SlipConfig, *, load_format: str = "auto"):
    """The device's model: real weights for everything but the offloaded linear maps. Returns (model, groups with
    their modules, the model's folder)."""
    from splitveil.plan.parts import empty_causal_lm, partial_causal_lm

    skeleton, _ = empty_causal_lm(model_name, load_format=load_format)
    start, stop = config.layers if config.layers is not None else (0, skeleton.config.num_hidden_layers)
    offloaded = offloaded_parameter_names(skeleton, causal_lm_groups(skeleton, layers=range(start, stop),
                                                                     include_head=config.include_head))
    model, model_dir = partial_causal_lm(model_name, lambda name: name not in offloaded, load_format=load_format)
    groups = causal_lm_groups(model, layers=range(start, stop), include_head=config.include_head)
    return model, groups, model_dir



class DealtDevice:
    """The device of the prompt deployment with a mask dealer, ready to generate: the model without linear weights,
    its Freivalds keys, and sessions with an executor and a dealer (child processes on 127.0.0.1 over TLS, or
    servers at URLs).

    Args:
        model_name: a registered model or a local folder.
        config: fixed point, rank 0, the offloaded layers, include_head for `--head masked`.
        executor: None (a child process) or (url, token, ca file, pin).
        dealer: None (a child process) or (url, token, ca file, pin).
        load_format: "auto" or "dummy" (random weights of a registered shape, for cost figures only).
        fuse: "auto" (fused groups, two round trips per layer, where the model allows: `fused.py`), "on" (refuse a
            model that does not) or "off" (four round trips per layer, any family).
    """

    def __init__(self, model_name: str, config: SlipConfig, *, executor=None, dealer=None, load_format: str = "auto",
                 window: int = 8, fuse: str = "auto", status=None):
        check_fuse(fuse)  # before anything loads
        self.fuse = fuse
        self.model_name = model_name
        self.config = config
        self.executor_at = executor
        self.dealer_at = dealer
        self.load_format = load_format
        self.window = window
        self.status = status or (lambda text: contextlib.nullcontext())
        self._closers: list = []

    def __enter__(self) -> "DealtDevice":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        import json
        import time

        from splitveil.edge.generate import SplitCausalLM
        from splitveil.models.loading import load_tokenizer
        from splitveil.protect.slip.fused import FusedDealtStage, resolve_fuse
        from splitveil.protect.slip.keys import load_or_build_keys
        from splitveil.protect.slip.runtime import (
            DealerProcess,
            ExecutorProcess,
            connect_client,
            connect_dealer,
            dealt_groups,
            ensure_bundle,
        )

        started = time.perf_counter()
        with self.status(f"loading {self.model_name} without its offloaded linear weights ..."):
            model, found, model_dir = load_dealt_model(self.model_name, self.config, load_format=self.load_format)
            tokenizer = load_tokenizer(self.model_name, load_format=self.load_format)
        self.model = model
        self.config = config = replace(self.config, fuse=resolve_fuse(model, self.fuse))
        groups, sources = dealt_groups(model, config)
        with self.status("the Freivalds keys (once per model: each public matrix streamed from disk and dropped) ..."):
            keys, self.keys_seconds = load_or_build_keys(model, model_dir, groups, sources, config.fixed_point)
        self.load_seconds = time.perf_counter() - started
        with self.status("the public-weights bundle the executor and the dealer serve ..."):
            bundle = ensure_bundle(self.model_name, config, load_format=self.load_format)
        sha = json.loads((bundle / "manifest.json").read_text())["sha256"]
        self.executor_process = self.dealer_process = None
        with self.status("starting the executor and the mask dealer ..."):
            if self.executor_at is None:
                self.executor_process = ExecutorProcess(bundle, "fixed").__enter__()
                self._closers.append(lambda: self.executor_process.__exit__(None, None, None))
                executor = (self.executor_process.url, self.executor_process.token, self.executor_process.cert, None)
            else:
                executor = self.executor_at
            if self.dealer_at is None:
                self.dealer_process = DealerProcess(bundle).__enter__()
                self._closers.append(lambda: self.dealer_process.__exit__(None, None, None))
                dealer = (self.dealer_process.url, self.dealer_process.token, self.dealer_process.cert, None)
            else:
                dealer = self.dealer_at
        if config.fuse:
            self.slip = DealtGroups([(group, [None] * len(group.members)) for group in groups], keys, config)
        else:
            self.slip = DealtSlipModel(model, found, keys, config)
        widths = [(group.in_features, group.total_out) for group in self.slip.groups]
        self.client, self.transport = connect_client(executor[0], token=executor[1], mode="fixed", residual_sha256=sha,
                                                     groups=len(widths), ca_file=executor[2], pin_sha256=executor[3])
        self._closers.append(self.transport.close)
        # connect_client opened a session to check the executor's bundle; hold none until a generation needs it (each
        # opens its own): a device that pauses first (the learned text attack trains its readout here for many
        # minutes) would have an idle session evicted and its connection closed by the executor
        self.client.close()
        self.dealer, self.dealer_transport = connect_dealer(dealer[0], token=dealer[1], widths=widths,
                                                            residual_sha256=sha, ca_file=dealer[2], pin_sha256=dealer[3])
        self.dealer.window = self.window
        self._closers.append(self.dealer_transport.close)
        self.slip.attach(self.client, self.dealer)
        self.runner = SplitCausalLM(model, None, tokenizer=tokenizer, transport=self.transport)
        if config.fuse:
            start, stop = config.layers if config.layers is not None else (0, model.config.num_hidden_layers)
            self.runner.stages = [FusedDealtStage(model, self.slip, range(start, stop), config.include_head)]

    def generate(self, prompt, config, *, chat: bool = False) -> tuple[object, dict]:
        """One session: (the GenerationResult, the deployment's figures)."""
        from splitveil.models.footprint import process_cpu_seconds

        def party_cpu():
            return [process_cpu_seconds(p.process.pid) if p is not None else None
                    for p in (self.executor_process, self.dealer_process)]

        self.client.session_key()  # this generation's executor session, opened before its figures are counted
        before = party_cpu()
        dealer_before = self.dealer_transport.stats.snapshot()
        wait_before, cost_before = self.dealer.wait_seconds, self.slip.cost.to_dict()
        steps: list[tuple[float, int]] = []  # per forward: (seconds blocked on the dealer, executor round trips)
        forward = self.runner.step

        def counted(input_ids, **options):
            waited, trips = self.dealer.wait_seconds, self.transport.stats.round_trips
            logits = forward(input_ids, **options)
            steps.append((self.dealer.wait_seconds - waited, self.transport.stats.round_trips - trips))
            return logits

        self.runner.step = counted
        try:
            result = self.runner.generate(prompt, config, chat=chat)
        finally:
            self.runner.step = forward
            self.client.close()
            self.dealer.close()
        after = party_cpu()
        dealt = self.dealer_transport.stats.since(dealer_before)
        cost = {key: value - cost_before[key] for key, value in self.slip.cost.to_dict().items() if isinstance(value, int)}
        decode_waits = [wait for wait, _ in steps[1:]]
        decode_trips = [trips for _, trips in steps[1:]]
        figures = {
            "dealer": "child process (TLS, 127.0.0.1)" if self.dealer_process is not None else self.dealer_at[0],
            "executor": "child process (TLS, 127.0.0.1)" if self.executor_process is not None else self.executor_at[0],
            "head": "masked" if self.config.include_head else "device",
            "fused": self.config.fuse,
            "groups": len(self.slip.groups),
            "executor_cpu_seconds": None if None in (before[0], after[0]) else round(after[0] - before[0], 3),
            "dealer_cpu_seconds": None if None in (before[1], after[1]) else round(after[1] - before[1], 3),
            "dealer_bytes_up": dealt.bytes_up, "dealer_bytes_down": dealt.bytes_down,
            "dealer_round_trips": dealt.round_trips,
            "dealer_wait_seconds_prefill": round(steps[0][0], 6) if steps else None,
            "dealer_wait_seconds_per_decode_step": round(sum(decode_waits) / len(decode_waits), 6) if decode_waits else None,
            "round_trips_per_decode_step": sum(decode_trips) / len(decode_trips) if decode_trips else None,
            "freivalds_soundness_bits": self.slip.soundness_bits(),
            "flops": cost,
            "keys_seconds": round(self.keys_seconds, 3),
            "trust": "the dealer and the executor do not collude (together they would unmask every input); each alone "
                     "learns nothing of the prompt but its length; masks are ChaCha20 output (computational hiding)",
        }
        return result, figures

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:  # closing what broke must not hide why it broke
                pass
