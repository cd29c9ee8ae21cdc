"""The exponential race, the last stage of sampling, in plain PyTorch: hashed noise and each row's winner.

The Triton kernels in ``sampling/triton_race.py`` compute the same thing without storing the noise;
this module is their reference and the path used on CPU.
"""

import functools
import struct
from collections.abc import Callable

import torch
import xxhash

DIGEST_AS_INT32S = struct.Struct(">ii")  # xxh64_digest's 8 bytes (big-endian) as two int32 values
MIN_TEMPERATURE = 1e-5  # temperatures below this would overflow the division; greedy rows are chosen separately
UINT32_MASK = 0xFFFFFFFF
# Odd multipliers of the 32-bit mixer, below 2**31 so that they are int32 constants.
MIX_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D)
HASH_SCALE = 2.0**-32  # (a 32-bit hash value + 0.5) times this is in (0, 1)
# The largest float32 below 1: a hash value that rounds up to 1.0 in float32 is drawn as this instead.
MAX_UNIFORM = 1.0 - 2.0**-24


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


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (xorshift-multiply rounds) on int32 tensors, read as uint32 bits.

    Why int32 and not int64 with masks: on a CPU the int64 version ran ten times slower. An int32 multiply
    wraps modulo 2**32, as a uint32 one does, and the right shifts are made logical by clearing the bits
    the sign filled in.
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
    # -log1p(-u), written out so that the Triton kernel (sampling/triton_race.py) can do the same ops:
    # 1 - u rounds, and u / (1 - rounded) corrects the log for it (exact where 1 - u rounds to 1).
    complement = 1.0 - uniform
    return torch.where(complement == 1.0, uniform, -torch.log(complement) * (uniform / (1.0 - complement)))
