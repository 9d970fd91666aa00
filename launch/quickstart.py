"""The main job: corpus -> tokenizer and shards -> pre-train (ZeRO-3, 2 ranks) -> SFT ->
evaluate base vs fine-tuned -> verified Hugging Face export -> plots and report.

    python launch/quickstart.py [--output outputs/quickstart] [--tiny] [--ranks N] [--set STAGE.key=value ...]

Every stage runs as its own process with its recipe (configs/sample/*.yaml); re-running
skips completed stages and resumes interrupted training. Ends with a summary table (also
<output>/summary.md and summary.json). Details: docs/quickstart.md.
Exit codes: 0 done, else the exit code of the stage that failed (its log is named).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.stages.quickstart import main  # noqa: E402

if __name__ == "__main__":
    finish(main(description=__doc__))
