"""The layering of ``pipeline/`` (docs/dev/architecture.md), checked on the source:

    stages/            compose the rest; one module per stage; nothing imports a stage
    training/  eval/   the training engine and run; metrics, evaluation tasks, plots
    data/              corpus readers, cleaning, tokenizers, shards, samplers, SFT data
    base               pipeline/*.py: config, errors, cli, io, dist, inputs, ...

A module may import its own layer and the layers below; every import counts, also those
inside functions (a cycle held together by a function-level import is still a cycle). No
import cycles between modules. Every ``launch/<name>.py`` has one shape: it calls
``pipeline.stages.<name>.main(description=__doc__)`` and ends through ``pipeline.dist.finish``.
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


# ---------------------------------------------------------------------------- entry points

LAUNCH = ROOT / "launch"
_MAIN = ast.parse('def main(argv: list[str] | None = None, *, description: str = "") -> int: ...').body[0]
"""The signature of every stage's command line (``pipeline/stages/<name>.py``)."""


def _launch_shape_problems(name: str, source: str) -> list[str]:
    """What in ``launch/<name>.py`` departs from the one shape of an entry script: a docstring,
    ``import os`` / ``import sys``, the ``sys.path`` line, ``from pipeline.dist import finish``,
    ``from pipeline.stages.<name> import main`` and ``finish(main(description=__doc__))``
    under ``if __name__ == "__main__"``; nothing else."""
    body = ast.parse(source).body
    allowed = {
        "sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))",
        "from pipeline.dist import finish",
        f"from pipeline.stages.{name} import main",
        "if __name__ == '__main__':\n    finish(main(description=__doc__))",
    }
    problems = []
    if not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        problems.append("no docstring (it is the --help description)")
    else:
        body = body[1:]
    seen = []
    for node in body:
        text = ast.unparse(node)
        if isinstance(node, ast.Import) and {a.name for a in node.names} <= {"os", "sys"} and all(a.asname is None for a in node.names):
            continue
        if text in allowed:
            seen.append(text)
        else:
            problems.append(f"line {node.lineno}: {text.splitlines()[0]!r} (not part of an entry script: move it into the stage's main)")
    for want in sorted(allowed):
        if seen.count(want) != 1:
            problems.append(f"{want.splitlines()[-1].strip()!r} {'missing' if want not in seen else 'repeated'}")
    return problems


def _main_signature_problem(path: Path) -> str | None:
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if not path.is_file():
        return f"{shown} missing"
    fns = [n for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    if not fns:
        return f"{shown}: no top-level main"
    fn = fns[-1]
    if ast.dump(fn.args) != ast.dump(_MAIN.args) or ast.dump(fn.returns) != ast.dump(_MAIN.returns):
        got = f"main({ast.unparse(fn.args)}){' -> ' + ast.unparse(fn.returns) if fn.returns else ''}"
        return f"{shown}: {got}, not main({ast.unparse(_MAIN.args)}) -> int"
    return None


def test_every_launch_script_only_calls_its_stage_main():
    """``launch/<name>.py`` is six lines of code around ``pipeline.stages.<name>.main`` (docs/dev/architecture.md)."""
    scripts = sorted(LAUNCH.glob("*.py"))
    assert scripts
    wrong = {p.name: probs for p in scripts if (probs := _launch_shape_problems(p.stem, p.read_text(encoding="utf-8")))}
    assert not wrong, "\n".join(f"launch/{n}:\n  " + "\n  ".join(v) for n, v in wrong.items())


def test_every_launch_script_has_a_stage_main_with_one_signature():
    wrong = [m for p in sorted(LAUNCH.glob("*.py")) if (m := _main_signature_problem(PACKAGE / "stages" / p.name))]
    assert not wrong, "\n".join(wrong)


def test_the_shape_check_catches_a_departure(tmp_path):
    """The checker itself: another exit, a second import and a missing finish are each reported."""
    good = (LAUNCH / "train.py").read_text(encoding="utf-8")
    assert _launch_shape_problems("train", good) == []
    assert _launch_shape_problems("export", good)  # imports another stage's main
    assert _launch_shape_problems("train", good.replace("finish(main(description=__doc__))", "sys.exit(main())"))
    assert _launch_shape_problems("train", good + "\nimport argparse\n")
    assert _launch_shape_problems("train", good.replace("from pipeline.dist import finish", "from pipeline.dist import init"))
    bad = tmp_path / "stage.py"
    bad.write_text("def main(argv=None) -> int:\n    return 0\n")
    assert _main_signature_problem(bad) is not None and _main_signature_problem(tmp_path / "nope.py") is not None
    bad.write_text('def main(argv: list[str] | None = None, *, description: str = "") -> int:\n    return 0\n')
    assert _main_signature_problem(bad) is None
