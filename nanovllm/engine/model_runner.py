"""Runs the model: builds it, loads weights, owns the KV cache, and turns a batch into sampled tokens.

The runner is written so that every tensor-parallel rank runs the same code: it takes a
:class:`ScheduledBatch`, and rank 0's return value is what was sampled (:class:`StepSamples`).
Rank 0's runner also starts and drives the other ranks (engine/tp_worker.py); theirs rebuild
each batch from rank 0's messages and sample nothing.
"""

import dataclasses
import gc
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig, check_tensor_parallel_split
from nanovllm.engine.cuda_graphs import DecodeGraphs
from nanovllm.engine.host_samples import HostSamples, TokenBuffers
from nanovllm.engine.model_inputs import ModelInputs, build_model_inputs, feed_pending_tokens
from nanovllm.engine.sampling_metadata import SamplingMetadataBuilder
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence, StepSamples
from nanovllm.engine.tp_worker import TensorParallelWorkers
from nanovllm.kernels.backends import Kernels, select_attention_backend
from nanovllm.layers.attention import Attention
from nanovllm.layers.sampler import Sampler
from nanovllm.models.arch import ModelArch
from nanovllm.models.registry import build_model
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.context import attention_context
from nanovllm.utils.loader import init_dummy_weights, load_safetensors
from nanovllm.utils.parallel import require_no_tensor_parallel_engine

CPU_KV_CACHE_BYTES = 1 << 30  # KV cache on CPU when num_kvcache_blocks is not given: 1 GiB
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def release_cached_gpu_memory() -> None:
    """Give the GPU memory torch keeps cached for reuse (the tensors of closed engines) back to the device."""
    gc.collect()  # a closed engine may still be held by a reference cycle
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelRunner:
    """One rank's model shard and KV cache. Rank 0 (the default) starts ranks 1..N-1 when N > 1."""

    def __init__(
        self,
        config: EngineConfig,
        arch: ModelArch,
        max_model_len: int,
        eos_token_ids: Collection[int] = (),
        rank: int = 0,
    ) -> None:
        self.config = config
        self.arch = arch
        self.max_model_len = max_model_len  # config.max_model_len clamped to the model's limit
        self.rank = rank  # tensor-parallel rank: 0 samples and drives, the others follow
        self.block_size = config.kvcache_block_size
        self.device = rank_device(config, rank)
        self.dtype = resolve_dtype(config.dtype, arch)
        self.workers: TensorParallelWorkers | None = None  # ranks 1..N-1, held by rank 0
        self.decode_graphs: DecodeGraphs | None = None  # captured once the KV cache exists
        self._memory_plan = ""  # how the KV cache was sized from free GPU memory, for error messages
        if rank == 0:
            require_no_tensor_parallel_engine()
            check_tensor_parallel_split(config.tensor_parallel_size, arch)
        if rank == 0 and config.tensor_parallel_size > 1:
            self.workers = TensorParallelWorkers(config, arch, max_model_len, self.device)
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
            # would count them as held elsewhere: on 2 x H200 a bf16 engine's 65 GiB cache left the
            # next engine room for no KV block at all.
            release_cached_gpu_memory()
        # The hardware choices, made once: attention kernels, and torch.compile for the small ops on CUDA.
        attention = select_attention_backend(config.attention_backend, self.device, self.block_size)
        # Where Triton runs the attention, it also runs the queries' and keys' norm and rotary.
        on_cuda = self.device.type == "cuda"
        self.kernels = Kernels(attention, compile_ops=on_cuda, triton_rotary=attention.name != "torch")
        with _default_dtype(self.dtype), self.device:
            self.model = build_model(arch, self.kernels)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_safetensors(self.model, config.model)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler(
            config.seed, self.kernels.compile_ops, self.device, triton_race=attention.name != "torch"
        )
        if self.rank == 0 and self.kernels.compile_ops:  # rank 0 alone samples
            self.sampler.warm_up(arch.vocab_size, self.dtype, self.device)
        self.sampling = SamplingMetadataBuilder(config.max_num_seqs, arch.vocab_size, self.device, eos_token_ids)
        # The last step's sampled tokens, row by row, for a step launched before they reach the host (launch()).
        self.last_sampled = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        # Where the samples' token ids land on the host (rank 0, on CUDA), reused step after step.
        self.token_buffers = (
            TokenBuffers(config.max_num_seqs) if self.rank == 0 and self.device.type == "cuda" else None
        )
        self._all_rows = np.arange(config.max_num_seqs, dtype=np.int64)
        self.num_kvcache_blocks = self._min_across_ranks(self._plan_num_blocks())
        self._check_num_blocks(self.num_kvcache_blocks)
        self._allocate_kv_cache(self.num_kvcache_blocks)
        if self.device.type == "cuda" and not config.enforce_eager and attention.is_graph_capturable:
            # Every rank captures its own graphs (their collectives included) and replays them in lockstep.
            # A single rank also replays its LM head and sampling (the other ranks' LM head would have to
            # join the same captured all-gather: not done).
            single = self.workers is None and config.tensor_parallel_size == 1
            self.decode_graphs = DecodeGraphs(
                self.model, config.max_num_seqs, self.max_model_len, self.block_size, arch.hidden_size,
                self.last_sampled, self.sampler if single else None,
            )  # fmt: skip
            self.decode_graphs.capture()

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block on this rank, all layers, K and V."""
        layer = self.attention_layers[0]
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * len(self.attention_layers) * self.block_size * layer.num_kv_heads * layer.head_dim * itemsize

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
        layer = self.attention_layers[0]
        shape = (2, len(self.attention_layers), num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        self.kv_cache = torch.empty(0)  # drop the previous cache before taking memory for the next
        self.kv_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.bind_kv_cache(self.kv_cache[0, i], self.kv_cache[1, i])

    def run(self, batch: ScheduledBatch) -> StepSamples:
        """One step on every rank; rank 0 returns what was sampled for every sequence, workers nothing."""
        if self.workers is None:
            return self._launch_local(batch, None).wait(batch.seqs)
        self.workers.send_step(batch)  # the workers run this same step on their shards meanwhile
        with self.workers.failures_explained():
            return self._launch_local(batch, None).wait(batch.seqs)

    def launch(self, batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> HostSamples:
        """Queue one step and return before it has run (one rank only); ``.wait(batch.seqs)`` gives its samples.

        ``in_flight`` is the step launched before this one, if its samples have not been recorded yet:
        each of its sequences that is in ``batch`` has a PENDING_TOKEN as its newest token, and this
        step reads that token on the device, from the earlier step's samples.
        """
        if self.workers is not None:
            raise RuntimeError("launch() drives a single rank; with tensor parallelism use run()")
        return self._launch_local(batch, in_flight)

    @torch.inference_mode()
    def _launch_local(self, batch: ScheduledBatch, in_flight: ScheduledBatch | None) -> HostSamples:
        """This rank's forward pass over the batch, then (rank 0 only) the LM head and sampling, all queued on
        the device: the one place that samples. A decode step in the graphs whose rows a sampling graph covers
        is one replay; otherwise the LM head and sampler run eagerly after the hidden states."""
        feed_rows = None if in_flight is None or batch.is_prefill else self._feed_rows(batch, in_flight)
        graphs = self.decode_graphs
        if graphs is not None and (batch.is_prefill or not graphs.can_run(len(batch.seqs))):
            graphs.staging.forget()  # sequences may have been preempted and recomputed in this step
            graphs = None  # this step runs eagerly
        if self.rank != 0:  # a worker: its shard of the model, then its LM head's all-gather, which rank 0 joins
            self.model.compute_logits(self._hidden_states(batch, feed_rows, graphs))
            return HostSamples(None)  # rank 0 alone samples
        t = self.sampling.build(batch)
        if graphs is not None and graphs.can_sample(t):  # one replay: model, LM head, sampler, copy to the host
            return graphs.run_and_sample(batch, feed_rows, t)  # (the short path: no penalty table to count in)
        logits = self.model.compute_logits(self._hidden_states(batch, feed_rows, graphs))  # [B, vocab_size]
        output = self.sampler(logits, t)
        self.last_sampled[: output.token_ids.numel()].copy_(output.token_ids)  # what the next step may feed on
        self.sampling.record(output)  # the penalty table counts the new tokens
        return HostSamples(output, self.token_buffers)  # copies start now; the caller waits when it needs them

    def _hidden_states(
        self, batch: ScheduledBatch, feed_rows: np.ndarray | None, graphs: DecodeGraphs | None
    ) -> torch.Tensor:
        """The model over the batch, replayed in its decode graph or run eagerly: [B, hidden_size]."""
        if graphs is not None:
            return graphs.run(batch, feed_rows)
        inputs = build_model_inputs(batch, self.block_size, self.device)
        if feed_rows is not None:  # a decode step: one input token per row
            rows = torch.from_numpy(feed_rows).to(self.device, non_blocking=True)
            input_ids = feed_pending_tokens(inputs.input_ids, rows, self.last_sampled)
            inputs = dataclasses.replace(inputs, input_ids=input_ids)
        return self._forward(inputs)

    def _feed_rows(self, batch: ScheduledBatch, in_flight: ScheduledBatch) -> np.ndarray:
        """Row of each sequence in the in-flight step (its newest token is that row's sample), else -1."""
        seqs = batch.seqs
        if seqs == in_flight.seqs:  # identities, compared in C: the same batch one token further, most steps
            return self._all_rows[: len(seqs)]
        row_of = {id(seq): row for row, seq in enumerate(in_flight.seqs)}
        return np.array([row_of.get(id(seq), -1) for seq in seqs], dtype=np.int64)

    def _forward(self, inputs: ModelInputs) -> torch.Tensor:
        """The model over the batch's tokens: the hidden states of each sequence's last token [B, hidden_size]."""
        with attention_context(inputs.attention):
            hidden_states = self.model(inputs.input_ids, inputs.positions)  # [N, hidden_size]
        return hidden_states[inputs.last_token_indices]

    def logits(self, inputs: ModelInputs) -> torch.Tensor:
        """Each sequence's next-token logits [B, vocab_size], eagerly, without sampling (for checks)."""
        return self.model.compute_logits(self._forward(inputs))

    def close(self) -> None:
        """Free the decode graphs, then (rank 0) shut the workers down and leave the process group.

        Graphs go first: a graph that captured NCCL collectives keeps their communicator busy, and
        leaving the group while one exists can hang (pytorch/pytorch#115388). Closing twice is harmless.
        """
        if self.decode_graphs is not None:
            self.decode_graphs = None
            if self.workers is None or self.workers.failure.message is None:
                torch.cuda.synchronize(self.device)  # after a worker died the replay may never finish
        if self.workers is not None:
            self.workers.close()
