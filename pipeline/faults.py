"""Fault injection for tests: every test-only hook of the pipeline, in one place.

Some tests must stop, slow down or damage a real run at a precise point (kill a rank between
two steps, kill every rank half-way through a checkpoint write, make an export fail its own
verification). The production code calls the functions below at those points; each is
switched on by one environment variable and does nothing when it is unset. The variables
are read once, when this module is first imported, so set them in the environment of the
process under test (the tests start it with ``subprocess``); an unset hook then costs one
comparison with a module constant.

``PIPELINE_TEST_STEP_DELAY=S`` -- :func:`after_step`, called by training/trainer.py
    Sleep ``S`` seconds after each optimizer step. Set by tests/test_train.py,
    tests/test_faults.py and tests/test_slurm.py to signal, preempt or kill a run between steps.
``PIPELINE_TEST_BATCH_DELAY=S`` -- :func:`after_batch`, called by stages/preprocess.py
    Sleep ``S`` seconds after each encoded batch. Set by tests/test_preprocess.py to SIGKILL a
    preprocess run between two committed segments and resume it.
``PIPELINE_TEST_PAUSE_IN_SAVE=N`` -- :func:`pause_in_save`, called by training/checkpoint.py
    Every rank stops for good inside the save of step ``N``, after DeepSpeed's files are written
    and before ``meta.json`` and the rename. Set by tests/test_faults.py to SIGKILL the ranks
    during a checkpoint write (``latest`` and the previous step must survive).
``PIPELINE_TEST_CORRUPT_EXPORT=1`` -- :func:`corrupt_export`, called by stages/export.py
    Add 1 to the input embeddings after the reference logits, before writing. Set by
    tests/test_export.py: a failed verification publishes nothing and keeps the old export.

Every variable starts with ``PIPELINE_TEST_`` so a harness can drop them all (bench/train.py
does, so a benchmark never runs slowed down). A new hook goes here, with its entry above, its
entry in :data:`VARIABLES` and a test that sets it; tests/test_faults.py checks that no
other module of ``pipeline/`` reads a ``PIPELINE_TEST_`` variable.
"""

from __future__ import annotations

import os
import time
from typing import Any

VARIABLES = {
    "PIPELINE_TEST_STEP_DELAY": "after_step",
    "PIPELINE_TEST_BATCH_DELAY": "after_batch",
    "PIPELINE_TEST_PAUSE_IN_SAVE": "pause_in_save",
    "PIPELINE_TEST_CORRUPT_EXPORT": "corrupt_export",
}
"""Each hook's environment variable and the function of this module it switches on."""

_STEP_DELAY = float(os.environ.get("PIPELINE_TEST_STEP_DELAY") or 0)  # seconds
_BATCH_DELAY = float(os.environ.get("PIPELINE_TEST_BATCH_DELAY") or 0)  # seconds
_PAUSE_IN_SAVE = int(os.environ.get("PIPELINE_TEST_PAUSE_IN_SAVE") or 0)  # optimizer step; 0: off (no save has step 0)
_CORRUPT_EXPORT = os.environ.get("PIPELINE_TEST_CORRUPT_EXPORT") == "1"


def after_step() -> None:
    """``PIPELINE_TEST_STEP_DELAY``: called by the trainer after each optimizer step, so a test
    has time to signal or kill a run between two steps of a tiny model (a step takes
    milliseconds otherwise)."""
    if _STEP_DELAY:
        time.sleep(_STEP_DELAY)


def after_batch() -> None:
    """``PIPELINE_TEST_BATCH_DELAY``: called by preprocessing after each encoded batch, so a
    test can kill a run between two committed segments of a small corpus."""
    if _BATCH_DELAY:
        time.sleep(_BATCH_DELAY)


def pause_in_save(step: int, tag: str) -> None:
    """``PIPELINE_TEST_PAUSE_IN_SAVE``: called by every rank inside the save of ``step``
    (directory ``tag``) once DeepSpeed's files are written, before the RNG states,
    ``meta.json`` and the rename that publishes the step. At the chosen step it announces
    itself (the test waits for that line) and sleeps an hour, so the test kills the ranks
    there: the worst moment, with a half-written step directory on disk."""
    if _PAUSE_IN_SAVE and step == _PAUSE_IN_SAVE:
        print(f"test: pausing inside the save of {tag}", flush=True)
        time.sleep(3600)


def corrupt_export(model: Any) -> None:
    """``PIPELINE_TEST_CORRUPT_EXPORT``: called by export after the reference logits and
    before the weights are written; perturbs a weight so the reloaded model's logits differ
    and verification must fail."""
    if _CORRUPT_EXPORT:
        import torch

        with torch.no_grad():
            model.get_input_embeddings().weight.add_(1.0)
