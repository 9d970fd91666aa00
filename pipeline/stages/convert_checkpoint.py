"""Stage: a training checkpoint -> a DeepSpeed universal checkpoint (resume on any number of ranks).

    python launch/convert_checkpoint.py --checkpoint RUN/checkpoints/step-NNNNNNNN [--output DIR]

The command line only; the conversion is :func:`pipeline.training.checkpoint.to_universal`.
Exit codes: 0 written, 2 bad checkpoint/output.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.training.checkpoint import to_universal


def main(argv: list[str] | None = None, *, description: str = "") -> int:
    """``launch/convert_checkpoint.py``: parse the arguments and convert; returns the exit code."""
    import argparse

    from pipeline.cli import report_errors

    p = argparse.ArgumentParser(prog="launch/convert_checkpoint.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a step directory (step-NNNNNNNN)")
    p.add_argument("--output", default=None, metavar="DIR", help="where to write it (default: <checkpoint>-universal)")
    ns = p.parse_args(argv)
    return report_errors(lambda: to_universal(Path(ns.checkpoint), Path(ns.output) if ns.output else None) and 0)
