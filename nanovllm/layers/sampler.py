"""Turn each sequence's last-token logits into its next token, vLLM's logits pipeline batched over rows.

    raw logits ─┬─> log_softmax ─> logprobs (top-N and the sampled token's)
                └─> logit bias, min_tokens mask ─> penalties ─┬─> argmax                   (greedy rows)
                                                              └─> / temperature ─> min_p ─> top-k, top-p ─> draw

Every step is a tensor op over the whole batch; per-row settings come in as [B] tensors
(:class:`SamplingTensors`, built by ``engine/sampling_metadata.py``). A batch that needs none of
the transforms (greedy and temperature-only rows) takes the short path: :func:`sample`.
"""

import functools
import math
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import xxhash
from torch import nn

from nanovllm.layers.compile import maybe_compile

DIGEST_AS_INT32S = struct.Struct(">ii")  # xxh64_digest's 8 bytes (big-endian) as two int32 values
MIN_TEMPERATURE = 1e-5  # temperatures below this would overflow the division; greedy rows are chosen separately
UINT32_MASK = 0xFFFFFFFF
# Odd multipliers of the 32-bit mixer, below 2**31 so that they are int32 constants.
MIX_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D)
HASH_SCALE = 2.0**-32  # (a 32-bit hash value + 0.5) times this is in (0, 1)
# The largest float32 below 1: a hash value that rounds up to 1.0 in float32 is drawn as this instead.
MAX_UNIFORM = 1.0 - 2.0**-24


@dataclass(frozen=True)
class PenaltyTensors:
    """What the three penalties read: per-slot token counts kept on the device across steps."""

    output_counts: torch.Tensor  # [num_slots, vocab_size] int32, times each token occurs in the slot's output
    prompt_mask: torch.Tensor  # [num_slots, vocab_size] bool, whether each token occurs in the slot's prompt
    slots: torch.Tensor  # [B] int64, the table row of each batch row
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
        triton_race: bool = False,  # the race in Triton kernels (kernels/triton_sampler.py), noise never stored
    ) -> None:
        super().__init__()
        self._sample: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
        self._race_winners: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        self._noise_keys: Callable[..., torch.Tensor]
        self._race_triton: Callable[..., torch.Tensor] | None = None
        if triton_race:  # the keys, the noise and the race in the kernels, from the engine keys and draw count
            from nanovllm.kernels.triton_sampler import race_winners_triton  # imports Triton: only when chosen

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

        The decode graphs (engine/cuda_graphs.py) capture this call, so it must stay graph-safe: fixed
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


def hash_keys(seed: int, *more: int) -> tuple[int, int]:
    """Two 32-bit hash keys naming ``seed`` (and ``more`` integers with it, never negative): the engine's
    seed, or one draw of a seeded request (its seed, completion index and output position). As int32
    values with the bits of the 64-bit digest's low half, then of its high half."""
    high, low = DIGEST_AS_INT32S.unpack(xxhash.xxh64_digest(packer(1 + len(more))(seed % (1 << 64), *more)))
    return low, high


@functools.cache
def packer(num_values: int) -> Callable[..., bytes]:
    """Packs ``num_values`` uint64 values into bytes (a Struct per count: a format string is parsed once)."""
    return struct.Struct(f"<{num_values}Q").pack


def noise_keys(
    engine_keys: torch.Tensor,
    draw_count: torch.Tensor,
    num_rows: int,
    seed_keys: torch.Tensor | None,
    is_seeded: torch.Tensor | None,
) -> torch.Tensor:
    """The hash keys of each row's noise in this draw, [B, 2] int32: a seeded row's ``seed_keys`` row, any
    other's a mix of (engine keys, draw count, row), so that rows and draws get unrelated noise."""
    draw_keys = mix32(draw_count.to(torch.int32) ^ engine_keys)  # [2]
    rows = torch.arange(num_rows, dtype=torch.int32, device=engine_keys.device).unsqueeze(1)  # [B, 1]
    keys = mix32(draw_keys + rows)  # [B, 2]
    if seed_keys is not None and is_seeded is not None:
        keys = torch.where(is_seeded.unsqueeze(1), seed_keys, keys)
    return keys


def sample(logits: torch.Tensor, temperatures: torch.Tensor, noise_keys: torch.Tensor) -> torch.Tensor:
    """Greedy where temperature is 0, else argmax(softmax(logits / temperature) / noise), noise ~ Exp(1) hashed
    from each row's ``noise_keys`` [B, 2]."""
    logits = logits.float()
    greedy_ids = logits.argmax(dim=-1)
    scaled = logits / temperatures.clamp_min(MIN_TEMPERATURE).unsqueeze(1)
    sampled_ids = race_winners(scaled, noise_keys)
    return torch.where(temperatures == 0, greedy_ids, sampled_ids)


def race_winners(scaled_logits: torch.Tensor, noise_keys: torch.Tensor) -> torch.Tensor:
    """argmax(softmax(scaled_logits) / noise) per row, as argmax(scaled_logits - log(noise)): no softmax pass."""
    noise = hashed_noise(noise_keys, scaled_logits.shape[-1])  # [B, vocab_size]; fused away when compiled
    return (scaled_logits - noise.log()).argmax(dim=-1)  # [B]


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
    counts = p.output_counts[p.slots]  # [B, vocab_size]
    is_in_output = counts > 0
    is_seen = is_in_output | p.prompt_mask[p.slots]
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


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (xorshift-multiply rounds) on int32 tensors, read as uint32 bits.

    Why int32 and not int64 with masks: on a CPU the int64 version ran ten times slower (125 against
    12 ms for 5M values, 2 cores). An int32 multiply wraps modulo 2**32, as a uint32 one does, and the
    right shifts are made logical by clearing the bits the sign filled in.
    """
    x = x ^ shift_right(x, 16)
    x = x * MIX_MULTIPLIERS[0]
    x = x ^ shift_right(x, 15)
    x = x * MIX_MULTIPLIERS[1]
    return x ^ shift_right(x, 16)


def shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x >> bits on uint32 bits held in int32: torch shifts in copies of the sign bit, the mask clears them."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def hashed_noise(noise_keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [B, vocab_size] float32 from a counter-based hash of (row keys [B, 2] int32, token id).

    Why a hash and not a torch.Generator: a row's noise depends only on its own two keys and the
    token id, never on which rows share the batch or on launch order, so a seeded row draws the
    same wherever it runs; and the whole batch is one elementwise expression with no state to advance.
    E = -log(1 - u) for a uniform u: the race's winners have the smallest E, which float32 then
    holds with 32 bits of resolution (u near 0), not 24 (u near 1, as -log(u) would need), provided
    the log is taken as log1p.
    """
    token_ids = torch.arange(vocab_size, dtype=torch.int32, device=noise_keys.device).unsqueeze(0)  # [1, vocab]
    keys_a, keys_b = noise_keys[:, 0:1], noise_keys[:, 1:2]  # [B, 1] each
    bits = mix32(mix32(token_ids ^ keys_a) + keys_b)  # [B, vocab_size], uint32 bits in int32
    unsigned = (bits.to(torch.int64) & UINT32_MASK).float()  # the uint32 value, rounded once to float32
    uniform = ((unsigned + 0.5) * HASH_SCALE).clamp_max(MAX_UNIFORM)  # in (0, 1): E is never 0 or inf
    # -log1p(-u), written out so that the Triton kernel (kernels/triton_sampler.py) can do the same ops:
    # 1 - u rounds, and u / (1 - rounded) corrects the log for it (exact where 1 - u rounds to 1).
    complement = 1.0 - uniform
    return torch.where(complement == 1.0, uniform, -torch.log(complement) * (uniform / (1.0 - complement)))
