"""The client of a salted split classifier: it runs the blocks up to the cut (the salt layer included), keeps the
salt, sends only the features, and decodes the cloud's salted answer.

`SaltedSplitClassifier(model, cut)` runs the cloud part in process behind the loopback transport and the same
`PartService` the server runs; `SaltedSplitClassifier.connect(model, cut, url, token=...)` reaches a `splitveil
serve --defence salt` process over TLS instead. Either way the frames carry the features and nothing else: the salt
of each request comes from the client's `SaltKey` and never leaves this object.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from splitveil.edge.remote import RemoteStage, _connection_lost
from splitveil.plan.plan import SplitPlan, apply
from splitveil.protect.salt import SaltedSplittable, SaltKey, decode_logits
from splitveil.transport.base import Transport
from splitveil.wire.codecs import get_codec
from splitveil.wire.frame import HEADER_FIXED_BYTES, MAX_FRAME_BYTES, NO_SESSION, Frame, FrameKind

CLOUD_PART = 1  # the cloud's part in an edge | cloud plan


class ClassifierStage(RemoteStage):
    """A RemoteStage for a stateless classifier part: [B, *features] -> [B, *result_shape], chunked by rows.

    Nothing is kept for replay (the part has no state): after a lost session the request is sent again in a new one.
    """

    def __init__(self, transport: Transport, part_index: int, codec: str, *, result_shape: tuple[int, ...],
                 expect: dict | None = None, recover_seconds: float = 30.0):
        super().__init__(transport, part_index, codec, expect=expect, recover_seconds=recover_seconds)
        self.result_shape = tuple(result_shape)

    def expected_output_shape(self, hidden_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (hidden_shape[0], *self.result_shape)

    def rows_per_frame(self, example_shape: tuple[int, ...]) -> int:
        limit = int(self.info.get("max_frame_bytes", MAX_FRAME_BYTES))
        per_row = math.prod(example_shape) * get_codec(self.codec).bytes_per_element
        fit = max(1, (limit - HEADER_FIXED_BYTES - 4 * (1 + len(example_shape))) // per_row)
        return max(1, min(fit, int(self.info.get("max_batch", 8))))

    def _forward(self, features: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in torch.split(features, self.rows_per_frame(tuple(features.shape[1:])), dim=0):
            reply = self._call(Frame(FrameKind.FORWARD, chunk.contiguous(), codec=self.codec, session=self.session,
                                     seq=self.seq, part=self.part_index),
                               expected_shape=self.expected_output_shape(tuple(chunk.shape)))
            self.seq += 1
            outputs.append(reply.tensor)
        return torch.cat(outputs)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.session == NO_SESSION:
            self.open()
        try:
            output = self._forward(features)
        except _connection_lost() as error:
            if self.recover_seconds <= 0:
                raise
            self.history = []
            output = self._recover(features, error)
        self.history = []  # stateless: nothing to replay
        return output


class SaltedSplitClassifier:
    """Classifies images with a salted model split at `cut`: salt and edge here, the cloud part behind a transport.

    Args:
        model: the salted model (the client holds it whole; it uses only the edge part's segments).
        cut: the plan's cut; must keep the salt layer on the client.
        transport: how frames reach the cloud part (default: an in-process PartService over a loopback transport).
        key: the client's salt key (default: a fresh random one).
        wire: the features' codec.
    """

    def __init__(self, model: SaltedSplittable, cut: int, *, transport: Transport | None = None,
                 key: SaltKey | None = None, wire: str = "fp32", expect: dict | None = None):
        model.check_cut(cut)
        self.model, self.cut = model.eval(), cut
        self.edge, _ = apply(model, SplitPlan.two_way(cut))
        self.key = key or SaltKey(model.values)
        if transport is None:
            from splitveil.transport.loopback import LoopbackTransport

            transport = LoopbackTransport(vision_service(model, cut).handle)
        self.transport = transport
        self.stage = ClassifierStage(transport, CLOUD_PART, wire, result_shape=(model.num_classes,),
                                     expect={"cuts": [cut], **(expect or {})})

    @classmethod
    def connect(cls, model: SaltedSplittable, cut: int, url: str, *, token: str, ca_file: Path | None = None,
                pin_sha256: str | None = None, key: SaltKey | None = None, wire: str = "fp32",
                timeout: float = 60.0) -> "SaltedSplitClassifier":
        from splitveil.transport.network import WebSocketTransport

        transport = WebSocketTransport(url, token=token, ca_file=ca_file, pin_sha256=pin_sha256, timeout=timeout)
        return cls(model, cut, transport=transport, key=key, wire=wire)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded logits [N, C] (true class order) of `images` [N, *image_shape]; one fresh salt per image."""
        salts = self.key.draw(len(images))
        features = self.edge((images, salts))  # the salt stays here: only these features leave the device
        salted = self.stage(features)
        return decode_logits(salted, salts, self.model.table)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).argmax(-1)

    def close(self) -> None:
        self.stage.close()
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def vision_service(model: SaltedSplittable, cut: int, **limits):
    """The PartService that serves the cloud part of the salted `model` split at `cut` (copies of its segments only)."""
    from splitveil.serve.build import build_classifier_service

    model.check_cut(cut)
    example = (torch.zeros(1, *model.input_shape), torch.zeros(1, dtype=torch.int64))
    return build_classifier_service(model, cut, example=example, info={"classes": model.num_classes}, **limits)
