"""The logits pipeline against naive per-sequence references, sampled distributions, seeds and logprobs."""

import math
import random
import struct

import pytest
import torch
import xxhash

from nanovllm.runner.host_samples import HostSamples
from nanovllm.sampling.metadata import SamplingMetadataBuilder
from nanovllm.sampling.race import hash_keys
from nanovllm.sampling.sampler import (
    Sampler,
    SamplingTensors,
    apply_min_p,
    apply_penalties,
    apply_token_entries,
    apply_top_k_top_p,
    transform_logits,
)
from nanovllm.sampling_params import SamplingParams
from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.scheduler.sequence import Sequence

VOCAB = 64
EOS = 3
CPU = torch.device("cpu")
# One-sided normal quantile for a false-failure probability of 1e-6 per chi-square test.
Z_ONE_IN_A_MILLION = 4.753


def make_batch(params: list[SamplingParams], seed: int = 0, num_outputs: int = 5) -> ScheduledBatch:
    """A decode batch: each sequence has a random prompt and `num_outputs` random output tokens."""
    rng = random.Random(seed)
    seqs = []
    for p in params:
        seq = Sequence([rng.randrange(VOCAB) for _ in range(rng.randint(3, 9))], p)
        seq.token_ids += [rng.randrange(VOCAB) for _ in range(num_outputs)]
        seq.num_computed_tokens = seq.num_tokens - 1
        seqs.append(seq)
    return ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False)


def builder() -> SamplingMetadataBuilder:
    return SamplingMetadataBuilder(max_num_seqs=16, vocab_size=VOCAB, device=CPU, eos_token_ids={EOS})


def chi2_critical(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at 1 - 1e-6."""
    return df * (1 - 2 / (9 * df) + Z_ONE_IN_A_MILLION * math.sqrt(2 / (9 * df))) ** 3


def test_penalties_equal_reference() -> None:
    """Guards against penalties on the wrong tokens (prompt vs output), the wrong sign, or another row's counts."""
    params = [
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(frequency_penalty=0.9, presence_penalty=-0.4),
        SamplingParams(),  # no penalty, batched with the others
        SamplingParams(repetition_penalty=0.6, frequency_penalty=-1.2, presence_penalty=1.5),
    ]
    batch = make_batch(params, num_outputs=12)
    logits = torch.randn(len(params), VOCAB) * 3
    t = builder().build(batch)
    assert t.penalties is not None
    got = apply_penalties(logits, t.penalties)
    expected = logits.clone()
    for row, seq in enumerate(batch.seqs):
        p = seq.params
        outputs = seq.output_token_ids
        for token in set(seq.token_ids):
            value = expected[row, token]
            expected[row, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(outputs):
            expected[row, token] -= p.frequency_penalty * outputs.count(token) + p.presence_penalty
    torch.testing.assert_close(got, expected)


def test_penalty_counts_stay_in_sync_over_steps() -> None:
    """Guards against device-side output counts that drift from the sequence's tokens (missed or double counts)."""
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams(temperature=0.0, presence_penalty=0.5)]
    batch = make_batch(params, num_outputs=0)
    b = builder()
    sampler = Sampler()
    for _ in range(6):
        output = sampler(torch.randn(2, VOCAB), b.build(batch))
        b.record(output)
        for seq, token_id in zip(batch.seqs, output.token_ids.tolist(), strict=True):
            seq.token_ids.append(token_id)
            seq.num_computed_tokens += 1
    table = b.penalty_table
    assert table.output_counts is not None
    for seq in batch.seqs:
        row = table.row_of[seq.seq_id]
        expected = torch.bincount(torch.tensor(seq.output_token_ids), minlength=VOCAB).int()
        assert torch.equal(table.output_counts[row], expected), (seq.output_token_ids, table.output_counts[row])


def test_logit_bias_and_min_tokens_equal_reference() -> None:
    """Guards against a bias on the wrong row, and EOS/stop ids not masked (or masked too long) under min_tokens."""
    params = [
        SamplingParams(logit_bias={1: 5.0, 7: -100.0}),
        SamplingParams(min_tokens=10, stop_token_ids=[9, 11]),  # 5 outputs so far: masked
        SamplingParams(min_tokens=5, stop_token_ids=[9]),  # exactly reached: not masked
        SamplingParams(min_tokens=10, ignore_eos=True, logit_bias={9: 2.0}),  # EOS not masked under ignore_eos
    ]
    batch = make_batch(params)
    logits = torch.randn(len(params), VOCAB)
    t = builder().build(batch)
    assert t.logit_edits is not None
    got = apply_token_entries(logits, t.logit_edits)
    expected = logits.clone()
    for row, seq in enumerate(batch.seqs):
        p = seq.params
        for token, bias in (p.logit_bias or {}).items():
            expected[row, token] += bias
        if seq.num_output_tokens < p.min_tokens:
            for token in set(p.stop_token_ids or []) | ({EOS} if not p.ignore_eos else set()):
                expected[row, token] = -math.inf
    torch.testing.assert_close(got, expected)


def test_min_p_equals_reference() -> None:
    """Guards against min_p measured against the wrong maximum or in the wrong space (logits vs probabilities)."""
    min_ps = [0.0, 0.05, 0.3, 1.0]
    logits = torch.randn(len(min_ps), VOCAB) * 2
    got = apply_min_p(logits, torch.tensor(min_ps))
    for row, min_p in enumerate(min_ps):
        probs = torch.softmax(logits[row], -1)
        keep = probs >= min_p * probs.max()
        assert torch.equal(got[row].isfinite(), keep), (min_p, got[row], probs)


def reference_top_k_top_p(row: list[float], top_k: int, top_p: float) -> set[int]:
    """Naive: keep values >= the k-th largest; then, by rank, tokens until the mass above reaches top_p; ties kept."""
    ranked = sorted(row, reverse=True)
    kth = ranked[min(top_k, len(row)) - 1] if top_k > 0 else ranked[-1]
    kept = [v for v in ranked if v >= kth]
    weights = [math.exp(v - kept[0]) for v in kept]
    total = sum(weights)
    mass_above = 0.0
    cut = kept[0]
    for value, w in zip(kept, weights, strict=True):
        if mass_above >= top_p and top_p < 1.0:
            break
        cut = value
        mass_above += w / total
    return {i for i, v in enumerate(row) if v >= cut}


@pytest.mark.parametrize("with_ties", [False, True])
@pytest.mark.parametrize("all_rows_top_k", [False, True])
def test_top_k_top_p_equal_reference(with_ties: bool, all_rows_top_k: bool) -> None:
    """Guards against an off-by-one at the top-k or top-p boundary token, ties split arbitrarily, and the
    topk-only shortcut (every row has a top_k) disagreeing with the full sort."""
    gen = torch.Generator().manual_seed(1)
    settings = [(1, 1.0), (5, 1.0), (64, 0.5), (3, 0.9), (20, 0.3), (7, 0.999)]
    if not all_rows_top_k:
        settings += [(0, 0.7), (0, 0.1), (0, 1.0)]
    logits = torch.randn(len(settings), VOCAB, generator=gen) * 2
    if with_ties:
        logits = (logits * 2).round() / 2  # many exact ties, including at the boundaries
    top_ks = torch.tensor([k if k > 0 else VOCAB for k, _ in settings])
    top_ps = torch.tensor([p for _, p in settings])
    max_top_k = max(k for k, _ in settings) if all_rows_top_k else None
    got = apply_top_k_top_p(logits, top_ks, top_ps, max_top_k)
    for row, (k, p) in enumerate(settings):
        kept = set(got[row].isfinite().nonzero().flatten().tolist())
        assert kept == reference_top_k_top_p(logits[row].tolist(), k, p), (k, p, logits[row])
        assert torch.equal(got[row][got[row].isfinite()], logits[row][got[row].isfinite()])


def expected_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Reference probabilities: temperature, then min_p, top-k, top-p masks, renormalized."""
    scaled = logits / p.temperature
    probs = torch.softmax(scaled, -1)
    keep = probs >= p.min_p * probs.max()
    kept_top = reference_top_k_top_p(scaled.masked_fill(~keep, -math.inf).tolist(), p.top_k, p.top_p)
    mask = torch.zeros_like(keep)
    mask[list(kept_top)] = True
    probs = probs * (keep & mask)
    return probs / probs.sum()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=4),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.1),
        SamplingParams(temperature=1.1, top_k=6, top_p=0.9, min_p=0.02),
        SamplingParams(temperature=1.0, top_p=0.9, seed=7),  # the seeded noise must be Exp(1) too
    ],
    ids=["temperature", "top_k", "top_p", "min_p", "all", "seeded"],
)
def test_sampled_frequencies_match_distribution(params: SamplingParams) -> None:
    """Guards against a biased draw: frequencies over many rows must pass a chi-square test."""
    vocab, num_draws = 8, 20000
    torch.manual_seed(0)
    row = torch.randn(vocab) * 1.5
    draw_params = [
        SamplingParams(**{**params.__dict__, "seed": None if params.seed is None else params.seed + i})
        for i in range(num_draws)
    ]
    seqs = [Sequence([0], p) for p in draw_params]
    batch = ScheduledBatch(seqs, [1] * num_draws, is_prefill=True)
    b = SamplingMetadataBuilder(max_num_seqs=num_draws, vocab_size=vocab, device=CPU)
    token_ids = Sampler()(row.expand(num_draws, vocab), b.build(batch)).token_ids
    expected = expected_distribution(row, params) * num_draws
    observed = torch.bincount(token_ids, minlength=vocab).float()
    assert observed[expected == 0].sum() == 0, f"masked tokens were drawn: {observed} vs {expected}"
    support = expected > 0
    stat = float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())
    df = int(support.sum()) - 1
    limit = chi2_critical(df) if df > 0 else 0.0
    assert stat <= limit, (
        f"chi-square {stat:.1f} > {limit:.1f} (df={df}); a correct sampler fails this with probability 1e-6 "
        f"(fixed seeds make it deterministic); observed {observed.tolist()} expected {expected.tolist()}"
    )


def chi_square_within_limit(token_ids: torch.Tensor, expected: torch.Tensor) -> tuple[bool, str]:
    """Whether the counts of ``token_ids`` fit ``expected`` (counts per token) at a false-failure rate of 1e-6."""
    observed = torch.bincount(token_ids, minlength=expected.numel()).float()
    stat = float(((observed - expected) ** 2 / expected).sum())
    limit = chi2_critical(expected.numel() - 1)
    return stat <= limit, f"chi-square {stat:.1f} > {limit:.1f}; observed {observed.tolist()}"


def test_unseeded_draws_differ_from_draw_to_draw() -> None:
    """Guards the draw count: one row drawn again and again must follow its distribution (noise that did not
    change between draws would give one token every time), and greedy-only batches must not count a draw."""
    vocab, num_draws = 6, 6000
    torch.manual_seed(1)
    row = torch.randn(1, vocab)
    sampler = Sampler(seed=5)
    sampled = builder().build(make_batch([SamplingParams(temperature=1.0)]))
    greedy = builder().build(make_batch([SamplingParams(temperature=0.0)]))
    token_ids = []
    for _ in range(num_draws):
        sampler(row, greedy)
        token_ids.append(sampler(row, sampled).token_ids)
    assert int(sampler.draw_count) == num_draws
    ok, message = chi_square_within_limit(torch.cat(token_ids), torch.softmax(row[0], -1) * num_draws)
    assert ok, message


def test_unseeded_rows_draw_independently() -> None:
    """Guards the rows' noise keys: two rows of one batch with the same logits must draw independent tokens,
    so their pairs must follow the product distribution (noise shared by rows would pair equal tokens)."""
    vocab, num_draws = 4, 8000
    torch.manual_seed(2)
    row = torch.randn(vocab)
    sampler = Sampler(seed=9)
    t = builder().build(make_batch([SamplingParams(temperature=1.0)] * 2))
    pairs = torch.stack([sampler(row.expand(2, vocab), t).token_ids for _ in range(num_draws)])  # [num_draws, 2]
    probs = torch.softmax(row, -1)
    ok, message = chi_square_within_limit(
        pairs[:, 0] * vocab + pairs[:, 1], torch.outer(probs, probs).flatten() * num_draws
    )
    assert ok, message


def test_warm_up_leaves_the_draws_as_they_were() -> None:
    """Guards the draw count across the sampler's warm-up: the engine's first draws must be the same with
    or without it (it runs only where torch.compile is on)."""
    logits = torch.zeros(16, VOCAB)  # flat: the noise alone picks each token
    t = builder().build(make_batch([SamplingParams(temperature=1.0)] * 16))
    warmed = Sampler(seed=3)
    warmed.warm_up(VOCAB, torch.float32, CPU)
    assert int(warmed.draw_count) == 0
    assert torch.equal(warmed(logits, t).token_ids, Sampler(seed=3)(logits, t).token_ids)


def test_engine_seed_decides_unseeded_draws() -> None:
    """Guards the engine keys: the same engine seed draws the same tokens, another seed others."""
    logits = torch.zeros(16, VOCAB)  # flat: the noise alone picks each token
    t = builder().build(make_batch([SamplingParams(temperature=1.0)] * 16))
    first = Sampler(seed=3)(logits, t).token_ids
    assert torch.equal(Sampler(seed=3)(logits, t).token_ids, first)
    assert not torch.equal(Sampler(seed=4)(logits, t).token_ids, first)


@pytest.mark.parametrize(
    "extra",
    [{}, {"seed": 11}, {"top_k": 5, "top_p": 0.9, "repetition_penalty": 1.2}],
    ids=["temperature", "seeded", "transformed"],
)
def test_triton_race_equals_torch_race(extra: dict) -> None:
    """Guards the sampler's wiring of the Triton race (the short path with temperatures, the transformed
    path with scaled scores): the same draws as the torch race, greedy rows included, draw after draw."""
    params = [SamplingParams(temperature=0.0 if i % 3 == 0 else 0.8, **extra) for i in range(6)]
    batch = make_batch(params)
    samplers = {triton: Sampler(seed=2, triton_race=triton) for triton in (False, True)}
    for step in range(3):
        logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(step))
        tokens = {triton: sampler(logits, builder().build(batch)).token_ids for triton, sampler in samplers.items()}
        assert tokens[True].tolist() == tokens[False].tolist(), f"step {step}"


def test_top_k_1_equals_greedy() -> None:
    """Guards against top_k=1 leaving more than the argmax in play."""
    logits = torch.randn(32, VOCAB)
    batch = make_batch([SamplingParams(temperature=1.5, top_k=1)] * 32)
    tokens = Sampler()(logits, builder().build(batch)).token_ids
    assert torch.equal(tokens, logits.argmax(-1))


def test_greedy_rows_take_argmax_after_bias_and_penalties() -> None:
    """Guards against greedy rows skipping logit_bias (vLLM applies it before the argmax)."""
    logits = torch.zeros(2, VOCAB)
    params = [SamplingParams(temperature=0.0, logit_bias={17: 1.0}), SamplingParams(temperature=0.0, top_p=0.5)]
    t = builder().build(make_batch(params))
    assert transform_logits(logits, t)[1].tolist() == [17, 0]


def test_logprobs_are_raw_log_softmax() -> None:
    """Guards against logprobs taken after temperature/penalties, or a sampled logprob of another token."""
    params = [
        SamplingParams(logprobs=3, temperature=0.5, repetition_penalty=1.5),
        SamplingParams(),
        SamplingParams(logprobs=0),
    ]
    batch = make_batch(params)
    logits = torch.randn(3, VOCAB)
    b = builder()
    output = Sampler()(logits, b.build(batch))
    samples = HostSamples.copy_from(output, None).wait(batch.seqs)
    reference = torch.log_softmax(logits, -1)
    top = reference[0].topk(3)
    expected = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    token = samples.token_ids[0]
    expected[token] = reference[0, token].item()
    assert samples.top_logprobs[0] == pytest.approx(expected), (samples.top_logprobs[0], expected)
    assert samples.sampled_logprobs[0] == pytest.approx(reference[0, token].item())
    assert samples.top_logprobs[1] is None and samples.sampled_logprobs[1] is None
    assert samples.top_logprobs[2] == pytest.approx({samples.token_ids[2]: reference[2, samples.token_ids[2]].item()})


@pytest.mark.parametrize("values", [(0,), (-5,), ((1 << 64) - 1, 3, 1000), (1234, 0, 17)])
def test_hash_keys_are_the_digest_halves_as_int32(values: tuple[int, ...]) -> None:
    """Guards the keys a seed names (so seeded draws stay as they were): the xxh64 digest of the values as
    uint64 (a negative seed taken modulo 2**64), its low 32 bits then its high 32 bits, each read as int32."""
    digest = xxhash.xxh64_intdigest(struct.pack(f"<{len(values)}Q", values[0] % (1 << 64), *values[1:]))
    as_int32 = [half - (1 << 32) if half >= 1 << 31 else half for half in (digest & 0xFFFFFFFF, digest >> 32)]
    assert hash_keys(*values) == tuple(as_int32)


def test_seeded_rows_ignore_batch_mates_and_order() -> None:
    """Guards against seeded noise that depends on the row index, the batch size or the engine seed."""
    seeded = SamplingParams(temperature=1.0, seed=1234, top_p=0.95)
    logits_row = torch.randn(VOCAB) * 0.1  # nearly flat: any change of noise changes the token
    draws = []
    for num_mates, position in ((0, 0), (5, 3), (9, 9)):
        params = [SamplingParams(temperature=1.0)] * num_mates
        params.insert(position, seeded)
        batch = make_batch(params, seed=num_mates)
        logits = torch.randn(len(params), VOCAB)
        logits[position] = logits_row
        batch.seqs[position].token_ids[batch.seqs[position].num_prompt_tokens :] = [1, 2, 3, 4, 5]
        sampler = Sampler(seed=num_mates)
        draws.append(sampler(logits, builder().build(batch)).token_ids[position].item())
    assert len(set(draws)) == 1, draws


def test_sampling_params_validation() -> None:
    """Guards against out-of-range settings reaching the sampler; each error names the field."""
    bad = {
        "n": 0,
        "temperature": -0.1,
        "top_p": 0.0,
        "top_k": -2,
        "min_p": 1.5,
        "presence_penalty": 2.5,
        "frequency_penalty": -3.0,
        "repetition_penalty": 0.0,
        "max_tokens": 0,
        "min_tokens": -1,
        "logprobs": -1,
        "stop": [""],
        "stop_token_ids": [-1],
        "logit_bias": {5: 101.0},
        "seed": 1.5,
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: value})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(n=2, temperature=0.0)
    assert SamplingParams(top_k=-1).top_k_or_none is None and SamplingParams(top_k=0).top_k_or_none is None
    assert SamplingParams(stop="x").stop_strings == ("x",)


def test_reused_decode_tensors_follow_min_tokens_and_batch_changes() -> None:
    """Guards against the decode-step reuse of sampling tensors keeping a min_tokens mask after the row
    reached min_tokens, or serving one batch's tensors to a different batch."""
    builder = SamplingMetadataBuilder(max_num_seqs=4, vocab_size=VOCAB, device=CPU, eos_token_ids={EOS})
    held = SamplingParams(temperature=0.5, min_tokens=7)
    free = SamplingParams(temperature=0.9)
    seqs = [Sequence([1, 2, 3], held), Sequence([4, 5], free)]
    for seq in seqs:
        seq.token_ids += [6] * 5  # 5 outputs: the first row is 2 short of its min_tokens
        seq.num_computed_tokens = len(seq.token_ids) - 1

    def decode_step() -> tuple[SamplingTensors, ScheduledBatch]:
        batch = ScheduledBatch(list(seqs), [1] * len(seqs), is_prefill=False)
        return builder.build(batch), batch

    first, _ = decode_step()
    assert first.logit_edits is not None and first.logit_edits.rows.tolist() == [0]  # EOS masked on row 0
    for seq in seqs:
        seq.token_ids.append(6)
        seq.num_computed_tokens += 1
    assert decode_step()[0] is first, "same batch, same masking: the tensors are reused"
    for seq in seqs:
        seq.token_ids.append(6)  # 7 outputs: row 0 reached its min_tokens
        seq.num_computed_tokens += 1
    released, _ = decode_step()
    assert released is not first and released.logit_edits is None
    seqs.reverse()  # another batch (the same sequences in other rows)
    reordered, _ = decode_step()
    assert reordered is not released and reordered.temperatures.tolist() == pytest.approx([0.9, 0.5])


def test_penalty_row_never_rebuilt_from_a_pending_token() -> None:
    """Guards the penalty table's invariant under scheduling ahead: a row rebuilt from a sequence whose newest
    token is still on the device would miss that token's count, so it must fail loudly instead."""
    batch = make_batch([SamplingParams(repetition_penalty=1.2)])
    batch.seqs[0].num_pending_tokens = 1
    with pytest.raises(RuntimeError, match="pending"):
        builder().build(batch)
