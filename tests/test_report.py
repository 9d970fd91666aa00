"""The report: TensorBoard event files -> scalars (TensorBoard's reader), PNG plots, Markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.eval.plots import build_report, load_scalars

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _write(run_dir: Path, points: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(run_dir)) as w:
        for tag, pts in points.items():
            for step, value in pts:
                w.add_scalar(tag, value, step)


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    """Two training runs (loss, lr, throughput, eval curve) and two one-point evaluation runs."""
    root = tmp_path / "logs"
    for run, scale in (("pretrain/tensorboard", 1.0), ("finetune/tensorboard", 0.5)):
        _write(root / run, {
            "train/loss": [(s, scale * 5.0 / s) for s in range(1, 21)],
            "train/lr": [(s, 1e-3 * min(1.0, s / 5)) for s in range(1, 21)],
            "perf/tokens_per_s": [(s, 1500.0 + s) for s in range(1, 21)],
            "eval/loss": [(10, scale * 2.0), (20, scale * 1.5)],
            "eval/ppl": [(10, 7.39 * scale), (20, 4.48 * scale)],
        })
    _write(root / "eval/tensorboard/base", {"eval/exact_match": [(200, 0.05)]})
    _write(root / "eval/tensorboard/finetuned", {"eval/exact_match": [(300, 0.8)]})
    return root


def test_scalars_are_read_per_run_with_every_point(logdir: Path):
    s = load_scalars(logdir)
    assert set(s) == {"pretrain/tensorboard", "finetune/tensorboard", "eval/tensorboard/base", "eval/tensorboard/finetuned"}
    loss = s["pretrain/tensorboard"]["train/loss"]
    assert [step for step, _ in loss] == list(range(1, 21))
    assert loss[0][1] == pytest.approx(5.0) and loss[-1][1] == pytest.approx(0.25)
    assert s["eval/tensorboard/finetuned"]["eval/exact_match"] == [(300, pytest.approx(0.8))]


def test_report_writes_pngs_and_markdown_that_embeds_them(logdir: Path, tmp_path: Path):
    out = tmp_path / "report"
    result = build_report(logdir, out)
    assert result["output"] == str(out)
    figures = set(result["figures"])
    assert {"loss.png", "lr.png", "throughput.png", "eval_ppl.png", "eval_exact_match.png"} <= figures
    for name in figures:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name  # a real rendered figure
    md = (out / "report.md").read_text()
    for name in figures:
        assert f"]({name})" in md
    assert "| pretrain/tensorboard | train/loss | 20 | 1 | 20 | 0.25 |" in md
    assert "| eval/tensorboard/finetuned | eval/exact_match | 1 | 300 | 300 | 0.8 |" in md
    assert f"tensorboard --logdir {logdir}" in md
    dumped = json.loads((out / "scalars.json").read_text())
    assert len(dumped["finetune/tensorboard"]["perf/tokens_per_s"]) == 20
    assert not (tmp_path / "report.partial").exists()


def test_default_output_inside_logdir_is_not_read_back(logdir: Path):
    first = build_report(logdir)
    assert first["output"] == str(logdir / "report")
    (logdir / "report" / "stray").mkdir()  # a rerun must not treat the report folder as a run
    _write(logdir / "report" / "stray", {"train/loss": [(1, 9.0)]})
    second = build_report(logdir)
    assert "report/stray" not in second["runs"] and len(second["runs"]) == 4


def test_missing_or_empty_logdir_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no TensorBoard scalars"):
        build_report(tmp_path / "empty")


def test_launch_script_exit_codes(logdir: Path, tmp_path: Path):
    script = str(ROOT / "launch" / "report.py")
    ok = subprocess.run([sys.executable, script, "--logdir", str(logdir), "--output", str(tmp_path / "r")],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "report.md" in ok.stdout and (tmp_path / "r" / "loss.png").is_file()
    bad = subprocess.run([sys.executable, script, "--logdir", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: log directory") and "Traceback" not in bad.stderr
