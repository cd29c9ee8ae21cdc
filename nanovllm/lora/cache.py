"""Adapters in host memory: read from disk once, the least recently used dropped first when over capacity."""

import os
from collections import OrderedDict

from nanovllm.lora.adapter import LoRAAdapter, LoRAModuleWeights, load_adapter
from nanovllm.lora_request import LoRARequest
from nanovllm.models.arch import ModelArch


class AdapterCache:
    """Checked adapters by ``lora_int_id``, at most ``capacity`` of them, and the directory each id names.

    An id keeps naming its first directory for the engine's lifetime (its prefix-cache blocks are keyed by it),
    so the same id with another directory is refused, even after the adapter left the cache.
    """

    def __init__(self, arch: ModelArch, max_lora_rank: int, capacity: int, pin_memory: bool) -> None:
        self.arch = arch
        self.max_lora_rank = max_lora_rank
        self.capacity = capacity  # max_cpu_loras
        self.pin_memory = pin_memory  # page-locked host copies, so copies into device slots do not block
        self.adapters: OrderedDict[int, LoRAAdapter] = OrderedDict()  # least recently used first
        self.paths: dict[int, str] = {}  # lora_int_id -> its directory (real path), for every id ever read
        self.num_disk_reads = 0  # adapters read from disk so far, re-reads after eviction included

    def get(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter, read and checked on first use (or again after eviction); now the most recently used."""
        lora_id = request.lora_int_id
        path = os.path.realpath(request.lora_path)
        if self.paths.get(lora_id, path) != path:
            raise ValueError(
                f"LoRA adapter {request.lora_name!r}: lora_int_id={lora_id} already names {self.paths[lora_id]!r}, "
                f"not {path!r}; give each adapter directory its own lora_int_id"
            )
        adapter = self.adapters.get(lora_id)
        if adapter is None:
            adapter = self._read(request)
            self.paths[lora_id] = path
            self.adapters[lora_id] = adapter
            if len(self.adapters) > self.capacity:
                self.adapters.popitem(last=False)
        self.adapters.move_to_end(lora_id)
        return adapter

    def _read(self, request: LoRARequest) -> LoRAAdapter:
        adapter = load_adapter(request, self.arch, self.max_lora_rank)
        self.num_disk_reads += 1
        if not self.pin_memory:
            return adapter
        pinned = {
            key: LoRAModuleWeights(w.lora_a.pin_memory(), w.lora_b.pin_memory()) for key, w in adapter.modules.items()
        }
        return LoRAAdapter(adapter.request, adapter.rank, adapter.scaling, pinned)
