"""The device's work for concurrent generations, batched: the lanes' LM heads (`LogitsBatcher`) and the decode
steps of their head and tail parts (`StepBatcher`).

The LM head is the device's largest matrix (SmolLM2: 49152 x 576, 113 MB in fp32), and a one-row product reads all
of it: eight concurrent generations (the OpenAI edge's lanes) that each apply it to their own row read it eight
times per token, and memory bandwidth, shared by the cores, is what they wait for. Their head and tail layers are
small, and a one-position forward of a layer costs mostly the Python and kernel-launch overhead, paid once per lane.
The trunk server answers the lanes' batched decode step at about the same moment, so their tails (and then their
heads, with the next token) reach the device's parts together: the first to arrive waits (at most `window` seconds,
and only while other lanes are generating) for the others, runs every waiting item in one batched call, and hands
each lane its rows. A lone generation never waits.

A step batch runs `forward_batched_step` over the lanes' own parts (each its own KV cache): the rows are what single
steps give (the same check the trunk server's batching passes); parts that cannot be batched run one by one.
"""

from __future__ import annotations

import threading
import time

import torch

from splitveil.core.errors import ConfigError


class Lanes:
    """How many lanes are inside a generation: a batch's leader waits for that many callers at most."""

    def __init__(self):
        self.generating = 0
        self.changed = threading.Condition()

    def enter(self) -> None:
        with self.changed:
            self.generating += 1

    def leave(self) -> None:
        with self.changed:
            self.generating -= 1
            self.changed.notify_all()  # a leader waiting for this lane stops waiting


class _Gatherer:
    """Gathers concurrent callers' items for at most `window` seconds (while other lanes generate) and computes them
    in one `combine(items) -> results` call; every caller gets its own result (or the batch's exception)."""

    def __init__(self, *, window: float = 0.003, lanes: Lanes | None = None):
        self.window = window
        self.lanes = lanes or Lanes()
        self.batches = 0
        self.rows = 0
        self._cond = self.lanes.changed  # one condition: a lane leaving wakes the leader of any batcher
        self._waiting: list[tuple[object, dict]] = []  # (item, slot for its result) of the next batch
        self._leading = False

    @property
    def generating(self) -> int:
        return self.lanes.generating

    def enter(self) -> None:
        self.lanes.enter()

    def leave(self) -> None:
        self.lanes.leave()

    def combine(self, items: list) -> list:
        raise NotImplementedError

    def _gather(self, item) -> object:
        slot: dict = {}
        with self._cond:
            self._waiting.append((item, slot))
            if self._leading:  # a leader is gathering: it computes this item too
                while "result" not in slot and "error" not in slot:
                    self._cond.wait()
                return self._result(slot)
            self._leading = True
            deadline = time.monotonic() + self.window
            while len(self._waiting) < self.lanes.generating and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            batch, self._waiting = self._waiting, []
            self._leading = False
        try:
            results, error = self.combine([item for item, _ in batch]), None
        except BaseException as failure:  # every caller of the batch gets the failure
            results, error = None, failure
        with self._cond:
            for index, (_, waiter) in enumerate(batch):
                if error is None:
                    waiter["result"] = results[index]
                else:
                    waiter["error"] = error
            self.batches += 1
            self.rows += len(batch)
            self._cond.notify_all()
        return self._result(slot)

    @staticmethod
    def _result(slot: dict):
        if "error" in slot:
            raise slot["error"]
        return slot["result"]


class LogitsBatcher(_Gatherer):
    """Applies `head` ([n, H] final-normed rows -> [n, V] logits) to the rows of concurrent callers in one product.

    Args:
        head: the model's LM head (with its soft cap), e.g. `CausalLMSplittable.logits`.
        window: the most seconds a caller waits for other generating lanes' rows.
        lanes: the lane count shared with the other batchers of the same lanes.
    """

    def __init__(self, head, *, window: float = 0.003, lanes: Lanes | None = None):
        super().__init__(window=window, lanes=lanes)
        self.head = head

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._gather(hidden)

    def combine(self, items: list) -> list:
        logits = self.head(torch.cat(items))
        results, start = [], 0
        for rows in items:
            results.append(logits[start : start + rows.shape[0]])
            start += rows.shape[0]
        return results


class StepBatcher(_Gatherer):
    """Runs one-position forwards of several lanes' parts over the same segments (their heads, or their tails) as one
    batched step: `batcher(part, x)` with x [1, 1] token ids (a head part) or [1, 1, H] hidden states returns what
    `part(x)` returns (a tail part's logits: [1, 1, V])."""

    @torch.inference_mode()
    def __call__(self, part, x: torch.Tensor) -> torch.Tensor:
        return self._gather((part, x))

    def combine(self, items: list) -> list:
        from splitveil.models.causal_lm import forward_batched_step

        parts = [part for part, _ in items]
        if len(items) > 1 and all(p.owner is parts[0].owner and (p.start, p.end) == (parts[0].start, parts[0].end)
                                  for p in parts):
            try:
                out = forward_batched_step(parts, torch.cat([x for _, x in items]))
                return [out[row : row + 1] for row in range(len(items))]
            except ConfigError:  # a family or range whose batched steps differ: one by one, exactly
                pass
        return [part(x) for part, x in items]
