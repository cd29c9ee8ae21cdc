"""The OpenAI-compatible server's command line: ``nanovllm serve --model DIR`` (or ``python -m nanovllm serve ...``).

Every EngineConfig field is a flag: ``max_model_len`` is ``--max-model-len``, a boolean field is
``--enforce-eager`` / ``--no-enforce-eager``. See README.md, "Serving", for the endpoints.
``--enable-lora --lora-modules name=path ...`` serves PEFT adapters too, each under its own name.
"""

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from nanovllm.config import EngineConfig
from nanovllm.engine.lora_requests import check_adapters
from nanovllm.lora_request import LoRARequest
from nanovllm.serving.limits import DEFAULT_MAX_N, DEFAULT_MAX_REQUEST_BODY_BYTES, ServerLimits

DEFAULT_HOST = "127.0.0.1"  # loopback unless asked otherwise: no API is exposed to the network by surprise
DEFAULT_PORT = 8000  # OpenAI-compatible servers' usual port
# A thread that wants the GIL back (the thread that reads the engine process's events, or the engine thread
# with --no-engine-process) waits until Python's switch interval runs out, 5 ms by default, while the event loop
# is busy writing chunks under load: longer than a decode step. A short interval lets it back in quickly.
GIL_SWITCH_INTERVAL_S = 0.0005


def _flag_type(field_type: Any) -> Any:
    """The scalar type argparse converts a field's value to (``int | None`` -> int)."""
    if isinstance(field_type, types.UnionType) or typing.get_origin(field_type) is typing.Union:
        return next(arg for arg in typing.get_args(field_type) if arg is not type(None))
    return field_type


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field except `model`, defaulting to the field's default."""
    group = parser.add_argument_group("engine arguments (see README.md, 'Engine arguments')")
    help_of = EngineConfig.field_help()
    for field in dataclasses.fields(EngineConfig):
        if field.name == "model":
            continue
        flag = "--" + field.name.replace("_", "-")
        flag_type = _flag_type(field.type)
        description = f"{help_of[field.name]} (default: {field.default})"
        if flag_type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=description)
        else:
            metavar = flag_type.__name__.upper()
            group.add_argument(flag, type=flag_type, default=field.default, metavar=metavar, help=description)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanovllm serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a Hugging Face model directory")
    parser.add_argument("--served-model-name", help="the name clients pass as 'model' (default: --model)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="PEFT LoRA adapters to serve (with --enable-lora): a request whose 'model' is NAME runs adapter PATH",
    )
    parser.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine in a process of its own, which holds its own GIL, so that writing many streams "
        "does not slow its steps (default); --no-engine-process runs it in a thread of the server",
    )
    parser.add_argument(
        "--max-n", type=int, default=DEFAULT_MAX_N, help=f"most completions per prompt, n (default {DEFAULT_MAX_N})"
    )
    parser.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        help=f"largest request body; a larger one is a 413 (default {DEFAULT_MAX_REQUEST_BODY_BYTES})",
    )
    add_engine_args(parser)
    return parser


def engine_args_from(args: argparse.Namespace) -> dict[str, Any]:
    return {
        field.name: getattr(args, field.name) for field in dataclasses.fields(EngineConfig) if field.name != "model"
    }


def parse_lora_modules(specs: list[str], model_name: str) -> list[LoRARequest]:
    """``--lora-modules NAME=PATH ...`` as LoRARequests, with lora_int_id 1, 2, ... in the order given."""
    lora_modules: list[LoRARequest] = []
    for lora_int_id, spec in enumerate(specs, start=1):
        name, has_equals, path = spec.partition("=")
        if not (has_equals and name and path):
            raise ValueError(f"--lora-modules takes NAME=PATH pairs, got {spec!r}")
        if name in {model_name, *(lora.lora_name for lora in lora_modules)}:
            raise ValueError(f"--lora-modules name {name!r} is already served; give each adapter its own name")
        lora_modules.append(LoRARequest(name, lora_int_id, path))
    return lora_modules


def lora_modules_from(args: argparse.Namespace, model_name: str) -> list[LoRARequest]:
    """The adapters to serve, each directory read and checked against the model now (startup fails if one is bad)."""
    if args.lora_modules and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    lora_modules = parse_lora_modules(args.lora_modules, model_name)
    check_adapters(args.model, args.max_lora_rank, lora_modules)
    return lora_modules


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags, build the engine (the slow part), then serve until interrupted."""
    import uvicorn  # imported here: the library itself works without the `serve` extra

    from nanovllm.serving.app import build_app
    from nanovllm.serving.async_llm import AsyncLLM
    from nanovllm.serving.gc_freeze import startup_objects_frozen

    parser = make_parser()
    args = parser.parse_args(argv)
    model_name = args.served_model_name or args.model
    try:
        lora_modules = lora_modules_from(args, model_name)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    logging.basicConfig(level=args.log_level.upper())
    limits = ServerLimits(max_n=args.max_n, max_request_body_bytes=args.max_request_body_bytes)  # checked first
    async_llm = AsyncLLM.from_engine_args(args.model, engine_process=args.engine_process, **engine_args_from(args))
    try:
        app = build_app(async_llm, model_name, args.api_key, limits, lora_modules)
        with startup_objects_frozen():  # the engine (or its handle), the app and the tokenizer serve until exit
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        async_llm.shutdown()
