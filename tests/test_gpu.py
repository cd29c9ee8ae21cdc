"""Whole-engine checks of the GPU fast path. Skipped without CUDA; run on the GPU machine."""

import asyncio
import dataclasses
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.kernels.backends import is_flash_attn_installed
from nanovllm.runner.host_samples import NUM_TOKEN_BUFFERS, HostSamples, TokenRing
from nanovllm.runner.model_inputs import build_model_inputs
from nanovllm.sampling import triton_race
from nanovllm.sampling.sampler import SamplerOutput
from nanovllm.scheduler.batch import ScheduledBatch
from nanovllm.scheduler.sequence import Sequence
from nanovllm.serving.async_llm import AsyncLLM
from tests.test_async_scheduling import step_until_done

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
ARGS = dict(device="cuda", kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=512, max_num_seqs=24)


def prompts(num: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(400) for _ in range(rng.randint(1, 150))] for _ in range(num)]


def greedy_tokens(model_dir: Path, **args: object) -> list[list[int]]:
    batch = prompts(20)
    with LLM(str(model_dir), **{**ARGS, **args}) as llm:
        first = llm.generate(batch[:4], GREEDY, use_tqdm=False)  # later prompts share nothing, but decode
        rest = llm.generate(batch[4:] + batch[:2], GREEDY, use_tqdm=False)  # ... and these hit the cache
        return [out.token_ids for out in first + rest]


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
def test_triton_equals_torch_in_float32(tiny_models: dict[str, Path], arch: str) -> None:
    """Guards against the Triton kernels computing a different function than the reference on the GPU."""
    torch_tokens = greedy_tokens(tiny_models[arch], dtype="float32", attention_backend="torch", enforce_eager=True)
    triton_tokens = greedy_tokens(tiny_models[arch], dtype="float32", attention_backend="triton", enforce_eager=True)
    assert triton_tokens == torch_tokens


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_equal_eager(tiny_models: dict[str, Path], dtype: str) -> None:
    """Guards against stale or misplaced static inputs when decode graphs are replayed (padding lanes too)."""
    eager = greedy_tokens(tiny_models["qwen3"], dtype=dtype, attention_backend="triton", enforce_eager=True)
    graphs = greedy_tokens(tiny_models["qwen3"], dtype=dtype, attention_backend="triton", enforce_eager=False)
    assert graphs == eager


def test_cuda_graphs_equal_eager_under_preemption(tiny_models: dict[str, Path]) -> None:
    """Guards the graph staging's in-place update for an unchanged batch: a sequence preempted and
    recomputed (its blocks re-allocated) must not replay with its old block-table row."""
    tokens, preemptions = {}, {}
    for eager in (True, False):
        args = {**ARGS, "num_kvcache_blocks": 24, "max_model_len": 256}  # 384 slots for 16 prompts: preemption
        with LLM(str(tiny_models["qwen3"]), dtype="float32", enforce_eager=eager, **args) as llm:
            outputs = llm.generate(prompts(16, seed=5), GREEDY, use_tqdm=False)
            assert llm.engine is not None
            tokens[eager], preemptions[eager] = [o.token_ids for o in outputs], llm.engine.scheduler.num_preemptions
    assert preemptions[False] > 0, "the test needs preemption"
    assert tokens[False] == tokens[True]


def test_scheduling_ahead_equals_in_turn_with_graphs(tiny_models: dict[str, Path]) -> None:
    """Guards the device-side feed of pending tokens into the decode graphs (PendingTokens, last_sampled), the
    pinned staging buffers refilled while the previous step may still copy from them, and rows wasted on
    sequences that a stop token ended."""
    batch = prompts(20, seed=9)
    with LLM(str(tiny_models["qwen3"]), dtype="float32", async_scheduling=False, **ARGS) as llm:
        plain = llm.generate(batch, GREEDY, use_tqdm=False)
        stops = [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[o.token_ids[5]]) for o in plain]
        expected = [(o.token_ids, o.finish_reason) for o in llm.generate(batch, stops, use_tqdm=False)]
    assert sum(reason == "stop" for _, reason in expected) >= 5, "the test needs rows ended by stop tokens"
    with LLM(str(tiny_models["qwen3"]), dtype="float32", async_scheduling=True, **ARGS) as llm:
        assert [o.token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)] == [o.token_ids for o in plain]
        assert [(o.token_ids, o.finish_reason) for o in llm.generate(batch, stops, use_tqdm=False)] == expected


def test_step_ahead_equals_step_with_graphs(tiny_models: dict[str, Path]) -> None:
    """Guards the server's loop on CUDA (LLMEngine.step, scheduling ahead): decode graphs fed the pending tokens,
    sampling graphs for greedy and temperature rows, eager rich sampling, a request joining and one aborted
    mid-run, against steps run in turn."""
    batch = prompts(9, seed=12)
    with LLM(str(tiny_models["qwen3"]), dtype="float32", async_scheduling=False, **ARGS) as llm:
        engine = llm.engine
        assert engine is not None and engine.runner.decode_graphs is not None
        stop_tokens = [out.token_ids[4] for out in llm.generate(batch, GREEDY, use_tqdm=False)]
        params = [
            SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_tokens[i]]) if i % 3 == 0
            else SamplingParams(temperature=0.8, seed=i, max_tokens=18, ignore_eos=True) if i % 3 == 1
            else SamplingParams(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=i, max_tokens=16)
            for i in range(len(batch))
        ]  # fmt: skip
        params[2] = GREEDY  # the request aborted mid-run: still running then
        expected = step_until_done(engine, engine.step, batch, params)
    with LLM(str(tiny_models["qwen3"]), dtype="float32", **ARGS) as llm:
        engine = llm.engine
        assert engine is not None and engine.schedules_ahead
        got = step_until_done(engine, engine.step, batch, params)
    assert sum(value[3] == "stop" for value in expected.values()) >= 2, "the test needs rows ended by stop tokens"
    assert {key: (value[0], value[3]) for key, value in got.items()} == {
        key: (value[0], value[3]) for key, value in expected.items()
    }


def test_graph_input_copy_waited_for_before_restaging(tiny_models: dict[str, Path]) -> None:
    """Guards the event each decode graph records after copying its inputs out of the pinned buffer. The
    device is held back ~1 ms before every replay, so the host, a step ahead, restages the buffer while the
    graph before has not copied it yet: unless the host waits for that event, the graph reads the wrong step."""
    batch = prompts(12, seed=8)
    with LLM(str(tiny_models["qwen3"]), dtype="float32", async_scheduling=False, **ARGS) as llm:
        expected = [out.token_ids for out in llm.generate(batch, GREEDY, use_tqdm=False)]
    with LLM(str(tiny_models["qwen3"]), dtype="float32", async_scheduling=True, **ARGS) as llm:
        assert llm.engine is not None and llm.engine.runner.decode_graphs is not None
        for graph in llm.engine.runner.decode_graphs.graphs.values():
            graph.replay = held_back(graph.replay)  # type: ignore[method-assign]
        assert [out.token_ids for out in llm.generate(batch, GREEDY, use_tqdm=False)] == expected


def test_graph_token_buffers_read_before_reuse(tiny_models: dict[str, Path]) -> None:
    """Guards the token ring's buffers the sampling graphs copy their tokens into by turns: a third step
    launched while the first one's samples are unread must read them before its replay overwrites them."""
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    with LLM(str(tiny_models["qwen3"]), dtype="float32", **ARGS) as llm:
        engine = llm.engine
        assert engine is not None and engine.runner.decode_graphs is not None
        for prompt in prompts(6, seed=10):
            engine.add_request(prompt, params, stream_text=False)
        while engine.scheduler.waiting:
            engine.step()  # prefill
        batch = engine.scheduler.schedule()
        t = engine.runner.sampling.build(batch)
        graphs = engine.runner.decode_graphs
        launched, drawn = [], []
        for _ in range(3):  # the same step thrice, each drawing new noise; none read before the third
            launched.append(graphs.run_and_sample(batch, None, t))
            drawn.append(graphs.last_sampled[: len(batch.seqs)].clone())  # queued after the replay
        torch.cuda.synchronize()
        assert [s.wait(batch.seqs).token_ids for s in launched] == [d.tolist() for d in drawn]
        assert drawn[0].tolist() != drawn[2].tolist(), "the test needs steps that drew different tokens"


def held_back(replay: Callable[[], None]) -> Callable[[], None]:
    """``replay`` behind ~1 ms of device work queued before it (a GPU spin of 2M cycles)."""

    def delayed() -> None:
        torch.cuda._sleep(2_000_000)
        replay()

    return delayed


def test_engine_process_on_gpu_matches_generate(tiny_models: dict[str, Path]) -> None:
    """Guards the server's --engine-process on CUDA: a spawned process that initializes CUDA, captures graphs
    and streams through pipes must give generate()'s greedy tokens."""
    batch = prompts(8, seed=5)
    with LLM(str(tiny_models["qwen3"]), dtype="float32", **ARGS) as llm:
        expected = [out.token_ids for out in llm.generate(batch, GREEDY, use_tqdm=False)]

    async def stream_all(async_llm: AsyncLLM) -> list[list[int]]:
        streams = [await async_llm.add_requests([prompt], [GREEDY]) for prompt in batch]
        token_ids: list[list[int]] = [[] for _ in batch]
        for i, stream in enumerate(streams):
            async for _, out in stream:
                token_ids[i] += out.new_token_ids
        return token_ids

    async_llm = AsyncLLM.from_engine_args(str(tiny_models["qwen3"]), engine_process=True, dtype="float32", **ARGS)
    try:
        assert asyncio.run(stream_all(async_llm)) == expected
    finally:
        async_llm.shutdown()


def test_rich_sampling_on_gpu_matches_cpu(tiny_models: dict[str, Path]) -> None:
    """Guards against the compiled sampler (CUDA) computing another pipeline than the eager one (CPU), and
    against CUDA graphs or the penalty table breaking seeded draws: seeded noise is a hash of (seed, position,
    token), the same on every device, so float32 runs must pick the same tokens."""
    params = [
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=7, max_tokens=24),
        SamplingParams(n=2, temperature=1.0, min_p=0.05, frequency_penalty=0.5, seed=3, max_tokens=24),
        SamplingParams(temperature=0.7, top_p=0.8, presence_penalty=0.3, seed=11, max_tokens=24, logprobs=2),
    ]
    batch = [p[:40] for p in prompts(3, seed=2)]

    def completions(**args: object) -> list[list[list[int]]]:
        with LLM(str(tiny_models["qwen3"]), dtype="float32", **{**ARGS, **args}) as llm:
            return [[c.token_ids for c in out.outputs] for out in llm.generate(batch, params, use_tqdm=False)]

    cpu = completions(device="cpu", attention_backend="torch")
    eager = completions(enforce_eager=True)
    graphs = completions(enforce_eager=False)
    assert eager == cpu, f"CUDA eager {eager} != CPU {cpu}"
    assert graphs == eager, f"CUDA graphs {graphs} != eager {eager}"


def sampled_tokens(model_dir: Path, batch: list[list[int]], params: object, **args: object) -> list[list[int]]:
    with LLM(str(model_dir), dtype="float32", **{**ARGS, **args}) as llm:
        return [out.token_ids for out in llm.generate(batch, params, use_tqdm=False)]  # type: ignore[arg-type]


@pytest.mark.parametrize("num_rows", [8, 5])
def test_graph_sampling_equals_eager(tiny_models: dict[str, Path], num_rows: int) -> None:
    """Guards the sampling graphs' noise: each replay must advance the sampler's draw count as an eager draw
    does (a graph that replays its capture-time noise diverges), and the warm-up draws of capture must not
    move it. Graphs and eager then draw the same noise, so the same tokens, in a full bucket (8 rows in
    bucket 8) and a padded one (5 rows in bucket 8: a row's noise must not depend on the padding)."""
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    batch = prompts(num_rows, seed=3)
    graphs = sampled_tokens(tiny_models["qwen3"], batch, params, enforce_eager=False)
    eager = sampled_tokens(tiny_models["qwen3"], batch, params, enforce_eager=True)
    assert graphs == eager


def test_greedy_rows_among_sampled_rows_in_graphs(tiny_models: dict[str, Path]) -> None:
    """Guards the sampling graphs' temperatures, copied in only when the batch changes: rows finishing at
    different steps shift the lanes, and a greedy row left with a stale temperature would draw at random."""
    batch = prompts(12, seed=4)
    greedy = [SamplingParams(temperature=0.0, max_tokens=8 + 2 * i, ignore_eos=True) for i in range(12)]
    mixed = [p if i % 2 == 0 else dataclasses.replace(p, temperature=1.0) for i, p in enumerate(greedy)]
    alone = sampled_tokens(tiny_models["qwen3"], batch, greedy)
    together = sampled_tokens(tiny_models["qwen3"], batch, mixed)
    assert together[0::2] == alone[0::2]
    assert together[1::2] != alone[1::2], "the sampled rows should not all have drawn their greedy tokens"


def test_graph_sampling_follows_the_engine_seed(tiny_models: dict[str, Path]) -> None:
    """Guards the noise keys of the sampling graphs: the engine's seed must decide their draws (the same seed,
    the same tokens; another seed, others), at padded buckets too (5 rows in bucket 8)."""
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    batch = prompts(5, seed=6)
    first = sampled_tokens(tiny_models["qwen3"], batch, params, seed=1)
    assert sampled_tokens(tiny_models["qwen3"], batch, params, seed=1) == first
    assert sampled_tokens(tiny_models["qwen3"], batch, params, seed=2) != first


def test_token_ring_reads_unread_samples_before_reuse() -> None:
    """Guards the pinned ring that sampled token ids land in: a buffer whose tokens were not read yet must have
    them read before it is handed out again (the next copy overwrites it); dropped unread, it is reused as is."""
    ring = TokenRing(max_num_rows=8)

    def launch(first_token: int) -> HostSamples:
        token_ids = torch.arange(first_token, first_token + 8, device="cuda")
        return HostSamples.copy_from(SamplerOutput(token_ids, None, None, None), ring)

    held = [launch(10 * i) for i in range(NUM_TOKEN_BUFFERS)]
    reused = launch(100)  # buffer 0 again, while held[0] is unread
    assert held[0].wait([]).token_ids == list(range(8)), "the first step's tokens were overwritten"
    assert held[0].wait([]).token_ids == list(range(8)), "a second wait() must give the tokens it read"
    del held[1]  # dropped unread: its buffer is simply reused
    again = launch(200)
    assert reused.wait([]).token_ids == list(range(100, 108)) and again.wait([]).token_ids == list(range(200, 208))


SAMPLER_CONFIGS = {
    "top_p_only": dict(top_p=0.9),
    "top_k_only": dict(top_k=50),
    "top_k_top_p_rep": dict(top_k=50, top_p=0.95, repetition_penalty=1.1),
    "min_p_freq": dict(min_p=0.05, frequency_penalty=0.4, presence_penalty=0.2),
    "bias_min_tokens": dict(logit_bias={5: 3.0, 7: -100.0}, min_tokens=10),
}


@pytest.mark.parametrize("config", SAMPLER_CONFIGS)
def test_compiled_sampler_full_vocab(config: str) -> None:
    """Guards against Inductor failing or miscompiling the pipeline at a real vocabulary size (151,936
    tokens split its reductions; a tiny test vocabulary does not): compiled CUDA equals eager CUDA."""
    from nanovllm.sampling.metadata import SamplingMetadataBuilder
    from nanovllm.sampling.sampler import Sampler

    vocab_size, device = 151936, torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    # Mixed rows: half use the config, half are temperature-only; every fourth row is seeded. Both draws start
    # from draw count 0 of the same engine seed, so the unseeded rows' noise is the same too.
    params = [
        SamplingParams(temperature=0.7, seed=i if i % 4 == 0 else None, **(SAMPLER_CONFIGS[config] if i % 2 else {}))
        for i in range(64)
    ]
    seqs = [Sequence(torch.randint(vocab_size, (20,), generator=gen).tolist(), p) for p in params]
    for seq in seqs:
        seq.num_computed_tokens = seq.num_tokens - 1  # decoding: the last token is the new one
    logits = torch.randn(len(seqs), vocab_size, generator=gen).to(device) * 3
    batch = ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False)
    tokens = {}
    for compiled in (False, True):
        builder = SamplingMetadataBuilder(len(seqs), vocab_size, device, eos_token_ids={7})
        sampler = Sampler(compile_ops=compiled, device=device)
        tokens[compiled] = sampler(logits, builder.build(batch)).token_ids.tolist()
    assert tokens[True] == tokens[False], f"compiled {tokens[True]} != eager {tokens[False]}"


def teacher_forced_logits(
    model_dir: Path, backend: str, dtype: str = "bfloat16", block_size: int = 16, num_decode_steps: int = 0
) -> list[torch.Tensor]:
    """Logits of one prefill over 6 prompts, then of ``num_decode_steps`` eager decode steps [6, vocab] each.
    Every decode step is fed the same fixed tokens (teacher forcing), so backends stay comparable step by
    step even where their argmax would differ. At block size 16 the contexts cross block boundaries."""
    args = {**ARGS, "kvcache_block_size": block_size, "num_kvcache_blocks": 64 * 16 // block_size + 8}
    fed = torch.randint(400, (num_decode_steps, 6), generator=torch.Generator().manual_seed(2)).tolist()
    with LLM(str(model_dir), dtype=dtype, attention_backend=backend, enforce_eager=True, **args) as llm:
        assert llm.engine is not None
        runner, block_manager = llm.engine.runner, llm.engine.scheduler.block_manager
        seqs = [Sequence(p, GREEDY) for p in prompts(6, seed=1)]
        for seq in seqs:
            block_manager.allocate(seq)
        with torch.inference_mode():
            prefill = ScheduledBatch(seqs, [seq.num_tokens for seq in seqs], is_prefill=True)
            logits = [runner.logits(build_model_inputs(prefill, block_size, runner.device)).float()]
            for tokens in fed:
                for seq, token in zip(seqs, tokens, strict=True):
                    seq.num_computed_tokens = seq.num_tokens
                    seq.token_ids.append(token)
                    block_manager.append_slot(seq)
                batch = ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False)
                logits.append(runner.logits(build_model_inputs(batch, block_size, runner.device)).float())
        return logits


def prefill_logits(model_dir: Path, backend: str, block_size: int = 16) -> torch.Tensor:
    """bf16 logits of one prefill over 6 prompts, half of them behind a cached prefix."""
    return teacher_forced_logits(model_dir, backend, block_size=block_size)[0]


def decode_logits(model_dir: Path, backend: str, dtype: str = "bfloat16", block_size: int = 16) -> torch.Tensor:
    """Logits [8 steps, 6, vocab] of teacher-forced eager decode steps after the prefill."""
    return torch.stack(teacher_forced_logits(model_dir, backend, dtype, block_size, num_decode_steps=8)[1:])


def bf16_decode_errors(model_dir: Path, backend: str, block_size: int = 16) -> tuple[list[float], list[float]]:
    """Per decode step, the relative L2 error against float32 torch logits of ``backend`` in bf16, and of
    torch in bf16: the second is bf16's own error, the noise floor the first is judged against."""
    ref = decode_logits(model_dir, "torch", "float32", block_size)

    def errors(out: torch.Tensor) -> list[float]:
        return [round(((o - r).norm() / r.norm()).item(), 5) for o, r in zip(out, ref, strict=True)]

    return errors(decode_logits(model_dir, backend, block_size=block_size)), errors(
        decode_logits(model_dir, "torch", block_size=block_size)
    )


def test_bf16_logits_close_to_torch(tiny_models: dict[str, Path]) -> None:
    """Guards against bf16-specific kernel errors (rounding of softmax weights, dtype casts)."""
    ref = prefill_logits(tiny_models["qwen3"], "torch")
    out = prefill_logits(tiny_models["qwen3"], "triton")
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"relative error of triton bf16 logits vs torch: {rel:.2e}"


def test_kv_cache_sized_from_free_memory(tiny_models: dict[str, Path]) -> None:
    """Guards against the profiling run (automatic num_kvcache_blocks) failing or leaving no cache."""
    args = {k: v for k, v in ARGS.items() if k != "num_kvcache_blocks"}
    with LLM(str(tiny_models["qwen3"]), gpu_memory_utilization=0.3, **args) as llm:
        assert llm.engine is not None and llm.engine.runner.num_kvcache_blocks > 1000
        assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].token_ids) == GREEDY.max_tokens


def test_engines_one_after_another_get_the_same_cache(tiny_models: dict[str, Path]) -> None:
    """Guards against a freed engine's memory, cached by torch, pinning the next engine's weights: on
    2 x H200 a bf16 engine's 65 GiB cache once left the next engine in the process room for no KV block."""
    args = {k: v for k, v in ARGS.items() if k != "num_kvcache_blocks"}
    with LLM(str(tiny_models["qwen3"]), gpu_memory_utilization=0.5, **args) as llm:
        assert llm.engine is not None
        first = llm.engine.runner.num_kvcache_blocks
    assert torch.cuda.memory_reserved() < 1 << 30, "close() should give the memory back to the device"
    dropped = LLM(str(tiny_models["qwen3"]), gpu_memory_utilization=0.5, **args)  # then dropped, not closed
    assert dropped.engine is not None and dropped.engine.runner.num_kvcache_blocks > 0.98 * first
    del dropped
    with LLM(str(tiny_models["qwen3"]), gpu_memory_utilization=0.5, **args) as llm:
        assert llm.engine is not None and llm.engine.runner.num_kvcache_blocks > 0.98 * first


def test_sampler_compiled_when_the_engine_is_built(tiny_models: dict[str, Path]) -> None:
    """Guards against the first requests waiting for a compiler: a server's first single-row step and its
    first batch each compiled the sampler, stalling those requests over a second. With the triton backend
    the short path is the Triton race alone, whose kernels the engine's build compiles (no torch.compile)."""
    kernels = (triton_race._race_kernel, triton_race._best_of_splits_kernel)
    for kernel in kernels:
        kernel.device_caches.clear()  # earlier tests' engines compiled them already; this engine must do it itself

    def num_compiled() -> list[int]:  # a Triton kernel's first cache, per device, holds its compiled variants
        return [sum(len(caches[0]) for caches in kernel.device_caches.values()) for kernel in kernels]

    params = SamplingParams(temperature=0.6, max_tokens=4, ignore_eos=True)
    with LLM(str(tiny_models["qwen3"]), **ARGS) as llm:
        compiled = num_compiled()
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
        llm.generate([[1, 2, 3], [4, 5, 6, 7]], params, use_tqdm=False)
        assert min(compiled) >= 1 and num_compiled() == compiled


def test_bf16_decode_logits_within_bf16_noise(tiny_models: dict[str, Path]) -> None:
    """Guards against decode-only kernel errors (split-KV reduction, the newest token's slot) step by step:
    triton in bf16 may be off float32 by no more than 1.5x what torch in bf16 is."""
    triton, noise = bf16_decode_errors(tiny_models["qwen3"], "triton")
    assert all(t <= 1.5 * n for t, n in zip(triton, noise, strict=True)), f"triton {triton} vs torch bf16 {noise}"


needs_flash_attn = pytest.mark.skipif(not is_flash_attn_installed(), reason="needs the flash_attn package")


@needs_flash_attn
def test_flash_attn_logits_close_to_torch(tiny_models: dict[str, Path]) -> None:
    """Guards against misusing flash-attn's paged API (cu_seqlens_k, block_table, causal alignment)."""
    ref = prefill_logits(tiny_models["qwen3"], "torch", block_size=256)
    out = prefill_logits(tiny_models["qwen3"], "flash_attn", block_size=256)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"relative error of flash_attn bf16 logits vs torch: {rel:.2e}"


@needs_flash_attn
def test_flash_attn_decode_logits_within_bf16_noise(tiny_models: dict[str, Path]) -> None:
    """Guards against misusing flash_attn_with_kvcache (cache_seqlens, block_table) in decode, step by step."""
    flash, noise = bf16_decode_errors(tiny_models["qwen3"], "flash_attn", block_size=256)
    print(f"decode logits off float32 per step: flash_attn {flash}, torch bf16 {noise}")
    assert all(f <= 1.5 * n for f, n in zip(flash, noise, strict=True)), f"flash_attn {flash} vs torch bf16 {noise}"


@needs_flash_attn
def test_flash_attn_cuda_graphs_equal_eager(tiny_models: dict[str, Path]) -> None:
    """Guards against flash-attn's kvcache decode reading stale inputs when replayed inside a CUDA graph."""
    args = dict(dtype="bfloat16", kvcache_block_size=256, num_kvcache_blocks=32)
    graphs = greedy_tokens(tiny_models["qwen3"], attention_backend="flash_attn", **args)
    eager = greedy_tokens(tiny_models["qwen3"], attention_backend="flash_attn", enforce_eager=True, **args)
    assert graphs == eager


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_cache_triton_in_graphs_equals_torch(tiny_models: dict[str, Path], kv_cache_dtype: str) -> None:
    """Guards against the compiled Triton kernels (the CPU tests run them only in the interpreter) writing or
    reading an FP8 cache otherwise than the reference, and against FP8 decode inside CUDA graphs."""
    args = dict(dtype="float32", kv_cache_dtype=kv_cache_dtype)
    torch_tokens = greedy_tokens(tiny_models["qwen3"], attention_backend="torch", enforce_eager=True, **args)
    triton_tokens = greedy_tokens(tiny_models["qwen3"], attention_backend="triton", **args)
    assert triton_tokens == torch_tokens


def test_fp8_cache_holds_twice_the_blocks_of_bfloat16(tiny_models: dict[str, Path]) -> None:
    """Guards against the GPU memory plan counting an FP8 cache in the model's element size: the same
    gpu_memory_utilization must give twice the blocks (the profiled step's peak is the same for both)."""
    args = {k: v for k, v in ARGS.items() if k != "num_kvcache_blocks"}
    num_blocks = {}
    for kv_cache_dtype in ("auto", "fp8"):
        with LLM(str(tiny_models["qwen3"]), dtype="bfloat16", kv_cache_dtype=kv_cache_dtype,
                 gpu_memory_utilization=0.5, **args) as llm:  # fmt: skip
            assert llm.engine is not None
            num_blocks[kv_cache_dtype] = llm.engine.runner.num_kvcache_blocks
    assert 1.98 * num_blocks["auto"] <= num_blocks["fp8"] <= 2.02 * num_blocks["auto"], num_blocks


needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@needs_2_gpus
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_tp2_equals_tp1_on_gpus(tiny_models: dict[str, Path], enforce_eager: bool) -> None:
    """Guards against NCCL-only tensor-parallel bugs: a rank on the wrong GPU, collectives captured into
    (or missing from) the decode graphs, workers replaying graphs from stale staged inputs."""
    model_dir = tiny_models["qwen3"]
    tp1 = greedy_tokens(model_dir, dtype="float32", enforce_eager=enforce_eager)
    tp2 = greedy_tokens(model_dir, dtype="float32", enforce_eager=enforce_eager, tensor_parallel_size=2)
    assert tp2 == tp1
