"""Stage 1, the published output: whether a dataset directory already holds this config's result,
and step=merge, which joins the outputs of several preprocess tasks into one dataset.

Used by :mod:`pipeline.stages.preprocess` (its ``run`` calls :func:`merge` for ``step=merge``);
``cfg`` is its ``PreprocessConfig``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from pipeline.config import to_dict, to_yaml
from pipeline.data.doc_lengths import distribution
from pipeline.data.shards import file_entries, read_manifest, verify, write_manifest
from pipeline.errors import UserError
from pipeline.io import atomic_write_text, publish_dir

_PARTITIONED_STATS = ("kept", "dropped_duplicate", "dropped_too_few_tokens")
_TASK_DIR = re.compile(r"task-(\d{5})-of-(\d{5})$")
# Keys added to the config after outputs were made: at this value they change nothing, and an
# output (or partial run) made before they existed still counts as made with this config.
_ADDED_KEYS = {("clean", "min_tokens"): 0}


def output_config(cfg: Any) -> dict:
    """The part of the config that determines the output bytes (not threads or overwrite)."""
    d = to_dict(cfg)
    for k in ("workers", "overwrite", "step", "task_index", "task_count"):
        d.pop(k)
    return _without_added_defaults(d)


def _without_added_defaults(d: dict) -> dict:
    """``d`` without the :data:`_ADDED_KEYS` that hold their no-op value (a copy where any is removed)."""
    for (section, key), value in _ADDED_KEYS.items():
        if isinstance(d.get(section), dict) and d[section].get(key, value) == value and key in d[section]:
            d = {**d, section: {k: v for k, v in d[section].items() if k != key}}
    return d


def check_existing(cfg: Any, output: Path) -> bool:
    """True when ``output`` is already the complete result of this config."""
    if not output.exists():
        return False
    if (output / "manifest.json").exists():
        manifest = read_manifest(output)
        wanted = output_config(cfg)
        if _without_added_defaults({k: v for k, v in manifest["config"].items() if k in wanted}) == wanted:
            return True
        if cfg.overwrite:
            return False
        raise UserError(
            f"output '{output}' already holds a dataset made with a different config; "
            "choose another output, or set overwrite=true to replace it once the new one is complete"
        )
    if any(output.iterdir()):
        raise UserError(f"output '{output}' exists and is not a preprocessed dataset; choose another output directory")
    output.rmdir()
    return False


def merge(cfg: Any, tasks_dir: Path, output: Path) -> dict | None:
    """Validate every task's output and join them into one dataset (hard links, no copies)."""
    found = sorted(p for p in tasks_dir.glob("task-*-of-*") if _TASK_DIR.search(p.name))
    if not found:
        raise UserError(f"nothing to merge in {tasks_dir}; run step=shards in every task first")
    count = int(_TASK_DIR.search(found[0].name).group(2))  # type: ignore[union-attr]
    expected = [tasks_dir / f"task-{i:05d}-of-{count:05d}" for i in range(count)]
    missing = [str(p) for p in expected if not p.exists()]
    if missing:
        raise UserError(f"{len(missing)} of {count} tasks have not finished: {', '.join(missing)}; rerun them (they resume)")
    if check_existing(cfg, output):
        print(f"{output} is already complete for this config; nothing to do", file=sys.stderr)
        return None
    manifests = []
    for d in expected:
        verify(d)
        manifests.append(read_manifest(d))
    first = manifests[0]
    for d, m in zip(expected, manifests):
        if m["tokenizer"]["fingerprint"] != first["tokenizer"]["fingerprint"] or m["dtype"] != first["dtype"]:
            raise UserError(f"{d} was made with another tokenizer or dtype than {expected[0]}; rerun that task")
    work = output.with_name(output.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(expected[0] / "tokenizer", work / "tokenizer")
    shards, totals, sources = [], {s: {"documents": 0, "tokens": 0} for s in ("train", "val")}, {}
    for d, m in zip(expected, manifests):
        for s in m["shards"]:
            for part in ("bin", "idx"):
                (work / s[part]).parent.mkdir(parents=True, exist_ok=True)
                os.link(d / s[part], work / s[part])
            shards.append(s)
        for split in totals:
            for k in totals[split]:
                totals[split][k] += m["totals"][split][k]
        for src in m["sources"]:
            entry = sources.setdefault(src["name"], {"name": src["name"], "weight": src["weight"], "files": src["files"], "stats": {}})
            for k, v in src["stats"].items():
                # Every task reads and cleans every record; only kept documents and
                # duplicates are partitioned between tasks.
                if k in _PARTITIONED_STATS:
                    entry["stats"][k] = entry["stats"].get(k, 0) + v
                elif k != "other_task":
                    entry["stats"][k] = max(entry["stats"].get(k, 0), v)
    stats: dict[str, int] = {}
    for src in sources.values():
        for k, v in src["stats"].items():
            stats[k] = stats.get(k, 0) + v
    atomic_write_text(work / "config.yaml", to_yaml(cfg))
    known = {}
    for m in manifests:
        known.update(m["files"])
    relpaths = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    manifest = {
        **{k: first[k] for k in ("format", "version", "dtype", "tokenizer", "val_fraction")},
        "task": {"index": 0, "count": 1, "merged_from": count},
        "sources": list(sources.values()),
        "shards": shards,
        "files": file_entries(work, relpaths, {k: v for k, v in known.items() if k != "config.yaml"}),
        "totals": totals,
        "doc_tokens": distribution(work, shards),
        "stats": stats,
        "config": to_dict(cfg),
    }
    write_manifest(work, manifest)
    publish_dir(work, output)
    print(f"merged {count} tasks into {output}: {totals['train']['tokens']:,} train tokens", file=sys.stderr)
    return {"manifest": manifest}
