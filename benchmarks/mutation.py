"""Mutation testing of elbox's math and training step: how many planted bugs does the test suite catch?

mutmut (``pip install -e '.[dev]'``) rewrites the files listed under ``[tool.mutmut]`` in pyproject.toml one small
change at a time (a ``+`` for a ``-``, a constant off by one, a dropped argument...) and runs the tests that reach
the changed function; a mutant is *killed* when a test fails. This script runs it and prints, per file, the share of
non-equivalent mutants that were killed, as JSON lines and a table.

    python benchmarks/mutation.py              # run (hours on 2 cores; results are cached in mutants/ and
                                               # kept in mutation_results.json), report
    python benchmarks/mutation.py --report     # only report the last run's results
    python benchmarks/mutation.py --survivors  # also print each surviving mutant's diff
    python benchmarks/mutation.py --only 'elbox.samplers.*'   # run some mutants, by name pattern
    python benchmarks/mutation.py --rerun --only NAME ...      # run them again though they have a result
    python benchmarks/mutation.py --retime     # first time the tests afresh (see retime()), then run
    python benchmarks/mutation.py --check-equivalents         # has any listed mutant changed since it was read?
    python benchmarks/mutation.py --record-equivalents        # after reading them: pin the listed mutants' changes

Equivalent mutants (changes no test can see because the behaviour is the same) are listed, with the reason, in
``benchmarks/mutation_equivalent.toml`` and left out of the denominator; so are, in their own column, mutants
that only a GPU ("cpu-only": a tensor's device) or several processes (torchrun) can tell apart, which
tests/test_devices.py and tests/test_train_ddp.py check there. A timeout counts as killed (the mutant
made a test hang, which a test run notices); "no tests" (no test reaches the function) counts as survived.

A listed name is a function and a *number*: when the function's code changes, its mutants are renumbered and a name
may come to mean another change, for which the reason is wrong. So each entry's change (its - and + lines, made by
mutmut from the source) is pinned in ``mutation_equivalent_diffs.json`` when the entries are read, and
``--check-equivalents`` (also run by ``--report``) names every entry whose change is no longer the one read.

A run takes longer than one working session, and mutants/ is one machine's cache, so the decided results are also
kept in ``benchmarks/mutation_results.json``, which is committed: a run (and ``--report``) adds to it, and a run in
a fresh clone starts from it. A result is kept on mutmut's own rule: while its function's source and the mutation
settings are unchanged (a killed mutant stays killed when tests are added; weakening a test that killed it is not
noticed, as in mutmut's cache). ``--report`` in a fresh clone reports from it.

Only the in-process tests take part (pyproject.toml ignores the end-to-end files that start ``python -m elbox``
and torchrun subprocesses: most of the suite's time, spent again for every surviving mutant). Should a test start
one anyway, PYTHONPATH points it at mutmut's copy of the package and the mutant's name travels in the environment,
so it runs the mutant too. mutmut does not mutate decorated functions (properties, ``@torch.no_grad()``), so the
math of elbox is written without such decorators where it matters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT = REPO / "benchmarks" / "mutation_equivalent.toml"
PINNED = REPO / "benchmarks" / "mutation_equivalent_diffs.json"
KILLED = {1, 3, 36, 24, -24, 152, 255}  # mutmut's exit codes for killed and timed out
# timed out: mutmut sends SIGXCPU at a CPU-time limit, and also at half that limit in *wall* time, so a busy (or
# paused) machine makes false timeouts; the report counts them, and they are worth re-running on a quiet machine
TIMED_OUT = {24, -24, 152}
SURVIVED = {0, 5, 33}  # survived, no tests


STAMP = REPO / "mutants" / "elbox-mutation-config.json"


def mutation_settings() -> dict:
    """The settings that decide which mutants a function has (a change renumbers them)."""
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]
    return {k: settings.get(k, []) for k in ("do_not_mutate_patterns", "only_mutate")}


def forget_results_of_other_settings() -> None:
    """mutmut keeps a function's results while the function's source is unchanged, by mutant number; but which
    mutants a function has also depends on ``do_not_mutate_patterns`` / ``only_mutate``, and a change there
    renumbers them, so kept results would belong to other mutants. When those settings differ from the ones the
    cached mutants were made with (or are unknown), the mutants and their results are dropped (mutants/src);
    the test-coverage map (mutants/mutmut-stats.json) does not depend on them and is kept."""
    import shutil

    wanted = mutation_settings()
    had = json.loads(STAMP.read_text()) if STAMP.is_file() else None
    if had != wanted and (REPO / "mutants" / "src").exists():
        print("mutation settings changed since the cached mutants were made: dropping them (mutants/src)",
              file=sys.stderr)
        shutil.rmtree(REPO / "mutants" / "src")
    (REPO / "mutants").mkdir(exist_ok=True)
    STAMP.write_text(json.dumps(wanted))


# The results, committed: mutants/ is mutmut's cache on one machine, and a run takes longer than a working session,
# so each run's decided results are also written here (save_ledger) and a fresh clone starts from them
# (restore_ledger). A result is kept on mutmut's own rule: while its function's source (mutmut's hash of it) and
# the mutation settings are unchanged. Like mutmut's cache, it is not re-decided when only the tests change.
LEDGER = REPO / "benchmarks" / "mutation_results.json"


def ledger_files() -> dict:
    """The ledger's results by source file; none when it was made under other mutation settings (renumbered)."""
    ledger = json.loads(LEDGER.read_text()) if LEDGER.is_file() else {}
    return ledger.get("files", {}) if ledger.get("settings") == mutation_settings() else {}


def save_ledger() -> int:
    """Add every decided result in mutants/ to the ledger, and keep the ledger's others where their function is
    unchanged (a file without a cache keeps its entry); returns how many results the ledger holds."""
    files = ledger_files()
    for meta in sorted((REPO / "mutants").rglob("*.py.meta")):
        path = meta.relative_to(REPO / "mutants").as_posix()[: -len(".meta")]
        data = json.loads(meta.read_text())
        hashes = data["hash_by_function_name"]
        old = files.get(path, {"hash_by_function_name": {}, "exit_code_by_key": {}})
        same = {f for f, h in old["hash_by_function_name"].items() if hashes.get(f) == h}
        codes = {k: c for k, c in old["exit_code_by_key"].items() if k in data["exit_code_by_key"] and _function(k) in same}
        codes.update({k: c for k, c in data["exit_code_by_key"].items() if c is not None})
        files[path] = {"hash_by_function_name": {f: hashes.get(f) for f in sorted({_function(k) for k in codes})},
                       "exit_code_by_key": codes}
        if not codes:
            del files[path]
    LEDGER.write_text(json.dumps({"settings": mutation_settings(), "files": files}, indent=1, sort_keys=True,
                                 ensure_ascii=False) + "\n")
    return sum(len(f["exit_code_by_key"]) for f in files.values())


def _function(mutant: str) -> str:
    """The function a mutant belongs to, as mutmut's hashes name it: elbox.x.xǁAǁf__mutmut_3 -> xǁAǁf."""
    return mutant.partition("__mutmut_")[0].rpartition(".")[2]


def restore_ledger() -> int:
    """Seed mutmut's cache with the ledger's results, for each file that has no cache yet (a fresh clone); mutmut
    then keeps those whose function is unchanged and runs the rest. Returns how many results were seeded."""
    files = ledger_files()
    if LEDGER.is_file() and not files:
        print(f"{LEDGER.name} holds no results made under these mutation settings: not used", file=sys.stderr)
    seeded = 0
    for path, entry in files.items():
        meta = REPO / "mutants" / (path + ".meta")
        if meta.exists():
            continue
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({**entry, "type_check_error_by_key": {}, "durations_by_key": {},
                                    "estimated_durations_by_key": {}}))
        seeded += len(entry["exit_code_by_key"])
    return seeded


def results_from_ledger() -> dict[str, dict[str, int | None]]:
    """{source file: {mutant name: exit code}} for the source as it is now, from the ledger alone (no mutants/):
    mutmut makes the current mutants, and a result counts only where its function is unchanged."""
    import fnmatch

    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.format_utils import get_mutant_name

    files = ledger_files()
    cwd = os.getcwd()
    os.chdir(REPO)  # mutmut reads its settings (the patterns not to mutate) from ./pyproject.toml
    try:
        out = {}
        for path in sorted(p.relative_to(REPO).as_posix() for p in (REPO / "src").rglob("*.py")):
            if not any(fnmatch.fnmatch(path, pattern) for pattern in mutation_settings()["only_mutate"]):
                continue
            mutated = mutate_file_contents(path, (REPO / path).read_text())
            entry = files.get(path, {"hash_by_function_name": {}, "exit_code_by_key": {}})
            codes = {}
            for local in mutated.mutant_names:
                function = _function(local)
                same = entry["hash_by_function_name"].get(function) == mutated.hash_by_function_name.get(function)
                name = get_mutant_name(Path(path), local)
                codes[name] = entry["exit_code_by_key"].get(name) if same else None
            if codes:
                out[path] = codes
        return out
    finally:
        os.chdir(cwd)


def run_mutmut(children: int, names: list[str]) -> None:
    """Run mutmut on the named mutants (see mutants_to_run)."""
    forget_results_of_other_settings()
    seeded = restore_ledger()
    if seeded:
        print(f"seeded mutmut's cache with {seeded} results from {LEDGER.name}", file=sys.stderr)
    # the folder must exist before Python starts: a PYTHONPATH entry missing at start-up is cached as "nothing here"
    (REPO / "mutants" / "src").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "mutants" / "src")}
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names], cwd=REPO,
                   env=env, check=False)
    print(f"{save_ledger()} results in {LEDGER.name}", file=sys.stderr)


def mutants_to_run(current: dict[str, dict[str, int | None]], equivalent: dict[str, str], patterns: list[str],
                   rerun: bool) -> list[str]:
    """The mutants a run tests: those without a result, and the survivors (a new test may kill one; one that is
    equivalent must be listed), or with ``rerun`` all of them, whose names match ``patterns`` (all when none), less
    the listed ones. mutmut is given their names, because it re-runs every mutant it is named even when it has a
    result. A listed mutant is not run: it is out of the score either way, and a mutant
    no CPU test kills costs all the tests that reach its function (minutes each; ~190 of them were hours of a run).
    That its entry still names the change that was read is checked without running it (--check-equivalents)."""
    import fnmatch

    return [name for codes in current.values() for name, code in codes.items()
            if (rerun or code is None or code in SURVIVED) and name not in equivalent
            and (not patterns or any(fnmatch.fnmatch(name, p) for p in patterns))]


STATS = REPO / "mutants" / "mutmut-stats.json"


def parse_durations(pytest_output: str) -> dict[str, float]:
    """{test id: seconds of setup + call + teardown} from the lines ``pytest --durations=0`` prints."""
    import re

    out: dict[str, float] = defaultdict(float)
    for line in pytest_output.splitlines():
        m = re.match(r"([\d.]+)s (setup|call|teardown) +(\S.*)$", line.rstrip())
        if m:
            out[m.group(3)] += float(m.group(1))
    return dict(out)


def retime(stats: Path, measured: dict[str, float]) -> int:
    """Replace the test durations in mutmut's stats with ``measured`` ones; returns how many were replaced.

    A mutant's tests run fastest first (with -x, so a killed mutant stops at its first failing test; mutmut's
    forkserver gives them in set order, and tests/conftest.py sorts them), by the durations mutmut's stats run
    recorded once. A stats run that spans a busy or paused machine records some tests at 100x their time: those
    then run last, after slow ones that start ``python -m elbox`` subprocesses, and every killed mutant waits for
    them (measured: 2 mutants a minute, 9 after a retime). Only the order and the timeouts change; the results
    do not."""
    data = json.loads(stats.read_text())
    durations = data["duration_by_test"]
    hits = [t for t in durations if t in measured]
    for t in hits:
        durations[t] = max(measured[t], 0.01)
    stats.write_text(json.dumps(data))
    return len(hits)


def measure_test_durations() -> dict[str, float]:
    """Run the tests mutmut runs (pyproject's pytest_add_cli_args), once, unmutated, and time each."""
    args = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"].get("pytest_add_cli_args", [])
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", *args, "--durations=0", "--durations-min=0"],
                         cwd=REPO, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.exit(f"the tests fail unmutated; fix them before timing them:\n{run.stdout[-2000:]}")
    return parse_durations(run.stdout)


def load_results() -> dict[str, dict[str, int | None]]:
    """{source file: {mutant name: exit code}} from mutmut's .meta files."""
    out = {}
    for meta in sorted((REPO / "mutants").rglob("*.py.meta")):
        path = meta.relative_to(REPO / "mutants").as_posix()[: -len(".meta")]
        out[path] = json.loads(meta.read_text())["exit_code_by_key"]
    return out


def mutant_diff(name: str) -> str:
    return subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=REPO, capture_output=True,
                          text=True).stdout


def mutant_changes(names: list[str]) -> dict[str, str | None]:
    """Each named mutant's change, its - and + lines, made by mutmut from the source as it is now (under the
    settings in pyproject.toml); None for a name that names no mutant of it."""
    import difflib

    import libcst as cst
    from mutmut.mutation.diff_apply import read_mutant_function, read_original_function
    from mutmut.mutation.file_mutation import mutate_file_contents

    cwd = os.getcwd()
    os.chdir(REPO)  # mutmut reads its settings (the patterns not to mutate) from ./pyproject.toml
    try:
        files, out = {}, {}
        for name in names:
            module = name.split(".x", 1)[0]  # elbox.objectives.ddpm.xǁDDPMǁbound__mutmut_3 -> elbox.objectives.ddpm
            path = Path("src", *module.split(".")).with_suffix(".py")
            if path not in files:  # (names, the mutated module parsed once)
                mutated = mutate_file_contents(str(path), path.read_text()) if path.is_file() else None
                files[path] = (set(mutated.mutant_names), cst.parse_module(mutated.code)) if mutated else (set(), None)
            local = name[len(module) + 1 :]
            names_here, tree = files[path]
            if local not in names_here:
                out[name] = None
                continue
            before, after = (cst.Module([f(tree, local)]).code.strip().splitlines()
                             for f in (read_original_function, read_mutant_function))
            out[name] = "\n".join(line for line in difflib.unified_diff(before, after, lineterm="")
                                  if line[:1] in "+-" and not line.startswith(("---", "+++")))
        return out
    finally:
        os.chdir(cwd)


def unpinned_equivalents(pinned: dict[str, str], current: dict[str, str | None]) -> dict[str, str]:
    """{entry: what is wrong} for the entries whose mutant is not the change that was read when it was listed."""
    problems = {}
    for name, change in sorted(current.items()):
        if change is None:
            problems[name] = "names no mutant of the current source"
        elif name not in pinned:
            problems[name] = f"never pinned; read its change, then --record-equivalents:\n{change}"
        elif pinned[name] != change:
            problems[name] = f"its mutant changed since it was read; was:\n{pinned[name]}\nnow:\n{change}"
    return problems


def check_equivalents(equivalent: dict[str, str]) -> dict[str, str]:
    pinned = json.loads(PINNED.read_text()) if PINNED.is_file() else {}
    return unpinned_equivalents(pinned, mutant_changes(sorted(equivalent)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", action="store_true", help="do not run mutmut; report the cached results")
    ap.add_argument("--survivors", action="store_true", help="print the diff of every surviving mutant")
    ap.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    ap.add_argument("--only", nargs="+", default=[], metavar="PATTERN",
                    help="run only the mutants whose names match (fnmatch), e.g. 'elbox.samplers.*'")
    ap.add_argument("--rerun", action="store_true",
                    help="also run the selected mutants that have a result (a timeout on a busy machine, say)")
    ap.add_argument("--check-equivalents", action="store_true",
                    help=f"only check that each entry of {EQUIVALENT.name} still names the change that was read")
    ap.add_argument("--record-equivalents", action="store_true",
                    help=f"pin each entry's change in {PINNED.name} (after reading them against their reasons)")
    ap.add_argument("--retime", action="store_true",
                    help="time the tests once, unmutated, on a quiet machine, and give mutmut those durations "
                         "(the order it runs each mutant's tests in), then run")
    args = ap.parse_args()
    equivalent = tomllib.loads(EQUIVALENT.read_text()).get("equivalent", {}) if EQUIVALENT.is_file() else {}
    if args.record_equivalents:
        changes = mutant_changes(sorted(equivalent))
        missing = [n for n, c in changes.items() if c is None]
        if missing:
            sys.exit(f"{len(missing)} entries of {EQUIVALENT.name} name no mutant; remove them first: {missing[:5]}")
        PINNED.write_text(json.dumps(changes, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
        print(f"pinned the changes of {len(changes)} entries in {PINNED.name}")
        return
    if args.check_equivalents:
        problems = check_equivalents(equivalent)
        for name, problem in problems.items():
            print(f"# {name}: {problem}\n")
        print(f"{len(problems)} of {len(equivalent)} entries of {EQUIVALENT.name} need reading again")
        sys.exit(1 if problems else 0)
    if args.retime:
        if not STATS.is_file():
            sys.exit(f"{STATS} is not there yet: run once without --retime first")
        print(f"retimed {retime(STATS, measure_test_durations())} tests in {STATS.name}", file=sys.stderr)
    if not args.report:
        if (REPO / "mutants").exists():
            save_ledger()  # this machine's cache first, so the ledger knows every result
        names = mutants_to_run(results_from_ledger(), equivalent, args.only, args.rerun)
        if names:
            print(f"{len(names)} mutants to run", file=sys.stderr)
            run_mutmut(args.children, names)
        else:
            print("every selected mutant has a result (--rerun to run them again)", file=sys.stderr)
    results = load_results()
    if results:
        print(f"{save_ledger()} results in {LEDGER.name}", file=sys.stderr)
    else:
        results = results_from_ledger()  # a fresh clone: the committed results, where their code is unchanged
    if not any(code is not None for codes in results.values() for code in codes.values()):
        sys.exit("no mutation results in mutants/ or in the ledger; run without --report first")
    rows = []
    survivors = defaultdict(list)
    for path, codes in results.items():
        count = Counter()
        for name, code in codes.items():
            if name in equivalent:  # "cpu-only"/"torchrun" reasons: tested elsewhere; the others: equivalent
                elsewhere = equivalent[name].startswith(("cpu-only", "runs only under torchrun"))
                count["elsewhere" if elsewhere else "equivalent"] += 1
            elif code in KILLED:
                count["killed"] += 1
                count["timed out"] += code in TIMED_OUT
            elif code in SURVIVED:
                count["survived"] += 1
                survivors[path].append(name)
            elif code is None:
                count["not checked"] += 1
            else:
                count["other"] += 1
        counted = count["killed"] + count["survived"]
        rows.append({"file": path, "mutants": len(codes), **count,
                     "score": round(count["killed"] / counted, 4) if counted else None})
    for row in rows:
        print(json.dumps(row))
    print()
    print(f"{'file':44} {'mutants':>8} {'killed':>7} {'surv.':>6} {'equiv.':>6} {'GPU/DDP':>7} {'unrun':>6} "
          f"{'score':>7}")
    total = Counter()
    for row in rows:
        score = "-" if row["score"] is None else f"{100 * row['score']:.1f}%"
        print(f"{row['file']:44} {row['mutants']:8} {row.get('killed', 0):7} {row.get('survived', 0):6} "
              f"{row.get('equivalent', 0):6} {row.get('elsewhere', 0):7} {row.get('not checked', 0):6} {score:>7}")
        total.update({k: row.get(k, 0) for k in ("mutants", "killed", "survived", "equivalent", "elsewhere",
                                                 "not checked")})
    counted = total["killed"] + total["survived"]
    print(f"{'all':44} {total['mutants']:8} {total['killed']:7} {total['survived']:6} {total['equivalent']:6} "
          f"{total['elsewhere']:7} {total['not checked']:6} {100 * total['killed'] / max(counted, 1):6.1f}%")
    print("\nscore = killed / (killed + survived); equivalent mutants and those only a GPU or torchrun can tell apart "
          f"(listed with reasons in {EQUIVALENT.name}) are left out; unrun: not yet tested")
    timed_out = sorted(n for codes in results.values() for n, c in codes.items() if c in TIMED_OUT and n not in equivalent)
    if timed_out:
        print(f"\n{len(timed_out)} of the killed timed out (a busy or paused machine makes false timeouts; on a quiet "
              f"one, re-run them: --rerun --only NAME ...): {timed_out[:5]}")
    stale = sorted(set(equivalent) - {n for codes in results.values() for n in codes})
    if stale:
        print(f"\n{len(stale)} entries of {EQUIVALENT.name} name no current mutant (the code moved): {stale[:5]}")
    moved = check_equivalents(equivalent)
    if moved:
        print(f"\n{len(moved)} entries of {EQUIVALENT.name} name a change other than the one read (the code moved): "
              f"{sorted(moved)[:5]}; see --check-equivalents")
    wrong = killed_but_listed(results, equivalent)
    if wrong:
        print(f"\n{len(wrong)} entries of {EQUIVALENT.name} name a mutant the tests kill (the numbers moved, or the "
              f"reason is wrong): {wrong}")
    if args.survivors:
        for path, names in survivors.items():
            for name in names:
                print(f"\n# {name}\n{mutant_diff(name)}")


def killed_but_listed(results: dict[str, dict[str, int | None]], equivalent: dict[str, str]) -> list[str]:
    """Entries of the equivalents file whose mutant the tests kill. An equivalent mutant cannot be killed, so such an
    entry names the wrong mutant (its function changed and the numbers moved) or gives a wrong reason; either way
    it must go, or it would hide a killed mutant and, worse, the real equivalent one would show as a survivor."""
    return sorted(n for codes in results.values() for n, code in codes.items() if n in equivalent and code in KILLED)


if __name__ == "__main__":
    main()
