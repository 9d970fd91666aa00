"""Plots and a Markdown report from TensorBoard event files, for people who would rather look.

    python launch/report.py --logdir outputs/quickstart [--output DIR]

The event files are read with TensorBoard's own loader (``EventMultiplexer``, which walks
the log directory the way ``tensorboard --logdir`` does and names each run by its path
relative to it), so what is plotted is exactly what TensorBoard shows. Written into
``--output`` (default ``<logdir>/report``), published together (written under a temporary
name and renamed):

* ``loss.png``: ``train/loss`` and ``eval/loss`` against the step, one panel per run;
* ``lr.png``: ``train/lr``; ``throughput.png``: ``perf/tokens_per_s``;
* ``eval_<metric>.png`` for every other ``eval/*`` scalar: a line per run, or a bar per
  run when every run has a single point (e.g. the evaluate stage's exact match of a base
  and a fine-tuned model);
* ``report.md`` embedding the figures, with a table of every run's scalars (points, last
  value), and ``scalars.json`` (every point, for further use).

Only scalars are read; the Agg backend of matplotlib renders without a display.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.io import atomic_write_json, atomic_write_text, publish_dir

Scalars = dict[str, dict[str, list[tuple[int, float]]]]  # run -> tag -> [(step, value)]

LOSS_TAGS = ("train/loss", "eval/loss")
LR_TAG = "train/lr"
THROUGHPUT_TAG = "perf/tokens_per_s"


def load_scalars(logdir: str | Path) -> Scalars:
    """Every scalar of every run under ``logdir``, read with TensorBoard's event loader.

    A run is a directory holding event files; its name is the path relative to ``logdir``
    (``"."`` for event files directly in it), as TensorBoard names it. All points are kept
    (no reservoir sampling); when several event files of one run hold the same step, the last
    written value wins, as in TensorBoard.

    Raises:
        UserError: ``logdir`` does not exist.
    """
    from tensorboard.backend.event_processing import event_accumulator, event_multiplexer

    root = Path(logdir)
    if not root.is_dir():
        raise UserError(f"log directory '{logdir}' does not exist; give the directory TensorBoard would read (--logdir)")
    mux = event_multiplexer.EventMultiplexer(size_guidance={event_accumulator.SCALARS: 0})
    mux.AddRunsFromDirectory(str(root))
    mux.Reload()
    out: Scalars = {}
    for run, tags in sorted(mux.Runs().items()):
        for tag in sorted(tags.get(event_accumulator.SCALARS, [])):
            points: dict[int, float] = {}
            for ev in mux.Scalars(run, tag):
                points[int(ev.step)] = float(ev.value)
            out.setdefault(run, {})[tag] = sorted(points.items())
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (CI, ssh)
    import matplotlib.pyplot as plt

    return plt


def _runs_with(scalars: Scalars, tag: str) -> list[str]:
    return [run for run, tags in scalars.items() if tags.get(tag)]


def _save(plt, fig, path: Path) -> None:
    """Write a finished figure as a PNG and free it (pyplot keeps every open figure)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _line_plot(scalars: Scalars, tag: str, path: Path, title: str, ylabel: str, log_y: bool = False) -> bool:
    runs = _runs_with(scalars, tag)
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        steps, values = zip(*scalars[run][tag])
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=run)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if log_y and all(v > 0 for run in runs for _, v in scalars[run][tag]):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)
    return True


def _loss_plot(scalars: Scalars, path: Path) -> bool:
    runs = [run for run in scalars if any(scalars[run].get(t) for t in LOSS_TAGS)]
    if not runs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for tag, style in zip(LOSS_TAGS, ("-", "--o")):
            if scalars[run].get(tag):
                steps, values = zip(*scalars[run][tag])
                ax.plot(steps, values, style, markersize=4, label=tag)
        ax.set(title=run, xlabel="step", ylabel="loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(plt, fig, path)
    return True


def _eval_plot(scalars: Scalars, tag: str, path: Path) -> bool:
    runs = _runs_with(scalars, tag)
    if not runs:
        return False
    if any(len(scalars[run][tag]) > 1 for run in runs):
        return _line_plot(scalars, tag, path, tag, tag.split("/", 1)[-1], log_y=tag.endswith("ppl"))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(runs)), 4))
    values = [scalars[run][tag][0][1] for run in runs]
    bars = ax.bar(range(len(runs)), values, color=[f"C{i}" for i in range(len(runs))])
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
    ax.set_xticks(range(len(runs)), [f"{run}\n(step {scalars[run][tag][0][0]})" for run in runs], fontsize=7)
    ax.set(title=tag, ylabel=tag.split("/", 1)[-1])
    ax.grid(axis="y", alpha=0.3)
    _save(plt, fig, path)
    return True


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"


def render_markdown(logdir: str, scalars: Scalars, figures: list[tuple[str, str]]) -> str:
    """The report: the figures (``(file, caption)``), then a table of every run's scalars."""
    lines = ["# Training report", "", f"Event files under `{logdir}` ({len(scalars)} runs), read with TensorBoard's loader.",
             f"Watch them live: `tensorboard --logdir {logdir}`.", ""]
    for file, caption in figures:
        lines += [f"## {caption}", "", f"![{caption}]({file})", ""]
    lines += ["## Scalars", "", "| run | tag | points | first step | last step | last value |", "|---|---|---:|---:|---:|---:|"]
    for run, tags in scalars.items():
        for tag, points in tags.items():
            if points:
                lines.append(f"| {run} | {tag} | {len(points)} | {points[0][0]} | {points[-1][0]} | {_fmt(points[-1][1])} |")
    return "\n".join(lines) + "\n"


def build_report(logdir: str | Path, output: str | Path | None = None) -> dict[str, Any]:
    """Read ``logdir``, write the figures, ``report.md`` and ``scalars.json`` into ``output``.

    Args:
        logdir: a TensorBoard log directory (runs in its subdirectories).
        output: report directory (default ``<logdir>/report``); replaced as a whole once the
            new one is complete. It is skipped when reading ``logdir``.

    Returns:
        ``{"output", "runs", "figures"}``: the published directory, the run names and the
        figure file names.

    Raises:
        UserError: no log directory, or no scalar in it.
    """
    logdir = Path(logdir)
    output = Path(output) if output is not None else logdir / "report"
    scalars = {run: tags for run, tags in load_scalars(logdir).items()
               if not _inside(logdir / run, output)}
    if not any(scalars.values()):
        raise UserError(f"no TensorBoard scalars under '{logdir}'; point --logdir at a directory with event files "
                        "(e.g. a run's tensorboard/ directory, or the quickstart's output directory)")
    work = output.with_name(output.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    figures: list[tuple[str, str]] = []
    if _loss_plot(scalars, work / "loss.png"):
        figures.append(("loss.png", "Loss (train and validation)"))
    if _line_plot(scalars, LR_TAG, work / "lr.png", "learning rate", "learning rate"):
        figures.append(("lr.png", "Learning rate"))
    if _line_plot(scalars, THROUGHPUT_TAG, work / "throughput.png", "throughput", "tokens/s (all ranks)"):
        figures.append(("throughput.png", "Throughput"))
    eval_tags = sorted({t for tags in scalars.values() for t in tags if t.startswith("eval/") and t != "eval/loss"})
    for tag in eval_tags:
        name = "eval_" + tag.split("/", 1)[1].replace("/", "_") + ".png"
        if _eval_plot(scalars, tag, work / name):
            figures.append((name, f"Evaluation: {tag}"))
    atomic_write_json(work / "scalars.json", {run: {tag: [[s, v] for s, v in pts] for tag, pts in tags.items()}
                                              for run, tags in scalars.items()})
    atomic_write_text(work / "report.md", render_markdown(str(logdir), scalars, figures))
    publish_dir(work, output)
    return {"output": str(output), "runs": list(scalars), "figures": [f for f, _ in figures]}


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False
