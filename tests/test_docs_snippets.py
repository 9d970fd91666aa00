"""Every recipe snippet in the docs is accepted by the config loader of the stage it names.

A snippet is a ```yaml block whose first line is ``# launch/<stage>.py``; it must load
without a ConfigError (unknown keys, wrong types, inconsistent values), so the docs cannot
drift from the config dataclasses.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"```yaml\n(# launch/(\w+)\.py\n.*?)```", re.S)


def _classes() -> dict:
    from pipeline.stages.evaluate import EvalConfig
    from pipeline.stages.finetune import FinetuneConfig
    from pipeline.stages.preprocess import PreprocessConfig
    from pipeline.stages.train import TrainConfig

    return {"preprocess": PreprocessConfig, "train": TrainConfig, "finetune": FinetuneConfig, "evaluate": EvalConfig}


def _snippets() -> list[tuple[str, int, str, str]]:
    out = []
    for md in sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]):
        text = md.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            out.append((str(md.relative_to(ROOT)), text[:m.start()].count("\n") + 1, m.group(2), m.group(1)))
    return out


SNIPPETS = _snippets()


def test_the_guide_to_own_data_has_a_recipe_for_every_stage():
    stages = {stage for doc, _, stage, _ in SNIPPETS if doc == "docs/own_data.md"}
    assert stages == {"preprocess", "train", "finetune", "evaluate"}


@pytest.mark.parametrize("doc, line, stage, text", SNIPPETS, ids=[f"{d}:{n}" for d, n, _, _ in SNIPPETS])
def test_snippet_loads(tmp_path: Path, doc: str, line: int, stage: str, text: str):
    cls = _classes().get(stage)
    assert cls is not None, f"{doc}:{line} names launch/{stage}.py, which has no recipe"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    load_config(cls, str(recipe))
