# mypy: disable-error-code="no-untyped-def"
# (@triton.jit kernels take untyped pointers and scalars; the Python wrappers are typed.)
"""Triton kernels for the sampler's last stage, the exponential race: one pass over the logits, then the
best of each row's splits.

Same contract as :func:`nanovllm.sampling.race.race_winners` (and, given temperatures, as
:func:`nanovllm.sampling.race.sample`): per row, the token with the largest
``score - log(E)``, where E ~ Exp(1) is hashed from the row's two keys and the token id; the kernel
makes the keys too, as :func:`nanovllm.sampling.race.noise_keys` does.
Each row's vocabulary is cut into splits, one program each, so that a batch of a few rows still
fills the GPU; a program walks its split in blocks, computing the noise in registers:

    row r:  | split 0: block, block, ... | split 1 | ... |   per block: hash -> E, score - log(E),
                                                            kept per position where better
    then per split: its best (value, first token id)  ->  second kernel: per row, best of the splits

The hash is the torch code's, in uint32 arithmetic, where wrapping multiplies and logical shifts
are native (torch has no uint32 arithmetic, so its reference holds the bits in int32 and masks
its right shifts).
"""

import functools

import torch
import triton
import triton.language as tl

from nanovllm.sampling import race

# From a sweep on an H200: within 11% of the fastest choice at every batch of 1 to 256 rows.
BLOCK_V = 4096  # vocabulary entries per loop iteration of a program
NUM_WARPS = 16
PROGRAMS_PER_SM = 2  # splits are chosen so that a launch has at least this many programs per SM
# The reference's constants, as compile-time values (a kernel reads no other globals).
MIX_A: tl.constexpr = tl.constexpr(race.MIX_MULTIPLIERS[0])
MIX_B: tl.constexpr = tl.constexpr(race.MIX_MULTIPLIERS[1])
HASH_SCALE: tl.constexpr = tl.constexpr(race.HASH_SCALE)
MAX_UNIFORM: tl.constexpr = tl.constexpr(race.MAX_UNIFORM)
MIN_TEMPERATURE: tl.constexpr = tl.constexpr(race.MIN_TEMPERATURE)


@triton.jit
def _mix32(x):
    """sampling/race.py's mix32 on uint32 values."""
    x = x ^ (x >> 16)
    x = x * MIX_A
    x = x ^ (x >> 15)
    x = x * MIX_B
    return x ^ (x >> 16)


@triton.jit
def _race_kernel(
    scores_ptr,  # [B, vocab_size], any float dtype
    stride_row,
    engine_keys_ptr,  # [2] int32: the engine seed's hash keys
    draw_count_ptr,  # [] int64: the draws so far
    seed_keys_ptr,  # [B, 2] int32, contiguous: seeded rows' keys; read only when HAS_SEEDS
    is_seeded_ptr,  # [B] bool: the rows keyed by seed_keys; read only when HAS_SEEDS
    temperatures_ptr,  # [B] float32; read only when HAS_TEMPERATURES
    split_best_ptr,  # [B, num_splits] float32 out: each split's best raced score
    split_ids_ptr,  # [B, num_splits] int32 out: the first token id with it
    vocab_size,
    split_size,  # vocabulary entries per split, a multiple of BLOCK
    HAS_SEEDS: tl.constexpr,
    HAS_TEMPERATURES: tl.constexpr,  # scores are raw logits: divide by temperature, argmax where it is 0
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    # The row's two keys, as sampling/race.py's noise_keys() makes them: (engine keys, draw count, row) mixed,
    # or the row's own seed keys.
    draw = tl.load(draw_count_ptr).to(tl.int32).to(tl.uint32)
    key_a = _mix32(_mix32(draw ^ tl.load(engine_keys_ptr).to(tl.uint32)) + row.to(tl.uint32))
    key_b = _mix32(_mix32(draw ^ tl.load(engine_keys_ptr + 1).to(tl.uint32)) + row.to(tl.uint32))
    if HAS_SEEDS:
        is_seeded = tl.load(is_seeded_ptr + row)
        key_a = tl.where(is_seeded, tl.load(seed_keys_ptr + 2 * row).to(tl.uint32), key_a)
        key_b = tl.where(is_seeded, tl.load(seed_keys_ptr + 2 * row + 1).to(tl.uint32), key_b)
    temperature = 1.0
    is_greedy = False
    if HAS_TEMPERATURES:
        temperature = tl.load(temperatures_ptr + row)
        is_greedy = temperature == 0.0
        temperature = tl.maximum(temperature, MIN_TEMPERATURE)
    # Each of the BLOCK positions keeps its own best so far (no reduction inside the loop): position i sees
    # tokens split_start + i, + BLOCK, ..., in increasing order, so keeping a tie leaves the first such token.
    best = tl.full((BLOCK,), -float("inf"), tl.float32)
    best_id = tl.zeros((BLOCK,), tl.int32)
    split_start = split * split_size
    for start in range(split_start, tl.minimum(split_start + split_size, vocab_size), BLOCK):
        token_ids = start + tl.arange(0, BLOCK)
        in_vocab = token_ids < vocab_size
        score = tl.load(scores_ptr + row * stride_row + token_ids, mask=in_vocab, other=-float("inf")).to(tl.float32)
        bits = _mix32(_mix32(token_ids.to(tl.uint32) ^ key_a) + key_b)
        uniform = tl.minimum((bits.to(tl.float32) + 0.5) * HASH_SCALE, MAX_UNIFORM)
        complement = 1.0 - uniform  # E ~ Exp(1) = -log1p(-u), as the reference writes it out
        noise = tl.where(complement == 1.0, uniform, -tl.log(complement) * (uniform / (1.0 - complement)))
        raced = score / temperature - tl.log(noise)
        if HAS_TEMPERATURES:
            raced = tl.where(is_greedy, score, raced)
        raced = tl.where(in_vocab, raced, -float("inf"))
        is_better = raced > best
        best_id = tl.where(is_better, token_ids, best_id)
        best = tl.where(is_better, raced, best)
    top = tl.max(best, axis=0)
    num_splits = tl.num_programs(1)
    tl.store(split_best_ptr + row * num_splits + split, top)
    tl.store(split_ids_ptr + row * num_splits + split, tl.min(tl.where(best == top, best_id, vocab_size), axis=0))


@triton.jit
def _best_of_splits_kernel(split_best_ptr, split_ids_ptr, out_ptr, num_splits, vocab_size, BLOCK: tl.constexpr):
    """Per row: the largest of the splits' best scores, and the first token id that has it (as torch.argmax)."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK)
    in_row = splits < num_splits
    best = tl.load(split_best_ptr + row * num_splits + splits, mask=in_row, other=-float("inf"))
    best_id = tl.load(split_ids_ptr + row * num_splits + splits, mask=in_row, other=vocab_size)
    top = tl.max(best, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, best_id, vocab_size), axis=0).to(tl.int64))


def race_winners_triton(
    scores: torch.Tensor,
    engine_keys: torch.Tensor,
    draw_count: torch.Tensor,
    temperatures: torch.Tensor | None = None,
    seed_keys: torch.Tensor | None = None,
    is_seeded: torch.Tensor | None = None,
    num_splits: int | None = None,  # programs per row; by default enough to fill the GPU
) -> torch.Tensor:
    """Each row's race winner, [B] int64, with the noise keys that ``noise_keys(engine_keys, draw_count, B,
    seed_keys, is_seeded)`` gives (made in the kernel; the caller counts the draw). Without ``temperatures``,
    ``scores`` are already scaled; with them, they are raw logits: divided by each row's temperature, and
    taken by argmax where it is 0."""
    num_rows, vocab_size = scores.shape
    assert scores.stride(1) == 1, "each row's scores must be contiguous"
    num_blocks = triton.cdiv(vocab_size, BLOCK_V)
    if num_splits is None:
        num_splits = triton.cdiv(PROGRAMS_PER_SM * sm_count(scores.device), num_rows)
    num_splits = max(1, min(num_blocks, num_splits))
    split_size = triton.cdiv(num_blocks, num_splits) * BLOCK_V
    num_splits = triton.cdiv(vocab_size, split_size)  # none left empty
    split_best = torch.empty(num_rows, num_splits, dtype=torch.float32, device=scores.device)
    split_ids = torch.empty(num_rows, num_splits, dtype=torch.int32, device=scores.device)
    if seed_keys is None or is_seeded is None:
        seed_keys = is_seeded = engine_keys  # unused pointers, as temperatures' where there are none
        has_seeds = False
    else:
        seed_keys, has_seeds = seed_keys.contiguous(), True
    _race_kernel[(num_rows, num_splits)](
        scores,
        scores.stride(0),
        engine_keys,
        draw_count,
        seed_keys,
        is_seeded,
        engine_keys if temperatures is None else temperatures,
        split_best,
        split_ids,
        vocab_size,
        split_size,
        HAS_SEEDS=has_seeds,
        HAS_TEMPERATURES=temperatures is not None,
        BLOCK=BLOCK_V,
        num_warps=NUM_WARPS,
    )
    out = torch.empty(num_rows, dtype=torch.int64, device=scores.device)
    block = max(triton.next_power_of_2(num_splits), 16)
    _best_of_splits_kernel[(num_rows,)](split_best, split_ids, out, num_splits, vocab_size, BLOCK=block, num_warps=1)
    return out


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a few for the CPU (the Triton interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
