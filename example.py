"""Chat with a model: python example.py path/to/Qwen3-0.6B

Get the model's files (config.json, *.safetensors, tokenizer files) on a machine with internet,
for example `huggingface-cli download Qwen/Qwen3-0.6B --local-dir Qwen3-0.6B`, then copy the folder here.
"""

import argparse

from transformers import AutoTokenizer

from nanovllm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a Hugging Face model directory")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    questions = ["introduce yourself", "list all prime numbers within 100"]
    prompts = [
        str(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True))
        for q in questions
    ]
    with LLM(args.model, max_model_len=4096) as llm:
        outputs = llm.generate(prompts, SamplingParams(temperature=0.6, max_tokens=args.max_tokens))
    for prompt, output in zip(prompts, outputs, strict=True):
        print(f"\nPrompt: {prompt!r}\nCompletion: {output.text!r}")


if __name__ == "__main__":
    main()
