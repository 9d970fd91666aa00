"""Preflight memory planner: which DeepSpeed config and micro batch fit a recipe on your hardware.

    python launch/plan.py --config configs/sample/pretrain.yaml [key=value ...]
    python launch/plan.py --config FILE --gpus-per-node 8 --gpu-memory 80 --nodes 2 --cpu-memory 1000 --nvme 3000

Prints, for each shipped ds_configs/ file, the estimated memory per GPU (per rank on CPU) and per
node, whether it fits, the largest micro batch that fits, and the fastest choice. The target
defaults to this machine (its GPUs, or CPU ranks, and the available RAM); GPUs described with
--gpu-memory from a machine without any get 128 GiB of CPU RAM per GPU unless --cpu-memory is
given (the output says so).

Exit codes: 0 something fits, 1 nothing fits, 2 bad config or arguments.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.stages.plan import main  # noqa: E402

if __name__ == "__main__":
    finish(main(description=__doc__))
