"""The layering of ``pipeline/`` (docs/dev/architecture.md), checked on the source:

    stages/            compose the rest; one module per stage; nothing imports a stage
    training/  eval/   the training engine and run; metrics, evaluation tasks, plots
    data/              corpus readers, cleaning, tokenizers, shards, samplers, SFT data
    base               pipeline/*.py: config, errors, cli, io, dist, inputs, ...

A module may import its own layer and the layers below; every import counts, also those
inside functions (a cycle held together by a function-level import is still a cycle). No
import cycles between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "pipeline"
LAYERS = {"base": 0, "data": 1, "eval": 2, "training": 2, "stages": 3}
"""Rank of each layer: an import may not go to a higher rank. eval and training share a rank
(evaluation during training, and evaluation of checkpoints) but may not form a cycle."""


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "base"


def _imports() -> dict[str, set[str]]:
    """Every ``pipeline`` module and the ``pipeline`` modules it imports (anywhere in its body)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "pipeline":
                for alias in node.names:  # "from pipeline.x import y": y may be a module of package x
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "pipeline")
        out[name] = {d for d in deps if d in modules and d != name and not (d == "pipeline" or d.endswith("__init__"))}
    return out


def test_no_import_goes_up_a_layer():
    wrong = []
    for module, deps in sorted(_imports().items()):
        for dep in sorted(deps):
            if LAYERS[_layer(dep)] > LAYERS[_layer(module)]:
                wrong.append(f"{module} ({_layer(module)}) imports {dep} ({_layer(dep)})")
    assert not wrong, "imports against the layering (docs/dev/architecture.md):\n" + "\n".join(wrong)


def test_nothing_imports_a_stage():
    users = sorted(f"{m} imports {d}" for m, deps in _imports().items() for d in deps
                   if _layer(d) == "stages" and _layer(m) != "stages")
    assert not users, "\n".join(users)


def test_no_import_cycles():
    graph = _imports()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a data module importing a stage is reported."""
    assert _layer("pipeline.data.sft") == "data" and _layer("pipeline.stages.train") == "stages"
    assert _layer("pipeline.config") == "base" and LAYERS[_layer("pipeline.stages.train")] > LAYERS["data"]


def test_modules_stay_small():
    """Split a module before it passes 600 lines (docs/dev/architecture.md)."""
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, long
