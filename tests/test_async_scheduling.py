"""generate() with the host one step ahead of the device (async_scheduling) against steps run in turn."""

from collections.abc import Callable
from pathlib import Path

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput, StreamOutput
from tests.test_engine import BASE_ARGS, random_prompts

CASES = {
    "plain": dict(num_kvcache_blocks=256),
    "preemption": dict(num_kvcache_blocks=6, max_model_len=64),
    "chunked prefill": dict(num_kvcache_blocks=64, max_num_batched_tokens=13, max_num_seqs=4),
}


def outputs_of(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple]:
    outs: list[RequestOutput] = llm.generate(prompts, params, use_tqdm=False)
    return [(o.token_ids, o.finish_reason, o.outputs[0].stop_reason, o.outputs[0].logprobs) for o in outs]


def mixed_params(stop_tokens: list[int]) -> list[SamplingParams]:
    """Greedy rows that end on a stop token mid-run, seeded sampling, logprobs, penalties, and lengths 1 to 24."""
    params = []
    for i, stop in enumerate(stop_tokens):
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop]))
        elif i % 3 == 1:
            presence = 0.5 if i == 4 else 0.0
            params.append(
                SamplingParams(
                    temperature=0.9, seed=i, max_tokens=1 + 5 * i % 24, logprobs=2, presence_penalty=presence
                )
            )
        else:
            params.append(
                SamplingParams(
                    temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1, repetition_penalty=1.3,
                    frequency_penalty=0.4,
                )
            )  # fmt: skip
    return params


def penalty_params(num: int) -> list[SamplingParams]:
    """Every row with penalties: seeded sampling and greedy, lengths 3 to 20."""
    return [
        SamplingParams(
            temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=3 + 7 * i % 18, ignore_eos=True,
            repetition_penalty=1.4, frequency_penalty=0.3, presence_penalty=0.2,
        )
        for i in range(num)
    ]  # fmt: skip


def count_launches_ahead(engine: LLMEngine) -> list[int]:
    """Counts, in the list's one entry, the steps the engine launches while another is in flight."""
    count = [0]
    launch = engine.runner.launch

    def counting_launch(batch, in_flight):  # type: ignore[no-untyped-def]
        count[0] += in_flight is not None
        return launch(batch, in_flight)

    engine.runner.launch = counting_launch  # type: ignore[method-assign]
    return count


@pytest.mark.parametrize("case", sorted(CASES))
def test_scheduling_ahead_gives_the_same_outputs(tiny_models: dict[str, Path], case: str) -> None:
    """Guards the pending-token bookkeeping: a step launched before the previous one's tokens are on the host
    must read those tokens on the device, waste (and not record) the row of a sequence that a stop token
    ended meanwhile, and leave every KV block free at the end."""
    model_dir = str(tiny_models["qwen3"])
    args = {**BASE_ARGS, **CASES[case]}
    max_len = 30 if case == "preemption" else 60
    prompts = random_prompts(9, 5, max_len, seed=11)
    with LLM(model_dir, async_scheduling=False, **args) as llm:
        plain = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
        stop_tokens = [out.token_ids[3] for out in plain]  # each greedy row stops by its 4th token at the latest
        expected = outputs_of(llm, prompts, mixed_params(stop_tokens))
    assert sum(stop == "stop" for _, stop, _, _ in expected) >= 3, "the test needs rows ended by stop tokens"
    with LLM(model_dir, async_scheduling=True, **args) as llm:
        engine = llm.engine
        assert engine is not None
        launches_ahead = count_launches_ahead(engine)
        got = outputs_of(llm, prompts, mixed_params(stop_tokens))
        block_manager = engine.scheduler.block_manager
        assert block_manager.num_free_blocks == block_manager.num_blocks
        if case == "preemption":
            assert engine.scheduler.num_preemptions > 0, "the test must preempt"
    assert launches_ahead[0] > 10, "generate() did not schedule ahead"
    # Logprobs to float32 rounding: a wasted row changes the batch size, and with it the matmuls' blocking.
    assert [out[:3] for out in got] == [out[:3] for out in expected]
    for (*_, got_logprobs), (*_, expected_logprobs) in zip(got, expected, strict=True):
        for got_top, expected_top in zip(got_logprobs or [], expected_logprobs or [], strict=True):
            assert got_top.keys() == expected_top.keys()
            assert all(abs(got_top[t] - expected_top[t]) < 1e-4 for t in got_top)


@pytest.mark.parametrize("case", sorted(CASES))
def test_scheduling_ahead_with_penalties_on_every_row(tiny_models: dict[str, Path], case: str) -> None:
    """Guards the penalty table under scheduling ahead: more penalty sequences than slots (chunked prefill's
    max_num_seqs=4 for 9 prompts), so slots change hands, and preempted sequences, whose rows are rebuilt
    from their tokens; a running sequence's newest token may be pending, so it must keep its slot."""
    model_dir = str(tiny_models["qwen3"])
    args = {**BASE_ARGS, **CASES[case]}
    prompts = random_prompts(9, 5, 30 if case == "preemption" else 60, seed=12)
    params = penalty_params(len(prompts))
    with LLM(model_dir, async_scheduling=False, **args) as llm:
        expected = outputs_of(llm, prompts, params)
    with LLM(model_dir, async_scheduling=True, **args) as llm:
        engine = llm.engine
        assert engine is not None
        launches_ahead = count_launches_ahead(engine)
        got = outputs_of(llm, prompts, params)
        if case == "preemption":
            assert engine.scheduler.num_preemptions > 0, "the test must preempt"
    assert launches_ahead[0] > 10, "generate() did not schedule ahead"
    assert [out[:3] for out in got] == [out[:3] for out in expected]


def completions_of(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[tuple]]:
    outs: list[RequestOutput] = llm.generate(prompts, params, use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in out.outputs] for out in outs]


@pytest.mark.parametrize("case", sorted(CASES))
def test_scheduling_ahead_with_stop_strings_and_siblings(tiny_models: dict[str, Path], case: str) -> None:
    """Guards the per-row work done between steps when scheduling ahead: a stop string found in a step's text
    must end its completion before the step in flight is recorded (that row wasted, as for a stop token), and
    n > 1 must queue the siblings once the first completion's prompt is in the cache."""
    model_dir = str(tiny_models["qwen3"])
    args = {**BASE_ARGS, **CASES[case]}
    prompts = random_prompts(6, 5, 30 if case == "preemption" else 60, seed=13)
    with LLM(model_dir, async_scheduling=False, **args) as llm:
        plain = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        # A 2-character stop string from the middle of each greedy text: it ends the greedy rows part way.
        stops = [out.text[len(out.text) // 2 :][:2] or "never" for out in plain]
        params = [
            SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop])
            if i % 2 == 0
            else SamplingParams(temperature=0.8, seed=i, n=3, max_tokens=12, ignore_eos=True, stop=[stop])
            for i, stop in enumerate(stops)
        ]
        expected = completions_of(llm, prompts, params)
    assert sum(c[3] == stops[i] for i, out in enumerate(expected) for c in out) >= 2, "the test needs stop strings"
    with LLM(model_dir, async_scheduling=True, **args) as llm:
        engine = llm.engine
        assert engine is not None
        launches_ahead = count_launches_ahead(engine)
        got = completions_of(llm, prompts, params)
        block_manager = engine.scheduler.block_manager
        assert block_manager.num_free_blocks == block_manager.num_blocks
    assert launches_ahead[0] > 5, "generate() did not schedule ahead"
    assert got == expected


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=4),
        SamplingParams(repetition_penalty=1.3, max_tokens=4),  # the penalty table counts on the device
        SamplingParams(stop=["xyz"], max_tokens=4),  # the text is checked between steps
        SamplingParams(n=2, max_tokens=4),  # siblings are queued between steps
    ],
)
def test_schedules_ahead_whenever_enabled(tiny_models: dict[str, Path], params: SamplingParams) -> None:
    """Guards the async_scheduling switch: on one GPU (or CPU) every kind of request schedules ahead when it
    is on, and none does when it is off."""
    for enabled in (True, False):
        with LLM(str(tiny_models["qwen3"]), num_kvcache_blocks=64, async_scheduling=enabled, **BASE_ARGS) as llm:
            engine = llm.engine
            assert engine is not None
            engine.add_request([1, 2, 3], params, stream_text=False)
            assert engine.schedules_ahead == enabled


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_stream_ahead_gives_every_step_output(tiny_models: dict[str, Path], with_tokenizer: bool) -> None:
    """Guards stream() scheduling ahead: every request's outputs must still come, step by step, with or without
    text to follow (skip_tokenizer_init), and join to what steps run in turn stream."""
    prompts = random_prompts(5, 5, 40, seed=14)
    greedy = [SamplingParams(temperature=0.0, max_tokens=6 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    params = [*greedy[:1], SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=9, ignore_eos=True), *greedy[2:]]
    streamed: dict[bool, dict[tuple[str, int], tuple]] = {}
    for enabled in (False, True):
        args = {**BASE_ARGS, "num_kvcache_blocks": 64, "skip_tokenizer_init": not with_tokenizer}
        with LLM(str(tiny_models["qwen3"]), async_scheduling=enabled, **args) as llm:
            engine = llm.engine
            assert engine is not None
            launches_ahead = count_launches_ahead(engine)
            joined: dict[tuple[str, int], tuple] = {}
            for out in llm.stream(prompts, params):
                key = (out.request_id, out.sample_index)
                tokens, text, _ = joined.get(key, ((), "", None))
                joined[key] = (tokens + tuple(out.new_token_ids), text + out.text_delta, out.finish_reason)
            assert (launches_ahead[0] > 5) == enabled
        streamed[enabled] = joined
    assert len(streamed[False]) == len(prompts) + 1  # the n = 2 request streams two completions
    assert all(reason == "length" for *_, reason in streamed[False].values())
    assert streamed[True] == streamed[False]


def step_until_done(engine: LLMEngine, step: Callable[[], list[StreamOutput]], prompts: list[list[int]],
                    params: list[SamplingParams]) -> dict[tuple[str, int], tuple]:  # fmt: skip
    """The server's pattern: requests added, one joining after 3 steps and one aborted after 5, stepped to the end;
    each completion's outputs joined (tokens, text, logprobs, finish and stop reasons)."""
    joined: dict[tuple[str, int], tuple] = {}

    def collect(outputs: list[StreamOutput]) -> None:
        for out in outputs:
            key = (out.request_id, out.sample_index)
            tokens, text, logprobs, *_ = joined.get(key, ((), "", (), None, None))
            joined[key] = (
                tokens + tuple(out.new_token_ids), text + out.text_delta, logprobs + tuple(out.logprobs or ()),
                out.finish_reason, out.stop_reason,
            )  # fmt: skip

    for i in range(len(prompts) - 1):
        engine.add_request(prompts[i], params[i], request_id=f"r{i}")
    for turn in range(5):
        if turn == 3:
            engine.add_request(prompts[-1], params[-1], request_id="late")
        collect(step())
    assert engine.abort_request("r2")
    while engine.has_unfinished_requests():
        collect(step())
    block_manager = engine.scheduler.block_manager
    assert block_manager.num_free_blocks == block_manager.num_blocks
    assert engine._in_flight is None, "a step was left running once every request had finished"
    return {key: value for key, value in joined.items() if key[0] != "r2"}  # r2's last step differs: aborted


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_ahead_gives_the_outputs_of_step(tiny_models: dict[str, Path], case: str) -> None:
    """Guards the server's loop (LLMEngine.step, scheduling ahead): with requests joining and aborted mid-run,
    stop tokens and strings, n > 1, seeds, logprobs and penalties, its outputs must join to what steps run in
    turn give, every step's bookkeeping done while the next step runs, and nothing left running at the end."""
    model_dir = str(tiny_models["qwen3"])
    args = {**BASE_ARGS, **CASES[case]}
    prompts = random_prompts(7, 5, 30 if case == "preemption" else 50, seed=15)
    with LLM(model_dir, async_scheduling=False, **args) as llm:
        greedy = SamplingParams(temperature=0.0, max_tokens=8)
        stop_tokens = [out.token_ids[3] for out in llm.generate(prompts, greedy, use_tqdm=False)]
        params = mixed_params(stop_tokens[:-1])
        params[2] = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)  # r2, still running at its abort
        params.append(SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=10, stop=["e"]))  # the late request
        engine = llm.engine
        assert engine is not None and not engine.schedules_ahead
        launches_ahead = count_launches_ahead(engine)
        expected = step_until_done(engine, engine.step, prompts, params)
        assert launches_ahead[0] == 0
    with LLM(model_dir, **args) as llm:
        engine = llm.engine
        assert engine is not None and engine.schedules_ahead
        launches_ahead = count_launches_ahead(engine)
        got = step_until_done(engine, engine.step, prompts, params)
        assert launches_ahead[0] > 5, "step() did not schedule ahead"
    assert sum(value[3] == "stop" for value in expected.values()) >= 2, "the test needs stop tokens or strings"
    # A step run ahead may hold rows of sequences that ended in the step before: other rows' logprobs then move
    # in their last digits (a batch of another size), never their tokens.
    without_logprobs = {key: (*value[:2], *value[3:]) for key, value in expected.items()}
    assert {key: (*value[:2], *value[3:]) for key, value in got.items()} == without_logprobs
    for key, (_, _, logprobs, *_) in expected.items():
        assert [list(top) for top in got[key][2]] == [list(top) for top in logprobs]
        expected_values = [pytest.approx(list(top.values()), abs=1e-4) for top in logprobs]
        assert [list(top.values()) for top in got[key][2]] == expected_values


def test_step_reports_each_step_one_call_late(tiny_models: dict[str, Path]) -> None:
    """Guards the one step contract when scheduling ahead: a call launches the next step and reports the one
    before, so the first call of a run reports nothing; an abort leaves nothing in flight, and a later run
    starts afresh."""
    with LLM(str(tiny_models["qwen3"]), num_kvcache_blocks=64, **BASE_ARGS) as llm:
        engine = llm.engine
        assert engine is not None
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True), request_id="a")
        assert engine.step() == []  # launched; its outputs come with the next call
        assert [out.new_token_ids for out in engine.step()] != []
        engine.abort_request("a")
        assert engine._in_flight is None
        engine.add_request([4, 5], SamplingParams(max_tokens=2, ignore_eos=True), request_id="b")
        assert engine.step() == [], "a new run starts with nothing in flight"
        assert [len(out.new_token_ids) for out in engine.step()] == [1]
        engine.abort_request("b")
        # The last request ends on a stop token: the step launched meanwhile holds its wasted row, and must not
        # outlive it (the next step() would refuse).
        greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        tokens = llm.generate([[7, 8, 9]], greedy, use_tqdm=False)[0].token_ids
        stop = next(token for i, token in enumerate(tokens) if i >= 2 and token not in tokens[:i])
        engine.add_request([7, 8, 9], SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[stop]))
        reasons = []
        while engine.has_unfinished_requests():
            reasons += [out.finish_reason for out in engine.step() if out.finished]
        assert reasons == ["stop"]
        assert engine._in_flight is None, "a step was left running once every request had finished"


def test_step_ahead_failure_then_abort_leaves_the_engine_usable(tiny_models: dict[str, Path]) -> None:
    """Guards the server's recovery from a failed step (EngineLoop aborts every live request): the step in flight
    is dropped with the failure, and the engine must then free every block and run new requests as if fresh."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = random_prompts(4, 5, 40, seed=16)
    with LLM(str(tiny_models["qwen3"]), num_kvcache_blocks=64, **BASE_ARGS) as llm:
        expected = [out.token_ids for out in llm.generate(prompts, params, use_tqdm=False)]
        engine = llm.engine
        assert engine is not None
        for i, prompt in enumerate(prompts):
            engine.add_request(prompt, params, request_id=f"r{i}")
        for _ in range(4):
            engine.step()
        real_launch = engine.runner.launch

        def failing_launch(batch, in_flight):  # type: ignore[no-untyped-def]
            engine.runner.launch = real_launch  # type: ignore[method-assign]
            raise RuntimeError("injected launch failure")

        engine.runner.launch = failing_launch  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()
        assert engine._in_flight is None
        for i in range(len(prompts)):
            assert engine.abort_request(f"r{i}")
        block_manager = engine.scheduler.block_manager
        assert block_manager.num_free_blocks == block_manager.num_blocks
        got: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            got[engine.add_request(prompt, params, request_id=f"again{i}")] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                got[out.request_id] += out.new_token_ids
    assert list(got.values()) == expected
