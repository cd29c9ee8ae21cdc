"""Load safetensors checkpoints (one file or many shards) into a model, shard by shard.

Checkpoint names map onto model parameters directly, except the tensors that our layers
fuse: ``q_proj``/``k_proj``/``v_proj`` go into ``qkv_proj`` and ``gate_proj``/``up_proj`` into
``gate_up_proj``, each through its parameter's ``weight_loader`` with the part it fills.
Every parameter (and every part of a fused one) must be loaded exactly once, and every
checkpoint tensor must land somewhere: anything else is an error, never a silent default.
KV-cache scales are the one exception: models/kv_scales.py reads them for an FP8 cache.
"""

import glob
import os
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from nanovllm.layers.linear import default_weight_loader
from nanovllm.models.kv_scales import is_kv_scale_name

# Checkpoint tensors that hold nothing we load: precomputed rotary tables some exporters save.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DUMMY_WEIGHT_STD = 0.02  # spread of random dummy weights, as in common initializers


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
    packed: dict[str, tuple[str, Any]] = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())
    # A tied LM head shares the embedding's parameter, so named_parameters() lists it only once.
    is_tied = "lm_head.weight" not in params
    loaded: set[tuple[str, Any]] = set()
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for ckpt_name in f.keys():
                is_kv_scale = is_kv_scale_name(ckpt_name)  # the KV cache's, read by models/kv_scales.py
                if ckpt_name.endswith(IGNORED_SUFFIXES) or is_kv_scale or (is_tied and ckpt_name == "lm_head.weight"):
                    continue
                name, part = _target(ckpt_name, packed)
                if name not in params:
                    raise ValueError(f"checkpoint tensor {ckpt_name!r} in {os.path.basename(path)} has no parameter")
                param = params[name]
                loader: Callable[..., None] = getattr(param, "weight_loader", default_weight_loader)
                tensor = f.get_tensor(ckpt_name).to(param.dtype)
                loader(param, tensor) if part is None else loader(param, tensor, part)
                loaded.add((name, part))
    expected = {(name, part) for name, p in params.items() for part in (getattr(p, "shard_ids", ()) or (None,))}
    missing = sorted(f"{name}[{part}]" if part is not None else name for name, part in expected - loaded)
    if missing:
        raise ValueError(f"the checkpoint in {model_dir} lacks {len(missing)} parameter(s): {missing[:8]}")


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights with the checkpoint's shapes, for benchmarks: norms 1, biases 0, matrices N(0, std)."""
    generator: torch.Generator | None = None
    for name, param in model.named_parameters():
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if param.dim() == 1:
            param.data.fill_(1.0 if "norm" in name else 0.0)
        else:
            param.data.normal_(0.0, DUMMY_WEIGHT_STD, generator=generator)
