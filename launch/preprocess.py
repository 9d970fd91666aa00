"""Preprocess corpora into tokenized, packed, verified shards.

    python launch/preprocess.py --config configs/sample/preprocess.yaml [key=value ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.cli import run_stage  # noqa: E402
from pipeline.stages.preprocess import PreprocessConfig, run  # noqa: E402

if __name__ == "__main__":
    finish(run_stage(PreprocessConfig, lambda cfg, ns: run(cfg) and 0, prog="launch/preprocess.py", description=__doc__))
