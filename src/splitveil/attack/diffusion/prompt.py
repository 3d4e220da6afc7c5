"""Prompt recovery from the prompt embeddings the cloud receives: the exact attack through the public text encoder.

The UNet's cross-attention reads the text encoder's last hidden state, so both placements send it to the cloud. A
CLIP text encoder is causal: position i's output depends on tokens 0..i only. Knowing tokens 0..i-1, the attacker
runs every vocabulary token at position i through its copy of the public encoder and keeps the one whose output
is nearest the observed row; with an exact (fp32) wire the nearest is at distance ~0 and the prompt comes back
token for token, padding included.
"""

from __future__ import annotations

import torch

from splitveil.attack.base import Attack, Target, ThreatModel


class PromptRecovery(Attack):
    name = "exact-prompt"
    threat_model = ThreatModel(observes="uplink", knows_head_weights=True,
                               description="The cloud receives the prompt embeddings (the public text encoder's "
                                           "output) and inverts them position by position with a copy of that encoder.")

    def __init__(self, target: Target, *, batch: int = 512):
        held = target.grant(self.threat_model, self.name)
        self.encoder = held.public_model.text_encoder.eval()
        self.vocab_size = int(self.encoder.config.vocab_size)
        self.batch = batch

    @torch.no_grad()
    def _outputs(self, prefix: list[int], candidates: torch.Tensor) -> torch.Tensor:
        """Encoder outputs [V, D] at position len(prefix) for each candidate token appended to `prefix`."""
        outputs = []
        for chunk in candidates.split(self.batch):
            ids = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(len(chunk), len(prefix)), chunk[:, None]], 1)
            outputs.append(self.encoder(ids).last_hidden_state[:, -1])
        return torch.cat(outputs)

    @torch.no_grad()
    def reconstruct(self, observed: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings [R, L, D] -> token ids [R, L]."""
        candidates = torch.arange(self.vocab_size)
        recovered = []
        for row in observed.float():
            prefix: list[int] = []
            for position in range(row.shape[0]):
                distances = (self._outputs(prefix, candidates) - row[position]).pow(2).sum(-1)
                prefix.append(int(distances.argmin()))
            recovered.append(prefix)
        return torch.tensor(recovered, dtype=torch.long)


def word_positions(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Mask [L] of the positions that hold the prompt's own tokens (not <bos>, <eos> or padding)."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return torch.tensor([int(i) not in special for i in ids])
