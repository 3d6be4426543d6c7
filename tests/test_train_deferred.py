"""The trainer's GPU way of checking a step, forced on the CPU (``loop.defer_checks``): a step is queued without
reading anything back (a read waits for the GPU), its NaN/Inf check is decided on the device (the fused AdamW's
``found_inf``, the EMA's zero weight) and read after the next step is queued. It must train the same model and say
the same things as the CPU's step-by-step check. Sampling and the bound, too, must not wait for the device at each
step. ``benchmarks/gpu_check.py`` checks the same on a GPU with CUDA's
own sync detector (``torch.cuda.set_sync_debug_mode``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_train import flaky_run, metrics, tensors
from torch.overrides import TorchFunctionMode

from elbox import checkpoint as ckpt
from elbox.config import DataConfig, RunConfig, TrainConfig
from elbox.errors import UserError
from elbox.objectives.ddpm import DDPM, DDPMConfig
from elbox.objectives.latent import LDMConfig
from elbox.objectives.vae import VAEConfig
from elbox.training import loop
from elbox.training.loop import train

# what makes the host wait for the device: a value of a tensor read into Python
READS = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy", "cpu"}


class ReadsBack(TorchFunctionMode):
    """Records each read of a tensor's value into Python, and each ``torch.tensor(..., device=...)`` (a copy from
    the host): on a GPU, each waits for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name == "tensor" and (kwargs or {}).get("device") is not None):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def deferred(monkeypatch):
    monkeypatch.setattr(loop, "defer_checks", lambda run: True)


def watch(monkeypatch) -> list[tuple]:
    """Each train_step's reads, and the order in which steps are queued and read back."""
    events: list[tuple] = []
    real_step, real_settle = loop.train_step, loop.StepOutcome.settle

    def train_step(step, *args, **kwargs):
        with ReadsBack() as mode:
            done = real_step(step, *args, **kwargs)
        events.append(("queued", step + 1, mode.reads))
        return done

    def settle(self):
        events.append(("read", self.step))
        return real_settle(self)

    monkeypatch.setattr(loop, "train_step", train_step)
    monkeypatch.setattr(loop.StepOutcome, "settle", settle)
    return events


def test_sampling_and_the_bound_read_nothing_back():
    """A 1000-step chain that waited for the GPU at each step would idle it between steps: no reads, no tensors
    made from host values on the device, in ancestral and DDIM sampling and in the bound's per-timestep loop
    (the bound reads three numbers once, whatever T: its check that x is on the 8-bit grid)."""
    torch.manual_seed(0)
    ddpm = DDPM(DDPMConfig(net="micro", timesteps=20, data_kind="8bit"), (1, 8, 8)).eval()
    x = torch.rand(4, 1, 8, 8).mul(255).round().div(127.5).sub(1)
    with torch.no_grad(), ReadsBack() as mode:
        ddpm.sample(4, generator=torch.Generator().manual_seed(0))
        ddpm.sample(4, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=5, eta=0.5)
    assert mode.reads == []
    with torch.no_grad(), ReadsBack() as mode:
        ddpm.bound(x, generator=torch.Generator().manual_seed(0))
    assert mode.reads == ["tolist"]


def tiny(model: str, model_config, **train) -> RunConfig:
    return RunConfig(model=model, model_config=model_config, data=DataConfig(),
                     train=TrainConfig(batch_size=16, num_samples=4, final_eval_examples=0, quiet=True,
                                       sample_every=0, **train))


def test_a_step_is_queued_without_a_read_and_read_back_after_the_next(monkeypatch, tmp_path, deferred):
    """DDPM, VAE and latent diffusion (the LSGM end-to-end one): no read inside a step; a step is read back only
    after the next one is queued, except where its results are needed (a metrics line, a checkpoint, the end)."""
    vae = tmp_path / "vae"
    every = {"steps": 12, "log_every": 5, "checkpoint_every": 8}
    runs = [(tiny("ddpm", DDPMConfig(net="micro", timesteps=20), **every), tmp_path / "ddpm"),
            (tiny("vae", VAEConfig(hidden=(16,), latent_dim=3), **every), vae),
            (tiny("ldm", LDMConfig(vae=str(vae), timesteps=10, end_to_end=True), **every), tmp_path / "ldm")]
    for cfg, out in runs:
        events = watch(monkeypatch)
        train(cfg, out)
        assert [e for e in events if e[0] == "queued" and e[2]] == [], cfg.model  # no read inside a step
        order = [e[:2] for e in events]
        due = {5, 8, 10, 12}  # metrics lines, the checkpoint, the last step
        expected = []
        for s in range(1, 13):
            expected.append(("queued", s))
            if s - 1 >= 1 and s - 1 not in due:
                expected.append(("read", s - 1))  # read while step s runs
            if s in due:
                expected.append(("read", s))
        assert order == expected, cfg.model
        monkeypatch.undo()
        monkeypatch.setattr(loop, "defer_checks", lambda run: True)


@pytest.mark.parametrize("bad,skip", [({2: "term", 4: "grad"}, {}),
                                      ({3: "loss", 4: "term", 5: "grad"}, {"max_skips": 3})])
def test_deferred_checks_train_the_same_model_and_say_the_same(monkeypatch, tmp_path, bad, skip):
    """Skipped steps (the deferred check decided on the device) give the CPU check's weights bit for bit, its EMA
    to float rounding (a multiply and an add instead of one fused lerp), and the same metrics lines; three bad steps
    in a row with max_skips=3 stop both at the same step with the same words."""
    outcomes = {}
    for mode in ("cpu", "deferred"):
        if mode == "deferred":
            monkeypatch.setattr(loop, "defer_checks", lambda run: True)
        cfg, run = flaky_run(monkeypatch, tmp_path / mode, bad, steps=9, on_nonfinite="skip", **skip)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=4, checkpoint_every=3))
        try:
            outcomes[mode] = ("done", train(cfg, run).skipped)
        except UserError as e:
            outcomes[mode] = ("stopped", str(e).replace(str(tmp_path / mode), "RUN"))
        rows = [{k: v for k, v in r.items() if k != "images_per_s"} for r in metrics(run)]
        outcomes[mode] += (rows, [p.name for p in ckpt.list_checkpoints(run)])
    assert outcomes["cpu"] == outcomes["deferred"]
    assert any("nonfinite" in r for r in outcomes["cpu"][2])
    assert (outcomes["cpu"][0] == "stopped") == bool(skip)
    cpu, deferred = tmp_path / "cpu" / "run", tmp_path / "deferred" / "run"
    for step in (int(name.split("-")[1]) for name in outcomes["cpu"][3]):
        a, b = tensors(cpu, step, "model"), tensors(deferred, step, "model")
        assert all(torch.equal(a[k], b[k]) for k in a), step
        a, b = tensors(cpu, step, "ema"), tensors(deferred, step, "ema")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, step
        # the EMA counts the updates made, not the steps
        assert (ckpt.load_checkpoint(deferred / "checkpoints" / f"step-{step:07d}").manifest["ema_updates"]
                == ckpt.load_checkpoint(cpu / "checkpoints" / f"step-{step:07d}").manifest["ema_updates"])


@pytest.mark.parametrize("bad_step", [5, 6])
def test_a_nan_read_late_still_stops_at_its_step_and_saves_nothing_after_it(monkeypatch, tmp_path, deferred,
                                                                           bad_step):
    """Step 5's NaN is read while step 6 runs; step 6 is a checkpoint step, but the run stops first, naming step 5,
    its last checkpoint the one before the NaN. Step 6's own NaN is read before its checkpoint would be written."""
    cfg, run = flaky_run(monkeypatch, tmp_path, {bad_step - 1: "term"}, steps=9)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=10, checkpoint_every=3))
    events = watch(monkeypatch)
    with pytest.raises(UserError) as e:
        train(cfg, run)
    assert f"in the prior term L_T at step {bad_step}" in str(e.value) and "step-0000003" in str(e.value)
    order = [e[:2] for e in events]
    assert order[-1] == ("read", bad_step) and order.index(("queued", 6)) < order.index(("read", 5))  # 5 read late
    assert ("queued", 7) not in order
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-0000003"]
    assert metrics(run)[-1] == {"step": bad_step, "nonfinite": "the prior term L_T", "stopped": True}


def test_only_batches_the_trainer_made_from_images_skip_the_range_check(tmp_path):
    """The trainer maps 8-bit images into the model's range itself, so the VAE's min/max check (a read) is left out
    for them; vector data passes as it is, and a Bernoulli VAE on the moons is refused before it trains."""
    cfg = dataclasses.replace(tiny("vae", VAEConfig(hidden=(16,), latent_dim=2), steps=3),
                              data=DataConfig(data="toy2d:moons"))
    with pytest.raises(UserError, match=r"bernoulli decoder models data in \[0, 1\]"):
        train(cfg, tmp_path / "moons")
    assert not list((tmp_path / "moons").glob("checkpoints/*"))


def test_a_sigint_stops_after_its_step_when_checks_are_deferred(monkeypatch, tmp_path, deferred):
    cfg, run = flaky_run(monkeypatch, tmp_path, {2: "sigint"}, steps=6)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=10, checkpoint_every=10))
    result = train(cfg, run)
    assert result.stopped_by == "SIGINT" and result.step == 3
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-0000003"]


def test_importance_sampling_of_t_reads_back_only_until_every_step_has_its_ten_values(monkeypatch, tmp_path,
                                                                                     deferred):
    """N&D's importance sampling of t keeps the last ten L_t of each t: the history is updated on the device, and
    whether it is full (when sampling by it starts) is read back only until it is."""
    cfg = tiny("ddpm", DDPMConfig(net="micro", timesteps=4, loss="vlb", timestep_sampler="importance"), steps=10,
               log_every=100, checkpoint_every=100)
    events = watch(monkeypatch)
    train(cfg, tmp_path / "run")
    reads = [e[2] for e in events if e[0] == "queued"]
    full = reads.index([])  # T = 4, 16 values a step: full within a few steps
    assert 2 <= full <= 5 and reads[:full] == [["__bool__"]] * full and reads[full:] == [[]] * (10 - full), reads
