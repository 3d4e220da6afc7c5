"""Text inversion: recover prompts and answers from the hidden states a Λ-split sends to and gets from the cloud."""

from splitveil.attack.text.attacks import TEXT_ATTACKS, ExactInversion, NearestEmbedding, TailReadout

__all__ = ["TEXT_ATTACKS", "ExactInversion", "NearestEmbedding", "TailReadout"]
