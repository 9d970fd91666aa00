"""The preprocess stage end to end: formats, cleaning, round trip, resume, errors, tasks.

The refusals, and the runs around them in the same test, run the real ``launch/preprocess.py``
in this process (:func:`inproc.run_entry`: no interpreter start); the rest are fresh processes
(a killed run must be one).
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, make_docs, run_script, write_jsonl
from inproc import run_entry

pytestmark = pytest.mark.integration


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _corpus(tmp: Path) -> tuple[list[Path], list[str]]:
    """Three formats; returns (paths, every document text in input order)."""
    docs = make_docs(240)
    a = write_jsonl(tmp / "in" / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(docs[:120])])
    b = tmp / "in" / "b.parquet"
    pq.write_table(pa.table({"body": docs[120:200]}), b)
    c = tmp / "in" / "c.txt.gz"
    with gzip.open(c, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(docs[200:]) + "\n")
    return [a, b, c], docs


def _args(tmp: Path, tok: Path | None, *extra: str) -> list[str]:
    paths, _ = _corpus(tmp)
    srcs = (
        f"sources=[{{path: {paths[0]}, name: a, weight: 2}}, {{path: {paths[1]}, name: b, text_field: body}},"
        f" {{path: {paths[2]}, name: c, txt_unit: paragraph}}]"
    )
    tokargs = [f"tokenizer.path={tok}"] if tok else ["tokenizer.vocab_size=400", "tokenizer.sample_chars=200000"]
    return [srcs, "val_fraction=0.1", "shard_tokens=2000", "batch_chars=3000", "workers=2", *tokargs, *extra]


def test_round_trip_every_document(tmp_path: Path, tiny_tokenizer: Path):
    from transformers import AutoTokenizer

    from pipeline.data.clean import content_hash, is_validation
    from pipeline.data.shards import TokenDataset, read_manifest, verify

    args = _args(tmp_path, tiny_tokenizer, "output=out")
    _, docs = _corpus(tmp_path)
    r = run_script("preprocess.py", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert not (tmp_path / "out.partial").exists()
    verify(out, thorough=True)
    m = read_manifest(out)
    hf = AutoTokenizer.from_pretrained(out / "tokenizer")
    eos = hf.eos_token_id
    assert m["tokenizer"]["eos_id"] == eos and m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == len(hf)
    assert [s["name"] for s in m["sources"]] == ["a", "b", "c"] and [s["weight"] for s in m["sources"]] == [2.0, 1.0, 1.0]
    for src, lo, hi in (("a", 0, 120), ("b", 120, 200), ("c", 200, 240)):
        for split in ("train", "val"):
            want = [d for d in docs[lo:hi] if is_validation(content_hash(d), 0.1) == (split == "val")]
            ds = TokenDataset(out, split=split, source=src)
            assert ds.num_documents == len(want)
            for i, text in enumerate(want):
                expect = hf(text, add_special_tokens=False)["input_ids"] + [eos]
                assert ds.document(i).tolist() == expect, (src, split, i)
    assert m["totals"]["val"]["documents"] > 0 and m["totals"]["train"]["documents"] + m["totals"]["val"]["documents"] == 240
    assert len([s for s in m["shards"] if s["split"] == "train"]) > 3  # several segments were written
    assert (out / "config.yaml").exists() and m["config"]["val_fraction"] == 0.1
    assert "train: " in r.stderr and "tokens/s" in r.stderr  # the summary
    assert "\r" not in r.stderr  # no progress bar when stderr is not a terminal


def test_existing_tokenizer_without_transformers(tmp_path: Path, corpus: Path, tiny_tokenizer: Path):
    """With a generic fast tokenizer the stage never imports transformers or torch (1.8 s and 230 MB
    of start-up), and records the fingerprint that later stages compute with transformers."""
    from transformers import AutoTokenizer

    from pipeline.data.shards import read_manifest
    from pipeline.data.tokenizer import tokenizer_fingerprint

    code = (
        "import sys\n"
        "from pipeline.config import load_config\n"
        "from pipeline.stages.preprocess import PreprocessConfig, run\n"
        f"run(load_config(PreprocessConfig, None, ['sources.0.path={corpus}', 'output={tmp_path / 'out'}', "
        f"'tokenizer.path={tiny_tokenizer}', 'workers=2', 'batch_chars=2000']))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch', 'datasets')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert "sentencepiece encoder" in r.stderr
    m = read_manifest(tmp_path / "out")
    assert m["tokenizer"]["fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_tokenizer))
    assert m["totals"]["train"]["documents"] + m["totals"]["val"]["documents"] == 300


def test_trains_tokenizer_cleans_and_dedups(tmp_path: Path):
    from transformers import AutoTokenizer

    docs = make_docs(200)
    rows = [{"text": t} for t in docs] + [{"text": docs[3]}, {"text": "  \x00\x07 "}, {"text": "ab"}, {"text": "x" * 5000}]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": docs[5] + "\r\n"}, {"text": "new doc\x0b here " * 20}])
    r = run_script(
        "preprocess.py", f"sources=[{{path: {a}}}, {{path: {b}}}]", "output=out", "tokenizer.vocab_size=400",
        "tokenizer.sample_chars=100000", "clean.min_chars=3", "clean.max_chars=4000", cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sa, sb = (s["stats"] for s in m["sources"])
    assert sa["records"] == 204 and sa["kept"] == 200 and sa["dropped_duplicate"] == 1
    assert sa["dropped_empty"] == 1 and sa["dropped_too_short"] == 1 and sa["dropped_too_long"] == 1
    assert sb["records"] == 2 and sb["kept"] == 1 and sb["dropped_duplicate"] == 1 and sb["control_removed"] == 1
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert m["tokenizer"]["vocab_size"] == 400 and m["stats"]["kept"] == 201


@pytest.mark.slow
def test_resume_after_kill_is_byte_identical(tmp_path: Path, tiny_tokenizer: Path):
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    ref.mkdir(), crash.mkdir()
    args = _args(tmp_path, tiny_tokenizer, "output=out")
    r = run_script("preprocess.py", *args, cwd=ref)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_TEST_BATCH_DELAY": "0.3"}
    progress = crash / "out.partial" / ".progress"
    for kills_at in (2, 5):  # kill twice, at different points, mid-segment
        p = subprocess.Popen([sys.executable, str(ROOT / "launch" / "preprocess.py"), *args], cwd=crash, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and len(list(progress.glob("*.json"))) < kills_at:
            time.sleep(0.05)
        time.sleep(0.15)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not (crash / "out").exists(), "a killed run must not publish"
    r = run_script("preprocess.py", *args, cwd=crash)
    assert r.returncode == 0, r.stderr
    assert "resuming the partial run" in r.stderr
    assert _tree(crash / "out") == _tree(ref / "out")


def test_split_stable_across_batching(tmp_path: Path, tiny_tokenizer: Path):
    from pipeline.data.shards import read_manifest

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    args = _args(tmp_path, tiny_tokenizer, "output=out")
    assert run_script("preprocess.py", *args, cwd=one).returncode == 0
    assert run_script("preprocess.py", *args, "batch_chars=50000", "shard_tokens=10000000", "workers=1", cwd=two).returncode == 0
    t1, t2 = read_manifest(one / "out")["totals"], read_manifest(two / "out")["totals"]
    assert t1 == t2


def test_encode_calls_split_batches_evenly():
    """A batch is cut into one encode call per core by characters, keeping every text in order."""
    from pipeline.stages.preprocess import _parts

    texts = [f"d{i}" * (1 + i % 7) for i in range(101)]
    parts = _parts(texts, 2)
    assert sum(parts, []) == texts and len(parts) == 2
    sizes = [sum(map(len, p)) for p in parts]
    assert abs(sizes[0] - sizes[1]) <= max(map(len, texts))
    assert _parts(["one"], 2) == [["one"]] and _parts([], 2) == [] and _parts(texts, 1) == [texts]
    assert sum(_parts(["x" * 100, "y", "z"], 3), []) == ["x" * 100, "y", "z"]


def test_malformed_line_fails_then_skip_counts(tmp_path: Path, tiny_tokenizer: Path, monkeypatch, capsys):
    docs = make_docs(20)
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:7]) + '{"text": "broken\n' +
                    "".join(json.dumps({"text": t}) + "\n" for t in docs[7:]))
    args = [f"sources.0.path={path}", "output=out", f"tokenizer.path={tiny_tokenizer}"]
    code, _, err = run_entry("preprocess.py", args, monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and "Traceback" not in err
    assert f"{path}:8" in err and "bad_records=skip" in err
    assert not (tmp_path / "out").exists()
    code, _, err = run_entry("preprocess.py", [*args, "bad_records=skip"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 0, err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["stats"]["bad_records"] == 1 and m["stats"]["kept"] == 20


@pytest.mark.parametrize(
    "override, message",
    [
        ("sources.0.path=nowhere/*.jsonl", "no input matches"),
        ("sources.0.text_field=body", "text_field"),
        ("tokenizer.path=missing_tok", "missing_tok"),
        ("dtype=uint16 tokenizer.path=BIG", "does not fit dtype=uint16"),
        ("sources.0.path=EMPTY", "holds no documents: every input file is empty (0 bytes)"),
        ("sources.0.path=BLANK tokenizer.path=TOK", "holds no documents"),  # found at its end, after reading
    ],
)
def test_bad_input_messages(tmp_path: Path, corpus: Path, tiny_tokenizer: Path, override: str, message: str, monkeypatch, capsys):
    """Exit 2, the message, and nothing left behind: no output, no .partial of a run that never started."""
    (tmp_path / "EMPTY.jsonl").write_bytes(b"")
    (tmp_path / "BLANK.jsonl").write_text("\n  \n\n")
    override = override.replace("EMPTY", str(tmp_path / "EMPTY.jsonl")).replace("BLANK", str(tmp_path / "BLANK.jsonl"))
    override = override.replace("TOK", str(tiny_tokenizer))
    if "BIG" in override:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {f"w{i}": i for i in range(70000)}
        vocab["[UNK]"] = 70000
        t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=t, eos_token="w1", unk_token="[UNK]").save_pretrained(tmp_path / "BIG")
        override = override.replace("BIG", str(tmp_path / "BIG"))
    before = sorted(tmp_path.iterdir())
    code, _, err = run_entry("preprocess.py", [f"sources.0.path={corpus}", "output=out", *override.split()], monkeypatch, capsys,
                             cwd=tmp_path)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == before  # neither out nor out.partial


def _kill_after_commits(args: list[str], cwd: Path, commits: int) -> None:
    """Start a slowed-down run and SIGKILL it once ``commits`` segments are committed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_TEST_BATCH_DELAY": "0.3"}
    progress = cwd / "out.partial" / ".progress"
    p = subprocess.Popen([sys.executable, str(ROOT / "launch" / "preprocess.py"), *args], cwd=cwd, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(progress.glob("*.json"))) < commits:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(list(progress.glob("*.json"))) >= commits, "the run ended before it was killed"


def test_failed_start_leaves_earlier_partial_and_output_untouched(tmp_path: Path, tiny_tokenizer: Path, monkeypatch, capsys):
    args = _args(tmp_path, tiny_tokenizer, "output=out")
    _kill_after_commits(args, tmp_path, 2)
    partial = _tree(tmp_path / "out.partial")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    failing = [("sources.0.path=missing.jsonl", "no input matches"),
               ("tokenizer.path=missing_tok", "missing_tok"),
               (f"sources.1.path={tmp_path / 'empty.jsonl'}", "holds no documents")]
    for override, message in failing:  # each a different config: the partial run must not be discarded
        code, _, err = run_entry("preprocess.py", [*args, override], monkeypatch, capsys, cwd=tmp_path)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert _tree(tmp_path / "out.partial") == partial, override
    code, _, err = run_entry("preprocess.py", args, monkeypatch, capsys, cwd=tmp_path)
    assert code == 0 and "resuming the partial run" in err, err
    published = _tree(tmp_path / "out")
    code, _, err = run_entry("preprocess.py", [*args, "sources.0.path=missing.jsonl", "overwrite=true"], monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and "no input matches" in err
    assert _tree(tmp_path / "out") == published and not (tmp_path / "out.partial").exists()


def test_empty_source_is_not_committed(tmp_path: Path, corpus: Path, tiny_tokenizer: Path, monkeypatch, capsys):
    """An input with no records stops the run once read, and is not recorded as done: the
    other sources' committed work is kept, and the fixed input is read on the rerun."""
    b = tmp_path / "b.jsonl"
    b.write_text("\n\n")
    args = [f"sources=[{{path: {corpus}, name: a}}, {{path: {b}, name: b}}]", "output=out",
            f"tokenizer.path={tiny_tokenizer}", "shard_tokens=2000", "batch_chars=3000"]
    code, _, err = run_entry("preprocess.py", args, monkeypatch, capsys, cwd=tmp_path)
    assert code == 2 and f"source 'b' ({b}) holds no documents" in err, err
    assert list((tmp_path / "out.partial" / ".progress").glob("a-*.json"))  # resumable: kept
    assert not list((tmp_path / "out.partial" / ".progress").glob("b-*.json"))
    write_jsonl(b, [{"text": t} for t in make_docs(5, prefix="late")])
    code, _, err = run_entry("preprocess.py", args, monkeypatch, capsys, cwd=tmp_path)
    assert code == 0 and "resuming the partial run" in err, err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["stats"]["kept"] for s in m["sources"]] == [300, 5]


def test_tokenizer_from_model_dir_copies_tokenizer_files_only(tmp_path: Path, corpus: Path, tiny_tokenizer: Path):
    """tokenizer.path = a Hugging Face model directory: its weights and config stay behind (not
    copied, not hashed), the dataset records the tokenizer a tokenizer-only directory gives,
    and the model's tokenizer check passes."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from pipeline.config import load_config
    from pipeline.data.shards import read_manifest, verify
    from pipeline.inputs import check_model
    from pipeline.training.model import check_tokenizer_match
    from pipeline.stages.preprocess import PreprocessConfig, run

    model = tmp_path / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(model)
    for f in tiny_tokenizer.iterdir():
        shutil.copy2(f, model / f.name)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    left_behind = {"config.json", "generation_config.json", "model.safetensors"}
    assert left_behind <= {p.name for p in model.iterdir()}
    base = [f"sources.0.path={corpus}", "workers=1"]
    run(load_config(PreprocessConfig, None, [*base, f"output={tmp_path / 'from_model'}", f"tokenizer.path={model}"]))
    run(load_config(PreprocessConfig, None, [*base, f"output={tmp_path / 'from_tok'}", f"tokenizer.path={tiny_tokenizer}"]))
    out = tmp_path / "from_model"
    verify(out, thorough=True)
    tok_files = sorted(p.name for p in (out / "tokenizer").iterdir())
    assert tok_files == sorted([p.name for p in tiny_tokenizer.iterdir()] + ["chat_template.jinja"])
    m = read_manifest(out)
    hashed = {Path(f).name for f in m["files"]}
    assert not hashed & left_behind and "tokenizer.json" in hashed
    plain = read_manifest(tmp_path / "from_tok")
    assert m["tokenizer"] == plain["tokenizer"]  # fingerprint included: as from the tokenizer alone
    assert _tree(tmp_path / "from_tok" / "tokenizer") == _tree(tiny_tokenizer)  # a tokenizer-only dir: copied whole
    check_tokenizer_match(check_model(str(model), "model.path"), AutoConfig.from_pretrained(model), m["tokenizer"], str(out))


def test_existing_output_is_never_damaged(tmp_path: Path, corpus: Path, tiny_tokenizer: Path, monkeypatch, capsys):
    def run(*argv: str) -> tuple[int, str]:
        code, _, err = run_entry("preprocess.py", list(argv), monkeypatch, capsys, cwd=tmp_path)
        return code, err

    base = [f"sources.0.path={corpus}", "output=out", f"tokenizer.path={tiny_tokenizer}"]
    assert run(*base)[0] == 0
    before = _tree(tmp_path / "out")
    code, err = run(*base)  # same config: nothing to do
    assert code == 0 and "already complete" in err
    code, err = run(*base, "val_fraction=0.5")
    assert code == 2 and "overwrite=true" in err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}])
    code, err = run(f"sources.0.path={bad}", "output=out", f"tokenizer.path={tiny_tokenizer}", "overwrite=true")
    assert code == 2
    assert _tree(tmp_path / "out") == before
    code, err = run(*base, "val_fraction=0.5", "overwrite=true")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["val_fraction"] == 0.5


def test_tasks_then_merge_equals_single_run(tmp_path: Path):
    from pipeline.data.shards import TokenDataset, read_manifest, verify

    docs = make_docs(300)
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs + docs[:30]])  # 30 duplicates
    common = [f"sources.0.path={a}", "tokenizer.vocab_size=400", "tokenizer.sample_chars=100000", "val_fraction=0.1"]
    assert run_script("preprocess.py", *common, "output=multi", "step=tokenizer", cwd=tmp_path).returncode == 0
    for i in range(2):
        r = run_script("preprocess.py", *common, "output=multi", "step=shards", env={"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "2"}, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    r = run_script("preprocess.py", *common, "output=multi", "step=merge", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    verify(tmp_path / "multi", thorough=True)
    m = read_manifest(tmp_path / "multi")
    assert m["stats"]["kept"] == 300 and m["stats"]["dropped_duplicate"] == 30 and m["stats"]["records"] == 330
    tok = run_script("preprocess.py", *common, "output=single", f"tokenizer.path={tmp_path / 'multi' / 'tokenizer'}", cwd=tmp_path)
    assert tok.returncode == 0, tok.stderr
    single = read_manifest(tmp_path / "single")
    assert single["totals"] == m["totals"]
    got = sorted(TokenDataset(tmp_path / "multi").document(i).tobytes() for i in range(m["totals"]["train"]["documents"]))
    want = sorted(TokenDataset(tmp_path / "single").document(i).tobytes() for i in range(single["totals"]["train"]["documents"]))
    assert got == want


def test_builtin_sample_default_runs(tmp_path: Path):
    r = run_script("preprocess.py", "sample_docs=300", "tokenizer.vocab_size=400", "output=out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["stats"]["records"] == 300 and m["sources"][0]["name"] == "sample"
    assert not list((tmp_path / "out").rglob("sample.jsonl"))
