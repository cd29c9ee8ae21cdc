"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with new inputs.

A decode step launches hundreds of small kernels; capturing them once in a graph and
replaying it removes the per-launch CPU cost. A graph replays fixed memory addresses, so
every input lives in a static device buffer sized for the largest bucket, filled each step
from a pinned host buffer of the same layout (nothing is allocated per step). That copy is the
graph's first node, and an event recorded inside the graph after it tells the host when the
pinned buffer may be refilled: a replay is then the step's only launch. A batch of B sequences
runs the graph of the smallest bucket >= B; the padded lanes B.. get slot -1 (the KV store skips
them) and context length 0 (attention returns zeros for them).

A lane's input token comes from the host, or, when its ``feed_rows`` entry r is >= 0, from row
r of the runner's ``last_sampled``: the previous step's samples, still on the device when the
engine launches a step before the previous one has reached the host.

On a single-GPU engine each bucket also has graphs that go on through the LM head and the sampler's
short path, write their tokens into ``last_sampled`` and copy them to the host: for all-greedy
batches (argmax, no noise drawn), and for batches with temperature rows (each replay advances the
sampler's draw count on the device, so each draws fresh noise). Launched one op at a time, the LM head and
sampler took 250-700 us of host time per step on an H200's host. Each of these is captured twice,
one per pinned token buffer, used by turns (see ``NUM_TOKEN_PARITIES``). The graph that ends at
the hidden states serves batches that need more (top-k/p, penalties, seeds, logprobs: sampled
eagerly), and tensor parallelism, where it is the only one (each rank's LM head joins an
all-gather outside the graphs).

    bucket 8, batch 5:   lanes 0-4 real | lanes 5-7 padding (slot -1, context 0)
"""

from collections.abc import Callable
from contextlib import nullcontext
from enum import Enum
from functools import partial

import numpy as np
import torch

from nanovllm.engine.decode_staging import DecodeStaging
from nanovllm.engine.host_samples import HostSamples
from nanovllm.engine.model_inputs import feed_pending_tokens
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.layers.sampler import Sampler, SamplingTensors
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.utils.context import AttentionMetadata, attention_context

# Batch sizes with a graph: small powers of two, then every multiple of 16 (as vLLM and nano-vllm).
SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 16
# Pinned buffers the sampling graphs copy their token ids into, used by turns, each with an event recorded
# after its copy: the engine reads step N's tokens while step N+1 runs, so step N+1 must copy elsewhere.
# (One event recorded in every graph would not do: waiting on an event waits for its latest record.)
NUM_TOKEN_PARITIES = 2


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
        last_sampled: torch.Tensor,  # [max_num_seqs] int64, the previous step's samples (see feed_rows)
        sampler: Sampler | None = None,  # given: the LM head and short-path sampling are captured too
    ) -> None:
        self.model = model
        self.last_sampled = last_sampled
        self.sampler = sampler
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = graph_buckets(max_num_seqs)
        max_blocks = (max_model_len + block_size - 1) // block_size
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.staging = DecodeStaging(max_num_seqs, max_blocks, block_size, pin_memory=True)
        self.static_buffer = torch.zeros_like(self.staging.buffer, device=device)  # the host buffer's layout
        self.static = self.staging.fields_of(self.static_buffer)
        self.cu_seqlens_q = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device)  # one query each
        self.hidden_states = torch.zeros(max_num_seqs, hidden_size, dtype=dtype, device=device)
        self.ends = [GraphEnd.HIDDEN_STATES]  # the graphs each bucket has
        if sampler is not None:
            self.ends += [GraphEnd.TEMPERATURE, GraphEnd.GREEDY]
        self.graphs: dict[tuple[int, GraphEnd, int], torch.cuda.CUDAGraph] = {}  # by (bucket, end, token parity)
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
        # The sampling graphs' token ids on the host: per parity a pinned buffer ([n] views made once), the
        # event after its copy, and the samples it holds for the engine until they are read.
        host_tokens = [torch.zeros(max_num_seqs, dtype=torch.int64, pin_memory=True) for _ in range(NUM_TOKEN_PARITIES)]
        self.host_token_rows = [[buffer[:n] for n in range(max_num_seqs + 1)] for buffer in host_tokens]
        self.tokens_copied = [torch.cuda.Event(external=True) for _ in range(NUM_TOKEN_PARITIES)]
        self.held_samples: list[HostSamples | None] = [None] * NUM_TOKEN_PARITIES
        self.parity = 0  # the buffer the next sampling step copies its tokens into

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
        )

    def _step(self, batch_size: int, end: GraphEnd, parity: int) -> None:
        """What a graph holds: the input copy, the model, then the hidden states, or the LM head, the sampler
        and the copy of the tokens into buffer ``parity``."""
        num_bytes = self.staging.num_bytes(batch_size)  # every field's lanes < batch_size: one copy for all
        self.static_buffer[:num_bytes].copy_(self.staging.buffer[:num_bytes], non_blocking=True)
        self.inputs_copied.record()
        s = self.static
        input_ids = feed_pending_tokens(s["input_ids"][:batch_size], s["feed_rows"][:batch_size], self.last_sampled)
        with attention_context(self._metadata(batch_size)):
            hidden_states = self.model(input_ids, s["positions"][:batch_size])  # [batch_size, hidden_size]
        if end is GraphEnd.HIDDEN_STATES:
            self.hidden_states[:batch_size] = hidden_states
            return
        assert self.sampler is not None
        logits = self.model.compute_logits(hidden_states)  # [batch_size, vocab_size]
        if end is GraphEnd.GREEDY:  # as the sampler does: no noise drawn, so no draw counted
            token_ids = logits.argmax(dim=-1)  # [batch_size]
        else:
            token_ids = self.sampler.draw(logits, self.temperatures[:batch_size])
        self.last_sampled[:batch_size] = token_ids
        self.host_token_rows[parity][batch_size].copy_(token_ids, non_blocking=True)
        self.tokens_copied[parity].record()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its memory), all in one pool."""
        self.staging.arrays["slot_mapping"].fill(-1)  # capture runs copy this buffer in: they store no K/V
        # The warm-up runs count draws; the engine's first draw should not depend on whether graphs exist.
        with nullcontext() if self.sampler is None else self.sampler.draws_not_counted():
            for batch_size in reversed(self.buckets):
                for end in self.ends:
                    for parity in range(1 if end is GraphEnd.HIDDEN_STATES else NUM_TOKEN_PARITIES):
                        run = partial(self._step, batch_size, end, parity)
                        # The other parity's graph runs the same kernels: they are compiled and warm already.
                        self.graphs[batch_size, end, parity] = self._capture(run, warm_up=parity == 0)
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

    def run(self, batch: ScheduledBatch, feed_rows: np.ndarray | None = None) -> torch.Tensor:
        """Replay the graph that ends at the hidden states for this batch: they are [B, hidden_size]."""
        num_seqs = len(batch.seqs)
        self._replay(batch, feed_rows, GraphEnd.HIDDEN_STATES)
        return self.outputs[num_seqs]

    def can_sample(self, t: SamplingTensors) -> bool:
        """Whether a sampling graph computes this batch's tokens: greedy or temperature-only rows, nothing else."""
        return self.sampler is not None and t.is_short_path and t.num_logprobs is None

    def run_and_sample(self, batch: ScheduledBatch, feed_rows: np.ndarray | None, t: SamplingTensors) -> HostSamples:
        """Replay the model, LM head and sampler for this batch (can_sample(t)): its token ids, in last_sampled
        and on their way to the host."""
        num_seqs = len(batch.seqs)
        if not t.is_all_greedy and t.temperatures is not self.staged_temperatures:  # the batch changed
            self.temperatures[:num_seqs] = t.temperatures
            self.staged_temperatures = t.temperatures  # held, so its id cannot be reused by another tensor
        parity = self.parity
        held = self.held_samples[parity]
        if held is not None:
            held.wait([])  # read (and kept) before this step overwrites its buffer; the engine read them already
        self._replay(batch, feed_rows, GraphEnd.GREEDY if t.is_all_greedy else GraphEnd.TEMPERATURE, parity)
        self.parity = (parity + 1) % NUM_TOKEN_PARITIES
        samples = HostSamples.copied(self.host_token_rows[parity][num_seqs], self.tokens_copied[parity])
        self.held_samples[parity] = samples
        return samples

    def _replay(self, batch: ScheduledBatch, feed_rows: np.ndarray | None, end: GraphEnd, parity: int = 0) -> None:
        """Stage the batch into the pinned buffer and replay its bucket's graph, which copies it in."""
        bucket = self.bucket_of[len(batch.seqs)]
        self.inputs_copied.synchronize()  # the step before has copied its inputs out of the buffer
        self.staging.stage(batch, bucket, feed_rows)
        self.graphs[bucket, end, parity].replay()
