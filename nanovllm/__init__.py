"""nanovllm: fast offline LLM batch inference in a few readable files."""

from nanovllm.llm import LLM
from nanovllm.lora_request import LoRARequest
from nanovllm.outputs import RequestOutput, StreamOutput
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "LoRARequest", "RequestOutput", "SamplingParams", "StreamOutput"]
