"""Property-based fuzzing (hypothesis) of what users and files hand to elbox: random mutations of a real checkpoint
manifest (checksum recomputed, as anyone can), of a real config.toml, and random command lines. Every one ends in
success or one line with exit status 2: no traceback, no memory blow-up, nothing written outside the run folder.

Fast enough for CI with a fixed seed (``derandomize``); ``ELBOX_FUZZ_EXAMPLES=5000`` runs more."""

import copy
import json
import os
import shutil
import tomllib
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elbox import checkpoint as ckpt
from elbox.cli import main, train_config_from_args
from elbox.errors import UserError

EXAMPLES = int(os.environ.get("ELBOX_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY = ["--net", "micro", "--timesteps", "4", "--steps", "1", "--batch-size", "8", "--num-samples", "4",
        "--final-eval-examples", "0", "--quiet"]

scalars = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True)
           | st.text(max_size=12) | st.sampled_from(["../../x", "/etc/passwd", "model.safetensors", "a" * 300, "1e309",
                                                     "none", "", "ddpm", "vae", "ldm"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=8)


def key_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from key_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from key_paths(v, (*prefix, i))


@st.composite
def mutated(draw, original):
    """``original`` with 1-3 random edits: a value replaced, a key deleted, or a key added (path tricks included)."""
    doc = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from([p for p in key_paths(doc) if p]))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(values)
        elif op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8) | st.sampled_from(["../../x", "optimizer.safetensors", "step"]))] = draw(values)
    return doc


@pytest.fixture(scope="session")
def real_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fuzz") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return run


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_fuzzed_manifests_end_in_one_line(real_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    path = ckpt.latest_checkpoint(run)
    original = json.loads((path / ckpt.MANIFEST).read_text())
    before = files_under(tmp_path)
    out = tmp_path / "out.png"

    @FUZZ
    @given(manifest=mutated(original))
    def check(manifest):
        if isinstance(manifest, dict):
            manifest["checksum"] = ckpt._manifest_checksum(manifest)
        (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
        code = main(["sample", str(path), "--num", "1", "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 0 or (code == 2 and len(err) == 1 and err[0].startswith("elbox: error: ")), err
        out.unlink(missing_ok=True)
        assert files_under(tmp_path) <= before  # nothing written anywhere else (the PNG was ours, and is gone)

    check()


def test_fuzzed_configs_end_in_one_line(real_run, tmp_path):
    original = tomllib.loads((real_run / "config.toml").read_text())
    config = tmp_path / "config.toml"

    @FUZZ
    @given(doc=mutated(original))
    def check(doc):
        try:
            config.write_text(tomli_w.dumps(doc))
        except (TypeError, ValueError):  # not representable in TOML (None, NaN keys...): nothing a file could say
            return
        try:
            train_config_from_args(["--config", str(config), "--out", str(tmp_path / "never")])
        except UserError as e:
            assert "\n" not in str(e)
        assert not (tmp_path / "never").exists()

    check()


FLAGS = ["--out", "--resume", "--config", "--timesteps", "--net", "--steps", "--batch-size", "--lr", "--data",
         "--image-size", "--channels", "--latent-dim", "--hidden", "--vae", "--precision", "--device", "--ema-decay",
         "--grad-accum", "--sampler", "--eta", "--k", "--metric", "--num", "--schedule", "--hflip", "--no-hflip",
         "--learning-rate", "--latent-channels", "--data-kind", "--max-skips", "--on-nonfinite"]
TOKENS = st.sampled_from(FLAGS) | st.sampled_from(["0", "-1", "3", "1e309", "nan", "inf", "none", "x", "", "--",
                                                   "vae", "ddpm", "ldm", "mnist", "toy2d:moons", "folder:/nonexistent",
                                                   "cuda", "bf16", "1,2", "=", "-h"]) | st.text(max_size=6)


@FUZZ
@given(argv=st.lists(TOKENS, max_size=8), model=st.sampled_from([[], ["vae"], ["ldm"], ["ddpm"]]))
def test_fuzzed_command_lines_end_in_one_line(argv, model):
    try:
        train_config_from_args([*model, *argv])
    except UserError as e:
        assert "\n" not in str(e)
    except SystemExit as e:  # --help / -h
        assert e.code == 0
