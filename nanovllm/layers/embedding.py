"""Token embedding and LM head, with the vocabulary split across tensor-parallel ranks."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.linear import check_shape
from nanovllm.parallel.process_group import get_tensor_parallel


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [rank * V/tp, (rank+1) * V/tp) of the embedding matrix.

    With ``scale`` (Gemma: sqrt(hidden_size)) the embeddings are multiplied by it, rounded to the weights' dtype
    first as transformers rounds it.
    """

    scale: torch.Tensor | None  # [] in the weights' dtype

    def __init__(self, vocab_size: int, hidden_size: int, scale: float | None = None) -> None:
        super().__init__()
        self.tp = get_tensor_parallel()
        if vocab_size % self.tp.size:
            raise ValueError(f"vocab_size {vocab_size} is not divisible by tensor_parallel_size {self.tp.size}")
        self.vocab_size_per_rank = vocab_size // self.tp.size
        self.vocab_start = self.tp.rank * self.vocab_size_per_rank
        self.weight = nn.Parameter(torch.empty(self.vocab_size_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.load_shard  # type: ignore[attr-defined]
        self.register_buffer("scale", None if scale is None else torch.tensor(scale), persistent=False)

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        check_shape(loaded, (self.vocab_size_per_rank * self.tp.size, *param.shape[1:]))  # weight or LM-head bias
        param.data.copy_(loaded.narrow(0, self.vocab_start, self.vocab_size_per_rank))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [N] -> [N, hidden_size]
        embeds = self._lookup(input_ids)
        return embeds if self.scale is None else embeds * self.scale

    def _lookup(self, input_ids: torch.Tensor) -> torch.Tensor:  # [N] -> [N, hidden_size]
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        # Tokens outside this rank's slice look up row 0 and are zeroed; the all-reduce fills them in.
        local_ids = input_ids - self.vocab_start
        is_local = (local_ids >= 0) & (local_ids < self.vocab_size_per_rank)
        embeds = F.embedding(local_ids.masked_fill(~is_local, 0), self.weight)
        embeds = embeds * is_local.unsqueeze(-1)
        dist.all_reduce(embeds)
        return embeds


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states to vocabulary logits; every rank ends with the full vocabulary (rank 0 samples).

    An all-gather, not a gather to rank 0: NCCL runs a gather as point-to-point sends, and on 2 H200s a
    worker killed mid-decode left rank 0 stuck inside the gather's host call, with the watchdog's abort
    (parallel/workers.py) stuck behind it. The workers' copies cost little: B x vocab values per step.
    """

    def __init__(
        self, vocab_size: int, hidden_size: int, bias: bool = False, final_logit_softcapping: float | None = None
    ) -> None:
        super().__init__(vocab_size, hidden_size)
        self.bias = None  # Phi's LM head has one, split like the weight's rows
        if bias:
            self.bias = nn.Parameter(torch.empty(self.vocab_size_per_rank), requires_grad=False)
            self.bias.weight_loader = self.load_shard  # type: ignore[attr-defined]
        self.softcap = final_logit_softcapping  # Gemma's logits: cap * tanh(logits / cap), within (-cap, cap)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab]
        logits = F.linear(hidden_states, self.weight, self.bias)  # [B, vocab_size_per_rank]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.tp.size == 1:
            return logits
        num_rows = logits.shape[0]
        parts = logits.new_empty(self.tp.size * num_rows, self.vocab_size_per_rank)  # rank r's rows at r*B..
        dist.all_gather_into_tensor(parts, logits.contiguous())
        by_rank = parts.view(self.tp.size, num_rows, self.vocab_size_per_rank)
        return by_rank.permute(1, 0, 2).reshape(num_rows, -1)  # [B, vocab]: rank r's slice at columns r*V/tp..


class PositionEmbedding(nn.Module):
    """GPT-2's learned absolute positions: one vector per position, added to the token embedding; every rank
    holds the whole table."""

    def __init__(self, max_position: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_position, hidden_size), requires_grad=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:  # [N] -> [N, hidden_size]
        return F.embedding(positions, self.weight)
