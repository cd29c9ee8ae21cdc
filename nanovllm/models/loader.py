"""Load safetensors checkpoints (one file or many shards) into a model, shard by shard.

A model family may rename, transpose or split its checkpoint's tensors first (its
``checkpoint_tensors``: GPT-2's Conv1D weights, Phi-3's fused q/k/v), and map names onto its
parameters itself (its ``checkpoint_target``: per-expert tensors, models/moe.py). Other names map
onto model parameters directly, except the tensors that our layers fuse: ``q_proj``/``k_proj``/``v_proj``
go into ``qkv_proj`` and ``gate_proj``/``up_proj`` into ``gate_up_proj``, each through its
parameter's ``weight_loader`` with the part it fills.
Every parameter (and every part of a fused one) must be loaded exactly once, and every
checkpoint tensor must land somewhere: anything else is an error, never a silent default.
KV-cache scales are the one exception: models/kv_scales.py reads them for an FP8 cache.
"""

import glob
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from nanovllm.layers.linear import default_weight_loader
from nanovllm.models.kv_scales import is_kv_scale_name

# Checkpoint tensors that hold nothing we load: precomputed rotary tables some exporters save.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DUMMY_WEIGHT_STD = 0.02  # spread of random dummy weights, as in common initializers
MIN_FILES_FOR_PROGRESS = 2  # a progress bar for checkpoints of several shards


def _target(name: str, packed: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    """Checkpoint name -> (parameter name, part), part None for unfused parameters."""
    for ckpt_name, (fused_name, part) in packed.items():
        if f".{ckpt_name}." in name:
            return name.replace(f".{ckpt_name}.", f".{fused_name}."), part
    return name, None


def load_safetensors(model: nn.Module, model_dir: str) -> None:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}; use load_format='dummy' for random weights")
    params = dict(model.named_parameters())
    loaded: set[tuple[str, Any]] = set()
    for path in tqdm(files, desc="Loading weights", unit="file", disable=len(files) < MIN_FILES_FOR_PROGRESS):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for ckpt_name in f.keys():
                    _load_tensor(model, params, f, ckpt_name, loaded)
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); download it again") from e
        except ValueError as e:
            raise ValueError(f"{os.path.basename(path)} in {model_dir}: {e}") from e
    expected = {(name, part) for name, p in params.items() for part in (getattr(p, "shard_ids", ()) or (None,))}
    missing = sorted(f"{name}[{part}]" if part is not None else name for name, part in expected - loaded)
    if missing:
        raise ValueError(f"the checkpoint in {model_dir} lacks {len(missing)} parameter(s): {missing[:8]}")


def _checkpoint_target(model: nn.Module, name: str) -> tuple[str, Any]:
    """(parameter name, part) of a checkpoint tensor: the family's own mapping first, then the fused layers'."""
    model_target: Callable[[str], tuple[str, Any] | None] = getattr(model, "checkpoint_target", lambda name: None)
    return model_target(name) or _target(name, getattr(model, "packed_modules_mapping", {}))


def _load_tensor(
    model: nn.Module, params: dict[str, nn.Parameter], f: Any, ckpt_name: str, loaded: set[tuple[str, Any]]
) -> None:
    """Copy one checkpoint tensor into its parameter (or its parts of fused ones), each part exactly once."""
    # A tied LM head shares the embedding's parameter, so named_parameters() lists it only once.
    if ckpt_name.endswith(IGNORED_SUFFIXES) or (ckpt_name == "lm_head.weight" and ckpt_name not in params):
        return
    if is_kv_scale_name(ckpt_name):  # the KV cache's scales, read by models/kv_scales.py
        return
    # The family's reading of its checkpoint (renamed, transposed, fused tensors split): name -> [(name, tensor)].
    checkpoint_tensors: Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]] = getattr(
        model, "checkpoint_tensors", lambda name, tensor: [(name, tensor)]
    )
    for mapped_name, tensor in checkpoint_tensors(ckpt_name, f.get_tensor(ckpt_name)):
        name, part = _checkpoint_target(model, mapped_name)
        if name not in params:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has no parameter in the model ({name!r}){_hint(name)}")
        if (name, part) in loaded:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} fills {name} a second time (duplicate tensor)")
        param = params[name]
        loader: Callable[..., None] = getattr(param, "weight_loader", default_weight_loader)
        if not getattr(param, "takes_checkpoint_dtype", False):  # quantized tensors convert themselves
            if param.is_floating_point() and not _is_plain_float(tensor):  # its scale would be lost on the way
                raise ValueError(
                    f"checkpoint tensor {ckpt_name!r} is {tensor.dtype}, a quantized tensor, where the model holds "
                    f"{param.dtype} values ({name!r}){_hint(name)}"
                )
            tensor = tensor.to(param.dtype)
        try:
            loader(param, tensor) if part is None else loader(param, tensor, part)
        except (ValueError, RuntimeError) as e:
            where = f"{name}[{part}]" if part is not None else name
            raise ValueError(f"checkpoint tensor {ckpt_name!r} {e} for parameter {where}") from e
        loaded.add((name, part))


def _is_plain_float(tensor: torch.Tensor) -> bool:
    """A float tensor a float parameter can take as it is (converted): not FP8 codes, not packed integers."""
    return tensor.is_floating_point() and tensor.element_size() > 1


def _hint(param_name: str) -> str:
    """What a tensor the model has no place for most likely means, where that is known."""
    if ".experts." in param_name:
        return (
            "; nanovllm loads mixture-of-experts experts unquantized only, and this checkpoint quantizes them: "
            "use the model's unquantized checkpoint (quantized experts: issue #26)"
        )
    return ""


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights with the checkpoint's shapes, for benchmarks: norms 1, biases 0, matrices N(0, std);
    quantized tensors as their scheme fills them (about the same spread)."""
    generator: torch.Generator | None = None
    for name, param in model.named_parameters():
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if hasattr(param, "dummy_fill"):  # a quantized tensor: codes, FP8 values or scales
            param.dummy_fill(param.data, generator)
        elif param.dim() == 1:
            param.data.fill_(1.0 if name.endswith("norm.weight") else 0.0)  # LayerNorm biases are biases
        else:
            param.data.normal_(0.0, DUMMY_WEIGHT_STD, generator=generator)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (rotary tables, online FP8 scales; a tied weight once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
