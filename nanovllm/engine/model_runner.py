"""Runs the model: builds it, loads weights, owns the KV cache, and turns a batch into sampled tokens.

The runner is written so that every tensor-parallel rank runs the same code: it takes a
:class:`ScheduledBatch`, and rank 0's return value is what was sampled (:class:`StepSamples`).
"""

from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.cuda_graphs import DecodeGraphs
from nanovllm.engine.model_inputs import ModelInputs, build_model_inputs
from nanovllm.engine.sampling_metadata import SamplingMetadataBuilder, StepSamples
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.kernels.backends import Kernels, select_attention_backend
from nanovllm.layers.attention import Attention
from nanovllm.layers.sampler import Sampler
from nanovllm.models.arch import ModelArch
from nanovllm.models.registry import build_model
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.context import attention_context
from nanovllm.utils.loader import init_dummy_weights, load_safetensors

CPU_KV_CACHE_BYTES = 1 << 30  # KV cache on CPU when num_kvcache_blocks is not given: 1 GiB
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(name: str, arch: ModelArch) -> torch.dtype:
    name = arch.dtype if name == "auto" else name
    if name not in DTYPES:
        raise ValueError(f"checkpoint dtype {name!r} is not supported; pass dtype= one of {sorted(DTYPES)}")
    return DTYPES[name]


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelRunner:
    def __init__(
        self, config: EngineConfig, arch: ModelArch, max_model_len: int, eos_token_ids: Collection[int] = ()
    ) -> None:
        self.config = config
        self.arch = arch
        self.max_model_len = max_model_len  # config.max_model_len clamped to the model's limit
        self.block_size = config.kvcache_block_size
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, arch)
        # The hardware choices, made once: attention kernels, and torch.compile for the small ops on CUDA.
        attention = select_attention_backend(config.attention_backend, self.device, self.block_size)
        self.kernels = Kernels(attention=attention, compile_ops=self.device.type == "cuda")
        with _default_dtype(self.dtype), self.device:
            self.model = build_model(arch, self.kernels)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_safetensors(self.model, config.model)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler(self.kernels.compile_ops)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampling = SamplingMetadataBuilder(config.max_num_seqs, arch.vocab_size, self.device, eos_token_ids)
        self.decode_graphs: DecodeGraphs | None = None  # captured once the KV cache exists
        self.num_kvcache_blocks = self._plan_num_blocks()
        self._allocate_kv_cache(self.num_kvcache_blocks)
        if self.device.type == "cuda" and not config.enforce_eager and attention.is_graph_capturable:
            self.decode_graphs = DecodeGraphs(
                self.model, config.max_num_seqs, max_model_len, self.block_size, arch.hidden_size
            )
            self.decode_graphs.capture()

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block on this rank, all layers, K and V."""
        layer = self.attention_layers[0]
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * len(self.attention_layers) * self.block_size * layer.num_kv_heads * layer.head_dim * itemsize

    def _plan_num_blocks(self) -> int:
        if self.config.num_kvcache_blocks is not None:
            num_blocks = self.config.num_kvcache_blocks
        elif self.device.type == "cpu":
            num_blocks = CPU_KV_CACHE_BYTES // self.block_bytes
        else:
            num_blocks = self._profile_gpu_num_blocks()
        if num_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {self.block_size} tokens, less than one sequence of "
                f"max_model_len={self.max_model_len}; lower max_model_len, or raise num_kvcache_blocks / "
                "gpu_memory_utilization"
            )
        return num_blocks

    def _profile_gpu_num_blocks(self) -> int:
        """Run the largest prefill the scheduler may send, then give the KV cache what memory is left."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        seq_len = min(self.max_model_len, self.config.max_num_batched_tokens)
        num_seqs = max(1, min(self.config.max_num_batched_tokens // seq_len, self.config.max_num_seqs))
        blocks_per_seq = (seq_len + self.block_size - 1) // self.block_size
        self._allocate_kv_cache(num_seqs * blocks_per_seq)  # a temporary cache just big enough
        seqs = [Sequence(-1, [0] * seq_len, SamplingParams()) for _ in range(num_seqs)]
        for i, seq in enumerate(seqs):
            seq.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        self.run(ScheduledBatch(seqs, [seq_len] * num_seqs, is_prefill=True))
        torch.cuda.synchronize()
        temp_cache_bytes = num_seqs * blocks_per_seq * self.block_bytes
        self._allocate_kv_cache(0)
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        # Memory held outside our allocator (CUDA context, other processes) plus our peak without the temp cache.
        used_elsewhere = (total - free) - stats["allocated_bytes.all.current"]
        peak = stats["allocated_bytes.all.peak"] - temp_cache_bytes
        budget = total * self.config.gpu_memory_utilization - used_elsewhere - peak
        return max(0, int(budget) // self.block_bytes)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        layer = self.attention_layers[0]
        shape = (2, len(self.attention_layers), num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        self.kv_cache = torch.empty(0)  # drop the previous cache before taking memory for the next
        self.kv_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.bind_kv_cache(self.kv_cache[0, i], self.kv_cache[1, i])

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepSamples:
        """One forward pass over the batch; the next token of every sequence in it (and logprobs if asked)."""
        graphs = self.decode_graphs
        if graphs is not None and not batch.is_prefill and graphs.can_run(len(batch.seqs)):
            logits = self.model.compute_logits(graphs.run(batch))  # [B, vocab_size]
        else:
            logits = self._forward(build_model_inputs(batch, self.block_size, self.device))  # [B, vocab_size]
        return self._sample(batch, logits)

    def _sample(self, batch: ScheduledBatch, logits: torch.Tensor) -> StepSamples:
        """The one place that samples: the logits pipeline, then the penalty table counts the new tokens."""
        output = self.sampler(logits, self.sampling.build(batch), self.generator)
        self.sampling.record(output)
        return self.sampling.to_host(output, batch.seqs)

    def _forward(self, inputs: ModelInputs) -> torch.Tensor:
        with attention_context(inputs.attention):
            hidden_states = self.model(inputs.input_ids, inputs.positions)  # [N, hidden_size]
        return self.model.compute_logits(hidden_states[inputs.last_token_indices])  # [B, vocab_size]
