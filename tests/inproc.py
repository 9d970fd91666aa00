"""Run a ``launch/<script>.py`` entry point inside the pytest process.

A user error is refused by checks that run before any heavy work (no process group, no
model), yet through a fresh interpreter each such case pays 4-5 s of imports (torch,
DeepSpeed, transformers) before its first check; in this process it costs milliseconds once
those are imported. :func:`run_entry` runs the real script as ``__main__`` (``runpy``), so a
case takes the user's path: the script's ``sys.path`` line, the stage's ``main`` (argument
parsing, the config checks, :func:`pipeline.cli.report_errors`) and ``pipeline.dist.finish``
with its ``SystemExit``.

The functions that would start heavy work are replaced by a tripwire raising
:class:`HeavyWork`, so a case that gets past its checks fails its test loudly instead of
training in the test process:

* ``pipeline.dist.init``: the process group (train, finetune; evaluate with ``zero3=true``);
* ``pipeline.stages.evaluate.load``: reading a model's weights to evaluate it;
* ``pipeline.stages.export.consolidate``: gathering a checkpoint's weights.

Stages without such a step (preprocess, plan, ``--print-config``, ``finetune --inspect``)
run to their end, as they would from the shell. What a real process adds and this cannot
show (output printed on import or at interpreter exit, a rank's environment) is checked by
one real launch per entry point in ``tests/test_error_catalogue.py``.

Example::

    code, out, err = run_entry("train.py", ["train.lr=fast"], monkeypatch, capsys)
    assert code == 2 and "train.lr: expected a number" in err
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class HeavyWork(BaseException):
    """Raised by the tripwires: the entry point went past its checks into heavy work.

    A ``BaseException``, so no ``except Exception`` in the stage turns it into an exit code.
    """


def run_entry(script: str, argv: list[str], monkeypatch, capture, *, cwd: str | os.PathLike | None = None) -> tuple[int, str, str]:
    """Run ``launch/<script>`` as ``__main__`` in this process with ``argv``.

    Args:
        script: the file name under ``launch/``, e.g. ``"train.py"``.
        argv: its command line (without the script).
        monkeypatch: the test's ``monkeypatch``; the tripwires, ``sys.argv``, ``sys.path`` and
            the working directory are undone with it.
        capture: the test's ``capsys`` (or ``capfd``, to catch what C code writes to the file
            descriptors too); output captured before the call is dropped.
        cwd: the working directory to run in (relative paths in ``argv`` are read against it).

    Returns:
        ``(exit code, stdout, stderr)``. A bug in the entry point is not turned into a code: its
        exception propagates (a real process would print the traceback and exit 1), and so does
        :class:`HeavyWork` when the run got past its checks.
    """
    import pipeline.dist
    import pipeline.stages.evaluate
    import pipeline.stages.export

    def tripwire(*a, **k):
        raise HeavyWork(f"launch/{script} went past its checks into heavy work")

    monkeypatch.setattr(pipeline.dist, "init", tripwire)
    # dist.finish ends a process that ever started a process group with os._exit; an earlier
    # test in this process may have (and shut it down again): these runs start none.
    monkeypatch.setattr(pipeline.dist, "_started", False)
    monkeypatch.setattr(pipeline.stages.evaluate, "load", tripwire)
    monkeypatch.setattr(pipeline.stages.export, "consolidate", tripwire)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "launch" / script), *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script inserts the project root
    if cwd is not None:
        monkeypatch.chdir(cwd)
    # A stage may set process-wide variables (the tokenizer's thread settings): they would
    # reach every later subprocess of the session.
    environ = dict(os.environ)
    capture.readouterr()
    try:
        runpy.run_path(str(ROOT / "launch" / script), run_name="__main__")
        code = 0
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:  # sys.exit("message"): the interpreter prints it and exits with 1
            print(e.code, file=sys.stderr)
            code = 1
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        sys.stdout.flush()
        sys.stderr.flush()
    out, err = capture.readouterr()
    return code, out, err
