"""How the trainer takes SIGINT and SIGTERM: finish the step, save, stop."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any


class StopSignal:  # pragma: no mutate block
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step (then it saves and stops); a
    second one acts as if elbox had not caught the first (Ctrl-C twice: stop now)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            return
        self._restore()
        os.kill(os.getpid(), signum)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()
