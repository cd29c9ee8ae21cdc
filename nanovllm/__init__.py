"""nanovllm: fast offline LLM batch inference in a few readable files."""

from nanovllm.llm import LLM
from nanovllm.outputs import RequestOutput, StreamOutput
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "StreamOutput"]
