"""Known, harmless library output, silenced in one place; every other warning stays visible.

A 2-rank CPU run used to carry these lines in its log, once or twice per rank, every run:

* DeepSpeed's logger: ``Setting accelerator to CPU. If you have GPU or other accelerator, we
  were unable to detect it.`` Kept where the host has a GPU device node (``/dev/nvidia*``,
  ``/dev/kfd``): there it means torch cannot see a GPU the user meant to use.
* torch's ``FutureWarning`` that ``torch.distributed.all_gather_into_tensor`` and
  ``reduce_scatter_tensor`` are deprecated (two lines each: message and source line).
  DeepSpeed's ZeRO calls them, not this project; nothing a user can act on.
* DeepSpeed's ``print`` ``DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built
  successfully`` inside ``init_distributed`` (dropped by :func:`stdout_filtered`, which
  :func:`pipeline.dist.init` wraps around that call).

Each filter matches one exact message (and category and module for warnings). Importing
this module installs them (the entry scripts import it before anything imports DeepSpeed;
:func:`pipeline.dist.init` calls :func:`install` again before it does). The DeepSpeed
launcher's own lines (``runner.py``, ``launch.py``) come from the launcher process, which no
code of ours runs in, and stay. ``tests/test_launch_hygiene.py`` fails when a short 2-rank
run's log shows a line that is neither the pipeline's, the launcher's, nor allowed there.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import sys
import warnings

DS_ACCELERATOR_CPU = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
DEPRECATED_COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor")
SHM_OP_BANNER = "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
_TORCH_WARNING_MODULE = "torch.distributed.c10d_logger"  # where torch attributes the deprecations

_installed = False


class _DropMessages(logging.Filter):
    def __init__(self, messages: set[str]):
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.messages


def _gpu_device_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/kfd"))


def install() -> None:
    """Install the filters (once per process; later calls change nothing)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in DEPRECATED_COLLECTIVES:
        # `message` is a regex matched at the start; the backticks and dots are literal here.
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated\.",
                                category=FutureWarning, module=_TORCH_WARNING_MODULE)
    if not _gpu_device_present():
        # DeepSpeed's logger is named "DeepSpeed" and made at its import; a filter on the
        # logger object made here first is the one it gets (logging keeps one per name).
        logging.getLogger("DeepSpeed").addFilter(_DropMessages({DS_ACCELERATOR_CPU}))


@contextlib.contextmanager
def stdout_filtered(drop: tuple[str, ...] = (SHM_OP_BANNER,)):
    """Run the block with Python's ``sys.stdout`` captured, then write it out without the
    lines equal to one of ``drop``. Output written to the file descriptor directly (a
    compiler started on an op's first use) passes untouched."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        kept = [line for line in buf.getvalue().splitlines(keepends=True) if line.rstrip("\n") not in drop]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


install()
