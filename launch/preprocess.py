"""Preprocess corpora into tokenized, packed, verified shards.

    python launch/preprocess.py --config configs/sample/preprocess.yaml [key=value ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.stages.preprocess import main  # noqa: E402

if __name__ == "__main__":
    finish(main(description=__doc__))
