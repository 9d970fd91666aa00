"""The command line shared by every stage script.

``python launch/<stage>.py [--config FILE] [key=value ...] [--print-config] [--help]``

User errors (:class:`~pipeline.errors.UserError`) print one message and exit with code 2;
so does a full disk (ENOSPC / EDQUOT from any write: :class:`~pipeline.errors.DiskFullError`,
naming the output). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import help_text, load_config, to_yaml
from pipeline.errors import EXIT_USER_ERROR, UserError
from pipeline.io import disk_full_error, failed_path, is_disk_full


class _StageParser(argparse.ArgumentParser):
    """Builds the list of config keys only when help is printed: it parses the config
    classes' source for their field docstrings, which every launch need not pay for."""

    def __init__(self, *args, cfg_cls: type, **kwargs):
        self._cfg_cls = cfg_cls
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        self.epilog = "config keys (set in the YAML file or as key=value overrides):\n" + help_text(self._cfg_cls)
        return super().format_help()


def build_parser(prog: str, description: str, cfg_cls: type) -> argparse.ArgumentParser:
    parser = _StageParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, cfg_cls=cfg_cls)
    parser.add_argument("--config", metavar="FILE", help="YAML recipe; key=value overrides apply on top")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # The DeepSpeed launcher passes --local_rank=N; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def parse_args(
    cfg_cls: type, argv: Sequence[str] | None, prog: str, description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[Any, argparse.Namespace]:
    """Parse the command line into ``(config, namespace)``; raises UserError on bad config."""
    parser = build_parser(prog, description, cfg_cls)
    if extra is not None:
        extra(parser)
    ns = parser.parse_args(argv)
    cfg = load_config(cfg_cls, ns.config, ns.overrides)
    return cfg, ns


def run_stage(
    cfg_cls: type,
    main: Callable[[Any, argparse.Namespace], int | None],
    *,
    prog: str,
    description: str,
    argv: Sequence[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    describe: Callable[[Any], str] | None = None,
) -> int:
    """Parse, handle ``--print-config``, run ``main(cfg, ns)``, and map UserError to exit 2.

    Args:
        describe: optional extra text for ``--print-config`` (e.g. a resolved DeepSpeed JSON).
    """

    def body() -> int:
        cfg, ns = parse_args(cfg_cls, argv, prog, description, extra)
        if ns.print_config:
            sys.stdout.write(to_yaml(cfg))
            if describe is not None:
                sys.stdout.write(describe(cfg))
            return 0
        try:
            return int(main(cfg, ns) or 0)
        except UserError:
            raise
        except Exception as e:
            # A full disk is the user's to fix, wherever in the stage the write failed.
            if not is_disk_full(e) or not getattr(cfg, "output", None):
                raise
            raise disk_full_error(failed_path(e) or cfg.output, f"the output of {prog}",
                                  fix=f"set output= to a directory on another filesystem (now {cfg.output})") from None

    return report_errors(body)


def report_errors(body: Callable[[], int | None], *also: type[Exception]) -> int:
    """Run ``body`` and turn a user error (or one of ``also``, each with an ``exit_code``)
    into one ``error: ...`` line on stderr and its exit code; bugs keep their traceback."""
    try:
        return int(body() or 0)
    except (UserError, *also) as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        if not is_disk_full(e):
            raise
        sys.stdout.flush()
        print(f"error: {disk_full_error(failed_path(e), 'the output')}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
