"""This process's part of a torchrun job (distributed_executor_backend="external_launcher").

Every rank runs the user's script, so every rank builds an LLM and calls generate() with the same
arguments, and every rank returns the same outputs:

    replica's rank 0:   its share of the prompts -> LLMEngine.generate, each step broadcast to the others
                        -> CallDone(outputs) to the others (CallFailed if it raised)
    the other ranks:    follow each step on their shard until CallDone, and return its outputs
    data parallel:      each replica's rank 0 posts its outputs in the store; every rank reads them all

The job's layout, start-up checks, heartbeats and messages are parallel/launcher.py's.
"""

import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.data_parallel import in_whole_call, request_cost, share_out, tokenized
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.model_files import effective_max_model_len
from nanovllm.engine.prompts import Prompt, PromptsArg, SamplingParamsArg, as_params_list, as_prompt_list
from nanovllm.models.arch import check_tensor_parallel_split
from nanovllm.models.registry import load_model_arch
from nanovllm.outputs import RequestOutput
from nanovllm.parallel.launcher import LaunchedRank, LaunchedWorkers, LaunchEnv
from nanovllm.parallel.messages import CallDone, CallFailed, SequenceMirror
from nanovllm.runner.model_runner import ModelRunner, resolve_device


def launched_device(config: EngineConfig, env: LaunchEnv) -> torch.device:
    """One GPU per rank on each host: cuda:LOCAL_RANK; or the CPU."""
    device = resolve_device(config.device)
    return torch.device("cuda", env.local_rank) if device.type == "cuda" else device


class LaunchedEngine:
    """One rank of a torchrun job: its replica's driving engine (rank 0 of the replica) or a follower."""

    def __init__(self, config: EngineConfig) -> None:
        env = LaunchEnv.from_environ()
        arch = load_model_arch(config.model)
        check_tensor_parallel_split(config.tensor_parallel_size, arch)  # every rank fails alike, before joining
        self.config = config
        self.rank = LaunchedRank(config, env, launched_device(config, env))
        self.engine: LLMEngine | None = None  # on the replica's rank 0
        self.runner: ModelRunner | None = None  # on the others: this rank's shard
        self.num_calls = 0  # generate() calls so far; every rank counts the same
        try:
            if self.rank.layout.is_driver:
                self.engine = LLMEngine(config, workers=LaunchedWorkers(self.rank))
            else:
                max_model_len = effective_max_model_len(config, arch)
                self.runner = ModelRunner(config, arch, max_model_len, rank=self.rank.layout.tp_rank,
                                          device=self.rank.device)  # fmt: skip
                self.mirror = SequenceMirror()
        except BaseException:
            self.rank.close()
            raise

    def generate(
        self, prompts: PromptsArg, sampling_params: SamplingParamsArg = None, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """The whole call's outputs, in input order, on every rank of the job."""
        call, self.num_calls = self.num_calls, self.num_calls + 1
        if self.runner is not None:
            outputs = self.rank.follow(self.runner, self.mirror)
        else:
            outputs = self._drive(call, as_prompt_list(prompts), sampling_params, use_tqdm)
        return outputs if self.rank.layout.num_replicas == 1 else self.rank.gather(call)

    def _drive(
        self,
        call: int,
        prompts: list[Prompt],
        sampling_params: SamplingParamsArg,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        """Rank 0 of a replica: its share of the call, and how it ended told to every other rank."""
        assert self.engine is not None
        layout = self.rank.layout
        share = list(range(len(prompts)))
        try:
            params = as_params_list(sampling_params, len(prompts))
            if layout.num_replicas > 1:
                requests = tokenized(prompts, self.engine.tokenizer)
                costs = [request_cost(r, p) for r, p in zip(requests, params, strict=True)]
                share = share_out(costs, layout.num_replicas)[layout.replica]
            outputs = self.engine.generate([prompts[i] for i in share], [params[i] for i in share], use_tqdm)
            outputs = in_whole_call(outputs, share, layout.replica) if layout.num_replicas > 1 else outputs
        except BaseException as e:
            self._tell_others(call, CallFailed.of(e), share)
            raise
        self._tell_others(call, CallDone(outputs), share)
        return outputs

    def _tell_others(self, call: int, result: CallDone | CallFailed, share: list[int]) -> None:
        """The replica's other ranks return (or raise) the same; other replicas read it from the store."""
        if self.rank.layout.num_replicas > 1:
            posted = result.in_replica(self.rank.layout.replica, share) if isinstance(result, CallFailed) else result
            self.rank.post(call, posted)
        if self.rank.layout.replica_size == 1:
            return
        try:
            self.rank.send(result)
        except Exception:
            if not isinstance(result, CallFailed):
                raise
            # The replica's group is broken (one of its ranks died): the others see that for themselves.

    def close(self) -> None:
        """Close this rank's engine or shard, then leave the job. Closing twice is harmless."""
        peers_alive = not self.rank.failure.has_failed
        if self.engine is not None:
            self.engine.close()
        if self.runner is not None:
            self.runner.close(peers_alive=peers_alive)
        self.rank.close()
