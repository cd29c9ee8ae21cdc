"""Runs the model: builds it, loads weights, owns the KV cache, and turns a batch into sampled tokens.

The runner is written so that every tensor-parallel rank runs the same code: it takes a
:class:`ScheduledBatch`, and rank 0's return value is what was sampled (:class:`StepSamples`).
The other ranks' runners live in worker processes (parallel/workers.py), which rebuild each batch
from rank 0's messages and sample nothing.
"""

import dataclasses
import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig
from nanovllm.kernels.backends import Kernels, select_attention_backend
from nanovllm.kernels.lora import select_lora_kernels
from nanovllm.kernels.quant_backends import select_quantized_gemm
from nanovllm.layers.attention import Attention
from nanovllm.lora.manager import LoRAManager
from nanovllm.models.arch import ModelArch
from nanovllm.models.loader import init_dummy_weights, load_safetensors, weight_bytes
from nanovllm.models.quant_config import choose_quantization
from nanovllm.models.registry import build_model
from nanovllm.runner.cuda_graphs import DecodeGraphs
from nanovllm.runner.host_samples import HostSamples, TokenRing
from nanovllm.runner.kv_cache import KVCacheLayout, bind_kv_cache, plan_kv_scales, resolve_kv_cache_dtype
from nanovllm.runner.model_inputs import (
    ModelInputs,
    PendingTokens,
    build_model_inputs,
    feed_pending_tokens,
    find_pending_tokens,
)
from nanovllm.sampling.metadata import SamplingMetadataBuilder
from nanovllm.sampling.sampler import Sampler
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.batch import ScheduledBatch, StepSamples
from nanovllm.scheduler.sequence import Sequence
from nanovllm.utils.context import attention_context
from nanovllm.utils.device import release_cached_gpu_memory, to_device

CPU_KV_CACHE_BYTES = 1 << 30  # KV cache on CPU when num_kvcache_blocks is not given: 1 GiB
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GIB = 1 << 30  # bytes per GiB, for logs

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(name)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """This rank's device: one GPU per rank under tensor parallelism (cuda:rank), else the configured one."""
    device = resolve_device(config.device)
    size = config.tensor_parallel_size
    if size == 1 or device.type != "cuda":
        return device
    if size > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size={size} needs one GPU per rank but {torch.cuda.device_count()} are visible; "
            "lower it or make more GPUs visible"
        )
    return torch.device("cuda", rank)


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
    """One rank's model shard and KV cache. Rank 0 (the default) samples; under tensor parallelism the engine
    starts ranks 1..N-1 (parallel/workers.py) before building rank 0's runner, and all build in lockstep."""

    def __init__(
        self,
        config: EngineConfig,
        arch: ModelArch,
        max_model_len: int,
        eos_token_ids: Collection[int] = (),
        rank: int = 0,
        device: torch.device | None = None,  # None: rank_device(config, rank); a launcher's ranks pass their own
    ) -> None:
        self.config = config
        self.arch = arch
        self.max_model_len = max_model_len  # config.max_model_len clamped to the model's limit
        self.rank = rank  # tensor-parallel rank: 0 samples and drives, the others follow
        self.block_size = config.kvcache_block_size
        self.device = rank_device(config, rank) if device is None else device
        self.dtype = resolve_dtype(config.dtype, arch)
        self.decode_graphs: DecodeGraphs | None = None  # captured once the KV cache exists
        self.lora: LoRAManager | None = None  # the LoRA adapters' host cache and device slots, with enable_lora
        self._memory_plan = ""  # how the KV cache was sized from free GPU memory, for error messages
        try:
            self._build(eos_token_ids)
        except BaseException:
            self.close()
            raise

    def _build(self, eos_token_ids: Collection[int]) -> None:
        """Model, weights, sampler, KV cache and decode graphs: every rank, in lockstep (collectives inside)."""
        config, arch = self.config, self.arch
        if self.device.type == "cuda":
            # An engine freed earlier in this process leaves its memory in torch's cache. Our weights would
            # be carved from those cached blocks, so they could not be released, and the profile below
            # would count them as held elsewhere, leaving the KV cache no room.
            release_cached_gpu_memory()
        # The hardware choices, made once: attention kernels, and torch.compile for the small ops on CUDA.
        cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        attention = select_attention_backend(config.attention_backend, self.device, self.block_size, cache_dtype)
        self.kv_scales = plan_kv_scales(config, cache_dtype, arch.num_layers)  # each layer's, checked here
        # Where Triton runs the attention, it also runs the queries' and keys' norm and rotary, the RMSNorms,
        # the gated activations and the experts.
        on_cuda, on_triton = self.device.type == "cuda", attention.name != "torch"
        quantized_gemm = select_quantized_gemm(self.device, self.dtype)  # used by quantized linear layers only
        self.kernels = Kernels(
            attention, compile_ops=on_cuda, triton_rotary=on_triton, triton_norms=on_triton,
            triton_activation=on_triton, triton_moe=on_triton, quantized_gemm=quantized_gemm,
        )  # fmt: skip
        quant = choose_quantization(arch.quantization, config.quantization)
        with _default_dtype(self.dtype), self.device:
            self.model = build_model(arch, self.kernels, quant)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_safetensors(self.model, config.model)
        self.weight_bytes = weight_bytes(self.model)  # on this rank; the KV cache gets what is left
        logger.info(
            "rank %d: model weights take %.2f GiB (%s)", self.rank, self.weight_bytes / GIB,
            quant.method if quant else f"unquantized {self.dtype}",
        )  # fmt: skip
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        if config.enable_lora:  # its device slots come before the KV cache takes the memory left
            lora_kernels = select_lora_kernels(use_triton=attention.name != "torch")
            max_cpu_loras = config.max_cpu_loras or config.max_loras
            self.lora = LoRAManager(
                self.model, arch, config.max_loras, config.max_lora_rank, max_cpu_loras, lora_kernels, self.device
            )
        self.kv_layout = KVCacheLayout.of(self.attention_layers, self.block_size, cache_dtype)
        self.sampler = Sampler(
            config.seed, self.kernels.compile_ops, self.device, triton_race=attention.name != "torch"
        )
        if self.rank == 0 and self.kernels.compile_ops:  # rank 0 alone samples
            self.sampler.warm_up(arch.vocab_size, self.dtype, self.device)
        self.sampling = SamplingMetadataBuilder(config.max_num_seqs, arch.vocab_size, self.device, eos_token_ids)
        # The last step's sampled tokens, row by row, for a step launched before they reach the host (launch()).
        self.last_sampled = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        # Where the samples' token ids land on the host (rank 0, on CUDA), reused step after step.
        self.token_ring = TokenRing(config.max_num_seqs) if self.rank == 0 and self.device.type == "cuda" else None
        self.num_kvcache_blocks = self._min_across_ranks(self._plan_num_blocks())
        self._check_num_blocks(self.num_kvcache_blocks)
        self._allocate_kv_cache(self.num_kvcache_blocks)
        if self.device.type == "cuda" and not config.enforce_eager and attention.is_graph_capturable:
            # Every rank captures its own graphs (their collectives included) and replays them in lockstep.
            # A single rank also replays its LM head and sampling (the other ranks' LM head would have to
            # join the same captured all-gather: not done).
            single = config.tensor_parallel_size == 1
            self.decode_graphs = DecodeGraphs(
                self.model, config.max_num_seqs, self.max_model_len, self.block_size, arch.hidden_size,
                self.last_sampled, self.token_ring, self.sampler if single else None,
                max_loras=config.max_loras if config.enable_lora else 0,
            )  # fmt: skip
            self.decode_graphs.capture()

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block on this rank, all layers, K and V."""
        return self.kv_layout.block_bytes

    def _plan_num_blocks(self) -> int:
        """KV blocks that fit on this rank."""
        if self.config.num_kvcache_blocks is not None:
            return self.config.num_kvcache_blocks
        if self.device.type == "cpu":
            return CPU_KV_CACHE_BYTES // self.block_bytes
        return self._profile_gpu_num_blocks()

    def _min_across_ranks(self, num_blocks: int) -> int:
        """Every rank holds the same block ids, so all take the smallest count any rank can fit."""
        if self.config.tensor_parallel_size == 1:
            return num_blocks
        count = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        return int(count.item())

    def _check_num_blocks(self, num_blocks: int) -> None:
        if num_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {self.block_size} tokens, less than one sequence of "
                f"max_model_len={self.max_model_len}; lower max_model_len, or raise num_kvcache_blocks / "
                f"gpu_memory_utilization{self._memory_plan}"
            )

    def _profile_gpu_num_blocks(self) -> int:
        """Run the largest prefill the scheduler may send, then give the KV cache what memory is left."""
        torch.cuda.reset_peak_memory_stats()
        seq_len = min(self.max_model_len, self.config.max_num_batched_tokens)
        num_seqs = max(1, min(self.config.max_num_batched_tokens // seq_len, self.config.max_num_seqs))
        blocks_per_seq = (seq_len + self.block_size - 1) // self.block_size
        self._allocate_kv_cache(num_seqs * blocks_per_seq)  # a temporary cache just big enough
        seqs = [Sequence([0] * seq_len, SamplingParams()) for _ in range(num_seqs)]
        for i, seq in enumerate(seqs):
            seq.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        batch = ScheduledBatch(seqs, [seq_len] * num_seqs, is_prefill=True)
        self._launch_local(batch, None).wait(seqs)  # each rank its own
        torch.cuda.synchronize()
        temp_cache_bytes = num_seqs * blocks_per_seq * self.block_bytes
        self._allocate_kv_cache(0)
        torch.cuda.empty_cache()  # the temporary cache and the step's activations, cached but free
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        # Memory held outside our allocator (CUDA context, other processes) plus our peak without the temp cache.
        used_elsewhere = (total - free) - stats["allocated_bytes.all.current"]
        peak = stats["allocated_bytes.all.peak"] - temp_cache_bytes
        budget = total * self.config.gpu_memory_utilization - used_elsewhere - peak
        gib = 1 << 30
        self._memory_plan = (
            f" (of {total / gib:.1f} GiB x gpu_memory_utilization={self.config.gpu_memory_utilization}, "
            f"{used_elsewhere / gib:.1f} GiB were held outside this engine's tensors, its largest step peaked at "
            f"{peak / gib:.1f} GiB, {max(0.0, budget) / gib:.1f} GiB were left for the KV cache)"
        )
        return max(0, int(budget) // self.block_bytes)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = torch.empty(0)  # drop the previous cache before taking memory for the next
        self.kv_cache = self.kv_layout.allocate(num_blocks, self.device)
        bind_kv_cache(self.kv_cache, self.attention_layers, self.kv_scales)

    def run(self, batch: ScheduledBatch) -> StepSamples:
        """One step, run to its end: rank 0 returns what was sampled for every sequence, workers nothing."""
        return self._launch_local(batch, None).wait(batch.seqs)

    def launch(self, batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> HostSamples:
        """Queue one step and return before it has run; ``.wait(batch.seqs)`` gives its samples.

        ``in_flight`` is the step launched before this one, if its samples have not been recorded yet: each
        of its sequences that is in ``batch`` has a pending token, which this step reads on the device, from
        the earlier step's samples (:class:`PendingTokens`).
        """
        return self._launch_local(batch, in_flight)

    @torch.inference_mode()
    def _launch_local(self, batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> HostSamples:
        """This rank's forward pass over the batch, then (rank 0 only) the LM head and sampling, all queued on
        the device: the one place that samples. A decode step in the graphs whose rows a sampling graph covers
        is one replay; otherwise the LM head and sampler run eagerly after the hidden states."""
        pending = find_pending_tokens(batch, in_flight)
        lora_slots = None if self.lora is None else self.lora.activate(batch)  # [B] each row's adapter slot
        graphs = self.decode_graphs
        if graphs is not None and (batch.is_prefill or not graphs.can_run(len(batch.seqs))):
            graphs = None  # this step runs eagerly
        if self.rank != 0:  # a worker: its shard of the model, then its LM head's all-gather, which rank 0 joins
            self.model.compute_logits(self._hidden_states(batch, pending, graphs, lora_slots))
            return HostSamples([])  # rank 0 alone samples
        t = self.sampling.build(batch)
        if graphs is not None and graphs.can_sample(t):  # one replay: model, LM head, sampler, copy to the host
            return graphs.run_and_sample(batch, pending, t, lora_slots)  # (short path: no penalty table to count in)
        logits = self.model.compute_logits(self._hidden_states(batch, pending, graphs, lora_slots))  # [B, vocab]
        output = self.sampler(logits, t)
        self.last_sampled[: output.token_ids.numel()].copy_(output.token_ids)  # what the next step may feed on
        self.sampling.record(output)  # the penalty table counts the new tokens
        return HostSamples.copy_from(output, self.token_ring)  # copies start now; the caller waits when it needs them

    def _hidden_states(
        self,
        batch: ScheduledBatch,
        pending: PendingTokens | None,
        graphs: DecodeGraphs | None,
        lora_slots: np.ndarray | None,
    ) -> torch.Tensor:
        """The model over the batch, replayed in its decode graph or run eagerly: [B, hidden_size]."""
        if graphs is not None:
            return graphs.run(batch, pending, lora_slots)
        inputs = build_model_inputs(batch, self.block_size, self.device)
        if self.lora is not None and lora_slots is not None:
            lora = self.lora.metadata(lora_slots, batch.num_new_tokens)
            inputs = dataclasses.replace(inputs, attention=dataclasses.replace(inputs.attention, lora=lora))
        if pending is not None:
            is_pending = to_device(pending.is_pending, torch.bool, self.device)
            source_rows = to_device(pending.source_rows, torch.int64, self.device)
            input_ids = feed_pending_tokens(inputs.input_ids, is_pending, source_rows, self.last_sampled)
            inputs = dataclasses.replace(inputs, input_ids=input_ids)
        return self._forward(inputs)

    def _forward(self, inputs: ModelInputs) -> torch.Tensor:
        """The model over the batch's tokens: the hidden states of each sequence's last token [B, hidden_size]."""
        with attention_context(inputs.attention):
            hidden_states = self.model(inputs.input_ids, inputs.positions)  # [N, hidden_size]
        return hidden_states[inputs.last_token_indices]

    def logits(self, inputs: ModelInputs) -> torch.Tensor:
        """Each sequence's next-token logits [B, vocab_size], eagerly, without sampling (for checks)."""
        return self.model.compute_logits(self._forward(inputs))

    def close(self, peers_alive: bool = True) -> None:
        """Free the decode graphs; the process group is left afterwards, by whoever joined it.

        A graph that captured NCCL collectives keeps their communicator busy, and leaving the group while
        one exists can hang (pytorch/pytorch#115388). Once a peer rank died (``peers_alive`` False) the last
        replay may never finish, so it is not waited for. Closing twice is harmless.
        """
        if self.decode_graphs is not None:
            self.decode_graphs = None
            if peers_alive:
                torch.cuda.synchronize(self.device)
