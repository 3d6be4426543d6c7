"""Progress bars: tqdm's, redrawn often on a terminal and rarely into a log file (every redraw written to a file
stays in it: a 300-step run wrote 30 KB of them)."""

from __future__ import annotations

import sys
from typing import Any

#: how often a bar is redrawn when stderr is not a terminal (a log file, a pipe, CI), in seconds
LOG_INTERVAL_S = 30.0


def progress_bar(iterable: Any = None, **kwargs: Any):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, redrawn at most every ``LOG_INTERVAL_S`` seconds into a file (the
    first and the final state are always drawn)."""
    from tqdm.auto import tqdm

    notebook = any("notebook" in c.__module__ for c in tqdm.__mro__)  # a widget, not text: redraws cost nothing
    if not notebook and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)  # tqdm's monitor thread would redraw every 10 s
    return tqdm(iterable, **kwargs)
