"""The tree is the pipeline: every nanovllm module's imports, function-level ones included, read with ``ast``.

Each part of the package may import only the parts listed for it in ALLOWED, so imports flow one way:

    llm -> engine -> scheduler, runner (-> sampling, lora -> models -> layers -> kernels), parallel;  serving -> engine

A part is a top-level module (``config``) or a package (``runner``); a few entries name a single module
(``scheduler.batch``) where a part may use only that one of a package. No module may import itself back
through others (an import cycle), even from inside a function.
"""

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "nanovllm"
DATA = {"config", "outputs", "sampling_params", "lora_request"}  # plain settings and results, which any stage may use
# The scheduler's plain data: the batch handed to the runner, and the sequences it holds.
SCHEDULER_DATA = {"scheduler.batch", "scheduler.sequence"}
TENSOR_PARALLEL_INFO = {"parallel.process_group"}  # the rank, size and process group the parallel layers read
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "kernels": {"utils"},
    "layers": {"kernels", "utils", *TENSOR_PARALLEL_INFO},
    "models": {"layers", "kernels", "utils"},
    "scheduler": DATA,
    "sampling": {"utils", *SCHEDULER_DATA, *DATA},
    # LoRA adapters: read against the model's shapes, loaded into its layers' slots, per batch of the scheduler.
    "lora": {"models", "layers", "kernels", "utils", *SCHEDULER_DATA, *DATA},
    "runner": {"sampling", "lora", "models", "layers", "kernels", "utils", *SCHEDULER_DATA, *DATA},
    "parallel": {"runner", "models", *SCHEDULER_DATA, *DATA},
    "engine": {"scheduler", "runner", "parallel", "sampling", "lora", "models", *DATA},
    "serving": {"engine", *DATA},
    "llm": {"engine", "utils", *DATA},
    "cli": {"serving"},
    "__main__": {"cli"},
    "__init__": {"llm", *DATA},
    "config": set(),
    "outputs": set(),
    "sampling_params": set(),
    "lora_request": set(),
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name under nanovllm, e.g. "runner.model_runner"
    imported: str  # dotted module name under nanovllm
    path: Path  # the importer's file, from the folder that holds the package
    line: int  # where the import statement is

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def read_imports(root: Path) -> list[Import]:
    """Every import of a module of the package rooted at ``root`` (named by its folder), anywhere in a file."""
    package = root.name
    modules = {module_name(root, path) for path in root.rglob("*.py")}
    found: dict[Import, None] = {}  # in order, each import once (`from x import a, b` names x twice)
    for path in sorted(root.rglob("*.py")):
        importer = module_name(root, path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in imported_names(node, package, importer, path.name == "__init__.py"):
                # `from nanovllm.sampling import race` names a module; `from nanovllm.x import f` names x.
                imported = name if name in modules else name.rpartition(".")[0]
                if imported in modules and imported != importer:
                    found[Import(importer, imported, path.relative_to(root.parent), node.lineno)] = None
    return list(found)


def imported_names(node: ast.AST, package: str, importer: str, is_init: bool) -> Iterator[str]:
    """Dotted names under ``package`` that an import node brings in (``a.b`` or ``a.b.name``)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith(package + "."):
                yield alias.name.removeprefix(package + ".")
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the importer's package
            base = importer.split(".") if is_init else importer.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            module = ".".join([*base, node.module] if node.module else base)
        elif node.module == package or (node.module or "").startswith(package + "."):
            module = node.module.removeprefix(package).lstrip(".")  # type: ignore[union-attr]
        else:
            return
        for alias in node.names:
            yield f"{module}.{alias.name}" if module else alias.name


def part_of(module: str) -> str:
    return module.split(".")[0]


def may_import(importer: str, imported: str) -> bool:
    importer_part, imported_part = part_of(importer), part_of(imported)
    if importer_part == imported_part:
        return True
    allowed = ALLOWED.get(importer_part, set())
    return imported_part in allowed or imported in allowed


def forbidden_imports(imports: list[Import]) -> list[Import]:
    return [imp for imp in imports if not may_import(imp.importer, imp.imported)]


def import_cycles(imports: list[Import]) -> list[list[Import]]:
    """One cycle of imports through each strongly connected group of modules (Tarjan's algorithm)."""
    edges: dict[str, list[Import]] = {}
    for imp in imports:
        edges.setdefault(imp.importer, []).append(imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imp in edges.get(module, []):
            if imp.imported not in index:
                visit(imp.imported)
                low[module] = min(low[module], low[imp.imported])
            elif imp.imported in stack:
                low[module] = min(low[module], index[imp.imported])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return [cycle_within(group, edges) for group in groups]


def cycle_within(group: set[str], edges: dict[str, list[Import]]) -> list[Import]:
    """A path of imports inside ``group`` from its first module back to itself (breadth first: a shortest one)."""
    start = min(group)
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for module in frontier:
            for imp in edges.get(module, []):
                if imp.imported == start:
                    return [*paths[module], imp]
                if imp.imported in group and imp.imported not in paths:
                    paths[imp.imported] = [*paths[module], imp]
                    nxt.append(imp.imported)
        frontier = nxt
    raise AssertionError(f"{sorted(group)} is not a cycle")


def layering_report(root: Path) -> list[str]:
    """What is wrong with the package at ``root``: each forbidden import and each cycle, with file and line."""
    imports = read_imports(root)
    report = [f"forbidden: {imp}" for imp in forbidden_imports(imports)]
    for cycle in import_cycles(imports):
        report.append("cycle: " + " -> ".join(str(imp) for imp in cycle))
    return report


def test_imports_flow_one_way() -> None:
    """Guards the layout against the tangle it grew before: an import cycle (runner <-> tensor-parallel worker,
    sampler <-> its kernel, even from inside a function) or an import against the pipeline's direction."""
    report = layering_report(PACKAGE_ROOT)
    assert not report, "\n".join(report)


def test_every_part_is_listed() -> None:
    """Guards against a new package or top-level module escaping the rules: each must have an ALLOWED entry."""
    parts = {part_of(module_name(PACKAGE_ROOT, path)) for path in PACKAGE_ROOT.rglob("*.py")}
    assert parts <= set(ALLOWED), f"parts without rules: {sorted(parts - set(ALLOWED))}"


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A copy of the package's shape with a cycle and an upward import planted in it."""
    root = tmp_path / "nanovllm"
    files = {
        "__init__.py": "",
        "kernels/__init__.py": "",
        "kernels/backends.py": "def pick():\n    from nanovllm.layers.attention import Attention\n",
        "layers/__init__.py": "",
        "layers/attention.py": "from nanovllm.kernels import backends\n\nclass Attention:\n    pass\n",
        "runner/__init__.py": "",
        "runner/model_runner.py": "from nanovllm.scheduler.scheduler import Scheduler\n",
        "scheduler/__init__.py": "",
        "scheduler/scheduler.py": "class Scheduler:\n    pass\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_check_finds_planted_faults(planted: Path) -> None:
    """Guards the check itself: a function-level import that closes a cycle, and imports against the layers,
    must each be reported with the file and line."""
    report = layering_report(planted)
    assert "forbidden: nanovllm/kernels/backends.py:2: kernels.backends imports layers.attention" in report, report
    assert "forbidden: nanovllm/runner/model_runner.py:1: runner.model_runner imports scheduler.scheduler" in report, (
        report
    )
    cycles = [line for line in report if line.startswith("cycle:")]
    assert cycles == [
        "cycle: nanovllm/kernels/backends.py:2: kernels.backends imports layers.attention -> "
        "nanovllm/layers/attention.py:1: layers.attention imports kernels.backends"
    ], report
