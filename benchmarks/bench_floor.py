"""The floor of bench.py's workload: the least time any engine could take for it on a GPU of a given copy rate
and matmul rate, and so the most tok/s (runs on CPU: nothing is timed here).

    python benchmarks/bench_floor.py --shape qwen3-0.6b                    # an H200: 4.21 TB/s, 790 TFLOP/s
    python benchmarks/bench_floor.py --shape qwen3-8b --weight-gib 8.3     # weights as bench.py printed them
    python benchmarks/bench_floor.py --shape qwen3-0.6b --kv-bytes 1       # an FP8 KV cache

The run it assumes is the best one: every request admitted at once (an H200's KV cache holds bench.py's
whole workload), prefilled at the matmul rate, then one token per request per decode step. A decode step
must read the weights once and the K and V of every token each running request has cached (a sliding-window
layer only its window); those bytes move at the copy rate. A mixture-of-experts step reads only the experts
some token of the batch is routed to: with routing spread evenly, E * (1 - (1 - k/E) ** batch) of them.
Parameters are counted on transformers' own model class for the config, built on the meta device.

The rates are measured ones: the copy rate by benchmarks/kernels.py (bytes read and written by a
device-to-device copy), the matmul rate by a large bf16 matmul; pass the figures of the GPU you compare with.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import GPU_WORKLOAD, SHAPES, make_workload  # noqa: E402

H200_COPY_TBPS = 4.21  # benchmarks/kernels.py on an H200 (docs/performance.md)
H200_BF16_TFLOPS = 790.0  # a large bf16 matmul on an H200
MODEL_TYPES = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}  # shapes without a model_type


def count_parameters(config: dict) -> tuple[int, int, int]:
    """(all parameters, those of one expert of one layer, the input embedding's if not tied to the LM head)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {key: value for key, value in config.items() if key not in ("architectures", "model_type")}
    model_type = config.get("model_type") or MODEL_TYPES[config["architectures"][0]]
    hf_config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are one parameter, counted once
    expert = 3 * config["hidden_size"] * config["moe_intermediate_size"] if "num_experts" in config else 0
    untied_embedding = 0 if config.get("tie_word_embeddings") else model.get_input_embeddings().weight.numel()
    return total, expert, untied_embedding


def layer_windows(config: dict) -> list[int | None]:
    """Each layer's sliding window (None: it attends to everything), as Gemma 3 and Mistral configs give them."""
    num_layers, window = config["num_hidden_layers"], config.get("sliding_window")
    if window is None:
        return [None] * num_layers
    pattern = config.get("sliding_window_pattern")
    if pattern is None:
        return [window] * num_layers
    return [None if (layer + 1) % pattern == 0 else window for layer in range(num_layers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--copy-tbps", type=float, default=H200_COPY_TBPS, help="measured copy rate, TB/s")
    parser.add_argument("--tflops", type=float, default=H200_BF16_TFLOPS, help="measured matmul rate, TFLOP/s")
    parser.add_argument("--kv-bytes", type=float, default=2, help="bytes per cached K or V element (fp8: 1)")
    parser.add_argument("--weight-gib", type=float, help="weights in memory, as bench.py prints them (quantized)")
    parser.add_argument("--num-seqs", type=int, default=GPU_WORKLOAD["num_seqs"])
    parser.add_argument("--max-input-len", type=int, default=GPU_WORKLOAD["max_input_len"])
    parser.add_argument("--max-output-len", type=int, default=GPU_WORKLOAD["max_output_len"])
    parser.add_argument("--min-len", type=int, default=100)
    args = parser.parse_args()
    config = SHAPES[args.shape]
    prompts, params = make_workload(args.num_seqs, args.min_len, args.max_input_len, args.max_output_len)
    prompt_lens = [len(prompt) for prompt in prompts]
    output_lens = [sp.max_tokens for sp in params]

    num_params, expert_params, untied_embedding = count_parameters(config)
    num_experts, top_k = config.get("num_experts", 0), config.get("num_experts_per_tok", 0)
    all_experts = config["num_hidden_layers"] * num_experts * expert_params
    dense_params = num_params - all_experts - untied_embedding  # read in full by every step (the LM head too)
    weight_bytes_per_param = 2.0
    if args.weight_gib is not None:  # quantized: the bytes bench.py reported, spread evenly over the parameters
        weight_bytes_per_param = args.weight_gib * (1 << 30) / num_params

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_per_layer = 2 * config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim * args.kv_bytes
    windows = layer_windows(config)

    kv_bytes = weight_bytes = 0.0
    num_steps = max(output_lens) - 1  # the first token of each request comes from its prefill
    for step in range(1, num_steps + 1):
        contexts = [p + step for p, n in zip(prompt_lens, output_lens, strict=True) if n - 1 >= step]
        for window in windows:
            kv_bytes += kv_per_layer * sum(c if window is None else min(c, window) for c in contexts)
        experts_read = num_experts * (1 - (1 - top_k / num_experts) ** len(contexts)) if num_experts else 0
        step_params = dense_params + config["num_hidden_layers"] * experts_read * expert_params
        weight_bytes += step_params * weight_bytes_per_param
    decode_seconds = (kv_bytes + weight_bytes) / (args.copy_tbps * 1e12)

    # A prefilled token goes through every layer's matmuls and its top_k experts; the LM head runs on the last
    # token of each prompt only.
    lm_head_params = config["vocab_size"] * config["hidden_size"]
    active_params = dense_params - lm_head_params + config["num_hidden_layers"] * top_k * expert_params
    num_layers, q_width = config["num_hidden_layers"], config["num_attention_heads"] * head_dim
    matmul_flops = 2 * active_params * sum(prompt_lens) + 2 * lm_head_params * len(prompt_lens)
    attention_flops = sum(2 * num_layers * q_width * p * p for p in prompt_lens)  # causal: half of 4 * L * P^2
    prefill_seconds = (matmul_flops + attention_flops) / (args.tflops * 1e12)

    num_tokens = sum(output_lens)
    floor = decode_seconds + prefill_seconds
    print(f"{args.shape}: {num_params / 1e9:.2f} B parameters, {weight_bytes_per_param:.2f} bytes each")
    print(f"decode: {num_steps} steps read {weight_bytes / 1e12:.2f} TB of weights and {kv_bytes / 1e12:.2f} TB of K/V")
    print(f"  at {args.copy_tbps} TB/s: {decode_seconds:.2f} s; prefill at {args.tflops:.0f} TFLOP/s:", end=" ")
    print(f"{prefill_seconds:.2f} s")
    print(f"floor: {floor:.2f} s for {num_tokens} tokens = {num_tokens / floor:,.0f} tok/s")


if __name__ == "__main__":
    main()
