"""What an evaluation task is: the interface every task module implements.

A task reads and checks its data before any model is loaded (:meth:`EvalTask.read`,
:meth:`EvalTask.prepare`, :meth:`EvalTask.check_model`: every user error before the heavy
work), may run a further model first (:meth:`EvalTask.before_models`), then scores one loaded
model at a time (:meth:`EvalTask.evaluate`), and says what the
report shows (:attr:`EvalTask.headline`, :attr:`EvalTask.counts`, :meth:`EvalTask.markdown_rows`).
The stage (:mod:`pipeline.stages.evaluate`) composes these; the registry is
:mod:`pipeline.eval.tasks`.

``cfg`` is the evaluate stage's ``EvalConfig`` (typed ``Any`` here: nothing below the stages
imports a stage).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar

from pipeline.data.records import BadRecord, read_records, split_ext
from pipeline.errors import UserError
from pipeline.eval.models import Loaded, ModelRef
from pipeline.inputs import check_data_file


class EvalTask(ABC):
    """One evaluation task; subclasses set the class attributes and implement :meth:`evaluate`
    (a class without it cannot be instantiated)."""

    name: ClassVar[str]
    """The ``task=`` value that selects it."""
    head: ClassVar[str] = "causal_lm"
    """The model head it needs: ``causal_lm`` or ``classification``."""
    headline: ClassVar[tuple[str, ...]]
    """Metrics written to TensorBoard (``eval/<name>``), compared in the Markdown table and differenced."""
    counts: ClassVar[tuple[str, ...]] = ()
    """Further metrics shown in the Markdown table (sizes), not differenced in report.json."""
    rows_file: ClassVar[str | None] = None
    """Name of the per-example output file (JSONL, one line per model and example), or None."""

    def read(self, cfg: Any) -> Any:
        """Read and check the data before any model is resolved; returns what the task keeps of it."""
        return None

    def prepare(self, cfg: Any, refs: list[ModelRef], data: Any) -> Any:
        """Check the data against the resolved models (no weights loaded); returns the task's state."""
        return data

    def check_model(self, ref: ModelRef, cfg: Any, state: Any) -> None:
        """Refuse a model the data does not fit, from its config alone (no weights loaded)."""

    def before_models(self, cfg: Any, state: Any, load: Callable[[ModelRef], Loaded]) -> dict:
        """Runs on every rank once the process group is up, before the first model loads: a task
        that scores against a further model (preference's ``reference``) loads it with ``load``
        (plain or ZeRO-3, as the evaluated models), uses it and frees it here. Returns fields
        added to report.json."""
        return {}

    @abstractmethod
    def evaluate(self, lm: Loaded, cfg: Any, state: Any) -> tuple[dict, list[dict]]:
        """Score one model: ``(metrics, per-example rows)``; the same on every rank.

        Runs on every rank of a ZeRO-3 launch; a task deals its batches with
        :func:`pipeline.eval.ranks.my_batches` and brings results together with
        :func:`pipeline.eval.ranks.gather` (or :func:`pipeline.dist.all_reduce_sum_float`).
        """

    def headline_for(self, state: Any, metrics: dict) -> tuple[str, ...]:
        """The headline metrics of one run (a task whose metrics depend on its data, such as the
        harness's tasks, names them from the first model's ``metrics``)."""
        return self.headline

    def split(self, cfg: Any) -> str | None:
        """The dataset split the report names, when the data has splits."""
        return None

    def markdown_rows(self, models: list[dict]) -> list[str]:
        """Extra rows of the report's Markdown table, after the headline metrics and counts."""
        return []


def read_data(path: str | Path, what: str) -> list[tuple[str, dict]]:
    """``(where, record)`` of every record of a JSONL or CSV/TSV file (``.gz``/``.zst`` too);
    ``where`` is ``file:line``.

    Args:
        path: the ``data=`` file.
        what: what the task reads there, for messages ("labelled examples (JSONL or CSV)").

    Raises:
        UserError: a missing file, an unknown extension, a line that is not one JSON object
            in UTF-8, a CSV row with the wrong number of fields.
    """
    p = Path(path)
    check_data_file(p, "data", f"the {what}")
    if split_ext(p.name)[0] is None:
        raise UserError(f"data '{path}' has extension '{p.suffix.lower()}'; expected the {what} as .jsonl (or .csv/.tsv)")
    return [(where, rec) for where, _, rec in read_records(p, fix=_bad_line, utf8="strict")]


def _bad_line(bad: BadRecord) -> str:
    """The evaluate stage's message for a bad record (every one stops the evaluation)."""
    if bad.kind == "json":
        return f"{bad.where} is not valid JSON ({bad.detail}); each line must be one JSON object"
    if bad.kind == "not_object":
        return f"{bad.where} is {bad.detail}, not an object; each line must be one JSON object"
    if bad.kind == "utf8":
        return f"{bad.where} is not UTF-8; save the data as UTF-8"
    return f"{bad.where}: {bad}; fix the row (quote fields holding commas, quotes or newlines)"


def field_of(where: str, rec: dict, key: str, setting: str, kind: str = "text") -> Any:
    """``rec[key]``, or a UserError naming the line, the fields found and the config key to fix.

    Args:
        where: ``file:line`` of the record.
        rec: the record.
        key: the field to read.
        setting: the config key that names the field (``text_field``).
        kind: ``text`` (the value must be a string) or a description of any other value.
    """
    value = rec.get(key)
    if value is None or (kind == "text" and not isinstance(value, str)):
        found = ", ".join(sorted(map(str, rec))) or "none"
        what = "no" if value is None else f"a non-string ({type(value).__name__})"
        raise UserError(f"{where} has {what} '{key}' field (fields found: {found}); set {setting}= to the field holding the {kind}")
    return value


def fmt(v: Any) -> str:
    """A metric as the report and the console show it (floats to 4 decimals)."""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"
    return str(v)


def no_examples(cfg: Any) -> UserError:
    """The error for a data file that holds no example."""
    return UserError(f"'{cfg.data}' holds no example; nothing to evaluate")
