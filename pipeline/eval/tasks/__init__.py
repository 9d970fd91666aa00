"""The evaluation tasks, by the name ``task=`` selects them with.

A task is one module here with one :class:`~pipeline.eval.tasks.base.EvalTask` subclass: it
reads and checks its data, scores a loaded model and names its headline metrics (see
:mod:`pipeline.eval.tasks.base`). To add one, write ``pipeline/eval/tasks/<name>.py`` and add
its class to :data:`TASKS` below; the evaluate stage's ``task`` choices, its report and its
TensorBoard scalars follow from the registry.
"""

from __future__ import annotations

from pipeline.eval.tasks.base import EvalTask
from pipeline.eval.tasks.classification import Classification
from pipeline.eval.tasks.generation import Generation
from pipeline.eval.tasks.harness import Harness
from pipeline.eval.tasks.perplexity import Perplexity
from pipeline.eval.tasks.preference import Preference

TASKS: dict[str, EvalTask] = {t.name: t for t in (Perplexity(), Classification(), Generation(), Harness(), Preference())}
"""Every task by name, in the order ``--help`` lists them (the first is the default)."""

__all__ = ["TASKS", "EvalTask"]
