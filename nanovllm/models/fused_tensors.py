"""Checkpoint tensors that hold several of our layers at once (Phi-3's qkv_proj, GPT-2's c_attn), cut into one
tensor per layer while loading, each along the dim where its format keeps the outputs (a FusedSplit):

    qkv_proj.weight           [q + k + v, in]          rows          -> q_proj.weight [q, in], k_proj..., v_proj...
    qkv_proj.qweight (GPTQ)   [in / 8, q + k + v]      columns       -> q_proj.qweight [in / 8, q], ...
    qkv_proj.qzeros (AWQ)     [groups, (q + k + v)/8]  packed words  -> q_proj.qzeros [groups, q / 8], ...
    qkv_proj.weight_scale_inv [(q + k + v)/128, ...]   scale blocks  -> q_proj.weight_scale_inv [q / 128, ...]
    qkv_proj.weight_scale     [1] (per tensor)         not per output -> the same scale for q, k and v

An entry (packed word, scale block) must not hold two parts' outputs: each part's output size is a whole
number of entries, else the checkpoint is refused. The parts' tensors then load as a checkpoint that stores
q_proj, k_proj and v_proj separately would.
"""

from collections.abc import Iterator, Mapping

import torch

from nanovllm.layers.quantization.base import ROWS, FusedSplit, LinearQuantization


class FusedModules:
    """A family's modules fused in its checkpoint, cut into our layers as their tensors load, each tensor along
    the dim its format keeps the outputs in (the quantization scheme's ``fused_splits``; float tensors: rows)."""

    def __init__(self, parts: dict[str, list[tuple[str, int]]], quant: LinearQuantization | None) -> None:
        self.parts = parts  # fused module (".qkv_proj.") -> its parts and their outputs, in order
        self.splits = quant.scheme.fused_splits if quant is not None else {}  # tensor name after the module's

    def cut(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """One (name, tensor) per part when ``name`` is a fused module's tensor, else ``name`` itself."""
        fused = next((fused for fused in self.parts if fused in name), None)
        if fused is None:
            yield name, tensor
            return
        yield from split_fused(name, tensor, fused, self.parts[fused], self.splits.get(name.rsplit(".", 1)[-1], ROWS))


def fused_parts(
    modules: Mapping[str, tuple[str, ...]], sizes: Mapping[str, tuple[int, ...]]
) -> dict[str, list[tuple[str, int]]]:
    """FusedModules' parts from a family's fused_checkpoint_modules and each part's outputs, in the same order."""
    return {fused: list(zip(parts, sizes[fused], strict=True)) for fused, parts in modules.items()}


def split_fused(
    name: str, tensor: torch.Tensor, fused: str, parts: list[tuple[str, int]], split: FusedSplit = ROWS
) -> Iterator[tuple[str, torch.Tensor]]:
    """``name`` (holding ``fused``, e.g. ".qkv_proj.") -> one (name, tensor) per (part, its outputs) of ``parts``."""
    sizes = [size for _, size in parts]
    names = [name.replace(fused, part) for part, _ in parts]
    if split.is_weight_shape:  # compressed-tensors' weight_shape [2] = (out, in)
        pieces = [torch.tensor([size, int(tensor[1])], dtype=tensor.dtype) for size in sizes]
    elif split.out_dim is None:
        pieces = [tensor] * len(parts)
    else:
        pieces = list(tensor.split(_entries(name, tensor, parts, split, split.out_dim), split.out_dim))
    yield from zip(names, pieces, strict=True)


def _entries(
    name: str, tensor: torch.Tensor, parts: list[tuple[str, int]], split: FusedSplit, out_dim: int
) -> list[int]:
    """How many entries along out_dim each part takes; an error if one would share an entry."""
    sizes = [size for _, size in parts]
    per_entry = split.outputs_per_entry
    if any(size % per_entry for size in sizes):
        part_names = [part.strip(".").rsplit(".", 1)[-1] for part, _ in parts]  # the layers: q_proj, ...
        raise ValueError(
            f"checkpoint tensor {name!r} holds {part_names} with {sizes} outputs in one tensor, {per_entry} "
            f"outputs per {split.entry}; nanovllm loads them as separate layers, which needs each part's outputs "
            f"to be a multiple of {per_entry} (a {split.entry} must not hold two parts)"
        )
    entries = [size // per_entry for size in sizes]
    if tensor.dim() <= out_dim or tensor.shape[out_dim] != sum(entries):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {sum(entries)} {split.entry}s "
            f"in dim {out_dim} ({sizes} outputs, {per_entry} per {split.entry})"
        )
    return entries
