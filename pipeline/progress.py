"""Progress bars that stay quiet when the output is not a terminal (CI logs stay readable)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled unless stderr is a terminal (``PIPELINE_PROGRESS=1`` forces it)."""
    import os

    forced = os.environ.get("PIPELINE_PROGRESS")
    disable = (forced == "0") if forced is not None else not sys.stderr.isatty()
    return tqdm(file=sys.stderr, disable=disable, dynamic_ncols=True, smoothing=0.1, **kwargs)
