"""Turn each sequence's last-token logits into its next token, vLLM's logits pipeline batched over rows.

    raw logits ─┬─> log_softmax ─> logprobs (top-N and the sampled token's)
                └─> logit bias, min_tokens mask ─> penalties ─┬─> argmax                   (greedy rows)
                                                              └─> / temperature ─> min_p ─> top-k, top-p ─> draw

Every step is a tensor op over the whole batch; per-row settings come in as [B] tensors
(:class:`SamplingTensors`, built by ``sampling/metadata.py``). A batch that needs none of
the transforms (greedy and temperature-only rows) takes the short path: :func:`~nanovllm.sampling.race.sample`.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.sampling.race import MIN_TEMPERATURE, hash_keys, noise_keys, race_winners, sample
from nanovllm.utils.compile import maybe_compile


@dataclass(frozen=True)
class PenaltyTensors:
    """What the three penalties read: per-sequence token counts kept on the device across steps
    (sampling/metadata.py's PenaltyTable)."""

    output_counts: torch.Tensor  # [num_table_rows, vocab_size] int32, times each token occurs in the row's output
    prompt_mask: torch.Tensor  # [num_table_rows, vocab_size] bool, whether each token occurs in the row's prompt
    table_rows: torch.Tensor  # [B] int64, the table row of each batch row
    repetition: torch.Tensor  # [B] float32; 1 = off
    frequency: torch.Tensor  # [B] float32; 0 = off
    presence: torch.Tensor  # [B] float32; 0 = off


@dataclass(frozen=True)
class TokenEntries:
    """A sparse set of (row, token) logits entries: logit_bias values or tokens masked by min_tokens."""

    rows: torch.Tensor  # [K] int64, batch row of each entry
    token_ids: torch.Tensor  # [K] int64
    values: torch.Tensor  # [K] float32, added to the logit (-inf masks the token)


@dataclass(frozen=True)
class SamplingTensors:
    """One batch's sampling settings on the device, one row per sequence, plus which stages are needed."""

    temperatures: torch.Tensor  # [B] float32; 0 = greedy
    top_ks: torch.Tensor  # [B] int64; vocab_size = off
    top_ps: torch.Tensor  # [B] float32; 1 = off
    min_ps: torch.Tensor  # [B] float32; 0 = off
    logit_edits: TokenEntries | None  # logit_bias entries and min_tokens masks; None when no row has any
    penalties: PenaltyTensors | None  # None when no row uses a penalty
    seed_keys: torch.Tensor | None  # [B, 2] int32, two 32-bit hash keys per row (seed, position); None = no seeds
    is_seeded: torch.Tensor | None  # [B] bool, rows whose noise is keyed by seed_keys rather than the engine's draw
    max_top_k: int | None  # the largest top_k when every row has one (topk instead of a full sort), else None
    use_top_k_top_p: bool  # some row has top_k or top_p
    use_min_p: bool  # some row has min_p
    is_all_greedy: bool  # every row is greedy: no noise needed
    num_logprobs: int | None  # most top logprobs any row asks for; None = no row asks

    @property
    def is_temperature_only(self) -> bool:
        """No stage but temperature: the short path applies."""
        return not (self.use_top_k_top_p or self.use_min_p or self.logit_edits or self.penalties)

    @property
    def is_short_path(self) -> bool:
        """Temperature-only and no seeded row: :meth:`Sampler.draw` samples every row."""
        return self.is_temperature_only and self.seed_keys is None


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, the sampled token of each row
    sampled_logprobs: torch.Tensor | None  # [B] float32, raw-logits logprob of each sampled token
    top_logprobs: torch.Tensor | None  # [B, num_logprobs] float32, largest first
    top_token_ids: torch.Tensor | None  # [B, num_logprobs] int64


class Sampler(nn.Module):
    """Greedy rows take the argmax; the others draw from softmax(transformed logits / temperature).

    The draw is the exponential race (equivalent to Gumbel-max): with E_i ~ Exp(1) drawn
    independently, argmax_i p_i / E_i is distributed as p. No cumulative sums, and no softmax
    either: p_i = exp(s_i) / Z for the scaled logits s, and log is increasing, so
    argmax_i p_i / E_i = argmax_i (s_i - log E_i), one pass over the logits.

    The noise E is a hash of (two keys per row, token id) (:func:`hashed_noise`), computed inside the race:
    where the race is compiled or a Triton kernel, no [B, vocab_size] noise tensor goes through memory.
    No torch.Generator is involved, whose offset a CUDA graph would have to advance from the host before
    each replay. A seeded row's keys name its (seed, output position); every other row's name (engine
    seed, draws so far, row), with the count of draws kept on the device and advanced by each draw,
    inside a graph's replay too.
    """

    def __init__(
        self,
        seed: int = 0,
        compile_ops: bool = False,
        device: torch.device | str | None = None,
        triton_race: bool = False,  # the race in Triton kernels (sampling/triton_race.py), noise never stored
    ) -> None:
        super().__init__()
        self._sample: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
        self._race_winners: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        self._noise_keys: Callable[..., torch.Tensor]
        self._race_triton: Callable[..., torch.Tensor] | None = None
        if triton_race:  # the keys, the noise and the race in the kernels, from the engine keys and draw count
            from nanovllm.sampling.triton_race import race_winners_triton  # imports Triton: only when chosen

            self._race_triton = race_winners_triton
        else:
            self._sample = maybe_compile(sample, compile_ops)
            self._race_winners = maybe_compile(race_winners, compile_ops)
            self._noise_keys = maybe_compile(noise_keys, compile_ops)
        self._transform_logits = maybe_compile(transform_logits, compile_ops)
        self.engine_keys: torch.Tensor  # [2] int32, the engine seed's hash keys
        self.draw_count: torch.Tensor  # [] int64, draws so far (greedy-only batches draw nothing)
        engine_keys = torch.tensor(hash_keys(seed), dtype=torch.int32, device=device)
        self.register_buffer("engine_keys", engine_keys, persistent=False)
        self.register_buffer("draw_count", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    def warm_up(self, vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Compile the short path now, for one row and for several: torch.compile builds a graph for each
        on first use, and on a GPU that took over a second, stalling a server's first requests."""
        # torch.inference_mode: as the engine's steps run (grad mode is part of what a graph is kept for).
        with self.draws_not_counted(), torch.inference_mode():
            for num_rows in (1, 2):
                logits = torch.zeros(num_rows, vocab_size, dtype=dtype, device=device)
                self.draw(logits, torch.ones(num_rows, device=device))

    @contextmanager
    def draws_not_counted(self) -> Iterator[None]:
        """Draws inside (warm-up and capture runs) leave the draw count where it was, so that the engine's
        first draw is the same with or without them."""
        draw_count = self.draw_count.clone()
        try:
            yield
        finally:
            self.draw_count.copy_(draw_count)

    def draw(self, logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        """The short path, for rows that are greedy or temperature-only and unseeded: [B] token ids.

        The decode graphs (runner/cuda_graphs.py) capture this call, so it must stay graph-safe: fixed
        shapes, no host reads, device state updated in place.
        """
        return self._race(logits, temperatures, None)

    def _race(self, scores: torch.Tensor, temperatures: torch.Tensor | None, t: SamplingTensors | None) -> torch.Tensor:
        """Each row's race winner under this draw's noise keys (seeded rows' from ``t``), and one more draw
        counted. With ``temperatures`` the scores are raw logits, as :func:`sample` takes them."""
        seed_keys, is_seeded = (None, None) if t is None else (t.seed_keys, t.is_seeded)
        if self._race_triton is not None:
            token_ids = self._race_triton(scores, self.engine_keys, self.draw_count, temperatures, seed_keys, is_seeded)
        else:
            keys = self._noise_keys(self.engine_keys, self.draw_count, scores.shape[0], seed_keys, is_seeded)
            if temperatures is None:
                token_ids = self._race_winners(scores, keys)
            else:
                token_ids = self._sample(scores, temperatures, keys)
        self.draw_count += 1
        return token_ids

    def forward(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:  # logits: [B, vocab_size]
        if t.is_all_greedy and t.is_temperature_only:
            token_ids = logits.argmax(dim=-1)  # [B]
        elif t.is_temperature_only:
            token_ids = self._race(logits, t.temperatures, t)
        else:
            scores, greedy_ids = self._transform_logits(logits, t)
            token_ids = torch.where(t.temperatures == 0, greedy_ids, self._race(scores, None, t))
        if t.num_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, vocab_size], from the raw logits
        sampled = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [B]
        top_logprobs, top_token_ids = logprobs.topk(t.num_logprobs, dim=-1)  # [B, num_logprobs] each
        return SamplerOutput(token_ids, sampled, top_logprobs, top_token_ids)


def transform_logits(logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline up to the race, in vLLM's order; each stage is skipped when no row of the batch uses it.
    Returns the scores the race runs on [B, vocab_size] and each row's greedy token [B]."""
    logits = logits.float()
    if t.logit_edits is not None:
        logits = apply_token_entries(logits, t.logit_edits)
    if t.penalties is not None:
        logits = apply_penalties(logits, t.penalties)
    greedy_ids = logits.argmax(dim=-1)  # [B]
    logits = logits / t.temperatures.clamp_min(MIN_TEMPERATURE).unsqueeze(1)
    if t.use_min_p:
        logits = apply_min_p(logits, t.min_ps)
    if t.use_top_k_top_p:
        logits = apply_top_k_top_p(logits, t.top_ks, t.top_ps, t.max_top_k)
    return logits, greedy_ids


def apply_token_entries(logits: torch.Tensor, entries: TokenEntries) -> torch.Tensor:
    """Add each entry's value to logits[row, token] (a -inf value masks the token)."""
    return logits.index_put((entries.rows, entries.token_ids), entries.values, accumulate=True)


def apply_penalties(logits: torch.Tensor, p: PenaltyTensors) -> torch.Tensor:
    """Repetition over prompt + output tokens (divide positive logits, multiply negative ones), then
    frequency (times the output count) and presence (once per output token) subtracted."""
    counts = p.output_counts[p.table_rows]  # [B, vocab_size]
    is_in_output = counts > 0
    is_seen = is_in_output | p.prompt_mask[p.table_rows]
    repetition = torch.where(is_seen, p.repetition.unsqueeze(1), 1.0)  # [B, vocab_size]
    logits = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = logits - p.frequency.unsqueeze(1) * counts
    return logits - p.presence.unsqueeze(1) * is_in_output


def apply_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Mask tokens with p < min_p * p_max. In log space: logit < max_logit + log(min_p); min_p = 0 masks nothing."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_ps).unsqueeze(1)  # [B, 1]
    return logits.masked_fill(logits < threshold, -math.inf)


# Left out of the compiled graph: with a 151,936-token vocabulary Inductor (torch 2.11) splits the
# reductions and then fails to generate the gather of each row's k-th value ("list indices must be
# integers", seen on an H100). The sort or topk inside is a library kernel either way.
@torch.compiler.disable
def apply_top_k_top_p(
    logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, max_top_k: int | None
) -> torch.Tensor:
    """Keep each row's top_k largest logits, then the smallest prefix (by rank) whose probability reaches top_p.

    Both cuts are a threshold on the logit value, so tokens tied with the boundary token are kept.
    The boundary token itself (the one whose probability crosses top_p) is kept, as in vLLM.
    When every row has a top_k, only the max_top_k largest logits are sorted, not the whole vocabulary.
    """
    vocab_size = logits.shape[-1]
    if max_top_k is not None:
        ranked = logits.topk(min(max_top_k, vocab_size), dim=-1).values  # [B, K], largest first
    else:
        ranked = logits.sort(dim=-1, descending=True).values  # [B, vocab_size]
    kth_idx = (top_ks.clamp(1, ranked.shape[-1]) - 1).unsqueeze(1)  # [B, 1]
    ranked = ranked.masked_fill(ranked < ranked.gather(1, kth_idx), -math.inf)
    probs = torch.softmax(ranked, dim=-1)  # [B, K]
    mass_above = probs.cumsum(dim=-1) - probs  # [B, K] probability of the tokens ranked above each one
    is_kept = ((mass_above < top_ps.unsqueeze(1)) | (top_ps.unsqueeze(1) >= 1.0)) & (ranked > -math.inf)
    cut = ranked.masked_fill(~is_kept, math.inf).amin(dim=-1, keepdim=True)  # [B, 1] smallest kept logit
    return logits.masked_fill(logits < cut, -math.inf)
