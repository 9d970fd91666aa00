"""Export a training checkpoint as a verified Hugging Face model directory.

    python launch/export.py --checkpoint RUN|CHECKPOINTS|STEP_DIR --output DIR
                            [--dtype auto|fp32|bf16|fp16] [--max-shard-size 2GB] [--tolerance X] [--overwrite]

--checkpoint is a step directory (step-NNNNNNNN/), a checkpoints/ directory (its `latest`) or a
training run directory (<run>/checkpoints/latest). The output is written as <output>.tmp-<pid>,
verified (logits of the reloaded directory vs the checkpoint's consolidated fp32 weights) and
only then published; an existing output is replaced only with --overwrite. Details: docs/export.md.

Exit codes: 0 published, 1 verification failed (nothing published), 2 bad checkpoint/output/arguments.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.dist import finish  # noqa: E402  (imports pipeline.quiet: known library noise off)
from pipeline.cli import report_errors  # noqa: E402
from pipeline.stages.export import ExportVerificationError, export  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="step, checkpoints/ or run directory")
    p.add_argument("--output", required=True, metavar="DIR", help="Hugging Face model directory to publish")
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                   help="split safetensors files above this size, e.g. 2GB, 500MB, 64KiB (default 2GB)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype of the written weights; auto (default) = the training precision in meta.json")
    p.add_argument("--tolerance", type=float, default=None, metavar="X",
                   help="largest max |Δlogit| accepted (default: 1e-4 for fp32; for bf16 / fp16 2^-4 / 2^-6 "
                        "x max(1, max |reference logit|))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output, once the new one is verified")
    ns = p.parse_args(argv)
    return report_errors(lambda: export(ns.checkpoint, ns.output, max_shard_size=ns.max_shard_size, dtype=ns.dtype,
                                        tolerance=ns.tolerance, overwrite=ns.overwrite) and 0, ExportVerificationError)

if __name__ == "__main__":
    finish(main())
