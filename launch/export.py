"""Export a training checkpoint as a verified Hugging Face model directory.

    python launch/export.py --checkpoint RUN|CHECKPOINTS|STEP_DIR --output DIR
                            [--dtype auto|fp32|bf16|fp16] [--max-shard-size 2GB] [--tolerance X] [--overwrite]

Exit codes: 0 published, 1 verification failed (nothing published), 2 bad checkpoint/output/arguments.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
