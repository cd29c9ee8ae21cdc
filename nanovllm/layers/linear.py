"""Linear layers that hold one tensor-parallel shard of their weight.

Column-parallel layers split the output dimension across ranks (each rank computes a slice
of the outputs); row-parallel layers split the input dimension (each rank computes a
partial sum, then an all-reduce adds them). Every parameter has a ``weight_loader`` that
copies only this rank's shard out of the full checkpoint tensor, so a shard is all that is
ever held on a device. Which rows and columns that shard is, per checkpoint weight, is the
layer's :meth:`weight_shard`; a quantization scheme (layers/quantization/) reads its format's
tensors through the same description, and replaces the plain weight and its matmul.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels.lora import LoRAKernels
from nanovllm.layers.lora import LoRASlots, ShardRange
from nanovllm.layers.quantization.base import LinearScheme, WeightShard
from nanovllm.parallel.process_group import get_tensor_parallel


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    """A checkpoint tensor must have its full, unsharded shape (the loader names the tensor and file)."""
    if tuple(loaded.shape) != expected:
        raise ValueError(f"has shape {tuple(loaded.shape)}, expected {expected}")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """Copy a replicated (unsharded) tensor into its parameter."""
    check_shape(loaded, tuple(param.shape))
    param.data.copy_(loaded)


def load_plain_shard(param: nn.Parameter, loaded: torch.Tensor, shard: WeightShard) -> None:
    """Copy this rank's shard of a plain weight [out, in] (or bias [out]) into its rows of ``param``."""
    check_shape(loaded, (shard.out_total, shard.in_total)[: param.dim()])
    piece = loaded.narrow(0, shard.out_start, shard.out_size)
    if param.dim() == 2:
        piece = piece.narrow(1, shard.in_start, shard.in_size)
    param.data.narrow(0, shard.out_offset, shard.out_size).copy_(piece)


def _make_param(*shape: int, loader: Callable[..., None], shard_ids: tuple[Any, ...] = ()) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    param.shard_ids = shard_ids  # type: ignore[attr-defined]  # sub-tensors the checkpoint stores separately
    return param


class ParallelLinear(nn.Module):
    """What column- and row-parallel layers share: the weight (plain, or a scheme's tensors) and its matmul."""

    part_ids: tuple[Any, ...] = ()  # checkpoint weights fused into this layer (q, k, v ...); () = one

    def weight_shard(self, part: Any = None) -> WeightShard:
        raise NotImplementedError

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor, part: Any = None) -> None:
        load_plain_shard(param, loaded, self.weight_shard(part))

    def _create_weights(self, output_size: int, input_size: int, scheme: LinearScheme | None) -> None:
        """This rank's [output_size, input_size] weight: a plain parameter, or the scheme's quantized tensors."""
        self.scheme = scheme
        self.lora: LoRASlots | None = None  # adapters' A and B, once enable_lora() was called (layers/lora.py)
        if scheme is None:
            self.weight = _make_param(output_size, input_size, loader=self.load_weight, shard_ids=self.part_ids)
        else:
            scheme.create_weights(self, output_size, input_size)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # [N, in] -> [N, out]
        if self.scheme is None:
            y = F.linear(x, self.weight, bias)
        else:
            y = self.scheme.apply(self, x)
            y = y if bias is None else y + bias
        return y if self.lora is None else self.lora(x, y)  # a row-parallel layer's partial sum gets its part

    def _lora_weight(self) -> torch.Tensor:
        """The plain weight LoRA slots take their dtype and device from; quantized layers take no adapter."""
        if self.scheme is not None:
            raise ValueError(f"LoRA adapters on quantized layers are not supported ({type(self.scheme).__name__})")
        return self.weight

    def lora_slice(self, part: Any) -> int:
        """Which LoRA slice holds checkpoint part ``part`` (q, k, v of a qkv layer, in that order)."""
        return list(self.part_ids or (None,)).index(part)


class ColumnParallelLinear(ParallelLinear):
    """y = x W^T + b with W's output rows split across ranks: [output_size / tp, input_size] here."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, scheme: LinearScheme | None = None
    ) -> None:
        super().__init__()
        self.tp = get_tensor_parallel()
        if output_size % self.tp.size:
            raise ValueError(f"output size {output_size} is not divisible by tensor_parallel_size {self.tp.size}")
        self.input_size = input_size
        self.output_size_per_rank = output_size // self.tp.size
        self._create_weights(self.output_size_per_rank, input_size, scheme)
        self.bias = (
            _make_param(self.output_size_per_rank, loader=self.load_weight, shard_ids=self.part_ids) if bias else None
        )

    def weight_shard(self, part: Any = None) -> WeightShard:
        size = self.output_size_per_rank
        return WeightShard(size * self.tp.size, self.input_size, self.tp.rank * size, size, 0, self.input_size, 0)

    def enable_lora(self, max_loras: int, max_lora_rank: int, kernels: LoRAKernels) -> None:
        """Give the layer LoRA slots: A whole, B sharded as the weight's rows of each part (layers/lora.py)."""
        weight = self._lora_weight()
        shards = [self.weight_shard(part) for part in (self.part_ids or (None,))]
        out_slices = tuple(ShardRange(shard.out_offset, shard.out_size, shard.out_start) for shard in shards)
        in_range = ShardRange(0, self.input_size, 0)
        self.lora = LoRASlots(in_range, out_slices, max_loras, max_lora_rank, kernels, like=weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matrix (gate and up of a gated MLP).

    The checkpoint stores each part separately; part i fills rows [offset_i, offset_i + size_i / tp).
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, scheme: LinearScheme | None = None
    ) -> None:
        self.output_sizes = output_sizes
        self.part_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes), bias, scheme)

    def weight_shard(self, part: Any = None) -> WeightShard:
        size = self.output_sizes[part] // self.tp.size
        offset = sum(self.output_sizes[:part]) // self.tp.size
        return WeightShard(
            self.output_sizes[part], self.input_size, self.tp.rank * size, size, 0, self.input_size, offset
        )


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matrix, split by heads across ranks.

    Per rank:  [ q heads of this rank | k heads of this rank | v heads of this rank ]
    With fewer KV heads than ranks, each KV head is replicated on tp / num_kv_heads ranks.
    """

    part_ids = ("q", "k", "v")

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
        scheme: LinearScheme | None = None,
    ) -> None:  # fmt: skip
        tp = get_tensor_parallel()
        if num_heads % tp.size:
            raise ValueError(f"num_attention_heads {num_heads} is not divisible by tensor_parallel_size {tp.size}")
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(f"num_key_value_heads {num_kv_heads} and tensor_parallel_size {tp.size} don't divide")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size  # query heads on this rank
        self.num_kv_heads = max(1, num_kv_heads // tp.size)  # key/value heads on this rank
        self.total_num_kv_heads = num_kv_heads
        # First KV head of this rank: ranks share a head when there are fewer heads than ranks.
        self.kv_head_start = tp.rank * num_kv_heads // tp.size
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden_size, output_size, bias, scheme)

    def weight_shard(self, part: Any = None) -> WeightShard:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if part == "q":
            return WeightShard(
                q_size * self.tp.size, self.input_size, self.tp.rank * q_size, q_size, 0, self.input_size, 0
            )
        offset = q_size if part == "k" else q_size + kv_size
        total, start = self.total_num_kv_heads * self.head_dim, self.kv_head_start * self.head_dim
        return WeightShard(total, self.input_size, start, kv_size, 0, self.input_size, offset)


class RowParallelLinear(ParallelLinear):
    """y = x W^T + b with W's input columns split across ranks; partial sums are all-reduced."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, scheme: LinearScheme | None = None
    ) -> None:
        super().__init__()
        self.tp = get_tensor_parallel()
        if input_size % self.tp.size:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size {self.tp.size}")
        self.output_size = output_size
        self.input_size_per_rank = input_size // self.tp.size
        self._create_weights(output_size, self.input_size_per_rank, scheme)
        self.bias = _make_param(output_size, loader=self.load_weight) if bias else None  # replicated

    def weight_shard(self, part: Any = None) -> WeightShard:
        size = self.input_size_per_rank
        return WeightShard(self.output_size, size * self.tp.size, 0, self.output_size, self.tp.rank * size, size, 0)

    def enable_lora(self, max_loras: int, max_lora_rank: int, kernels: LoRAKernels) -> None:
        """Give the layer LoRA slots: A sharded as the weight's input columns, B whole (layers/lora.py)."""
        weight, in_size = self._lora_weight(), self.input_size_per_rank
        in_range = ShardRange(0, in_size, self.tp.rank * in_size)
        out_slices = (ShardRange(0, self.output_size, 0),)
        self.lora = LoRASlots(in_range, out_slices, max_loras, max_lora_rank, kernels, like=weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, on rank 0, so the all-reduce does not count it tp times.
        y = self._matmul(x, self.bias if self.tp.rank == 0 else None)
        if self.tp.size > 1:
            dist.all_reduce(y)
        return y
