"""Text inversion: recover prompts and answers from the hidden states a Λ-split sends to and gets from the cloud."""

from splitveil.attack.text.attacks import TEXT_ATTACKS, ExactInversion, NearestEmbedding, TailReadout
from splitveil.attack.text.learned import LearnedInversion
from splitveil.attack.text.target import TextTarget

__all__ = ["TEXT_ATTACKS", "ExactInversion", "LearnedInversion", "NearestEmbedding", "TailReadout", "TextTarget"]
