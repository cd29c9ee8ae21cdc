"""Turn each sequence's last-token logits into its next token."""

import torch
from torch import nn

MIN_TEMPERATURE = 1e-5  # temperatures below this would overflow the division; greedy rows are chosen separately


class Sampler(nn.Module):
    """Greedy rows take the argmax; the others sample from softmax(logits / temperature).

    Sampling uses the exponential race (equivalent to Gumbel-max): with E_i ~ Exp(1) drawn
    independently, argmax_i p_i / E_i is distributed as p. One pass, no cumulative sums.
    """

    def forward(
        self,
        logits: torch.Tensor,  # [B, vocab_size]
        temperatures: torch.Tensor,  # [B] float32; 0 = greedy
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # [B] int64
        logits = logits.float()
        greedy_ids = logits.argmax(dim=-1)
        scaled = logits / temperatures.clamp_min(MIN_TEMPERATURE).unsqueeze(1)
        probs = torch.softmax(scaled, dim=-1)  # [B, vocab_size]
        noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
        sampled_ids = (probs / noise).argmax(dim=-1)
        return torch.where(temperatures == 0, greedy_ids, sampled_ids)
