"""Stage: plots and a Markdown report from TensorBoard event files.

    python launch/report.py --logdir DIR [--output DIR]

The command line only; reading the event files, the figures and the Markdown are
:func:`pipeline.eval.plots.build_report`. Exit codes: 0 written, 2 no log directory or no scalars in it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.eval.plots import build_report


def main(argv: list[str] | None = None, *, description: str = "") -> int:
    """``launch/report.py``: parse the arguments, build the report, print where it is."""
    import argparse

    from pipeline.cli import report_errors

    p = argparse.ArgumentParser(prog="launch/report.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", required=True, metavar="DIR", help="TensorBoard log directory (runs in subdirectories)")
    p.add_argument("--output", metavar="DIR", default=None, help="report directory (default <logdir>/report)")
    ns = p.parse_args(argv)

    def body() -> int:
        result = build_report(ns.logdir, ns.output)
        n_fig, n_runs = len(result["figures"]), len(result["runs"])
        print(f"report: {Path(result['output']) / 'report.md'} ({n_fig} figures from {n_runs} runs)")
        return 0

    return report_errors(body)
