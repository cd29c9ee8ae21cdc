"""Mixed steps: every step decodes all running sequences and prefills prompt chunks beside them.

Scheduler's rule runs waiting prompts first, in steps of their own: a long prompt that arrives stalls every
running sequence for as many steps as its chunks take, and their streams pause. MixedScheduler leaves no
running sequence out of a step; new prompts take at most ``max_num_prefill_tokens`` tokens of it (vLLM's
chunked prefill does the same within max_num_batched_tokens), so a long prompt is spread over steps
that all decode too:

    one step:  | decode rows: one token for each running sequence | prefill rows: chunks of waiting prompts |
                                                                    <--- at most max_num_prefill_tokens --->

A step with prefill rows is a prefill step for the runner (its decode rows are rows with one query token
behind their cached context), so it runs eagerly where a decode step would replay a CUDA graph: the prefill
budget trades that against the decodes' latency.
"""

from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.scheduler.block_manager import BlockManager
from nanovllm.scheduler.scheduler import Scheduler, SchedulerLimits


class MixedScheduler(Scheduler):
    """A Scheduler whose every step decodes all running sequences, with prompt chunks of a bounded size beside."""

    def __init__(
        self, block_manager: BlockManager, limits: SchedulerLimits, eos_token_ids: set[int], max_num_prefill_tokens: int
    ) -> None:
        super().__init__(block_manager, limits, eos_token_ids)
        self.max_num_prefill_tokens = max_num_prefill_tokens  # most prompt tokens one step prefills

    def schedule(self) -> ScheduledBatch:
        """Decode every running sequence (preempting the newest when blocks run out), then prefill in what is left
        of the step's budget."""
        decode = self._schedule_decode()
        budget = min(self.max_num_prefill_tokens, self.limits.max_num_batched_tokens - len(decode.seqs))
        prefill = self._schedule_prefill(budget)
        if not prefill.seqs:
            return decode
        seqs, num_new_tokens = decode.seqs + prefill.seqs, decode.num_new_tokens + prefill.num_new_tokens
        return ScheduledBatch(seqs, num_new_tokens, is_prefill=True)


def build_scheduler(
    block_manager: BlockManager, limits: SchedulerLimits, eos_token_ids: set[int], max_num_prefill_tokens: int | None
) -> Scheduler:
    """Prefill steps apart from decodes (None, the default), or mixed steps with a prefill budget."""
    if max_num_prefill_tokens is None:
        return Scheduler(block_manager, limits, eos_token_ids)
    return MixedScheduler(block_manager, limits, eos_token_ids, max_num_prefill_tokens)
