"""The generated config reference (pipeline/stages/docgen.py): one file per stage, named after it."""

from __future__ import annotations

from pathlib import Path

from pipeline.stages import docgen


def test_one_reference_per_stage_named_after_its_launch_script():
    from conftest import ROOT

    names = {p.stem for p in (ROOT / "docs" / "config").glob("*.md")}
    assert names == {p.stem for p in (ROOT / "launch").glob("*.py")} & set(docgen.stages()) == {
        "preprocess", "train", "finetune", "evaluate"}
    assert docgen.stages()["pretrain"] is docgen.stages()["train"]  # the pre-training recipe's name
    assert "`pretrain` is this stage's recipe for pre-training" in (ROOT / "docs" / "config" / "train.md").read_text()


def test_a_reference_no_stage_writes_is_stale_and_removed(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(docgen, "DOCS", tmp_path)
    assert docgen.main([]) == 0
    (tmp_path / "pretrain.md").write_text("# `pretrain` config keys\n\n" + docgen._GENERATED + " from x; do not edit.\n")
    (tmp_path / "notes.md").write_text("written by hand\n")
    assert docgen.main(["--check"]) == 1
    assert "pretrain.md (no stage of that name: remove it)" in capsys.readouterr().err
    assert docgen.main([]) == 0 and docgen.main(["--check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluate.md", "finetune.md", "notes.md", "preprocess.md", "train.md"]
