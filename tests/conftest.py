import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests are CPU-only and deterministic; keep torch from oversubscribing the cores: 2 threads, or under pytest-xdist
# (README's `-n 2`: CI's 2 cores) the cores shared among the workers (pytest_configure, below, before the workers
# start: they and the subprocesses the tests start inherit it). A value the user set is kept.
# (the first process to read this, pytest's own, tells the workers whether the user gave a value)
os.environ.setdefault("ELBOX_TEST_THREADS_GIVEN", "1" if "OMP_NUM_THREADS" in os.environ else "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The fixtures that train a model or load a network once for a test file are session-scoped: built once however
# the tests are ordered. Under mutmut a mutant's tests run by duration (below), moving between files and back, and
# pytest tears a module-scoped fixture down each time it leaves its file.


def worker_threads(workers: int) -> int:
    """Each of ``workers`` processes' share of the cores this process may run on (at most 2, as without xdist)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(2, cores // workers))


def pytest_configure(config) -> None:
    workers = getattr(config.option, "numprocesses", None)
    if os.environ["ELBOX_TEST_THREADS_GIVEN"] == "0" and isinstance(workers, int) and workers > 1:
        os.environ["OMP_NUM_THREADS"] = str(worker_threads(workers))


def pytest_collection_modifyitems(items: list) -> None:
    """Under a mutmut mutant, run its tests fastest first, by the durations in mutmut's stats.

    mutmut 3.8.1 runs a mutant's tests with -x (its first failing test ends the run) but, with pyproject's
    ``process_isolation = "forkserver"``, in the arbitrary order of a set; its other runner sorts them fastest
    first. A range check that one fast edge test kills then waited behind the tests that train models, and past
    mutmut's time limit (which counts the tests' calls, not their fixtures) was scored a timeout, not a kill."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    stats = Path("mutmut-stats.json")  # mutmut runs the tests in its mutants/ folder
    if "__mutmut_" not in mutant or not stats.is_file():
        return
    durations = json.loads(stats.read_text())["duration_by_test"]
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))  # stable: file order among equals


def run_elbox(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `elbox` command (as `python -m elbox`) and capture its output."""
    return subprocess.run([sys.executable, "-m", "elbox", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def elbox_cli():
    return run_elbox


def check_on_the_cpu_under_another_default_device(everything) -> None:
    """A model kept on the CPU while another device is the default (``torch.set_default_device("cuda")``) must
    compute on the CPU, and compute the same: ``everything()`` (a dict of tensors) runs with the CPU as the default,
    then with "meta" (standing in for the GPU: a tensor made without a device there has no values, so any such
    tensor the math uses fails or shows), and every result must be on the CPU and bit-identical."""
    import torch

    expected = everything()
    with torch.device("meta"):
        got = everything()
    for name, value in got.items():
        assert value.device == torch.device("cpu"), name
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


@pytest.fixture
def on_the_cpu_under_another_default_device():
    return check_on_the_cpu_under_another_default_device
