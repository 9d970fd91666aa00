"""The evaluation report: ``report.json``, ``report.md``, the per-example file and TensorBoard scalars.

:func:`render_markdown` is the short summary printed at the end of a run and saved as
``report.md``: one row per headline metric of the task, a column per model, and the
difference when two models were evaluated. :func:`write_outputs` writes everything a run
publishes into its working directory (the stage renames it into place).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.eval.tasks import TASKS
from pipeline.eval.tasks.base import fmt
from pipeline.io import atomic_write_json, atomic_write_text


def headline(report: dict) -> tuple[str, ...]:
    """The run's headline metrics: as the report names them (the harness's depend on its tasks), else the task's."""
    return tuple(report.get("headline") or TASKS[report["task"]].headline)


def render_markdown(report: dict) -> str:
    """The short Markdown summary: one row per headline metric, a column per model."""
    task, models = TASKS[report["task"]], report["models"]
    split = f" (split `{report['split']}`)" if report.get("split") else ""
    lines = [f"# Evaluation: {task.name}", "", f"Data: `{report['data']}`{split}"]
    for m in models:
        lines.append(f"- **{m['name']}**: `{m['path']}`" + (f", step {m['step']}" if m["checkpoint"] else ""))
    head = ["metric"] + [m["name"] for m in models] + (["difference"] if len(models) == 2 else [])
    lines += ["", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for k in (*headline(report), *task.counts):
        cells = [fmt(m["metrics"][k]) + (f" ± {fmt(m['metrics'][k + '_stderr'])}" if k + "_stderr" in m["metrics"] else "")
                 for m in models]
        if len(models) == 2:
            diff = models[0]["metrics"][k] - models[1]["metrics"][k]
            cells.append(f"{diff:+.4f}" if isinstance(diff, float) else f"{diff:+d}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += task.markdown_rows(models)
    lines += ["", f"{report['timing']['seconds']:.1f} s on {report['world_size']} rank(s)."]
    return "\n".join(lines) + "\n"


def write_outputs(work: Path, report: dict, rows: list[dict]) -> None:
    """report.json, report.md, the per-example file and TensorBoard scalars, all under ``work``.

    TensorBoard gets one run directory per model (``tensorboard/<name>``), so its charts
    overlay the models; each headline metric is logged as ``eval/<metric>`` at the model's
    checkpoint step (0 for a model without one).
    """
    from torch.utils.tensorboard import SummaryWriter

    task = TASKS[report["task"]]
    atomic_write_json(work / "report.json", report)
    atomic_write_text(work / "report.md", render_markdown(report))
    if task.rows_file:
        atomic_write_text(work / task.rows_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for m in report["models"]:
        with SummaryWriter(log_dir=str(work / "tensorboard" / m["name"])) as writer:
            for k in headline(report):
                writer.add_scalar(f"eval/{k}", m["metrics"][k], m["step"])
