"""One step's samples on their way from the device to the host, through a ring of pinned buffers.

The engine launches a step, schedules the next, and only then waits for the first one's tokens
(engine/llm_engine.py), so the copy back must not block: it goes into pinned host memory behind an
event. Pinned memory is slow to allocate, so the token ids go into buffers allocated once and used
in turn, by eager steps and decode graphs alike (a sampling graph is captured once per buffer):

    step:     N     N+1    N+2    N+3
    buffer:   0      1      0      1     <- step N+2 reuses step N's buffer, whose tokens were read by then
"""

import weakref

import torch

from nanovllm.sampling.sampler import SamplerOutput
from nanovllm.scheduler.batch import StepSamples
from nanovllm.scheduler.sequence import Sequence

# Steps whose token ids may be unread at once: the step the engine waits for and the one it just launched.
NUM_TOKEN_BUFFERS = 2


class TokenRing:
    """Pinned host buffers for sampled token ids, each with the event that says its copy is done.

    A buffer is handed out again only once the samples it held were read: if they were not (the engine
    dropped a step it launched), they are read before the buffer is reused, so no tokens are overwritten
    while someone may still ask for them.
    """

    def __init__(self, max_num_rows: int) -> None:
        buffers = [torch.zeros(max_num_rows, dtype=torch.int64, pin_memory=True) for _ in range(NUM_TOKEN_BUFFERS)]
        self.rows = [[buffer[:n] for n in range(max_num_rows + 1)] for buffer in buffers]  # [n] views, made once
        # external=True: a decode graph records the event inside its replay, as an eager step records it.
        self.events = [torch.cuda.Event(external=True) for _ in range(NUM_TOKEN_BUFFERS)]
        self._holders: list[weakref.ref[HostSamples] | None] = [None] * NUM_TOKEN_BUFFERS
        self._next_index = 0

    def take(self) -> int:
        """The index of the next buffer in turn, free to be written."""
        index = self._next_index
        holder = self._holders[index]
        samples = None if holder is None else holder()
        if samples is not None:
            samples.read_token_ids()  # kept by its HostSamples before the buffer is overwritten
        self._next_index = (index + 1) % NUM_TOKEN_BUFFERS
        return index

    def hand_out(self, index: int, num_rows: int) -> "HostSamples":
        """Samples whose ``num_rows`` token ids are being copied into buffer ``index``, its event recorded after."""
        samples = HostSamples([self.rows[index][num_rows]], self.events[index])
        self._holders[index] = weakref.ref(samples)
        return samples


class HostSamples:
    """One step's samples on their way to the host: token ids, and logprobs where a row asked for them.

    ``wait()`` blocks until they are there. On CUDA the copies run behind an event, so the host can
    schedule the next step meanwhile; elsewhere they are plain copies, done when this is built.
    """

    def __init__(self, tensors: list[torch.Tensor], ready: torch.cuda.Event | None = None) -> None:
        self._tensors = tensors  # host tensors: token ids, then (when asked) sampled, top logprobs and top ids
        self._ready = ready  # recorded after the copies into ``tensors``; None when they are done already
        self._token_ids: list[int] | None = None  # the token ids, once read
        self._samples: StepSamples | None = None  # wait()'s answer, kept

    @classmethod
    def copy_from(cls, output: SamplerOutput, ring: TokenRing | None) -> "HostSamples":
        """Start the copies of a sampler's output to the host: token ids into the ring's next buffer (on CUDA)."""
        num_rows = output.token_ids.shape[0]
        on_cuda = output.token_ids.is_cuda
        if ring is not None and on_cuda:
            samples = ring.hand_out(ring.take(), num_rows)
        else:
            samples = cls([torch.empty(num_rows, dtype=torch.int64, pin_memory=on_cuda)])
        samples._tensors[0].copy_(output.token_ids, non_blocking=on_cuda)
        for tensor in (output.sampled_logprobs, output.top_logprobs, output.top_token_ids):
            if tensor is not None:
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_cuda)
                samples._tensors.append(host.copy_(tensor, non_blocking=on_cuda))
        if on_cuda:
            samples._ready = samples._ready or torch.cuda.Event()
            samples._ready.record()
        return samples

    @classmethod
    def landed(cls, samples: StepSamples) -> "HostSamples":
        """Samples already on the host (a step run to its end)."""
        host = cls([])
        host._samples = samples
        return host

    def read_token_ids(self) -> list[int]:
        """The token ids, waiting for their copy."""
        if self._token_ids is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._token_ids = self._tensors[0].tolist() if self._tensors else []
        return self._token_ids

    def wait(self, seqs: list[Sequence]) -> StepSamples:
        """The samples as lists, one entry per row of ``seqs`` (the batch they were sampled for)."""
        if self._samples is None:
            self._samples = self._as_lists(self.read_token_ids(), seqs)
        return self._samples

    def _as_lists(self, token_ids: list[int], seqs: list[Sequence]) -> StepSamples:
        num_rows = len(token_ids)
        if len(self._tensors) <= 1:
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
