"""Turn each sequence's last-token logits into its next token."""

import torch
from torch import nn

from nanovllm.layers.compile import maybe_compile

MIN_TEMPERATURE = 1e-5  # temperatures below this would overflow the division; greedy rows are chosen separately


class Sampler(nn.Module):
    """Greedy rows take the argmax; the others sample from softmax(logits / temperature).

    Sampling uses the exponential race (equivalent to Gumbel-max): with E_i ~ Exp(1) drawn
    independently, argmax_i p_i / E_i is distributed as p. One pass, no cumulative sums.
    """

    def __init__(self, compile_ops: bool = False) -> None:
        super().__init__()
        self._sample = maybe_compile(sample, compile_ops)

    def forward(
        self,
        logits: torch.Tensor,  # [B, vocab_size]
        temperatures: torch.Tensor,  # [B] float32; 0 = greedy
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # [B] int64
        # The exponential noise is drawn outside the compiled function, so a seeded generator keeps working.
        noise = torch.empty_like(logits, dtype=torch.float32).exponential_(1.0, generator=generator)
        return self._sample(logits, temperatures, noise)


def sample(logits: torch.Tensor, temperatures: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Greedy where temperature is 0, else argmax(softmax(logits / temperature) / noise) with noise ~ Exp(1)."""
    logits = logits.float()
    greedy_ids = logits.argmax(dim=-1)
    scaled = logits / temperatures.clamp_min(MIN_TEMPERATURE).unsqueeze(1)
    probs = torch.softmax(scaled, dim=-1)  # [B, vocab_size]
    sampled_ids = (probs / noise).argmax(dim=-1)
    return torch.where(temperatures == 0, greedy_ids, sampled_ids)
