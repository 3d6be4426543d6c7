import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests are CPU-only and deterministic; keep torch from oversubscribing the 2 cores of CI.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The fixtures that train a model or load a network once for a test file are session-scoped: built once however
# the tests are ordered. mutmut runs a mutant's tests by duration, moving between files and back, and pytest
# tears a module-scoped fixture down each time it leaves its file.


def run_elbox(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `elbox` command (as `python -m elbox`) and capture its output."""
    return subprocess.run([sys.executable, "-m", "elbox", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def elbox_cli():
    return run_elbox

