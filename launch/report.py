"""Render PNG plots and a Markdown report from TensorBoard event files.

    python launch/report.py --logdir DIR [--output DIR]

Reads every run under --logdir with TensorBoard's own event loader and writes loss.png,
lr.png, throughput.png, eval_<metric>.png, report.md and scalars.json into --output
(default <logdir>/report). Exit codes: 0 written, 2 no log directory or no scalars in it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.stages.report import main  # noqa: E402

if __name__ == "__main__":
    finish(main(description=__doc__))
