"""The LM head of concurrent generations on one device, batched: `LogitsBatcher`.

The LM head is the device's largest matrix (SmolLM2: 49152 x 576, 113 MB in fp32), and a one-row product reads all
of it: eight concurrent generations (the OpenAI edge's lanes) that each apply it to their own row read it eight
times per token, and memory bandwidth, shared by the cores, is what they wait for. The trunk server answers the
lanes' batched decode step at about the same moment, so their tails reach the head together: the first to arrive
waits (at most `window` seconds, and only while other lanes are generating) for the others, computes every waiting
row in one product, and hands each lane its rows. A lone generation never waits.
"""

from __future__ import annotations

import threading
import time

import torch


class LogitsBatcher:
    """Applies `head` ([n, H] final-normed rows -> [n, V] logits) to the rows of concurrent callers in one product.

    Args:
        head: the model's LM head (with its soft cap), e.g. `CausalLMSplittable.logits`.
        window: the most seconds a caller waits for other generating lanes' rows.
    """

    def __init__(self, head, *, window: float = 0.003):
        self.head = head
        self.window = window
        self.generating = 0  # lanes inside a generation (`enter` / `leave`)
        self.batches = 0
        self.rows = 0
        self._cond = threading.Condition()
        self._waiting: list[tuple[torch.Tensor, dict]] = []  # (rows, slot for the result) of the next batch
        self._leading = False

    def enter(self) -> None:
        with self._cond:
            self.generating += 1

    def leave(self) -> None:
        with self._cond:
            self.generating -= 1
            self._cond.notify_all()  # a leader waiting for this lane's rows stops waiting

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        slot: dict = {}
        with self._cond:
            self._waiting.append((hidden, slot))
            if self._leading:  # a leader is gathering: it computes these rows too
                while "logits" not in slot and "error" not in slot:
                    self._cond.wait()
                return self._result(slot)
            self._leading = True
            deadline = time.monotonic() + self.window
            while len(self._waiting) < self.generating and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            batch, self._waiting = self._waiting, []
            self._leading = False
        try:
            logits = self.head(torch.cat([rows for rows, _ in batch]))
            error = None
        except BaseException as failure:  # every caller of the batch gets the failure
            logits, error = None, failure
        with self._cond:
            start = 0
            for rows, waiter in batch:
                if error is None:
                    waiter["logits"] = logits[start : start + rows.shape[0]]
                else:
                    waiter["error"] = error
                start += rows.shape[0]
            self.batches += 1
            self.rows += start
            self._cond.notify_all()
        return self._result(slot)

    @staticmethod
    def _result(slot: dict) -> torch.Tensor:
        if "error" in slot:
            raise slot["error"]
        return slot["logits"]
