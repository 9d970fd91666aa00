"""Export a training checkpoint as a verified Hugging Face model directory.

    python launch/export.py --checkpoint RUN|CHECKPOINTS|STEP_DIR --output DIR
                            [--dtype auto|fp32|bf16|fp16] [--max-shard-size 2GB] [--tolerance X] [--overwrite]

--checkpoint is a step directory (step-NNNNNNNN/), a checkpoints/ directory (its `latest`) or a
training run directory (<run>/checkpoints/latest). The output is written as <output>.tmp-<pid>,
verified (logits of the reloaded directory vs the checkpoint's consolidated fp32 weights) and
only then published; an existing output is replaced only with --overwrite. Details: docs/export.md.

Exit codes: 0 published, 1 verification failed (nothing published), 2 bad checkpoint/output/arguments.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.stages.export import main  # noqa: E402

if __name__ == "__main__":
    finish(main(description=__doc__))
