"""One step's samples on their way from the device to the host, in pinned buffers reused step after step.

The engine launches a step, schedules the next, and only then waits for the first one's tokens
(engine/llm_engine.py), so the copy back must not block: it goes into pinned host memory behind
an event. Allocating that memory and the event anew each step cost ~100 us of host time per step
on an H200's host, so the token ids go into one of a few buffers that are reused in turn:

    step:     N     N+1    N+2    N+3    N+4
    buffer:   0      1      2      3      0    <- reused once step N's tokens were read (or dropped)

A decode step replayed in a sampling graph copies its tokens to the host inside the graph, into
buffers of the graphs' own (engine/cuda_graphs.py); its samples are made by ``HostSamples.copied``.
"""

import torch

from nanovllm.engine.sequence import Sequence, StepSamples
from nanovllm.layers.sampler import SamplerOutput

# Steps whose token ids may be on their way to the host at once before a fresh buffer is allocated:
# the engine holds two (the step it waits for and the one it just launched).
NUM_TOKEN_BUFFERS = 4


class TokenBuffers:
    """Pinned host buffers for sampled token ids, each with its event; a buffer is handed out again only
    after the samples it held were read or dropped, so no step's tokens are overwritten unread."""

    def __init__(self, max_num_rows: int) -> None:
        self.max_num_rows = max_num_rows
        buffers = [torch.empty(max_num_rows, dtype=torch.int64, pin_memory=True) for _ in range(NUM_TOKEN_BUFFERS)]
        self.rows = [[buffer[:n] for n in range(max_num_rows + 1)] for buffer in buffers]  # views made once
        self.events = [torch.cuda.Event() for _ in range(NUM_TOKEN_BUFFERS)]
        self.is_held = [False] * NUM_TOKEN_BUFFERS
        self.next_index = 0

    def take(self, num_rows: int) -> int | None:
        """The index of the next buffer, now held; None when it is still held or too small (allocate one)."""
        index = self.next_index
        if self.is_held[index] or num_rows > self.max_num_rows:
            return None
        self.is_held[index] = True
        self.next_index = (index + 1) % NUM_TOKEN_BUFFERS
        return index


class HostSamples:
    """One step's samples on their way to the host (token ids always, logprobs when some row asked);
    wait() blocks until they are there.

    On CUDA the copies go into pinned memory behind an event, so the host can schedule the next
    step while this one finishes; elsewhere they are plain synchronous copies. Token ids use one of
    ``buffers`` when it is free.
    """

    def __init__(self, output: SamplerOutput | None, buffers: TokenBuffers | None = None) -> None:
        self._tensors: list[torch.Tensor] = []  # token ids, then sampled, top logprobs and top ids when asked
        self._ready: torch.cuda.Event | None = None
        self._buffers = buffers
        self._index: int | None = None  # the buffer of ``buffers`` holding the token ids, until read
        self._samples: StepSamples | None = None  # wait()'s answer, kept: the buffer may be reused after
        if output is None:  # a tensor-parallel worker: rank 0 samples
            return
        on_cuda = output.token_ids.is_cuda
        num_rows = output.token_ids.shape[0]
        host_token_ids, ready = None, None
        if on_cuda and buffers is not None:
            self._index = buffers.take(num_rows)
            if self._index is not None:
                host_token_ids, ready = buffers.rows[self._index][num_rows], buffers.events[self._index]
        if host_token_ids is None:
            host_token_ids = torch.empty(num_rows, dtype=torch.int64, pin_memory=on_cuda)
        self._tensors.append(host_token_ids.copy_(output.token_ids, non_blocking=on_cuda))
        for tensor in (output.sampled_logprobs, output.top_logprobs, output.top_token_ids):
            if tensor is not None:
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_cuda)
                self._tensors.append(host.copy_(tensor, non_blocking=on_cuda))
        if on_cuda:
            self._ready = torch.cuda.Event() if ready is None else ready
            self._ready.record()

    @classmethod
    def copied(cls, host_token_ids: torch.Tensor, ready: torch.cuda.Event) -> "HostSamples":
        """Token ids whose copy into the pinned ``host_token_ids`` is queued already (by a decode graph), with
        ``ready`` recorded after it."""
        samples = cls(None)
        samples._tensors.append(host_token_ids)
        samples._ready = ready
        return samples

    def wait(self, seqs: list[Sequence]) -> StepSamples:
        """The samples as lists, one entry per row of ``seqs`` (the batch they were sampled for)."""
        if self._samples is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._samples = self._as_lists(seqs)
            self._release()
        return self._samples

    def __del__(self) -> None:
        self._release()  # never read: the buffer may be reused (a later copy into it is queued after this one)

    def _release(self) -> None:
        if self._index is not None and self._buffers is not None:
            self._buffers.is_held[self._index] = False
            self._index = None

    def _as_lists(self, seqs: list[Sequence]) -> StepSamples:
        if not self._tensors:
            return StepSamples([], [], [])
        token_ids = self._tensors[0].tolist()
        num_rows = len(token_ids)
        if len(self._tensors) == 1:
            return StepSamples(token_ids, [None] * num_rows, [None] * num_rows)
        sampled, top_values, top_ids = (t.tolist() for t in self._tensors[1:])
        sampled_out: list[float | None] = []
        top_out: list[dict[int, float] | None] = []
        for row, seq in enumerate(seqs):
            num = seq.params.logprobs
            if num is None:
                sampled_out.append(None)
                top_out.append(None)
                continue
            entries = dict(zip(top_ids[row][:num], top_values[row][:num], strict=True))
            entries[token_ids[row]] = sampled[row]
            sampled_out.append(sampled[row])
            top_out.append(entries)
        return StepSamples(token_ids, sampled_out, top_out)
