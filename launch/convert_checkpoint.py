"""Convert a training checkpoint into a DeepSpeed universal checkpoint (resume on any number of ranks).

    python launch/convert_checkpoint.py --checkpoint RUN/checkpoints/step-NNNNNNNN [--output DIR]

A regular checkpoint resumes only with the number of ranks that wrote it (ZeRO partitions the
optimizer state per rank); the training stages refuse another number and print this command.
The universal checkpoint (default: <checkpoint>-universal beside it) is written under a
temporary name and renamed once complete; the original is only read. Resume from it with
`checkpoint.resume=<output>` and any number of ranks. Details: docs/train.md.

Exit codes: 0 written, 2 bad checkpoint/output.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pipeline.quiet  # noqa: E402,F401  (known library noise off before DeepSpeed is imported)
from pipeline.training.checkpoint import to_universal  # noqa: E402
from pipeline.cli import report_errors  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/convert_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a step directory (step-NNNNNNNN)")
    p.add_argument("--output", default=None, metavar="DIR", help="where to write it (default: <checkpoint>-universal)")
    ns = p.parse_args(argv)
    from pathlib import Path

    return report_errors(lambda: to_universal(Path(ns.checkpoint), Path(ns.output) if ns.output else None) and 0)


if __name__ == "__main__":
    sys.exit(main())
