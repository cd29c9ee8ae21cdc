"""Linear layers that hold one tensor-parallel shard of their weight.

Column-parallel layers split the output dimension across ranks (each rank computes a slice
of the outputs); row-parallel layers split the input dimension (each rank computes a
partial sum, then an all-reduce adds them). Every parameter has a ``weight_loader`` that
copies only this rank's shard out of the full checkpoint tensor, so a shard is all that is
ever held on a device.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels.lora import LoRAKernels
from nanovllm.layers.lora import LoRASlots, ShardRange
from nanovllm.parallel.process_group import get_tensor_parallel


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Copy a replicated (unsharded) tensor into its parameter."""
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, parameter expects {tuple(param.shape)}")
    param.data.copy_(loaded)


def _make_param(*shape: int, loader: Callable[..., None], shard_ids: tuple[Any, ...] = ()) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    param.shard_ids = shard_ids  # type: ignore[attr-defined]  # sub-tensors the checkpoint stores separately
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks: [output_size / tp, input_size] here."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp = get_tensor_parallel()
        if output_size % self.tp.size:
            raise ValueError(f"output size {output_size} is not divisible by tensor_parallel_size {self.tp.size}")
        self.output_size_per_rank = output_size // self.tp.size
        self.weight = _make_param(self.output_size_per_rank, input_size, loader=self.load_shard)
        self.bias = _make_param(self.output_size_per_rank, loader=self.load_shard) if bias else None
        self.lora: LoRASlots | None = None  # adapters' A and B, once enable_lora() was called

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * size, size))

    def part_rows(self, part: int | str | None = None) -> ShardRange:
        """Where this rank's rows of checkpoint part ``part`` lie (a plain layer has one part, None)."""
        size = self.output_size_per_rank
        return ShardRange(0, size, self.tp.rank * size)

    def load_part(self, param: nn.Parameter, loaded: torch.Tensor, part: int | str) -> None:
        rows = self.part_rows(part)
        param.data.narrow(0, rows.local_offset, rows.size).copy_(loaded.narrow(0, rows.full_start, rows.size))

    def enable_lora(self, max_loras: int, max_lora_rank: int, kernels: LoRAKernels) -> None:
        """Give the layer LoRA slots: A whole, B sharded as the weight's rows of each part (layers/lora.py)."""
        parts = getattr(self.weight, "shard_ids", ()) or (None,)
        in_range = ShardRange(0, self.weight.shape[1], 0)
        out_slices = tuple(self.part_rows(part) for part in parts)
        self.lora = LoRASlots(in_range, out_slices, max_loras, max_lora_rank, kernels, like=self.weight)

    def lora_slice(self, part: int | str | None) -> int:
        """Which LoRA slice holds checkpoint part ``part`` (q, k, v of a qkv layer, in that order)."""
        parts = getattr(self.weight, "shard_ids", ()) or (None,)
        return list(parts).index(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.lora is None else self.lora(x, y)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matrix (gate and up of a gated MLP).

    The checkpoint stores each part separately; part i fills rows [offset_i, offset_i + size_i / tp).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = output_sizes
        self.weight.weight_loader = self.load_part  # type: ignore[attr-defined]
        self.weight.shard_ids = tuple(range(len(output_sizes)))  # type: ignore[attr-defined]
        if self.bias is not None:
            self.bias.weight_loader = self.load_part  # type: ignore[attr-defined]
            self.bias.shard_ids = self.weight.shard_ids  # type: ignore[attr-defined]

    def part_rows(self, part: int | str | None = None) -> ShardRange:
        assert isinstance(part, int), f"a merged layer's parts are numbered, got {part!r}"
        size = self.output_sizes[part] // self.tp.size
        return ShardRange(sum(self.output_sizes[:part]) // self.tp.size, size, self.tp.rank * size)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matrix, split by heads across ranks.

    Per rank:  [ q heads of this rank | k heads of this rank | v heads of this rank ]
    With fewer KV heads than ranks, each KV head is replicated on tp / num_kv_heads ranks.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        tp = get_tensor_parallel()
        if num_heads % tp.size:
            raise ValueError(f"num_attention_heads {num_heads} is not divisible by tensor_parallel_size {tp.size}")
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(f"num_key_value_heads {num_kv_heads} and tensor_parallel_size {tp.size} don't divide")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size  # query heads on this rank
        self.num_kv_heads = max(1, num_kv_heads // tp.size)  # key/value heads on this rank
        # First KV head of this rank: ranks share a head when there are fewer heads than ranks.
        self.kv_head_start = tp.rank * num_kv_heads // tp.size
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden_size, output_size, bias)
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.load_part  # type: ignore[attr-defined]
                param.shard_ids = ("q", "k", "v")  # type: ignore[attr-defined]

    def part_rows(self, part: int | str | None = None) -> ShardRange:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if part == "q":
            return ShardRange(0, q_size, self.tp.rank * q_size)
        offset = q_size if part == "k" else q_size + kv_size
        return ShardRange(offset, kv_size, self.kv_head_start * self.head_dim)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across ranks; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp = get_tensor_parallel()
        if input_size % self.tp.size:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size {self.tp.size}")
        self.weight = _make_param(output_size, input_size // self.tp.size, loader=self.load_shard)
        self.bias = _make_param(output_size, loader=default_weight_loader) if bias else None
        self.lora: LoRASlots | None = None  # adapters' A and B, once enable_lora() was called

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp.rank * size, size))

    def enable_lora(self, max_loras: int, max_lora_rank: int, kernels: LoRAKernels) -> None:
        """Give the layer LoRA slots: A sharded as the weight's input columns, B whole (layers/lora.py)."""
        in_size, out_size = self.weight.shape[1], self.weight.shape[0]
        in_range = ShardRange(0, in_size, self.tp.rank * in_size)
        self.lora = LoRASlots(in_range, (ShardRange(0, out_size, 0),), max_loras, max_lora_rank, kernels, self.weight)

    def lora_slice(self, part: int | str | None) -> int:
        """A row-parallel layer has one LoRA slice."""
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, on rank 0, so the all-reduce does not count it tp times.
        y = F.linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        if self.lora is not None:  # each rank's partial LoRA (its input columns) joins the all-reduce below
            y = self.lora(x, y)
        if self.tp.size > 1:
            dist.all_reduce(y)
        return y
