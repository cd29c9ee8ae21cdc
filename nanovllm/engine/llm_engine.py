"""The engine loop: tokenize requests, schedule a batch, run the model, record the tokens, repeat."""

import json
import os
import time
from collections.abc import Sequence as SequenceLike

from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager, PrefixCacheStats
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler, SchedulerLimits
from nanovllm.engine.sequence import Sequence
from nanovllm.models.arch import ModelArch, load_model_arch
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

Prompt = str | list[int]


def effective_max_model_len(config: EngineConfig, arch: ModelArch) -> int:
    """config.max_model_len clamped to the model's limit; a sliding window shorter than it is refused."""
    max_model_len = min(config.max_model_len, arch.max_position_embeddings)
    if arch.sliding_window is not None and arch.sliding_window < max_model_len:
        raise ValueError(
            f"the model attends through a sliding window of {arch.sliding_window} tokens, which this engine does "
            f"not implement; set max_model_len <= {arch.sliding_window} (now {max_model_len})"
        )
    return max_model_len


def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load a tokenizer from {model_dir} ({e}); add its tokenizer files, or pass "
            "skip_tokenizer_init=True and give prompts as token ids"
        ) from e


def read_eos_token_ids(model_dir: str, arch: ModelArch, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    """Every end-of-sequence id named by config.json, generation_config.json and the tokenizer."""
    eos_ids = set(arch.eos_token_ids)
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        eos_ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return eos_ids


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.arch = load_model_arch(config.model)
        self.max_model_len = effective_max_model_len(config, self.arch)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model)
        self.runner = ModelRunner(config, self.arch, self.max_model_len)
        block_manager = BlockManager(
            self.runner.num_kvcache_blocks, config.kvcache_block_size, config.enable_prefix_caching
        )
        limits = SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        eos_ids = read_eos_token_ids(config.model, self.arch, self.tokenizer)
        self.scheduler = Scheduler(block_manager, limits, eos_ids)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any. Closing twice is harmless."""
        self.runner.close()

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.scheduler.block_manager.stats

    def make_sequence(self, request_id: int, prompt: Prompt, params: SamplingParams) -> Sequence:
        """Tokenize and check one request; raises before anything is queued."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {request_id} is a string but skip_tokenizer_init=True; give token ids")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            token_ids = list(prompt)
            bad = [t for t in token_ids if not 0 <= t < self.arch.vocab_size]
            if bad:
                raise ValueError(f"prompt {request_id} has token ids outside [0, {self.arch.vocab_size}): {bad[:5]}")
        else:
            raise TypeError(f"prompt {request_id} must be a str or a list of int token ids, got {type(prompt)}")
        seq = Sequence(request_id, token_ids, params)
        self.scheduler.check_request(seq)
        return seq

    def step(self) -> tuple[list[Sequence], int, bool]:
        """Run one batch; returns (finished sequences, tokens computed, whether it was a prefill)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("the scheduler found nothing it could run although requests are pending")
        sampled = self.runner.run(batch)
        return self.scheduler.postprocess(batch, sampled), batch.num_tokens, batch.is_prefill

    def generate(
        self,
        prompts: SequenceLike[Prompt],
        sampling_params: SamplingParams | SequenceLike[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(sampling_params)} SamplingParams; give one or one each"
            )
        seqs = [self.make_sequence(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, sampling_params, strict=True))]
        for seq in seqs:
            self.scheduler.add(seq)
        try:
            self._run_to_completion(len(seqs), use_tqdm)
        finally:
            self.scheduler.abort_all()  # after an error or interrupt, leave the engine empty and usable
        return [self._to_output(seq) for seq in seqs]

    def _run_to_completion(self, num_requests: int, use_tqdm: bool) -> None:
        with tqdm(total=num_requests, desc="Generating", dynamic_ncols=True, disable=not use_tqdm) as bar:
            rates = {"prefill": 0.0, "decode": 0.0}
            while self.scheduler.has_unfinished():
                start = time.perf_counter()
                finished, num_tokens, is_prefill = self.step()
                rates["prefill" if is_prefill else "decode"] = num_tokens / (time.perf_counter() - start)
                bar.set_postfix({f"{k} tok/s": f"{v:,.0f}" for k, v in rates.items()}, refresh=False)
                bar.update(len(finished))

    def _to_output(self, seq: Sequence) -> RequestOutput:
        assert seq.finish_reason is not None, "outputs are built only for finished sequences"
        text = (
            "" if self.tokenizer is None else str(self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True))
        )
        return RequestOutput(
            seq.request_id, seq.token_ids[: seq.num_prompt_tokens], seq.output_token_ids, text, seq.finish_reason
        )
