"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with new inputs.

A decode step launches hundreds of small kernels; capturing them once in a graph and
replaying it removes the per-launch CPU cost. A graph replays fixed memory addresses, so
every input lives in a static device buffer sized for the largest bucket, filled each step
from a pinned host buffer of the same layout (nothing is allocated per step). That copy is the
graph's first node, and an event recorded inside the graph after it tells the host when the
pinned buffer may be refilled: a replay is then the step's only launch. A batch of B sequences
runs the graph of the smallest bucket >= B; the padded lanes B.. get slot -1 (the KV store skips
them) and context length 0 (attention returns zeros for them).

A lane's input token comes from the host, or, where it is pending (:class:`PendingTokens`), from
the runner's ``last_sampled``: the previous step's samples, still on the device when the engine
launches a step before the previous one has reached the host.

On a single-GPU engine each bucket also has graphs that go on through the LM head and the sampler's
short path, write their tokens into ``last_sampled`` and copy them to the host: for all-greedy
batches (argmax, no noise drawn), and for batches with temperature rows (each replay advances the
sampler's draw count on the device, so each draws fresh noise). Launched one op at a time, the LM head
and sampler cost more host time than the whole replay. Each of these is captured once per buffer of
the runner's token ring (runner/host_samples.py), the buffer its tokens are copied into. The graph
that ends at the hidden states serves batches that need more (top-k/p, penalties, seeds, logprobs:
sampled eagerly), and tensor parallelism, where it is the only one (each rank's LM head joins an
all-gather outside the graphs).

    bucket 8, batch 5:   lanes 0-4 real | lanes 5-7 padding (slot -1, context 0)

With LoRA each lane's adapter slot is an input too (padded lanes use the base model): the LoRA kernels'
grid depends on the bucket and max_loras only, so one graph serves every mix of adapters.
"""

from collections.abc import Callable
from contextlib import nullcontext
from enum import Enum
from functools import partial

import numpy as np
import torch

from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.runner.decode_staging import DecodeStaging
from nanovllm.runner.host_samples import NUM_TOKEN_BUFFERS, HostSamples, TokenRing
from nanovllm.runner.model_inputs import PendingTokens, feed_pending_tokens
from nanovllm.sampling.sampler import Sampler, SamplingTensors
from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.utils.context import AttentionMetadata, attention_context
from nanovllm.utils.lora_metadata import NO_ADAPTER, LoRAMetadata

# Batch sizes with a graph: small powers of two, then every multiple of 16 (as vLLM and nano-vllm).
SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 16


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Bucket sizes covering every batch size up to max_num_seqs, which is always included."""
    buckets = [b for b in SMALL_BUCKETS if b < max_num_seqs]
    buckets += range(BUCKET_STEP, max_num_seqs, BUCKET_STEP)
    return [*buckets, max_num_seqs]


class GraphEnd(Enum):
    """Where a bucket's graph ends."""

    HIDDEN_STATES = "hidden states"  # the LM head runs outside: eager sampling, or the all-gather of TP
    GREEDY = "greedy tokens"  # logits, then their argmax into last_sampled
    TEMPERATURE = "temperature draws"  # logits, then the sampler's short path into last_sampled


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        hidden_size: int,
        last_sampled: torch.Tensor,  # [max_num_seqs] int64, the previous step's samples (see PendingTokens)
        token_ring: TokenRing | None,  # where sampling graphs copy their token ids (needed with a sampler)
        sampler: Sampler | None = None,  # given: the LM head and short-path sampling are captured too
        max_loras: int = 0,  # LoRA adapter slots, 0 = LoRA off
    ) -> None:
        self.model = model
        self.last_sampled = last_sampled
        self.token_ring = token_ring
        self.sampler = sampler
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = graph_buckets(max_num_seqs)
        max_blocks = (max_model_len + block_size - 1) // block_size
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.staging = DecodeStaging(max_num_seqs, max_blocks, block_size, pin_memory=True, max_loras=max_loras)
        self.static_buffer = torch.zeros_like(self.staging.buffer, device=device)  # the host buffer's layout
        self.static = self.staging.fields_of(self.static_buffer)
        self.cu_seqlens_q = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device)  # one query each
        self.hidden_states = torch.zeros(max_num_seqs, hidden_size, dtype=dtype, device=device)
        self.ends = [GraphEnd.HIDDEN_STATES]  # the graphs each bucket has
        if sampler is not None:
            self.ends += [GraphEnd.TEMPERATURE, GraphEnd.GREEDY]
        self.graphs: dict[tuple[int, GraphEnd, int], torch.cuda.CUDAGraph] = {}  # by (bucket, end, token buffer)
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for every graph: one runs at a time
        self.temperatures = torch.ones(max_num_seqs, dtype=torch.float32, device=device)
        self.staged_temperatures: torch.Tensor | None = None  # the batch's tensor last copied into them
        # Made once, not per step (each tensor slice costs several us of host time): the bucket of each
        # batch size and the output rows.
        self.bucket_of = [next(b for b in self.buckets if b >= n) for n in range(max_num_seqs + 1)]
        self.outputs = [self.hidden_states[:n] for n in range(max_num_seqs + 1)]  # [n, hidden_size] each
        # Recorded inside every graph once its inputs are copied out of the pinned buffer: the next step must
        # not refill it before that, which is not implied when the engine launches steps ahead of the GPU.
        # external=True: captured as an event-record node, so each replay records it.
        self.inputs_copied = torch.cuda.Event(external=True)

    def _metadata(self, batch_size: int) -> AttentionMetadata:
        s = self.static
        return AttentionMetadata(
            is_prefill=False,
            cu_seqlens_q=self.cu_seqlens_q[: batch_size + 1],
            max_seqlen_q=1,
            context_lens=s["context_lens"][:batch_size],
            max_context_len=self.max_model_len,  # the kernels size their grid for the longest possible context
            slot_mapping=s["slot_mapping"][:batch_size],
            block_tables=s["block_tables"][:batch_size],
            lora=self._lora_metadata(batch_size),
        )

    def _lora_metadata(self, batch_size: int) -> LoRAMetadata | None:
        if not self.staging.max_loras:
            return None
        s = self.static
        return LoRAMetadata(
            s["lora_token_slots"][:batch_size], s["lora_sorted_token_ids"][:batch_size], s["lora_slot_starts"]
        )

    def _step(self, batch_size: int, end: GraphEnd, token_buffer: int) -> None:
        """What a graph holds: the input copy, the model, then the hidden states, or the LM head, the sampler
        and the copy of the tokens into the token ring's buffer ``token_buffer``."""
        num_bytes = self.staging.num_bytes(batch_size)  # every field's lanes < batch_size: one copy for all
        self.static_buffer[:num_bytes].copy_(self.staging.buffer[:num_bytes], non_blocking=True)
        self.inputs_copied.record()
        s = self.static
        input_ids = feed_pending_tokens(
            s["input_ids"][:batch_size], s["is_pending"][:batch_size], s["source_rows"][:batch_size], self.last_sampled
        )
        with attention_context(self._metadata(batch_size)):
            hidden_states = self.model(input_ids, s["positions"][:batch_size])  # [batch_size, hidden_size]
        if end is GraphEnd.HIDDEN_STATES:
            self.hidden_states[:batch_size] = hidden_states
            return
        assert self.sampler is not None and self.token_ring is not None
        logits = self.model.compute_logits(hidden_states)  # [batch_size, vocab_size]
        if end is GraphEnd.GREEDY:  # as the sampler does: no noise drawn, so no draw counted
            token_ids = logits.argmax(dim=-1)  # [batch_size]
        else:
            token_ids = self.sampler.draw(logits, self.temperatures[:batch_size])
        self.last_sampled[:batch_size] = token_ids
        self.token_ring.rows[token_buffer][batch_size].copy_(token_ids, non_blocking=True)
        self.token_ring.events[token_buffer].record()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its memory), all in one pool."""
        self.staging.arrays["slot_mapping"].fill(-1)  # capture runs copy this buffer in: they store no K/V
        if self.staging.max_loras:
            self.staging.arrays["lora_token_slots"].fill(NO_ADAPTER)  # and run no adapter (slot_starts all 0)
        # The warm-up runs count draws; the engine's first draw should not depend on whether graphs exist.
        with nullcontext() if self.sampler is None else self.sampler.draws_not_counted():
            for batch_size in reversed(self.buckets):
                for end in self.ends:
                    for token_buffer in range(1 if end is GraphEnd.HIDDEN_STATES else NUM_TOKEN_BUFFERS):
                        run = partial(self._step, batch_size, end, token_buffer)
                        # The other buffers' graphs run the same kernels: they are compiled and warm already.
                        self.graphs[batch_size, end, token_buffer] = self._capture(run, warm_up=token_buffer == 0)
        torch.cuda.synchronize()

    def _capture(self, run: Callable[[], None], warm_up: bool) -> torch.cuda.CUDAGraph:
        """A graph of what ``run`` launches, after one eager run of it when ``warm_up``: that compiles its Triton
        and Inductor kernels, which cannot happen during a capture."""
        if warm_up:
            run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            run()
        return graph

    def can_run(self, batch_size: int) -> bool:
        return bool(self.graphs) and batch_size <= self.buckets[-1]

    def run(
        self, batch: ScheduledBatch, pending: PendingTokens | None = None, lora_slots: np.ndarray | None = None
    ) -> torch.Tensor:
        """Replay the graph that ends at the hidden states for this batch: they are [B, hidden_size]."""
        self._replay(batch, pending, lora_slots, GraphEnd.HIDDEN_STATES)
        return self.outputs[len(batch.seqs)]

    def can_sample(self, t: SamplingTensors) -> bool:
        """Whether a sampling graph computes this batch's tokens: greedy or temperature-only rows, nothing else."""
        return self.sampler is not None and t.is_short_path and t.num_logprobs is None

    def run_and_sample(
        self,
        batch: ScheduledBatch,
        pending: PendingTokens | None,
        t: SamplingTensors,
        lora_slots: np.ndarray | None = None,  # [B] each row's adapter slot, with LoRA
    ) -> HostSamples:
        """Replay the model, LM head and sampler for this batch (can_sample(t)): its token ids, in last_sampled
        and on their way to the host."""
        assert self.token_ring is not None
        num_seqs = len(batch.seqs)
        if not t.is_all_greedy and t.temperatures is not self.staged_temperatures:  # the batch changed
            self.temperatures[:num_seqs] = t.temperatures
            self.staged_temperatures = t.temperatures  # held, so its id cannot be reused by another tensor
        token_buffer = self.token_ring.take()
        end = GraphEnd.GREEDY if t.is_all_greedy else GraphEnd.TEMPERATURE
        self._replay(batch, pending, lora_slots, end, token_buffer)
        return self.token_ring.hand_out(token_buffer, num_seqs)

    def _replay(
        self,
        batch: ScheduledBatch,
        pending: PendingTokens | None,
        lora_slots: np.ndarray | None,
        end: GraphEnd,
        token_buffer: int = 0,
    ) -> None:
        """Stage the batch into the pinned buffer and replay its bucket's graph, which copies it in."""
        bucket = self.bucket_of[len(batch.seqs)]
        self.inputs_copied.synchronize()  # the step before has copied its inputs out of the buffer
        self.staging.stage(batch, bucket, pending, lora_slots)
        self.graphs[bucket, end, token_buffer].replay()
