"""Data parallelism for offline generate(): data_parallel_size replicas of the engine, each with a share of the prompts.

    generate(prompts) -> cost of each request (prompt tokens + n x max_tokens)
                      -> share_out: costliest first, each to the replica with the least work so far
                      -> every replica runs generate() on its share, at the same time
                      -> outputs put back in input order

A replica is a whole engine of tensor_parallel_size ranks. :class:`SpawnedReplicas` spawns each
as a process on this host (backend "mp"; replica d gets GPUs d*tp .. d*tp+tp-1 of those visible);
under torchrun (engine/launched.py) a replica is a group of the job's ranks. Tokens equal one
replica's: greedy ones, and sampled ones with a seed (SamplingParams.seed); sampling without a
seed draws from each replica's own generator.
"""

import dataclasses
import multiprocessing as mp
import os
import weakref
from collections.abc import Callable
from collections.abc import Sequence as SequenceLike
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from nanovllm.config import EngineConfig
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.model_files import load_tokenizer
from nanovllm.engine.prompts import Prompt, PromptsArg, SamplingParamsArg, as_params_list, as_prompt_list
from nanovllm.models.arch import check_tensor_parallel_split
from nanovllm.models.registry import load_model_arch
from nanovllm.outputs import RequestOutput
from nanovllm.parallel.failures import WorkerDiedError
from nanovllm.parallel.messages import CallDone, CallFailed
from nanovllm.parallel.workers import cpu_threads_per_rank, stop_children
from nanovllm.runner.model_runner import resolve_device
from nanovllm.sampling_params import SamplingParams

REPLICA_START_TIMEOUT_S = 600  # a replica imports torch and builds its engine (workers, CUDA graphs) before it is ready
REPLICA_JOIN_TIMEOUT_S = 30.0  # at shutdown, how long a replica gets to close its engine before it is killed


def request_cost(prompt: Prompt, params: SamplingParams) -> int:
    """Tokens a request can make an engine compute: its prompt, and up to max_tokens per completion."""
    num_prompt_tokens = len(prompt) if isinstance(prompt, str | list) else 0  # a bad prompt: its replica says why
    return num_prompt_tokens + params.n * params.max_tokens


def share_out(costs: list[int], num_replicas: int) -> list[list[int]]:
    """Request indices for each replica, each share in input order, with about equal total cost per replica.

    Longest processing time first: the costliest request goes to the replica with the least work so far.
    """
    totals = [0] * num_replicas
    shares: list[list[int]] = [[] for _ in range(num_replicas)]
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        replica = min(range(num_replicas), key=lambda r: totals[r])
        shares[replica].append(index)
        totals[replica] += costs[index]
    return [sorted(share) for share in shares]


def tokenized(prompts: SequenceLike[Prompt], tokenizer: PreTrainedTokenizerBase | None) -> list[Prompt]:
    """Prompts as token ids, to measure them; a string stays one when there is no tokenizer (the engine says why)."""
    return [tokenizer.encode(p) if isinstance(p, str) and tokenizer is not None else p for p in prompts]


def in_whole_call(outputs: list[RequestOutput], share: list[int], replica: int) -> list[RequestOutput]:
    """A replica's outputs renumbered by their place in the whole call, with request ids unique across replicas."""
    return [
        dataclasses.replace(out, index=index, request_id=f"dp{replica}-{out.request_id}")
        for index, out in zip(share, outputs, strict=True)
    ]


@dataclass(frozen=True)
class ReplicaCall:
    """Run generate() on this share of a call."""

    prompts: list[Prompt]  # the replica's prompts, token ids where the front had a tokenizer
    params: list[SamplingParams]  # one per prompt


def replica_main(config: EngineConfig, visible_gpus: str | None, conn: Connection) -> None:
    """A replica process's life: build an engine, say ready, run each share until the pipe closes or says None."""
    if visible_gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus  # before CUDA starts: this replica's GPUs are 0..tp-1
    else:
        torch.set_num_threads(cpu_threads_per_rank(config.data_parallel_size))
    try:
        engine = LLMEngine(dataclasses.replace(config, data_parallel_size=1))
    except BaseException as e:
        conn.send(CallFailed.of(e))
        return
    try:
        conn.send(CallDone([]))  # ready
        while isinstance(call := _receive(conn), ReplicaCall):
            try:
                conn.send(CallDone(engine.generate(call.prompts, call.params, use_tqdm=False)))
            except Exception as e:
                conn.send(CallFailed.of(e))
    finally:
        engine.close()


def _receive(conn: Connection) -> ReplicaCall | None:
    try:
        call: ReplicaCall | None = conn.recv()
    except EOFError:  # the front's process is gone
        return None
    return call


def _answer(conn: Connection) -> CallDone | CallFailed | None:
    """A replica's answer; None when its end of the pipe closed (it died)."""
    try:
        answer: CallDone | CallFailed = conn.recv()
    except (EOFError, OSError):
        return None
    return answer


def replica_gpus(config: EngineConfig) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each replica: its own tensor_parallel_size GPUs; None on CPU."""
    dp, tp = config.data_parallel_size, config.tensor_parallel_size
    if resolve_device(config.device).type != "cuda":
        return [None] * dp
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(gpus) < dp * tp:
        raise ValueError(
            f"data_parallel_size={dp} x tensor_parallel_size={tp} needs {dp * tp} GPUs but {len(gpus)} are visible; "
            "lower either, or make more GPUs visible"
        )
    return [",".join(gpus[d * tp : (d + 1) * tp]) for d in range(dp)]


class SpawnedReplicas:
    """data_parallel_size engines, each in a process of its own on this host; this process shares out the prompts."""

    def __init__(self, config: EngineConfig) -> None:
        check_tensor_parallel_split(config.tensor_parallel_size, load_model_arch(config.model))  # before any spawn
        gpus = replica_gpus(config)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model)
        self.failure: str | None = None  # set when a replica died: no later call can run
        context = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[BaseProcess] = []
        self._finalizer = weakref.finalize(self, _stop_replicas, self.conns, self.processes)
        for replica, visible_gpus in enumerate(gpus):
            parent_conn, child_conn = context.Pipe()
            args = (config, visible_gpus, child_conn)
            process = context.Process(target=replica_main, args=args, name=f"nanovllm-dp{replica}")
            process.start()
            child_conn.close()
            self.conns.append(parent_conn)
            self.processes.append(process)
        try:
            started = self._collect([0] * len(gpus), REPLICA_START_TIMEOUT_S, lambda size: None)  # ready, or why not
            failed = [answer for answer in started if isinstance(answer, CallFailed)]
            if failed:
                raise failed[0].error
        except BaseException:
            self.close()
            raise

    def generate(
        self, prompts: PromptsArg, sampling_params: SamplingParamsArg = None, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """Every prompt completed by one of the replicas; outputs in input order."""
        if self.failure is not None:
            raise WorkerDiedError(f"{self.failure}; this engine cannot continue: close() it and create a new LLM")
        prompt_list = as_prompt_list(prompts)
        params = as_params_list(sampling_params, len(prompt_list))
        requests = tokenized(prompt_list, self.tokenizer)
        shares = share_out([request_cost(r, p) for r, p in zip(requests, params, strict=True)], len(self.conns))
        for conn, share in zip(self.conns, shares, strict=True):
            conn.send(ReplicaCall([requests[i] for i in share], [params[i] for i in share]))
        with tqdm(total=len(requests), desc="Generating", dynamic_ncols=True, disable=not use_tqdm) as bar:
            answers = self._collect([len(share) for share in shares], None, bar.update)
        failed = [
            answer.in_replica(r, share)
            for r, (answer, share) in enumerate(zip(answers, shares, strict=True))
            if isinstance(answer, CallFailed)
        ]
        if failed:
            raise failed[0].error
        results = [answer.outputs for answer in answers if isinstance(answer, CallDone)]
        merged = [
            in_whole_call(result, share, r) for r, (result, share) in enumerate(zip(results, shares, strict=True))
        ]
        return sorted((out for outputs in merged for out in outputs), key=lambda out: out.index)

    def _collect(
        self, sizes: list[int], timeout: float | None, on_done: Callable[[int], object]
    ) -> list[CallDone | CallFailed]:
        """Each replica's answer, as they come (``on_done`` gets the size of each share that returned); a replica
        that dies first is an error naming it, at once."""
        pending = dict(enumerate(self.conns))
        answers: list[CallDone | CallFailed] = [CallDone([]) for _ in self.conns]
        while pending:
            sentinels = {self.processes[r].sentinel: r for r in pending}
            ready = wait([*pending.values(), *sentinels], timeout)
            if not ready:
                raise self._died(f"data-parallel replicas {sorted(pending)} did not start in {timeout} s")
            for replica, conn in list(pending.items()):
                process = self.processes[replica]
                if conn not in ready and process.sentinel not in ready:
                    continue
                answer = _answer(conn) if conn in ready else None
                if answer is None:  # it exited without answering
                    process.join(1.0)  # reap it, so that its exit code is known
                    raise self._died(f"data-parallel replica {replica} (pid {process.pid}) exited with code "
                                     f"{process.exitcode}")  # fmt: skip
                del pending[replica]
                on_done(sizes[replica])
                answers[replica] = answer
        return answers

    def _died(self, message: str) -> WorkerDiedError:
        """Stop the other replicas (their work is lost with the call) and name the one that died."""
        self.failure = message
        for process in self.processes:
            process.terminate()  # their shares are lost with the call; their workers see the pipe close and exit
        self.close()
        return WorkerDiedError(f"{message}. Its traceback, if any, is printed above. This engine cannot continue: "
                               "close() it and create a new LLM.")  # fmt: skip

    def close(self) -> None:
        """Stop every replica: each closes its engine (and its workers). Closing twice is harmless."""
        self._finalizer()


def _stop_replicas(conns: list[Connection], processes: list[BaseProcess]) -> None:
    """close(), or the same when the handle is garbage-collected or at interpreter exit (before multiprocessing
    joins its children, which would wait forever on replicas waiting for their next call)."""
    stop_children(conns, processes, None, REPLICA_JOIN_TIMEOUT_S)
