"""A model runner's adapters: the host cache, the device slots, and the linear layers that hold them.

Each step, ``activate(batch)`` makes sure every adapter of the batch sits in a device slot (copying in those
that do not, in place of the least recently used ones the batch does not need) and says which slot each row
uses. Copies are queued on the device like the steps, so a step still running keeps the weights it started
with. Every tensor-parallel rank runs its own manager over the same batches, and loads its own shards.
"""

from collections.abc import Iterator

import numpy as np
import torch

from nanovllm.kernels.lora import LoRAKernels
from nanovllm.layers.linear import ColumnParallelLinear, RowParallelLinear
from nanovllm.lora.adapter import LoRAAdapter, lora_part_shapes
from nanovllm.lora.cache import AdapterCache
from nanovllm.lora.metadata import build_lora_metadata
from nanovllm.lora.slots import AdapterSlots
from nanovllm.lora_request import LoRARequest
from nanovllm.models.arch import ModelArch
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.utils.lora_metadata import NO_ADAPTER, LoRAMetadata

LoRALinear = ColumnParallelLinear | RowParallelLinear


class LoRAManager:
    def __init__(
        self,
        model: LlamaForCausalLM,
        arch: ModelArch,
        max_loras: int,  # device slots
        max_lora_rank: int,  # largest rank accepted
        max_cpu_loras: int,  # adapters kept in host memory
        kernels: LoRAKernels,
        device: torch.device,
    ) -> None:
        self.max_loras = max_loras
        self.device = device
        # (decoder layer index, projection) -> the linear layer that computes it, and its slice there.
        self.targets: dict[tuple[int, str], tuple[LoRALinear, int]] = dict(_find_targets(model, arch))
        self.linears = list(dict.fromkeys(linear for linear, _ in self.targets.values()))  # each fused layer once
        for linear in self.linears:
            linear.enable_lora(max_loras, max_lora_rank, kernels)
        self.cache = AdapterCache(arch, max_lora_rank, max_cpu_loras, pin_memory=device.type == "cuda")
        self.slots = AdapterSlots(max_loras)
        self.num_slot_loads = 0  # adapters copied into a device slot so far

    def check(self, request: LoRARequest) -> None:
        """Read and check a request's adapter before the request is queued: its errors go to the caller."""
        self.cache.get(request)

    def activate(self, batch: ScheduledBatch) -> np.ndarray:
        """Put the batch's adapters in device slots; returns each row's slot [B] int32 (NO_ADAPTER: base model)."""
        requests: dict[int, LoRARequest] = {}  # the batch's adapters by id, in order of first use
        for seq in batch.seqs:
            if seq.lora_request is not None:
                requests.setdefault(seq.lora_request.lora_int_id, seq.lora_request)
        assignment = self.slots.assign(list(requests))
        for slot, lora_id in assignment.to_load:
            self._load(slot, self.cache.get(requests[lora_id]))
        slot_of = assignment.slot_of
        rows = [NO_ADAPTER if seq.lora_request is None else slot_of[seq.lora_request.lora_int_id] for seq in batch.seqs]
        return np.array(rows, dtype=np.int32)

    def metadata(self, row_slots: np.ndarray, num_new_tokens: list[int]) -> LoRAMetadata:
        """The LoRAMetadata of an eager forward over the batch whose rows use ``row_slots``."""
        return build_lora_metadata(row_slots, num_new_tokens, self.max_loras, self.device)

    def _load(self, slot: int, adapter: LoRAAdapter) -> None:
        for linear in self.linears:
            assert linear.lora is not None, "enable_lora() gave every target layer its slots"
            linear.lora.clear(slot, adapter.scaling)
        for key, weights in adapter.modules.items():
            linear, slice_idx = self.targets[key]
            assert linear.lora is not None
            linear.lora.load(slot, slice_idx, weights.lora_a, weights.lora_b)
        self.num_slot_loads += 1


def _find_targets(model: LlamaForCausalLM, arch: ModelArch) -> Iterator[tuple[tuple[int, str], tuple[LoRALinear, int]]]:
    """Each projection of each decoder layer that adapters may target, with the linear layer (fused or not) and the
    slice holding it."""
    modules = lora_part_shapes(arch)
    for layer_idx, layer in enumerate(model.model.layers):
        linears = {name.rpartition(".")[2]: m for name, m in layer.named_modules() if isinstance(m, LoRALinear)}
        for module in modules:
            fused_name, part = model.packed_modules_mapping.get(module, (module, None))  # q_proj -> qkv_proj, "q"
            linear = linears[fused_name]
            yield (layer_idx, module), (linear, linear.lora_slice(part))
