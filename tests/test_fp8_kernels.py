"""The FP8 KV cache in the kernels: the torch reference's quantize-on-store / dequantize-on-read contract, and the
Triton store and attention kernels against it (on CPU through Triton's interpreter, TRITON_INTERPRET=1).

Scales here are not 1.0 and not powers of two, so a kernel that forgets one, applies it twice or divides where it
should multiply is caught; values run past the FP8 range, so a cast that overflows instead of saturating is too.
"""

import pytest
import torch
from test_triton_kernels import DEVICE, PREFILL_CASES, PagedBatch, assert_close, make_batch, nan_filled_empty

from nanovllm.kernels.backends import TorchBackend, TritonBackend
from nanovllm.kernels.reference import dequantize, paged_attention, quantize, store_kv
from nanovllm.kernels.triton_decode_attention import paged_decode_attention_triton
from nanovllm.kernels.triton_kv_store import store_kv_triton
from nanovllm.kernels.triton_prefill_attention import paged_prefill_attention_triton
from nanovllm.layers.attention import Attention
from nanovllm.utils.context import AttentionMetadata, attention_context

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
# A float32 query dots in float32; a bfloat16 one reads an FP8 cache through float16 dots (kernels/triton_attention.py).
QUERY_DTYPES = [torch.float32, torch.bfloat16]
K_SCALE, V_SCALE = 0.37, 2.9  # arbitrary, so every multiplication by a scale shows
# The store test's random values are spread this wide: past e4m3's 448 * K_SCALE, so some saturate.
SPREAD = 100.0
# The attention tests' K/V (before the scales) are N(0, 1) times this: well inside both formats' normal range,
# and small enough that float32 summation order stays inside the float32 tolerance.
ATTENTION_SPREAD = 3.0


def values_to_encode(dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Every finite value of the format, every midpoint between neighbours (ties), values past the largest and
    below the smallest subnormal, and random ones; all times ``scale``, so that x / scale hits them. [M] float32."""
    finite = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite = finite[finite.isfinite()].unique()  # sorted
    midpoints = (finite[1:] + finite[:-1]) / 2
    extremes = torch.tensor([1e9, -1e9, 1e-12, -1e-12, -0.0])
    randoms = torch.randn(256, generator=torch.Generator().manual_seed(0)) * SPREAD
    return torch.cat([finite, midpoints, extremes, randoms]) * scale


@pytest.mark.parametrize("dtype", FP8)
def test_triton_store_encodes_every_value_as_torch_rounds_it(dtype: torch.dtype) -> None:
    """Guards against the Triton store's own FP8 encoding rounding a tie the wrong way, mishandling subnormals,
    a carry into the exponent, or the sign, overflowing to inf/NaN instead of saturating, or skipping the scale:
    its bytes must equal torch's cast of clamp(x / scale) byte for byte (Triton's interpreter gets its own cast
    wrong, which the kernel does not use)."""
    num_kv_heads, head_dim = 8, 64  # one program per token: few programs for the interpreter to run
    values = values_to_encode(dtype, K_SCALE)
    values = torch.cat([values, values.new_zeros(-values.numel() % (num_kv_heads * head_dim))])
    key = values.view(-1, num_kv_heads, head_dim).to(DEVICE)  # [N, num_kv_heads, head_dim]
    value = -2 * key * V_SCALE / K_SCALE
    num_tokens = key.shape[0]
    slot_mapping = torch.tensor([5, 2, 1], device=DEVICE)[:num_tokens]
    caches = [torch.zeros(2, 4, num_kv_heads, head_dim, device=DEVICE).to(dtype) for _ in range(4)]
    store_kv(key, value, caches[0], caches[1], slot_mapping, K_SCALE, V_SCALE)
    store_kv_triton(key, value, caches[2], caches[3], slot_mapping, K_SCALE, V_SCALE)
    for name, want, got in [("k", caches[0], caches[2]), ("v", caches[1], caches[3])]:
        want_bytes, got_bytes = want.view(torch.uint8), got.view(torch.uint8)
        is_off = want_bytes != got_bytes
        assert not is_off.any(), (
            f"{name}: {is_off.sum().item()} bytes differ; reference {want[is_off][:4].float()}, "
            f"Triton {got[is_off][:4].float()}"
        )
        assert got.float().isfinite().all(), f"{name}: the cache holds inf/NaN: {got[~got.float().isfinite()][:4]}"


@pytest.mark.parametrize("dtype", FP8)
def test_reference_stores_scaled_saturated_values_and_reads_them_back(dtype: torch.dtype) -> None:
    """Guards against the reference (the oracle of every kernel) storing x instead of x / scale, overflowing
    instead of saturating, or reading stored values without the scale."""
    x = torch.tensor([1.0, -3.0, 1e6, -1e6]) * K_SCALE
    stored = quantize(x, K_SCALE, dtype)
    largest = torch.finfo(dtype).max
    assert stored.float().tolist() == [1.0, -3.0, largest, -largest], stored.float()
    read = dequantize(stored, K_SCALE, torch.float32)
    assert torch.allclose(read, torch.tensor([1.0, -3.0, largest, -largest]) * K_SCALE), read


def fp8_batch(
    dtype: torch.dtype, q_lens: list[int], case: tuple, query_dtype: torch.dtype = torch.float32
) -> PagedBatch:
    """make_batch's random cache, spread wide and stored in FP8 with the test's scales; NaN stays outside contexts.
    The query is in ``query_dtype``."""
    batch = make_batch(q_lens, *case, seed=4)
    k_cache, k_poisoned = (
        quantize(k * ATTENTION_SPREAD * K_SCALE, K_SCALE, dtype) for k in (batch.k_cache, batch.k_poisoned)
    )
    v_cache, v_poisoned = (
        quantize(v * ATTENTION_SPREAD * V_SCALE, V_SCALE, dtype) for v in (batch.v_cache, batch.v_poisoned)
    )
    return PagedBatch(
        query=batch.query.to(query_dtype), k_cache=k_cache, v_cache=v_cache, k_poisoned=k_poisoned,
        v_poisoned=v_poisoned, cu_seqlens_q=batch.cu_seqlens_q,
        context_lens=batch.context_lens, block_tables=batch.block_tables, max_seqlen_q=batch.max_seqlen_q,
        max_context_len=batch.max_context_len, sliding_window=batch.sliding_window,
    )  # fmt: skip


def reference_fp8_attention(batch: PagedBatch, scale: float) -> torch.Tensor:
    """The reference in float32 (its bfloat16 path rounds more than the kernels do), returned in the query's dtype."""
    return paged_attention(
        batch.query.float(), batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.max_seqlen_q, batch.context_lens,
        batch.max_context_len, batch.block_tables, scale, k_scale=K_SCALE, v_scale=V_SCALE,
    ).to(batch.query.dtype)  # fmt: skip


@pytest.mark.parametrize("query_dtype", QUERY_DTYPES)
@pytest.mark.parametrize("dtype", FP8)
def test_triton_prefill_reads_fp8_cache_as_reference(dtype: torch.dtype, query_dtype: torch.dtype) -> None:
    """Guards against the prefill kernel reading FP8 tiles wrongly (as bytes, without k_scale or v_scale) or
    reading the NaN codes outside the contexts, in float32 and in the float16 dots of a 16-bit query."""
    _, context_lens, *case = PREFILL_CASES["cached_prefixes"]
    batch = fp8_batch(dtype, [7, 1, 20, 3], (context_lens, *case), query_dtype)
    scale = batch.query.shape[-1] ** -0.5
    with nan_filled_empty():
        out = paged_prefill_attention_triton(
            batch.query, batch.k_poisoned, batch.v_poisoned, batch.cu_seqlens_q, batch.max_seqlen_q,
            batch.context_lens, batch.max_context_len, batch.block_tables, scale, k_scale=K_SCALE, v_scale=V_SCALE,
        )  # fmt: skip
    assert_close(out, reference_fp8_attention(batch, scale), query_dtype)


@pytest.mark.parametrize("query_dtype", QUERY_DTYPES)
@pytest.mark.parametrize("dtype", FP8)
def test_triton_decode_reads_fp8_cache_as_reference(dtype: torch.dtype, query_dtype: torch.dtype) -> None:
    """Guards against the split-KV decode kernel reading FP8 tiles wrongly, or applying v_scale to the partial
    results of some splits only (three splits here), in float32 and in the float16 dots of a 16-bit query."""
    batch = fp8_batch(dtype, [1, 1, 1], ([70, 9, 40], 4, 2, 32, 16), query_dtype)
    scale = batch.query.shape[-1] ** -0.5
    with nan_filled_empty():
        out = paged_decode_attention_triton(
            batch.query, batch.k_poisoned, batch.v_poisoned, batch.context_lens, batch.max_context_len,
            batch.block_tables, scale, 3, 1, k_scale=K_SCALE, v_scale=V_SCALE,
        )  # fmt: skip
    assert_close(out, reference_fp8_attention(batch, scale), query_dtype)


def test_attention_layer_passes_its_scales_to_every_backend() -> None:
    """Guards against the wiring between the attention layer and a backend dropping the scales bound with the
    cache (a prefill then a decode step, Triton against the torch reference on the same FP8 cache)."""
    num_heads, num_kv_heads, head_dim, block_size, prompt_len = 4, 2, 32, 16, 20
    gen = torch.Generator().manual_seed(5)
    qkv = (
        torch.randn(prompt_len + 1, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(DEVICE) * ATTENTION_SPREAD
    )
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    outputs = {}
    for backend in (TorchBackend(), TritonBackend()):
        layer = Attention(num_heads, num_kv_heads, head_dim, head_dim**-0.5, backend)
        cache = torch.zeros(2, 3, block_size, num_kv_heads, head_dim, device=DEVICE).to(torch.float8_e4m3fn)
        layer.bind_kv_cache(cache[0], cache[1], K_SCALE, V_SCALE)
        steps = [(0, prompt_len, True), (prompt_len, prompt_len + 1, False)]  # prefill 20 tokens, decode 1
        outputs[backend.name] = [run_step(layer, q, k, v, start, end, is_prefill) for start, end, is_prefill in steps]
    for want, got in zip(outputs["torch"], outputs["triton"], strict=True):
        assert_close(got, want, torch.float32)
    # The decode step by hand: one query over all 21 keys, as the cache stores and reads them.
    keys, values = (
        dequantize(quantize(x, s, torch.float8_e4m3fn), s, torch.float32) for x, s in [(k, K_SCALE), (v, V_SCALE)]
    )
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[-1:].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), scale=head_dim**-0.5, enable_gqa=True
    ).transpose(0, 1)  # [1, num_heads, head_dim]
    assert_close(outputs["torch"][1], expected, torch.float32)


def run_step(layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, end: int,
             is_prefill: bool) -> torch.Tensor:  # fmt: skip
    """One sequence's tokens start..end through the layer, its cache in blocks 1 and 2."""
    int32 = dict(dtype=torch.int32, device=DEVICE)
    block_size = layer.k_cache.shape[1]
    positions = torch.arange(start, end, device=DEVICE)
    metadata = AttentionMetadata(
        is_prefill=is_prefill, cu_seqlens_q=torch.tensor([0, end - start], **int32), max_seqlen_q=end - start,
        context_lens=torch.tensor([end], **int32), max_context_len=end,
        slot_mapping=block_size + positions, block_tables=torch.tensor([[1, 2]], **int32),
    )  # fmt: skip
    with attention_context(metadata):
        return layer(q[start:end], k[start:end], v[start:end])
