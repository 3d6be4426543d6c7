"""Checkpoints on their own, without a training run: what a save writes, what a load gives back, what is pruned,
and every way a folder can be refused, each with its one-line message. Tiny tensors: milliseconds per test."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from elbox import checkpoint as ckpt
from elbox.errors import UserError
from elbox.training.ema import EMA

DESCRIPTION = {"kind": "ddpm", "config": {"timesteps": 10}, "data_shape": [1, 8, 8]}


def save(run: Path, step: int, keep: int = 3, **over) -> Path:
    model = {"w": torch.full((2, 3), float(step)), "b": torch.arange(3.0)}
    args = dict(description=DESCRIPTION, model_state=model, ema_state={k: v + 0.5 for k, v in model.items()},
                optimizer_state={"state": {0: {"exp_avg": torch.ones(2), "step": torch.tensor(float(step))}},
                                 "param_groups": [{"lr": 0.1, "params": [0]}]},
                rng={"0": {"torch": torch.get_rng_state()}}, extra={"loader": {"0": {"epoch": 1}}, "ema_updates": step},
                keep=keep)
    args.update(over)
    return ckpt.save_checkpoint(run, step, **args)


def test_a_saved_checkpoint_loads_back_exactly(tmp_path):
    run = tmp_path / "run"
    path = save(run, 7)
    assert path == run / "checkpoints" / "step-0000007" and sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "manifest.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors"]
    state = ckpt.load_checkpoint(run)
    assert state.path == path and state.step == 7 and state.description == DESCRIPTION
    assert torch.equal(state.model["w"], torch.full((2, 3), 7.0)) and torch.equal(state.ema["b"], torch.arange(3.0) + 0.5)
    assert torch.equal(state.optimizer["state"][0]["exp_avg"], torch.ones(2))
    assert state.optimizer["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert torch.equal(state.rng["0"]["torch"], torch.get_rng_state())
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["step"] == 7 and manifest["ema_updates"] == 7
    assert manifest["loader"] == {"0": {"epoch": 1}}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest == ckpt.sha256(path / name)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left
    light = ckpt.load_checkpoint(path, with_training_state=False)
    assert light.optimizer is None and light.rng is None and torch.equal(light.model["w"], state.model["w"])
    without_ema = ckpt.load_checkpoint(save(tmp_path / "r2", 1, ema_state=None, optimizer_state=None))
    assert without_ema.ema is None and without_ema.optimizer is None


def test_only_the_newest_are_kept_in_numeric_order_and_a_saved_step_is_not_rewritten(tmp_path):
    run = tmp_path / "run"
    for step in (8, 9, 10, 100, 12_345_678):
        save(run, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-0000100", "step-12345678"]
    assert ckpt.latest_checkpoint(run).name == "step-12345678"
    before = (run / "checkpoints" / "step-0000100" / "manifest.json").read_bytes()
    assert save(run, 100, keep=2, model_state={"w": torch.zeros(1)}) == run / "checkpoints" / "step-0000100"
    assert (run / "checkpoints" / "step-0000100" / "manifest.json").read_bytes() == before
    # leftovers of an interrupted save or prune are neither checkpoints nor kept
    (run / "checkpoints" / ".step-0000200.tmp99").mkdir()
    (run / "checkpoints" / "step-0000300").mkdir()  # no manifest: not a checkpoint
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-0000100", "step-12345678"]
    save(run, 12_345_679, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-12345679"]
    assert not (run / "checkpoints" / ".step-0000200.tmp99").exists()
    # this process's own leftover of the same step (a save that failed and could not clean up) is cleared first
    mine = run / "checkpoints" / f".step-20000000.tmp{os.getpid()}"
    mine.mkdir()
    (mine / "stale.bin").write_bytes(b"x")
    assert sorted(p.name for p in save(run, 20_000_000, keep=1).iterdir()) == [
        "ema.safetensors", "manifest.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors"]
    assert ckpt.list_checkpoints(tmp_path / "nothing") == [] and ckpt.latest_checkpoint(tmp_path / "nothing") is None


def _save_with_files_of_at_most(limit: int, run: Path, step: int, **over) -> UserError:
    """Save while the kernel refuses to grow any file past ``limit`` bytes (RLIMIT_FSIZE, this process only, put
    back afterwards; EFBIG, as a full disk gives ENOSPC): the real failed write, in-process. Returns the error."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not the signal that kills
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(UserError) as info:
            save(run, step, **over)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    return info.value


def test_a_failed_save_leaves_no_half_written_folder_and_says_the_previous_one_is_untouched(tmp_path):
    run = tmp_path / "run"
    save(run, 2)
    big = {"w": torch.zeros(1 << 20)}  # 4 MiB, past the 1 MiB limit
    error = _save_with_files_of_at_most(1 << 20, run, 4, model_state=big, ema_state=big)
    root = run / "checkpoints"
    assert str(error) == (f"could not save checkpoint {root / 'step-0000004'}: the disk is full (File too large); "
                          f"the previous checkpoint {root / 'step-0000002'} is intact")
    assert [p.name for p in root.iterdir()] == ["step-0000002"]  # the temporary folder is gone
    assert ckpt.load_checkpoint(run).step == 2
    # the error is about the save, whatever state the previous checkpoint is in: it is not read (on a failure path,
    # and for a large model, re-hashing gigabytes), so its own damage does not take the message's place
    (root / "step-0000002" / "model.safetensors").write_bytes(b"damaged")
    error = _save_with_files_of_at_most(1 << 20, run, 4, model_state=big, ema_state=big)
    assert str(error).startswith(f"could not save checkpoint {root / 'step-0000004'}: the disk is full")


def test_a_save_that_cannot_make_its_folder_is_one_line_and_leaves_what_is_there(tmp_path):
    """``checkpoints`` is a file of the user's: the folder cannot be made; the error says so, nothing is removed
    (the clean-up of a temporary folder that was never made must not raise either)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("mine")
    with pytest.raises(UserError, match=r"could not save checkpoint .*step-0000003: .*; no earlier checkpoint exists"):
        save(run, 3)
    assert (run / "checkpoints").read_text() == "mine"


def test_a_save_that_fails_for_another_reason_than_a_full_disk_gives_the_systems_reason(tmp_path):
    """Only ENOSPC/EDQUOT/EFBIG are called a full disk; any other failure (here ``checkpoints`` is a user's file)
    is named as the system names it, so a user is not sent to free disk space that is not the problem."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("mine")
    with pytest.raises(UserError) as e:
        save(run, 3)
    assert str(e.value) == (f"could not save checkpoint {run / 'checkpoints' / 'step-0000003'}: File exists; "
                            "no earlier checkpoint exists")


def test_clearing_leftovers_is_best_effort_and_never_fails_a_save(tmp_path):
    """A dot-leftover the clean-up cannot remove (here a file, where it expects an interrupted save's folder) is left
    alone: the save it follows has succeeded and says so."""
    run = tmp_path / "run"
    save(run, 1)
    stray = run / "checkpoints" / ".step-0000001.tmp5"
    stray.write_text("not a folder")
    assert save(run, 2, keep=1) == run / "checkpoints" / "step-0000002"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-0000002"] and stray.read_text() == "not a folder"


def test_resolve_a_run_or_a_checkpoint_folder(tmp_path):
    run = tmp_path / "run"
    path = save(run, 3)
    assert ckpt.resolve_checkpoint(run) == path == ckpt.resolve_checkpoint(path)
    with pytest.raises(UserError, match=f"{tmp_path / 'missing'} does not exist; give a run folder"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint \\(expected .*step-NNNNNNN/manifest.json\\)"):
        ckpt.resolve_checkpoint(tmp_path / "empty")
    # resolving only finds the folder (no file is hashed: the load that follows verifies, once)
    _damage(path, "file-changed")
    assert ckpt.resolve_checkpoint(run) == path
    with pytest.raises(UserError, match="model.safetensors does not match its checksum"):
        ckpt.load_checkpoint(run)


def _damage(path: Path, how: str) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    if how == "no-manifest":
        (path / "manifest.json").unlink()
    elif how == "not-json":
        (path / "manifest.json").write_text("{not json")
    elif how == "no-files-key":
        del manifest["files"]
        (path / "manifest.json").write_text(json.dumps(manifest))
    elif how == "format":
        manifest["format"] = 2
        (path / "manifest.json").write_text(json.dumps(manifest))
    elif how == "edited":
        manifest["step"] = 8
        (path / "manifest.json").write_text(json.dumps(manifest))
    elif how == "file-missing":
        (path / "ema.safetensors").unlink()
    elif how == "file-changed":
        data = bytearray((path / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (path / "model.safetensors").write_bytes(bytes(data))
    elif how == "not-safetensors":
        (path / "model.safetensors").write_bytes(b"garbage")
        manifest["files"]["model.safetensors"] = ckpt.sha256(path / "model.safetensors")
        manifest["checksum"] = ckpt._manifest_checksum(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("how,message", [
    ("no-manifest", "is not an elbox checkpoint: manifest.json is missing"),
    ("not-json", "is damaged (not the JSON elbox writes); refusing to load it"),
    ("no-files-key", "is damaged (not the JSON elbox writes)"),
    ("format", "checkpoint format 2 is not 1, the one this elbox reads"),
    ("edited", "does not match its checksum (modified); refusing to load it"),
    ("file-missing", "ema.safetensors is missing; the checkpoint is incomplete"),
    ("file-changed", "model.safetensors does not match its checksum (truncated or modified); refusing to load it"),
    ("not-safetensors", "model.safetensors cannot be read as safetensors"),
])
def test_every_damage_is_refused_in_one_line(tmp_path, how, message):
    path = save(tmp_path / "run", 5)
    _damage(path, how)
    with pytest.raises(UserError) as e:
        # a folder without its manifest is not taken for a checkpoint at all; its reader says why
        ckpt.read_manifest(path) if how == "no-manifest" else ckpt.load_checkpoint(path)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("keys,value,message", [
    (("step",), -1, "step must be an integer >= 0"),
    (("step",), True, "step must be an integer >= 0"),
    (("checksum",), 5, "checksum must be a string"),
    (("files",), {"model.safetensors": "0" * 64},
     "files must map model.safetensors, rng.safetensors (and optionally ema/optimizer) to checksums"),
    (("files", "extra.bin"), "0" * 64, "unknown file 'extra.bin' (allowed: model.safetensors, rng.safetensors, "
                                          "ema.safetensors, optimizer.safetensors)"),
    (("files", "model.safetensors"), "0" * 63, "the checksum of model.safetensors is not a sha256 hex digest"),
    (("files", "model.safetensors"), "A" * 64, "the checksum of model.safetensors is not a sha256 hex digest"),
    (("model", "kind"), 1, "model must hold a kind (string) and a config (object)"),
    (("model", "config"), [], "model must hold a kind (string) and a config (object)"),
    (("model", "data"), [], "model.data must be an object"),
    (("optimizer",), [], "optimizer must be an object or null"),
    (("loader",), {"0": 1}, "loader must map ranks to objects"),
    (("ema_updates",), -1, "ema_updates must be an integer >= 0"),
    (("scaler",), 1, "scaler must be an object or null"),
])
def test_each_part_of_the_manifest_schema_has_its_own_message(tmp_path, keys, value, message):
    manifest = json.loads((save(tmp_path / "run", 5) / "manifest.json").read_text())
    *parents, last = keys
    part = manifest
    for key in parents:
        part = part[key]
    part[last] = value
    assert ckpt.manifest_problem(manifest) == message


def test_the_manifest_schema_names_what_is_wrong_at_its_limits(tmp_path):
    """manifest_problem, the schema check a recomputed checksum cannot get past: None for what save writes; a size
    of 65536 is allowed and 65537 is not, and so are 2**26 numbers in all and not one more (both ends of each
    range); loader, ema_updates, optimizer, scaler and model.data may be left out; anything but an object says so."""
    manifest = json.loads((save(tmp_path / "run", 5) / "manifest.json").read_text())
    assert ckpt.manifest_problem(manifest) is None
    assert ckpt.manifest_problem([manifest]) == "not a JSON object"
    for optional in ("loader", "ema_updates", "optimizer", "scaler"):  # each may be left out
        assert ckpt.manifest_problem({k: v for k, v in manifest.items() if k != optional}) is None, optional
    model = {k: v for k, v in manifest["model"].items() if k != "data"}
    assert ckpt.manifest_problem({**manifest, "model": model}) is None
    for shape, allowed in (([65536], True), ([65537], False), ([1, 1, 1], True), ([0], False), ([4, 4, 4, 4], False),
                           ([65536, 1024], True), ([65536, 1025], False)):  # 2**26 numbers at most
        manifest["model"]["data_shape"] = shape
        problem = ckpt.manifest_problem(manifest)
        assert (problem is None) == allowed and (allowed or problem.startswith("data_shape must be 1 to 3 sizes")), \
            (shape, problem)


def test_a_damaged_latest_checkpoint_names_the_one_before_it(tmp_path):
    run = tmp_path / "run"
    save(run, 1)
    _damage(save(run, 2), "file-changed")
    with pytest.raises(UserError, match=f"; delete it to go back to {run / 'checkpoints' / 'step-0000001'}$"):
        ckpt.latest_checkpoint(run)
    assert ckpt.latest_checkpoint(run, verify=False).name == "step-0000002"
    ckpt.read_manifest(run / "checkpoints" / "step-0000002", verify=False)  # reading without checks still works
    with pytest.raises(UserError, match="model.safetensors does not match its checksum"):
        ckpt.read_manifest(run / "checkpoints" / "step-0000002")  # by default, the files are checked


def test_weights_of_another_model_are_refused_naming_the_first_difference():
    module = torch.nn.Linear(3, 2)
    good = {k: v.clone() for k, v in module.state_dict().items()}
    ckpt.load_weights(module, good, Path("m.safetensors"))
    for state, detail in [
        ({"weight": good["weight"]}, "missing ['bias']"),
        ({**good, "extra": torch.zeros(1)}, "unexpected ['extra']"),
        ({**good, "weight": torch.zeros(3, 2)}, "weight is torch.float32 (3, 2), expected torch.float32 (2, 3)"),
        ({**good, "bias": good["bias"].double()}, "bias is torch.float64 (2,), expected torch.float32 (2,)"),
    ]:
        with pytest.raises(UserError) as e:
            ckpt.load_weights(module, state, Path("m.safetensors"))
        assert str(e.value) == f"m.safetensors holds weights of a different model ({detail}); refusing to load it"
    bigger = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))  # four tensors: three are named
    for state, detail in [({}, "missing ['0.weight', '0.bias', '1.weight']"),
                          ({**bigger.state_dict(), **{f"x{i}": torch.zeros(1) for i in range(4)}},
                           "unexpected ['x0', 'x1', 'x2']"),
                          ({k: v.double() for k, v in bigger.state_dict().items()},
                           "0.weight is torch.float64 (2, 2), expected torch.float32 (2, 2)")]:
        with pytest.raises(UserError, match=f"holds weights of a different model \\({re.escape(detail)}\\)"):
            ckpt.load_weights(bigger, state, Path("m.safetensors"))


def test_atomic_text_and_rng_states_round_trip(tmp_path):
    target = tmp_path / "config.toml"
    ckpt.write_text_atomic(target, "a = 1\n")
    ckpt.write_text_atomic(target, "a = 2\n")
    assert target.read_text() == "a = 2\n" and os.listdir(tmp_path) == ["config.toml"]
    torch.manual_seed(3)
    states = ckpt.rng_states(torch.device("cpu"))
    assert set(states) == {"torch"}
    expected = torch.rand(4)
    torch.manual_seed(4)
    ckpt.restore_rng_states(states, torch.device("cpu"))
    assert torch.equal(torch.rand(4), expected)
    # a checkpoint written on a GPU also holds the CUDA generator's state; resumed on a CPU, it is left alone
    torch.manual_seed(4)
    ckpt.restore_rng_states({**states, "cuda": torch.zeros(16, dtype=torch.uint8)}, torch.device("cpu"))
    assert torch.equal(torch.rand(4), expected)


def test_the_ema_follows_its_formula_with_warm_up_and_copies_buffers():
    """shadow <- d shadow + (1 - d) param with d = min(decay, (1 + n)/(10 + n)) at the n-th update."""
    model = torch.nn.BatchNorm1d(2)  # a parameter and buffers
    ema = EMA(model, 0.5)
    assert ema.num_updates == 0 and not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    shadow = model.weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
            model.running_mean.add_(2.0)
        ema.update(model)
        d = min(0.5, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * model.weight.detach()
        assert ema.num_updates == n
        torch.testing.assert_close(ema.model.weight, shadow, rtol=1e-6, atol=1e-6)
        assert torch.equal(ema.model.running_mean, model.running_mean)
    assert not torch.equal(ema.model.weight, model.weight)


def test_a_lone_damaged_checkpoint_is_refused_without_naming_one_before_it(tmp_path):
    run = tmp_path / "run"
    path = save(run, 1)
    _damage(path, "file-changed")
    with pytest.raises(UserError) as direct:
        ckpt.read_manifest(path)
    with pytest.raises(UserError) as latest:
        ckpt.latest_checkpoint(run)
    assert str(latest.value) == str(direct.value)  # nothing to go back to: the damage, and no hint


def test_a_manifest_verifies_whatever_the_order_of_its_keys(tmp_path):
    # the checksum is of the manifest's content, not of its layout: a manifest rewritten with its keys in another
    # order (by a JSON tool, or a writer that orders them otherwise) is the same manifest
    path = save(tmp_path / "run", 3)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())

    def reorder(value):
        return {k: reorder(value[k]) for k in reversed(list(value))} if isinstance(value, dict) else value

    (path / ckpt.MANIFEST).write_text(json.dumps(reorder(manifest), indent=2))
    assert list(json.loads((path / ckpt.MANIFEST).read_text())) == list(reversed(list(manifest)))
    assert ckpt.read_manifest(path) == manifest
    assert ckpt.latest_checkpoint(tmp_path / "run") == path


def test_checkpoints_are_listed_by_step_where_their_names_sort_otherwise(tmp_path):
    """step-10000000 comes after step-9999999, though its name sorts first: the list, the latest checkpoint and
    what pruning keeps follow the step."""
    run = tmp_path / "run"
    for step in (9_999_999, 10_000_000):
        save(run, step)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-9999999", "step-10000000"]
    assert ckpt.latest_checkpoint(run).name == "step-10000000"
    save(run, 10_000_001, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-10000000", "step-10000001"]
