"""Evaluate a model (and optionally compare it with another): perplexity, classification or generation.

    python launch/evaluate.py --config FILE [key=value ...]
    python launch/evaluate.py model=outputs/sample/pretrain data=outputs/sample/data task=perplexity
    deepspeed --num_gpus 2 launch/evaluate.py ... zero3=true      (a model that needs ZeRO-3 to fit)

Writes <output>/report.json, report.md, predictions.jsonl or generations.jsonl and
tensorboard/<model name>/. Exit codes: 0 done, 2 bad config, data or model path.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.stages.evaluate import main  # noqa: E402

if __name__ == "__main__":
    finish(main(description=__doc__))
