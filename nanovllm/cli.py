"""The ``nanovllm`` console script: ``nanovllm serve --model DIR [flags]`` (see nanovllm/serving/server.py)."""

import sys
from collections.abc import Sequence

COMMANDS = ("serve",)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(f"usage: nanovllm {{{','.join(COMMANDS)}}} ...   (got {args[:1] or 'nothing'})", file=sys.stderr)
        raise SystemExit(2)
    from nanovllm.serving.server import main as serve_main

    serve_main(args[1:])


if __name__ == "__main__":
    main()
