"""What rank 0 tells the tensor-parallel workers each step: only what changed since the last one.

Every rank runs the same :class:`~nanovllm.runner.model_runner.ModelRunner` on the same
:class:`ScheduledBatch`. Only rank 0 has the scheduler, so each worker keeps a mirror of the
sequences that hold KV blocks, keyed by ``seq_id``, and rank 0 sends each step the changes:

    first prefill chunk of a sequence (new, or back from preemption)  -> NewSequence: all its token
                                                                         ids, block table, params
    any later step of it (next chunk, decode)                         -> SequenceStep: tokens and
                                                                         block ids appended since
    a sequence that holds no blocks anymore (finished, preempted, aborted) -> its id in released_seq_ids

A decode step therefore sends, per sequence, the one token sampled last step and a new block id
every block_size tokens. How the messages travel is the backend's choice (parallel/executor.py):
pickled over a multiprocessing Pipe (mp), broadcast over a gloo group (external_launcher), or as Ray
actor calls (ray). Under external_launcher every rank runs the user's script, so a generate() call
also ends with a message, which the other ranks return or raise:

    rank 0's generate() returned  -> CallDone: its outputs
    rank 0's generate() raised    -> CallFailed: the exception
"""

import pickle
from dataclasses import dataclass

from nanovllm.lora_request import LoRARequest
from nanovllm.outputs import RequestOutput
from nanovllm.runner.model_runner import ModelRunner
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.scheduler.sequence import Sequence


@dataclass(frozen=True)
class NewSequence:
    """A sequence the workers do not hold yet: everything the runner reads from it."""

    seq_id: int  # Sequence.seq_id on rank 0
    token_ids: list[int]  # every token so far, prompt and generated (a preempted sequence has both)
    block_table: list[int]  # its KV-cache block ids
    num_computed_tokens: int  # tokens whose K/V is already cached (a prefix-cache hit), before this step
    params: SamplingParams  # its sampling settings (a Sequence needs them; workers never sample)
    num_new_tokens: int  # tokens it computes this step
    lora_request: LoRARequest | None = None  # its adapter, which each worker reads from the directory itself


@dataclass(frozen=True)
class SequenceStep:
    """A later step of a sequence the workers hold."""

    seq_id: int  # Sequence.seq_id on rank 0
    new_token_ids: list[int]  # tokens appended since the last step (the sampled one, when decoding)
    new_block_ids: list[int]  # block ids appended to its block table since the last step
    num_new_tokens: int  # tokens it computes this step


@dataclass(frozen=True)
class RunStep:
    """Run one forward pass over this batch (the ``ScheduledBatch`` of rank 0, rebuilt by the mirror)."""

    is_prefill: bool  # ScheduledBatch.is_prefill
    seqs: list[NewSequence | SequenceStep]  # the batch's sequences, in batch order
    released_seq_ids: list[int]  # sequences to forget first: they hold no KV blocks anymore


@dataclass(frozen=True)
class Shutdown:
    """Leave the process group and exit."""


@dataclass(frozen=True)
class CallDone:
    """Rank 0's generate() call has returned; every rank returns the same outputs."""

    outputs: list[RequestOutput]  # what rank 0's generate() returned, in input order


@dataclass(frozen=True)
class CallFailed:
    """Rank 0's generate() call raised; every rank raises it too."""

    error: BaseException  # what rank 0 raised (pickled with its message)

    @classmethod
    def of(cls, error: BaseException) -> "CallFailed":
        """The error as it can cross to another process: itself, or a RuntimeError with its text."""
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            error = RuntimeError(f"{type(error).__name__}: {error}")
        return cls(error)

    def in_replica(self, replica: int, share: list[int]) -> "CallFailed":
        """The error as data-parallel replica ``replica`` raised it on its ``share`` of a call's prompts: the same
        type where it can be rebuilt, saying which of the call's prompts its own prompt numbers stand for."""
        shown = ", ".join(map(str, share[:8])) + (", ..." if len(share) > 8 else "")
        message = f"data-parallel replica {replica} (its prompts 0, 1, ... are the call's {shown}): {self.error}"
        try:
            return CallFailed.of(type(self.error)(message))
        except Exception:
            return CallFailed(RuntimeError(message))


WorkerCall = RunStep | Shutdown
FollowerCall = RunStep | CallDone | CallFailed  # what a torchrun rank other than 0 receives in generate()


@dataclass
class _SentState:
    seq: Sequence  # rank 0's sequence, to notice when it gives its blocks back
    num_tokens: int  # tokens the workers' mirror holds
    num_blocks: int  # block ids the workers' mirror holds


class StepEncoder:
    """Rank 0's side: turns each ScheduledBatch into a RunStep, remembering what the workers hold."""

    def __init__(self) -> None:
        self.sent: dict[int, _SentState] = {}  # seq_id -> what the workers know of it

    def encode(self, batch: ScheduledBatch) -> RunStep:
        released = [seq_id for seq_id, state in self.sent.items() if not state.seq.block_table]
        for seq_id in released:
            del self.sent[seq_id]
        items: list[NewSequence | SequenceStep] = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            state = self.sent.get(seq.seq_id)
            # allocate() sets num_computed_tokens = num_cached_tokens; every chunk then adds >= 1.
            is_first_chunk = batch.is_prefill and seq.num_computed_tokens == seq.num_cached_tokens
            if state is None or is_first_chunk:
                items.append(
                    NewSequence(
                        seq.seq_id, list(seq.token_ids), list(seq.block_table), seq.num_computed_tokens, seq.params,
                        num_new, seq.lora_request,
                    )
                )  # fmt: skip
            else:
                new_tokens, new_blocks = seq.token_ids[state.num_tokens :], seq.block_table[state.num_blocks :]
                items.append(SequenceStep(seq.seq_id, new_tokens, new_blocks, num_new))
            self.sent[seq.seq_id] = _SentState(seq, len(seq.token_ids), len(seq.block_table))
        return RunStep(batch.is_prefill, items, released)


class SequenceMirror:
    """A worker's side: the sequences that hold KV blocks, rebuilt from RunSteps."""

    def __init__(self) -> None:
        self.seqs: dict[int, Sequence] = {}  # rank 0's seq_id -> this worker's copy

    def apply(self, step: RunStep) -> ScheduledBatch:
        for seq_id in step.released_seq_ids:
            del self.seqs[seq_id]
        seqs: list[Sequence] = []
        for item in step.seqs:
            if isinstance(item, NewSequence):
                seq = Sequence(item.token_ids, item.params, lora_request=item.lora_request)
                seq.block_table = list(item.block_table)
                seq.num_computed_tokens = item.num_computed_tokens
                self.seqs[item.seq_id] = seq
            else:
                seq = self.seqs[item.seq_id]
                seq.token_ids.extend(item.new_token_ids)
                seq.block_table.extend(item.new_block_ids)
            seqs.append(seq)
        return ScheduledBatch(seqs, [item.num_new_tokens for item in step.seqs], step.is_prefill)

    def run(self, runner: ModelRunner, step: RunStep) -> None:
        """A worker's turn: rebuild rank 0's batch, run this rank's share of it, record what it computed."""
        batch = self.apply(step)
        runner.run(batch)
        self.advance(batch)

    @staticmethod
    def advance(batch: ScheduledBatch) -> None:
        """After the step: the computed tokens are cached, as Scheduler.postprocess records on rank 0."""
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += num_new
