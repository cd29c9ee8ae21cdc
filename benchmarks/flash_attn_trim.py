"""Trim an unpacked flash-attn 2.8.x source tree to the kernels nanovllm's checks need, before building it.

    python benchmarks/flash_attn_trim.py /tmp/fa/flash_attn-2.8.3.post2

The full build compiles 72 CUDA files (~22 minutes on the 16-core GPU machine), most of a session's
device time. nanovllm calls only the forward kernels (varlen prefill, paged KV-cache decode), with
head_dim 32 (the tests' tiny Qwen3) and 128 (the Qwen3 shapes bench.py runs). This keeps the 16 forward
files of those head dims and drops the rest:

- setup.py: the other sources are taken out of the extension's list;
- static_switch.h: HEADDIM_SWITCH picks kernel 32 for head_dim <= 32 and 128 for <= 128 (flash-attn's
  kernels mask a head_dim below their own), and fails loudly above that;
- flash_api.cpp: run_mha_bwd, the one caller of the backward kernels, fails loudly instead.

Only the shape of those three files is relied on; each edit checks that it matched exactly once.
"""

import re
import sys
from pathlib import Path

KEPT_HEAD_DIMS = (32, 128)

HEADDIM_SWITCH = """#define HEADDIM_SWITCH(HEADDIM, ...)   \\
  [&] {                                    \\
    if (HEADDIM <= 32) {                   \\
      constexpr static int kHeadDim = 32;  \\
      return __VA_ARGS__();                \\
    } else if (HEADDIM <= 128) {           \\
      constexpr static int kHeadDim = 128; \\
      return __VA_ARGS__();                \\
    } else {                               \\
      TORCH_CHECK(false, "this trimmed flash-attn build has head_dim <= 128 only"); \\
    }                                      \\
  }()"""

RUN_MHA_BWD = """void run_mha_bwd(Flash_bwd_params &params, cudaStream_t stream) {
    TORCH_CHECK(false, "this trimmed flash-attn build has no backward kernels");
}"""


def replace_once(text: str, pattern: str, replacement: str, what: str) -> str:
    new_text, count = re.subn(pattern, lambda _: replacement, text, flags=re.DOTALL)
    if count != 1:
        raise SystemExit(f"{what}: expected one match, found {count}; this flash-attn version differs")
    return new_text


def keep_source(line: str) -> bool:
    match = re.search(r'"csrc/flash_attn/src/flash_(fwd|fwd_split|bwd)_hdim(\d+)_', line)
    if match is None:
        return True
    return match.group(1) != "bwd" and int(match.group(2)) in KEPT_HEAD_DIMS


def main() -> None:
    root = Path(sys.argv[1])
    setup = root / "setup.py"
    lines = setup.read_text().splitlines(keepends=True)
    kept = [line for line in lines if keep_source(line)]
    num_kept = sum('"csrc/flash_attn/src/flash_' in line for line in kept)
    if num_kept != 8 * len(KEPT_HEAD_DIMS):
        raise SystemExit(f"setup.py: expected {8 * len(KEPT_HEAD_DIMS)} kept kernel sources, found {num_kept}")
    setup.write_text("".join(kept))

    switch = root / "csrc/flash_attn/src/static_switch.h"
    text = switch.read_text()
    pattern = r"#define HEADDIM_SWITCH\(HEADDIM, \.\.\.\).*?\}\(\)"
    switch.write_text(replace_once(text, pattern, HEADDIM_SWITCH, str(switch)))

    api = root / "csrc/flash_attn/flash_api.cpp"
    text = api.read_text()
    pattern = r"void run_mha_bwd\(Flash_bwd_params &params, cudaStream_t stream\) \{.*?\n\}"
    api.write_text(replace_once(text, pattern, RUN_MHA_BWD, str(api)))
    print(f"trimmed {root}: {num_kept} kernel sources (forward, head_dim {KEPT_HEAD_DIMS}) and flash_api.cpp")


if __name__ == "__main__":
    main()
