"""README cannot drift from the code: every code block of README.md is run or checked here.

- the quick start's training command runs, with tiny settings appended (flags given later win);
- the test command is the one CI runs (``.ci/run``);
- the Python snippets run as they stand, in the folder where the quick start ran;
- every flag in the command listings is one the command accepts, and every benchmark script named exists and
  answers ``--help``;
- every file the layout names exists.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from elbox.cli import train_config_from_args

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"^ *```(\w*)\n(.*?)^ *```", README, re.M | re.S)]
TINY = ["--steps", "3", "--timesteps", "100", "--final-eval-examples", "16", "--num-samples", "4", "--quiet"]


def test_readme_has_the_blocks_this_file_checks():
    kinds = [k for k, _ in BLOCKS]
    assert kinds.count("bash") >= 3 and kinds.count("python") == 1 and kinds.count("") >= 3


def elbox_commands(block: str) -> list[list[str]]:
    """The `elbox ...` commands of a bash block, as argument lists after `elbox` (a `&&` chain split)."""
    out = []
    for part in re.split(r"&&|\n", block.replace("\\\n", " ")):
        words = shlex.split(part)
        for i, w in enumerate(words):
            if w.endswith("/elbox") or w == "elbox" or (w == "-m" and i + 1 < len(words) and words[i + 1] == "elbox"):
                out.append(words[i + 1 + (w == "-m"):])
                break
    return out


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quick start's first command (its `elbox train`, tiny settings appended), in a fresh folder."""
    cwd = tmp_path_factory.mktemp("readme")
    first = next(code for kind, code in BLOCKS if kind == "bash")
    (command,) = elbox_commands(first)
    done = subprocess.run([sys.executable, "-m", "elbox", *command, *TINY], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "held-out bound" in done.stdout and (cwd / "runs" / "digits" / "samples.png").is_file()
    return cwd


def test_the_test_command_is_the_one_ci_runs():
    second = [code for kind, code in BLOCKS if kind == "bash"][1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-m pytest" in second and "pip install" in second
    assert second in ci  # verbatim


def test_the_python_snippets_run_as_they_stand(quickstart, monkeypatch):
    monkeypatch.chdir(quickstart)
    for kind, code in BLOCKS:
        if kind == "python":
            exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (quickstart / "runs" / "api-example" / "samples.png").is_file()


def test_every_flag_in_the_command_listings_exists():
    import contextlib
    import io

    from elbox.cli import main

    helps = {}
    for cmd, extra in (("train", ["ddpm"]), ("train", ["vae"]), ("train", ["ldm"]), ("sample", []), ("evaluate", [])):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            main([cmd, *extra, "--help"])
        helps.setdefault(cmd, set()).update(re.findall(r"--[a-z][a-z0-9-]*", buf.getvalue()))
    checked = 0
    for kind, code in BLOCKS:
        for line in code.splitlines():
            m = re.match(r"\s*(?:torchrun .*?-m )?elbox (train|sample|evaluate)\b(.*)", line)
            if not m:
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2)):
                assert flag in helps[m.group(1)], f"README: `elbox {m.group(1)}` has no flag {flag}: {line.strip()}"
                checked += 1
    assert checked >= 15


def test_the_torchrun_example_parses():
    for kind, code in BLOCKS:
        for line in code.splitlines():
            if line.strip().startswith("torchrun"):
                words = shlex.split(line)
                cfg, out, resume = train_config_from_args(words[words.index("elbox") + 2:])
                assert cfg.model_config.net == "ddpm-cifar10" and not resume


def test_every_benchmark_script_named_exists_and_answers_help():
    scripts = set(re.findall(r"python (benchmarks/\w+\.py)", README))
    assert len(scripts) >= 3
    for script in scripts:
        done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (script, done.stderr)


def test_every_file_the_layout_names_exists():
    layout = next(code for kind, code in BLOCKS if kind == "" and code.startswith("src/elbox/"))
    names = set(re.findall(r"[\w]+\.py", layout))
    src = {p.name for p in (ROOT / "src" / "elbox").rglob("*.py")}
    bench = {p.name for p in (ROOT / "benchmarks").glob("*.py")}
    assert names and names <= src | bench, names - src - bench
    for folder in re.findall(r"^  (\w+)/", layout, re.M):
        assert (ROOT / "src" / "elbox" / folder).is_dir(), folder
