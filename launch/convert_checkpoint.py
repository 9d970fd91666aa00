"""Convert a training checkpoint into a DeepSpeed universal checkpoint (resume on any number of ranks).

    python launch/convert_checkpoint.py --checkpoint RUN/checkpoints/step-NNNNNNNN [--output DIR]

A regular checkpoint resumes only with the number of ranks that wrote it (ZeRO partitions the
optimizer state per rank); the training stages refuse another number and print this command.
The universal checkpoint (default: <checkpoint>-universal beside it) is written under a
temporary name and renamed once complete; the original is only read. Resume from it with
`checkpoint.resume=<output>` and any number of ranks. Details: docs/train.md.

Exit codes: 0 written, 2 bad checkpoint/output.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.stages.convert_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    finish(main(description=__doc__))
