"""A request as the engine tracks it: its n completions (one Sequence each) and their texts.

With ``n > 1`` only the first completion is queued at first. Once its prompt is prefilled,
the others are queued at the head of the waiting queue: their prompt blocks are then in the
prefix cache, so they share the first one's KV blocks (reference counts) instead of
prefilling the prompt n times; each recomputes at most its last, partial prompt block.
"""

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from nanovllm.engine.completion_text import CompletionText
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.scheduler.sequence import Sequence


@dataclass
class Request:
    request_id: str  # the caller's id, unique among unfinished requests
    seqs: list[Sequence]  # the n completions, by sample index
    texts: list[CompletionText | None]  # per completion; None when no text is needed per step
    num_queued: int = 1  # seqs[:num_queued] were handed to the scheduler; the rest wait for seqs[0]'s prompt

    @classmethod
    def build(
        cls,
        request_id: str,
        first: Sequence,
        tokenizer: PreTrainedTokenizerBase | None,
        stream_text: bool,
    ) -> "Request":
        """``first`` plus its n - 1 siblings: new sequences with the same prompt and params."""
        prompt = first.token_ids[: first.num_prompt_tokens]
        siblings = [Sequence(prompt, first.params, index, first.lora_request) for index in range(1, first.params.n)]
        seqs = [first, *siblings]
        needs_text = tokenizer is not None and (stream_text or bool(first.params.stop_strings))
        texts = [CompletionText(tokenizer, first.params) if needs_text and tokenizer else None for _ in seqs]
        return cls(request_id, seqs, texts)

    def siblings_to_queue(self) -> list[Sequence]:
        """The completions still held back, once the first one's prompt is in the KV cache (or it finished)."""
        first = self.seqs[0]
        if self.num_queued == len(self.seqs) or not (first.is_finished or first.num_output_tokens > 0):
            return []
        held = self.seqs[self.num_queued :]
        self.num_queued = len(self.seqs)
        return held

    @property
    def is_finished(self) -> bool:
        return self.num_queued == len(self.seqs) and all(seq.is_finished for seq in self.seqs)

    def to_output(self, index: int, tokenizer: PreTrainedTokenizerBase | None) -> RequestOutput:
        """The finished request as generate() returns it; the top-level fields are the first completion's."""
        completions = [self._completion(i, tokenizer) for i in range(len(self.seqs))]
        first = self.seqs[0]
        return RequestOutput(index, self.request_id, first.token_ids[: first.num_prompt_tokens], completions)

    def _completion(self, index: int, tokenizer: PreTrainedTokenizerBase | None) -> CompletionOutput:
        seq, text = self.seqs[index], self.texts[index]
        assert seq.finish_reason is not None, "outputs are built only for finished sequences"
        if text is not None:
            decoded = text.text
        elif tokenizer is not None:
            decoded = str(tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens))
        else:
            decoded = ""
        asked = seq.params.logprobs is not None
        return CompletionOutput(
            index=index,
            text=decoded,
            token_ids=seq.output_token_ids,
            cumulative_logprob=seq.cumulative_logprob if asked else None,
            logprobs=list(seq.output_logprobs) if asked else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
