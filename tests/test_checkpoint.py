"""pipeline.training.checkpoint: world-size checks and the universal conversion's refusals (no ranks started)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.training.checkpoint import check_world_size, to_universal, universal_path
from pipeline.errors import UserError


def _step(root: Path, **meta) -> Path:
    step = root / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 2, "world_size": 2, "zero_stage": 3, **meta}))
    (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    return step


def test_world_size_check(tmp_path: Path):
    step = _step(tmp_path)
    meta = json.loads((step / "meta.json").read_text())
    assert check_world_size(step, meta, 2) is False  # same ranks: a regular resume
    assert check_world_size(step, {**meta, "universal": True}, 5) is True  # any ranks: universal loading
    with pytest.raises(UserError) as e:
        check_world_size(step, meta, 1)
    msg = str(e.value)
    assert f"cannot resume from {step}: it was written by 2 data-parallel rank(s) and this run has 1" in msg
    assert f"`python launch/convert_checkpoint.py --checkpoint {step}`" in msg
    assert msg.endswith(f"checkpoint.resume={universal_path(step)}") and universal_path(step).name == "step-00000002-universal"


@pytest.mark.parametrize("case, message", [
    ("not a checkpoint", "is not a complete checkpoint of this pipeline"),
    ("half-written", "is not a complete checkpoint of this pipeline"),
    ("universal already", "is a universal checkpoint already"),
    ("output exists", "already exists; resume from it"),
])
def test_conversion_refusals_touch_nothing(tmp_path: Path, case: str, message: str):
    step = _step(tmp_path, universal=case == "universal already")
    out = None
    if case == "not a checkpoint":
        step = tmp_path / "elsewhere"
        step.mkdir()
    elif case == "half-written":
        (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    elif case == "output exists":
        out = tmp_path / "universal"
        out.mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=re.escape(message)):
        to_universal(step, out, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
