"""Full-parameter fine-tuning: chat SFT or sequence classification, with DeepSpeed.

    deepspeed --num_gpus 2 launch/finetune.py --config configs/sample/finetune.yaml [key=value ...]
    python launch/finetune.py --config ... --inspect 5     # show 5 rendered examples, trained tokens marked

Exit codes: 0 done, 2 bad config/data, 75 stopped by SIGTERM/SIGUSR1 after a checkpoint (requeue).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.stages.finetune import main  # noqa: E402

if __name__ == "__main__":
    finish(main(description=__doc__))
