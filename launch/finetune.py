"""Full-parameter fine-tuning: chat SFT or sequence classification, with DeepSpeed.

    deepspeed --num_gpus 2 launch/finetune.py --config configs/sample/finetune.yaml [key=value ...]
    python launch/finetune.py --config ... --inspect 5     # show 5 rendered examples, trained tokens marked

Exit codes: 0 done, 2 bad config/data, 75 stopped by SIGTERM/SIGUSR1 after a checkpoint (requeue).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.cli import run_stage  # noqa: E402
from pipeline.stages.finetune import FinetuneConfig, describe, inspect, run  # noqa: E402


def _extra(parser):
    parser.add_argument("--inspect", type=int, metavar="N", default=0, help="print N rendered training examples with the trained tokens marked, then exit")


def _main(cfg, ns):
    return inspect(cfg, ns.inspect) if ns.inspect else run(cfg, ns.local_rank)


if __name__ == "__main__":
    finish(run_stage(FinetuneConfig, _main, prog="launch/finetune.py", description=__doc__, extra=_extra, describe=describe))
