"""The config system: YAML + dotted overrides, strict keys, one error listing every problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pipeline.config import describe_keys, field_docs, help_text, load_config, parse_value, to_dict
from pipeline.errors import ConfigError, UserError

from conftest import ROOT
from inproc import run_entry


@dataclass
class Inner:
    path: str = ""
    """Where it is."""
    weight: float = 1.0
    """How much it counts."""

    def check(self):
        return [("weight", f"must be > 0, got {self.weight}")] if self.weight <= 0 else []


@dataclass
class Train:
    lr: float = 1e-3
    """Peak learning rate."""
    steps: int = 10
    """Optimizer steps."""
    schedule: Literal["cosine", "linear"] = "cosine"
    """Decay shape."""
    act_ckpt: bool = False
    """Activation checkpointing."""
    note: str | None = None
    """Optional note."""


@dataclass
class Cfg:
    train: Train = field(default_factory=Train)
    """Training."""
    items: list[Inner] = field(default_factory=list)
    """Inputs."""
    name: str = "x"
    """A name."""


def test_defaults_yaml_and_overrides_merge(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 20\nitems:\n  - path: a\n  - {path: b, weight: 2}\n")
    cfg = load_config(Cfg, str(f), ["train.lr=3e-4", "items.1.weight=5", "items.2.path=c", "train.schedule=linear"])
    assert cfg.train.steps == 20 and cfg.train.lr == pytest.approx(3e-4) and cfg.train.schedule == "linear"
    assert [(i.path, i.weight) for i in cfg.items] == [("a", 1.0), ("b", 5.0), ("c", 1.0)]
    assert cfg.name == "x" and cfg.train.act_ckpt is False


def test_whole_list_override_and_null():
    cfg = load_config(Cfg, None, ["items=[{path: z}]", "train.note=null", "train.steps=1e3"])
    assert [i.path for i in cfg.items] == ["z"] and cfg.train.note is None and cfg.train.steps == 1000


def test_all_problems_reported_together(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("trian: {}\ntrain:\n  stpes: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, str(f), ["train.lr=fast", "train.schedule=step", "items.0.weight=-1", "train.act_ckpt=maybe", "noequals"])
    keys = [k for k, _ in e.value.problems]
    assert sorted(keys) == sorted(["trian", "train.stpes", "noequals", "train.lr", "train.schedule", "train.act_ckpt", "items.0.weight"])
    msg = str(e.value)
    assert "did you mean 'train'" in msg and "did you mean 'steps'" in msg
    assert "must be one of: cosine, linear" in msg and "expected a number, got 'fast'" in msg
    assert "must be > 0, got -1.0" in msg and msg.startswith("invalid config (7 problems)")


def test_bad_yaml_and_missing_file(tmp_path: Path):
    with pytest.raises(UserError, match="cannot read config file"):
        load_config(Cfg, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Cfg, str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(Cfg, str(bad))


def test_field_docs_and_help():
    assert field_docs(Train)["lr"] == "Peak learning rate."
    keys = {k: (t, d, doc) for k, t, d, doc in describe_keys(Cfg)}
    assert keys["train.schedule"] == ("cosine | linear", "cosine", "Decay shape.")
    assert keys["items.N.weight"][2] == "How much it counts."
    assert "train.note  (str | null; default: null)" in help_text(Cfg)


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("true") is True and parse_value("[1, 2]") == [1, 2]
    assert parse_value("a: b: c") == "a: b: c"  # not valid YAML: kept as the raw string


def test_every_stage_config_documents_every_key():
    from pipeline.stages.docgen import stages

    for cls in stages().values():
        for key, _, _, doc in describe_keys(cls):
            assert doc, f"config key {key} of {cls.__name__} has no docstring"


def test_every_shipped_yaml_loads():
    from pipeline.stages.docgen import stages as stage_configs

    # recipes named after what they do rather than their stage: continue-training, preference tuning
    stages = {**stage_configs(), "continue_train": stage_configs()["pretrain"], "dpo": stage_configs()["finetune"]}
    files = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "examples").rglob("*.yaml"))
    harness = ROOT / "examples" / "harness"  # lm-evaluation-harness task files (tests/test_harness.py reads them)
    files = [f for f in files if harness not in f.parents]
    assert files, "no shipped configs found"
    for f in files:
        stage = f.stem
        assert stage in stages, f"{f}: no stage named {stage}"
        load_config(stages[stage], str(f))


def test_cli_error_exit_code_and_no_traceback(tmp_path: Path, monkeypatch, capsys):
    code, _, err = run_entry("preprocess.py", ["val_fraction=2", "clean.min_char=3", "workers=x"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 2
    assert "Traceback" not in err
    assert "val_fraction: must be in [0, 1), got 2.0" in err
    assert "clean.min_char: unknown key; did you mean 'min_chars'?" in err
    assert "workers: expected an integer, got 'x'" in err
    assert not any(tmp_path.iterdir()), "a failed config check must not write anything"


def test_cli_help_and_print_config(tmp_path: Path, monkeypatch, capsys):
    code, out, _ = run_entry("preprocess.py", ["--help"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 0
    assert "tokenizer.vocab_size" in out and "sources.N.text_field" in out and "val_fraction" in out
    code, out, err = run_entry("preprocess.py", ["--print-config", "tokenizer.vocab_size=1000", "sources.0.weight=2"], monkeypatch, capsys,
                               cwd=tmp_path)
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["tokenizer"]["vocab_size"] == 1000 and cfg["sources"][0]["weight"] == 2.0
    assert not any(tmp_path.iterdir())


def test_generated_config_docs_are_current():
    from pipeline.stages.docgen import main

    assert main(["--check"]) == 0, "docs/config is stale: run python -m pipeline.stages.docgen"


def test_names_from_other_tools_point_at_ours():
    """Hugging Face / DeepSpeed / Megatron names, and our names in the wrong section, are pointed at the key here."""
    from pipeline.stages.train import TrainConfig

    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, ["train.learning_rate=1e-4", "per_device_train_batch_size=4",
                                        "train.gradient_accumulation_steps=2", "train.num_train_epochs=3",
                                        "data.max_seq_length=512", "lr=3e-4", "train.max_step=5", "train.warmup_ratio=0.1"])
    got = dict(e.value.problems)
    assert got["train.learning_rate"].startswith("unknown key; did you mean 'lr'? valid keys here: ")
    assert "did you mean 'train.micro_batch_size'?" in got["per_device_train_batch_size"]
    assert "did you mean 'grad_accum'?" in got["train.gradient_accumulation_steps"]
    assert "did you mean 'max_steps'? (training length is counted in optimizer steps here, not epochs)" in got["train.num_train_epochs"]
    assert "did you mean 'warmup_steps'? (warm-up is counted in optimizer steps" in got["train.warmup_ratio"]
    assert "did you mean 'seq_len'?" in got["data.max_seq_length"]
    assert "did you mean 'train.lr'?" in got["lr"]  # our own name, one section off
    assert "did you mean 'max_steps'?" in got["train.max_step"]  # a misspelling: the closest name, as before
    with pytest.raises(ConfigError) as e:  # the test config: the alias resolves wherever its target lives
        load_config(Cfg, None, ["learning_rate=1"])
    assert "did you mean 'train.lr'?" in str(e.value)


def test_every_alias_names_a_real_key():
    """The alias table must follow renames: each entry names a key of some stage config."""
    from pipeline.config import _ALIASES, leaf_keys
    from pipeline.stages.docgen import stages

    keys = {k for cls in stages().values() for k in leaf_keys(cls)}
    for foreign, (ours, _) in _ALIASES.items():
        assert foreign not in {k.rsplit(".", 1)[-1] for k in keys}, f"{foreign} is a key here: not an alias"
        for name in ours:
            assert any(k == name or k.endswith("." + name) for k in keys), f"alias {foreign} -> {name}: no such key"


def test_deepspeed_json_as_config_is_one_problem(tmp_path: Path):
    from pipeline.stages.preprocess import PreprocessConfig
    from pipeline.stages.train import TrainConfig

    files = sorted((ROOT / "ds_configs").glob("*.json"))
    assert files
    for f in files:
        with pytest.raises(ConfigError) as e:
            load_config(TrainConfig, str(f))
        assert len(e.value.problems) == 1, e.value
        key, msg = e.value.problems[0]
        assert key == "--config" and "is a DeepSpeed config (zero_optimization" in msg
        assert f"pass it as deepspeed.config={f}" in msg
        with pytest.raises(ConfigError) as e:
            load_config(PreprocessConfig, str(f))
        assert len(e.value.problems) == 1 and "this stage takes no DeepSpeed config" in str(e.value)
    # a recipe with one DeepSpeed name in it is a recipe with an unknown key, not a DeepSpeed config
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text("train:\n  lr: 1.0e-4\ngradient_accumulation_steps: 4\noptimizer: adamw\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, str(recipe))
    got = dict(e.value.problems)
    assert set(got) == {"gradient_accumulation_steps", "optimizer"}
    assert "did you mean 'train.grad_accum'?" in got["gradient_accumulation_steps"]


def test_cli_deepspeed_json_as_config(tmp_path: Path, monkeypatch, capsys):
    code, _, err = run_entry("train.py", ["--config", str(ROOT / "ds_configs" / "zero3.json")], monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "invalid config (1 problem):" in err and "is a DeepSpeed config" in err
    assert f"pass it as deepspeed.config={ROOT / 'ds_configs' / 'zero3.json'}" in err
    assert not any(tmp_path.iterdir())
