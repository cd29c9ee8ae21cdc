"""``python -m nanovllm serve --model DIR [flags]``: the same as the ``nanovllm`` console script."""

from nanovllm.cli import main

main()
