"""What a Λ-split offers a text attacker, and the private parts it is granted.

A `TextTarget` names the public model the victim split and where the cuts are; it never holds a live part (whose KV
cache holds the user's prompt once the split has run). An attack granted the head's weights gets a fresh head part
over a private copy of exactly the embedding and the head's layers (`private_copy`: every other weight of the model
is a meta tensor); one granted the tail's weights gets a fresh tail part over copies of the tail's layers, final
norm and LM head. Auxiliary text is the attacker's own (the learned attack takes it as an argument), so the target
does not offer it.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitveil.attack.base import Target, private_copy
from splitveil.core.errors import ConfigError
from splitveil.models.causal_lm import CausalLMPart, CausalLMSplittable


@dataclass(frozen=True, eq=False)
class TextTarget(Target):
    """The public model of a Λ-split and its cuts, as segment boundaries; None means not offered.

    Args:
        splittable: the model the victim split (its weights are copied only as far as an attack is granted them).
        head_end: the segment where the head ends (the uplink is the head's output).
        tail_start: the segment where the tail starts (the downlink is the tail's input).
    """

    splittable: CausalLMSplittable
    head_end: int | None = None
    tail_start: int | None = None

    offers = {"knows_head_weights": ("head", "the public head: the part from the embedding to the cut"),
              "knows_tail_weights": ("tail", "the public tail: the part that ends with the LM head")}
    observable = ("uplink", "downlink")

    @classmethod
    def from_split(cls, lm, head_depth: int | None = None) -> "TextTarget":
        """What a `SplitCausalLM` Λ-split offers: its model, head and tail (`head_depth` overrides the head's cut,
        e.g. the depth a randomised cut drew for this session)."""
        splittable = lm.splittable
        head_cut, tail_cut = lm.plan.cuts
        depth = head_cut if head_depth is None else head_depth
        return cls(splittable, splittable.boundary(depth), splittable.boundary(tail_cut))

    @classmethod
    def of_part(cls, part) -> "TextTarget":
        """What a bare part offers: its own weights, as a head (from the embedding, before the LM head) or a tail
        (ending with the LM head). The part itself is not kept."""
        part = getattr(part, "stage", part)  # a defended stage wraps the part
        if not isinstance(part, CausalLMPart):
            return cls(None)
        head = part.end if part.has_embed and not part.has_head else None
        tail = part.start if part.has_head and part.start > 0 else None
        return cls(part.owner, head, tail)

    def offered(self, field: str) -> bool:
        return self.splittable is not None and (self.head_end if field == "head" else self.tail_start) is not None

    def copy_of(self, field: str) -> CausalLMPart:
        splittable = self.splittable
        start, end = (0, self.head_end) if field == "head" else (self.tail_start, len(splittable.segment_names))
        granted = [p for module in splittable.modules_for(start, end) for p in module.parameters()]
        # a mid-model part still runs the family's prologue (e.g. GPT-2 adds position embeddings, then discards
        # them for the received state): zeros there, never the victim's values
        prologue = [p for name, child in splittable.base.named_children()
                    if name not in (splittable.layers_attr, splittable.norm_attr) for p in child.parameters()]
        part = CausalLMSplittable(private_copy(splittable.model, granted, zeroed=prologue)).make_part(start, end)
        if field == "tail":
            part.last_logits_only = False
        return part


def text_target(target) -> TextTarget:
    """`target` as a TextTarget: given one, or a bare part (see `TextTarget.of_part`).

    Experiments hand attacks a TextTarget, never a live part: a part the device runs holds the session's KV cache,
    and an attack constructor that kept its argument could read the prompt from it. A bare part suits callers that
    own the part themselves (tests, the demo's own check); only its weights are granted, as copies.
    """
    if isinstance(target, TextTarget):
        return target
    if isinstance(target, CausalLMPart) or hasattr(target, "stage"):
        return TextTarget.of_part(target)
    raise ConfigError(f"a text attack needs a TextTarget or a causal-LM part, not {type(target).__name__}")
