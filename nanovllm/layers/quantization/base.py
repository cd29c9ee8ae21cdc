"""What every quantization scheme shares: the shard a rank loads, the scheme interface, and which layers it covers.

A tensor-parallel linear layer describes, for each checkpoint weight [out, in] it holds (one per part of a
fused layer), which rows and columns this rank keeps and where they go (:class:`WeightShard`). A scheme turns
each of its format's checkpoint tensors into this rank's rows of a parameter through that description, so
packed words, groups and blocks are cut at the same rows and columns as the plain weight.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class WeightShard:
    """This rank's piece of one checkpoint weight [out_total, in_total], and where it goes in our parameter."""

    out_total: int  # rows (output features) of the checkpoint weight: one part of a fused layer
    in_total: int  # columns (input features) of the checkpoint weight
    out_start: int  # first row this rank keeps
    out_size: int  # rows this rank keeps
    in_start: int  # first column this rank keeps
    in_size: int  # columns this rank keeps
    out_offset: int  # first row of the piece in this rank's parameter (fused parts follow one another)


@dataclass(frozen=True)
class FusedSplit:
    """Where a format's checkpoint tensor holds its layer's output features, so that one tensor of a layer fused
    in the checkpoint (Phi-3's qkv_proj) is cut into its parts (q_proj, k_proj, v_proj) in whole entries:

        weight [q + k + v, in]              out_dim 0, one output per row
        GPTQ qweight [in / 8, q + k + v]    out_dim 1, one output per column (codes are packed along in)
        AWQ qzeros [groups, (q + k + v)/8]  out_dim 1, 8 outputs per packed word: each part whole words
        weight_scale_inv [(q + k + v)/128, in/128]  out_dim 0, 128 outputs per scale block
    """

    out_dim: int | None  # the dim indexed by outputs; None: the tensor is not per output (every part gets it)
    outputs_per_entry: int = 1  # outputs per index along out_dim: 1, a packed word's codes, a block's rows
    entry: str = "row"  # what one index along out_dim is, for errors
    is_weight_shape: bool = False  # a [2] tensor of the weight's (out, in): each part gets (its outputs, in)


ROWS = FusedSplit(0)  # [out, ...]: a float weight or bias, FP8 values, per-row scales
COLUMNS = FusedSplit(1, entry="column")  # [..., out]: GPTQ's and AWQ's transposed layouts
WHOLE = FusedSplit(None)  # one value for every output: a per-tensor scale, GPTQ's g_idx


class ShardedLinear(Protocol):
    """What a scheme needs from the linear layer it fills."""

    part_ids: tuple[Any, ...]  # the checkpoint tensors fused into the layer (q, k, v ...); () for one

    def weight_shard(self, part: Any) -> WeightShard: ...

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None: ...

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None: ...


class LinearScheme(Protocol):
    """How a quantized linear layer stores its weight and multiplies by it."""

    # Checkpoint tensor name (after the module's) -> where it holds the outputs; a name not listed is a float
    # weight or bias (ROWS). Models that keep layers fused in their checkpoint split tensors by it while loading.
    fused_splits: dict[str, FusedSplit]

    def create_weights(self, layer: ShardedLinear, output_size: int, input_size: int) -> None:
        """Register this rank's tensors ([output_size, input_size] of weight) on the layer, each with a loader."""
        ...

    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:
        """x [num_tokens, input_size] -> [num_tokens, output_size], without the bias."""
        ...


# A checkpoint tensor and this rank's shard -> this rank's rows in our layout ([shard.out_size, ...]), or None
# for a tensor that is only checked (its information is implied by the format's settings).
Reader = Callable[[Tensor, WeightShard], Tensor | None]
DummyFill = Callable[[Tensor, torch.Generator], None]  # random values for load_format="dummy"


def add_quantized_param(
    layer: ShardedLinear, name: str, data: Tensor, read: Reader, dummy_fill: DummyFill | None = None
) -> nn.Parameter:
    """Register ``data`` as ``layer.<name>``, loaded from the checkpoint tensor of that name through ``read``."""
    param = nn.Parameter(data, requires_grad=False)

    def load(param: nn.Parameter, loaded: Tensor, part: Any = None) -> None:
        shard = layer.weight_shard(part)
        piece = read(loaded, shard)
        if piece is None:
            return
        rows = param.data.narrow(0, shard.out_offset, shard.out_size)
        if piece.shape != rows.shape:
            raise ValueError(f"its rows of this rank have shape {tuple(piece.shape)}, expected {tuple(rows.shape)}")
        rows.copy_(piece)

    param.weight_loader = load  # type: ignore[attr-defined]
    param.shard_ids = layer.part_ids  # type: ignore[attr-defined]
    param.takes_checkpoint_dtype = True  # type: ignore[attr-defined]  # the loader converts it, not models/loader.py
    param.dummy_fill = dummy_fill or (lambda data, generator: None)  # type: ignore[attr-defined]
    layer.register_parameter(name, param)
    return param


def check_shape(loaded: Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(loaded.shape) != expected:
        raise ValueError(f"has shape {tuple(loaded.shape)}, expected {expected} ({layout})")


def entry_range(start: int, size: int, total: int, per_entry: int, what: str) -> tuple[int, int]:
    """Rows or columns [start, start + size) of ``total`` -> (first entry, entries) of a tensor that holds one
    entry per ``per_entry`` of them (a packed word, a group, a block); the range must not split an entry."""
    ends_inside = (start + size) % per_entry and start + size != total
    if start % per_entry or ends_inside:
        raise ValueError(
            f"this rank's range [{start}, {start + size}) of {total} splits a {what} of {per_entry}; "
            f"use a tensor_parallel_size that keeps whole {what}s on each rank"
        )
    return start // per_entry, -(-size // per_entry)


def slice_rows_cols(
    tensor: Tensor, rows: tuple[int, int], cols: tuple[int, int]
) -> Tensor:  # [rows[1], cols[1]] of a 2-D tensor from (start, size) pairs
    return tensor.narrow(0, *rows).narrow(1, *cols)


def matches(name: str, pattern: str) -> bool:
    """compressed-tensors' spelling: "re:" + a regex matched at the start of the name, else the exact name.
    "Linear" (a class name) stands for every linear layer."""
    if pattern == "Linear":
        return True
    if pattern.startswith("re:"):
        return re.match(pattern.removeprefix("re:"), name) is not None
    return name == pattern


@dataclass(frozen=True)
class LinearQuantization:
    """Which linear layers of a model hold quantized weights, and in which scheme."""

    scheme: LinearScheme  # how a quantized layer stores and multiplies its weight
    targets: tuple[str, ...]  # layers quantized: "Linear" (all), module names or "re:" regexes
    ignore: tuple[str, ...]  # layers kept in the model's dtype, same spelling; wins over targets
    # (ours, the checkpoint's) module name pieces, replaced in order in "<module name>." before matching: for a
    # family whose checkpoint names or fuses modules its own way (Phi-3's qkv_proj holds our q_proj, k_proj and
    # v_proj); the family sets them (LlamaForCausalLM.quant_module_renames).
    module_renames: tuple[tuple[str, str], ...] = ()

    def is_quantized(self, module_name: str) -> bool:
        """Whether our module ``module_name`` (``model.layers.0.self_attn.q_proj``) is quantized in the checkpoint."""
        name = f"{module_name}."
        for ours, checkpoints in self.module_renames:
            name = name.replace(ours, checkpoints)
        name = name.removesuffix(".")
        is_target = any(matches(name, target) for target in self.targets)
        return is_target and not any(matches(name, pattern) for pattern in self.ignore)

    def scheme_for(self, prefix: str, checkpoint_names: tuple[str, ...]) -> LinearScheme | None:
        """The scheme of the layer fusing ``prefix.<name>`` for each checkpoint name; None = unquantized.
        A fused layer is all quantized or all not: one scheme holds all its parts."""
        names = [f"{prefix}.{name}" for name in checkpoint_names]
        quantized = [self.is_quantized(name) for name in names]
        if all(quantized):
            return self.scheme
        if not any(quantized):
            return None
        raise ValueError(
            f"quantization_config quantizes {[n for n, q in zip(names, quantized, strict=True) if q]} but not "
            f"{[n for n, q in zip(names, quantized, strict=True) if not q]}, which nanovllm fuses into one layer; "
            "a fused layer must be quantized whole (change the checkpoint's ignore list)"
        )
