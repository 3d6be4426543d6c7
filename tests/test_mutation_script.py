"""benchmarks/mutation.py's cache rule: mutants made under other mutation settings are dropped before a run, so no
kept result can belong to a renumbered mutant; the coverage map is kept."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mutation.py"


def load_script():
    spec = importlib.util.spec_from_file_location("mutation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/ is not here (mutmut runs the tests from its copy)")
def test_cached_mutants_are_dropped_when_the_mutation_settings_change(tmp_path, monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "REPO", tmp_path)
    monkeypatch.setattr(script, "STAMP", tmp_path / "mutants" / "elbox-mutation-config.json")

    def settings(patterns):
        (tmp_path / "pyproject.toml").write_text(f"[tool.mutmut]\ndo_not_mutate_patterns = {patterns!r}\n")

    def cache():
        (tmp_path / "mutants" / "src").mkdir(parents=True, exist_ok=True)
        (tmp_path / "mutants" / "src" / "a.py.meta").write_text("{}")
        (tmp_path / "mutants" / "mutmut-stats.json").write_text("{}")

    settings(["raise"])
    cache()
    script.forget_results_of_other_settings()  # made under unknown settings: dropped
    assert not (tmp_path / "mutants" / "src").exists() and (tmp_path / "mutants" / "mutmut-stats.json").exists()
    cache()
    script.forget_results_of_other_settings()  # the same settings: kept
    assert (tmp_path / "mutants" / "src" / "a.py.meta").exists()
    settings(["raise", "print"])
    script.forget_results_of_other_settings()  # other patterns: dropped
    assert not (tmp_path / "mutants" / "src").exists() and (tmp_path / "mutants" / "mutmut-stats.json").exists()


@pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/ is not here (mutmut runs the tests from its copy)")
def test_an_equivalent_entry_whose_mutant_is_killed_is_reported():
    script = load_script()
    killed, survived = next(iter(script.KILLED)), next(iter(script.SURVIVED))
    results = {"src/a.py": {"a.f__mutmut_1": killed, "a.f__mutmut_2": survived, "a.f__mutmut_3": None}}
    listed = {"a.f__mutmut_1": "wrong: the tests kill it", "a.f__mutmut_2": "equivalent", "a.f__mutmut_3": "not run"}
    assert script.killed_but_listed(results, listed) == ["a.f__mutmut_1"]
    assert script.killed_but_listed(results, {"a.f__mutmut_2": "equivalent"}) == []


@pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/ is not here (mutmut runs the tests from its copy)")
def test_an_entry_whose_mutant_is_no_longer_the_change_that_was_read_is_named():
    script = load_script()
    pinned = {"a.f__mutmut_1": "-    return x + 1\n+    return x - 1", "a.f__mutmut_2": "-    y = 2\n+    y = 3"}
    current = {"a.f__mutmut_1": pinned["a.f__mutmut_1"], "a.f__mutmut_2": "-    return x + 1\n+    return x + 2",
               "a.f__mutmut_3": "-    z\n+    None", "a.g__mutmut_9": None}
    problems = script.unpinned_equivalents(pinned, current)
    assert sorted(problems) == ["a.f__mutmut_2", "a.f__mutmut_3", "a.g__mutmut_9"]
    assert "changed since it was read" in problems["a.f__mutmut_2"] and "y = 3" in problems["a.f__mutmut_2"]
    assert "never pinned" in problems["a.f__mutmut_3"] and "names no mutant" in problems["a.g__mutmut_9"]


@pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/ is not here (mutmut runs the tests from its copy)")
def test_a_mutants_change_is_made_from_the_source_as_it_is(tmp_path, monkeypatch):
    """mutmut's own numbering, from the file on disk and the settings in pyproject.toml: the first mutant of f is
    its first change, and renumbers when a line is added above it."""
    pytest.importorskip("mutmut")
    script = load_script()
    monkeypatch.setattr(script, "REPO", tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool.mutmut]\nsource_paths = ["src/pkg"]\n')
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    source = tmp_path / "src" / "pkg" / "mod.py"
    source.write_text("def f(x):\n    return x + 1\n")
    first = script.mutant_changes(["pkg.mod.x_f__mutmut_1", "pkg.mod.x_f__mutmut_99"])
    assert first == {"pkg.mod.x_f__mutmut_1": "-    return x + 1\n+    return x - 1", "pkg.mod.x_f__mutmut_99": None}
    source.write_text("def f(x):\n    y = x * 2\n    return x + 1\n")
    assert script.mutant_changes(["pkg.mod.x_f__mutmut_1"])["pkg.mod.x_f__mutmut_1"] != first["pkg.mod.x_f__mutmut_1"]


@pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/ is not here (mutmut runs the tests from its copy)")
def test_retime_gives_mutmut_the_measured_durations_and_keeps_the_rest(tmp_path):
    script = load_script()
    out = """============================= slowest durations ==============================
2.50s call     tests/test_a.py::test_slow[x-1 (a, b)]
0.25s setup    tests/test_a.py::test_slow[x-1 (a, b)]
0.00s teardown tests/test_a.py::test_fast
1.00s call     tests/test_a.py::test_fast
3 passed in 4.00s"""
    measured = script.parse_durations(out)
    assert measured == {"tests/test_a.py::test_slow[x-1 (a, b)]": 2.75, "tests/test_a.py::test_fast": 1.0}
    stats = tmp_path / "mutmut-stats.json"
    old = {"tests/test_a.py::test_slow[x-1 (a, b)]": 378.0, "tests/test_a.py::test_fast": 0.5, "tests/gone.py::t": 9.0}
    stats.write_text(json.dumps({"duration_by_test": old, "tests_by_mangled_function_name": {"f": ["t"]}}))
    assert script.retime(stats, measured) == 2
    data = json.loads(stats.read_text())
    assert data["duration_by_test"] == {"tests/test_a.py::test_slow[x-1 (a, b)]": 2.75,
                                        "tests/test_a.py::test_fast": 1.0, "tests/gone.py::t": 9.0}
    assert data["tests_by_mangled_function_name"] == {"f": ["t"]}


@pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/ is not here (mutmut runs the tests from its copy)")
def test_the_committed_results_come_back_in_a_fresh_clone_only_where_their_function_is_unchanged(tmp_path,
                                                                                                 monkeypatch):
    """A run outlives a session: its results go to the ledger, and a clone without mutants/ reads them back, for
    the functions whose source is as it was; a changed function's mutants are unrun again, and so is everything
    when the mutation settings change (the mutants are renumbered)."""
    pytest.importorskip("mutmut")
    from mutmut.mutation.file_mutation import mutate_file_contents

    script = load_script()
    for name, value in (("REPO", tmp_path), ("LEDGER", tmp_path / "benchmarks" / "mutation_results.json"),
                        ("STAMP", tmp_path / "mutants" / "elbox-mutation-config.json")):
        monkeypatch.setattr(script, name, value)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "pyproject.toml").write_text('[tool.mutmut]\nsource_paths = ["src/pkg"]\nonly_mutate = ["src/pkg/*"]\n')
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    source = tmp_path / "src" / "pkg" / "mod.py"
    source.write_text("def f(x):\n    return x + 1\n\n\ndef g(x):\n    return x * 2\n")
    monkeypatch.chdir(tmp_path)
    mutated = mutate_file_contents("src/pkg/mod.py", source.read_text())
    names = [f"pkg.mod.{n}" for n in mutated.mutant_names]
    f_names, g_names = [n for n in names if ".x_f__" in n], [n for n in names if ".x_g__" in n]
    assert f_names and g_names
    # what mutmut leaves in mutants/ after a partial run: f's mutants decided, g's first one killed, the rest unrun
    codes = {n: (1 if n in f_names[:1] + g_names[:1] else 0 if n in f_names else None) for n in names}
    meta = tmp_path / "mutants" / "src" / "pkg" / "mod.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": codes, "hash_by_function_name": mutated.hash_by_function_name,
                                "type_check_error_by_key": {}, "durations_by_key": {},
                                "estimated_durations_by_key": {}}))
    decided = {n: c for n, c in codes.items() if c is not None}
    assert script.save_ledger() == len(decided)

    import shutil

    shutil.rmtree(tmp_path / "mutants")  # a fresh clone
    assert script.results_from_ledger() == {"src/pkg/mod.py": codes}
    assert script.load_results() == {}
    assert script.restore_ledger() == len(decided)  # mutmut's cache seeded, as mutmut itself would have left it
    restored = json.loads(meta.read_text())
    assert restored["exit_code_by_key"] == decided and set(restored["hash_by_function_name"]) == {"x_f", "x_g"}
    assert script.restore_ledger() == 0  # a cache that is there is never overwritten
    assert script.save_ledger() == len(decided)  # nor is a saved result lost by saving again
    meta.write_text(json.dumps({**restored, "exit_code_by_key": dict.fromkeys(names)}))  # an older cache, unrun
    assert script.save_ledger() == len(decided)  # the ledger's results stay, its function being the same

    source.write_text("def f(x):\n    return x + 1\n\n\ndef g(x):\n    return x * 3\n")  # g changed
    assert script.results_from_ledger() == {"src/pkg/mod.py": {n: decided.get(n) if n in f_names else None
                                                                for n in names}}
    (tmp_path / "pyproject.toml").write_text('[tool.mutmut]\nsource_paths = ["src/pkg"]\nonly_mutate = ["src/pkg/*"]\n'
                                             'do_not_mutate_patterns = ["x \\\\+ 1"]\n')
    shutil.rmtree(tmp_path / "mutants")
    assert script.restore_ledger() == 0  # other settings: the numbers may mean other mutants
    assert all(c is None for c in script.results_from_ledger()["src/pkg/mod.py"].values())


@pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/ is not here (mutmut runs the tests from its copy)")
def test_a_run_names_only_the_unrun_unlisted_mutants_since_mutmut_reruns_every_mutant_it_is_named():
    script = load_script()
    """Run: the unrun and the survivors (a new test may kill one). Not run: the killed (and timed out) unless asked
    to, and the listed ones ever."""
    killed, survived, timed_out = 1, 0, next(iter(script.TIMED_OUT))
    current = {"src/a.py": {"a.x_f__mutmut_1": killed, "a.x_f__mutmut_2": None, "a.x_f__mutmut_3": None},
               "src/b.py": {"b.x_g__mutmut_1": None, "b.x_g__mutmut_2": timed_out, "b.x_g__mutmut_3": survived,
                            "b.x_g__mutmut_4": survived}}
    listed = {"a.x_f__mutmut_3": "equivalent", "b.x_g__mutmut_4": "equivalent"}
    assert script.mutants_to_run(current, listed, [], rerun=False) == ["a.x_f__mutmut_2", "b.x_g__mutmut_1",
                                                                        "b.x_g__mutmut_3"]
    assert script.mutants_to_run(current, listed, ["b.*"], rerun=False) == ["b.x_g__mutmut_1", "b.x_g__mutmut_3"]
    assert script.mutants_to_run(current, listed, ["b.*"], rerun=True) == ["b.x_g__mutmut_1", "b.x_g__mutmut_2",
                                                                           "b.x_g__mutmut_3"]
    assert script.mutants_to_run(current, listed, ["a.x_f__mutmut_3"], rerun=True) == []


def test_under_a_mutant_its_tests_run_fastest_first_by_mutmuts_recorded_durations(tmp_path):
    """mutmut 3.8.1's forkserver gives pytest a mutant's tests in the order of a set; tests/conftest.py sorts them by
    mutmut's stats (read from the folder mutmut runs in), so the fast test that kills a mutant is not left behind
    slow ones, past mutmut's time limit. Outside a mutant the order is the one given."""
    here = "tests/test_mutation_script.py::"
    slow = here + "test_an_equivalent_entry_whose_mutant_is_killed_is_reported"
    fast = here + "test_an_entry_whose_mutant_is_no_longer_the_change_that_was_read_is_named"
    (tmp_path / "mutmut-stats.json").write_text(json.dumps({"duration_by_test": {slow: 9.0, fast: 0.5}}))

    def order(mutant: str) -> list[str]:
        run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly",
                              "-p", "no:cacheprovider", "--rootdir", str(ROOT), str(ROOT / slow), str(ROOT / fast)],
                             cwd=tmp_path, env={**os.environ, "MUTANT_UNDER_TEST": mutant}, capture_output=True,
                             text=True, check=True)
        return [line for line in run.stdout.splitlines() if "::" in line]

    assert order("elbox.checkpoint.x_latest_checkpoint__mutmut_19") == [fast, slow]
    assert order("") == [slow, fast]
