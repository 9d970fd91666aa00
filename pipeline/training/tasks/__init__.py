"""The fine-tuning tasks, by the name the config's ``task`` key takes.

A task is one module here with one :class:`~pipeline.training.tasks.base.FinetuneTask`
subclass (data, head, model-config changes, loaders, loss, validation, checkpoint metadata,
``--inspect``). Adding one: write the module, register its class below, and give the
fine-tune config a field named after its ``section`` holding its ``config_class``
(config fields are written out so that each carries its documentation); the ``task`` key
accepts every name registered here. ``tests/test_tasks.py`` checks each registered task
has every part and a config section.
"""

from __future__ import annotations

from pipeline.training.tasks.base import FinetuneTask
from pipeline.training.tasks.classification import ClassificationTask
from pipeline.training.tasks.dpo import DPOTask
from pipeline.training.tasks.sft import SFTTask

TASKS: dict[str, type[FinetuneTask]] = {cls.name: cls for cls in (SFTTask, ClassificationTask, DPOTask)}
"""Task name → task class, in the order the config lists them (the first is not the default:
the config's ``task`` field sets that)."""

__all__ = ["TASKS", "FinetuneTask"]
