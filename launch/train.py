"""Pre-train or continue-train a causal LM with DeepSpeed (ZeRO-3, CPU offload, resume).

    deepspeed --num_gpus 2 launch/train.py --config configs/sample/pretrain.yaml [key=value ...]
    torchrun --nproc-per-node 2 launch/train.py ...   |   srun launch/train.py ...

Exit codes: 0 done, 2 bad config/data, 75 stopped by SIGTERM/SIGUSR1 after a checkpoint (requeue).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.stages.train import main  # noqa: E402

if __name__ == "__main__":
    finish(main(description=__doc__))
