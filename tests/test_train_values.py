"""The training engine's numbers, checked against formulas computed here, not just "training still works".

Each test guards one mechanism of ``elbox.training.loop.train_step`` / ``train`` that a silent bug could break while
the loss still goes down:

- the EMA follows shadow <- d shadow + (1 - d) param, d = min(decay, (1 + n) / (10 + n)), step by step;
- ``elbox.load`` returns the EMA weights by default and the raw ones with ``ema=False``;
- bf16 autocast really runs the network's layers in bfloat16 (and fp32 in float32);
- ``compile=True`` really hands the networks to torch.compile (dynamo captures graphs);
- gradient clipping: with plain SGD the update is -lr g min(1, clip / ||g||), and g unclipped with clip 0;
- gradient accumulation: K micro-batches give the same update as one full batch, -lr times its mean gradient
  (the loss is divided by K), for a DDPM and a VAE;
- the learning-rate warm-up: step s uses lr min(1, (s + 1) / W), and the update scales with it (and uses that
  step's gradient alone: the previous step's is cleared).

The reference gradient is computed here on the same batch with the same draws (``draws.global_batch`` seeded as
the trainer seeds it). Tiny models on the embedded 8x8 digits, on the CPU.
"""

import copy
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import elbox
from elbox import checkpoint as ckpt
from elbox import draws
from elbox.config import DataConfig, RunConfig, TrainConfig
from elbox.data import load_dataset, to_model
from elbox.data.dataset import derive_seed
from elbox.objectives.ddpm import DDPMConfig
from elbox.objectives.vae import VAEConfig
from elbox.training.distributed import DistInfo
from elbox.training.loop import train, train_step
from elbox.training.session import LossModule, build_model, micro_rows, resolve

ONE_CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
BATCH = 16
MODELS = {
    "ddpm": lambda: DDPMConfig(net="micro", timesteps=10),
    "vae": lambda: VAEConfig(hidden=(32,), latent_dim=4),
    "vae-iwae": lambda: VAEConfig(hidden=(32,), latent_dim=4, iwae_k=4),  # k draws per row, kept as rows are
}


def tiny(kind: str = "ddpm", **train_kw) -> RunConfig:
    t = dict(steps=5, batch_size=BATCH, device="cpu", quiet=True, final_eval_examples=0, num_samples=4, lr=1.0,
             grad_clip=0.0, ema_decay=0.0, log_every=1)
    return RunConfig(model=kind.split("-")[0], model_config=MODELS[kind](), data=DataConfig("digits"),
                     train=TrainConfig(**{**t, **train_kw}))


def digits_batch() -> torch.Tensor:
    return load_dataset("digits", "train").data[:BATCH]


def initial_model(cfg: RunConfig):
    """The model as ``train`` builds it before its first step."""
    torch.manual_seed(cfg.train.seed)
    return build_model(resolve(cfg, "8bit"), (1, 8, 8))


def fresh_model(cfg: RunConfig):
    """The initial model, with small random weights where it has zeros (the U-Net's output convolution), so that
    every layer gets a gradient, not only the last one."""
    model = initial_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


def sgd_step(cfg: RunConfig, model, batch: torch.Tensor, step: int = 0):
    """One ``train_step`` with plain SGD (no momentum, lr = cfg.train.lr before the warm-up): returns the update of
    every parameter, flattened into one vector, and the step's outcome."""
    t = cfg.train
    before = flat(model.parameters()).clone()
    outcome = train_step(step, batch, t=t, model=model, loss_module=LossModule(model),
                         optimizer=torch.optim.SGD(model.parameters(), lr=t.lr),
                         scaler=torch.amp.GradScaler("cpu", enabled=False), ema=None, info=ONE_CPU,
                         micro_rows=micro_rows(t, ONE_CPU), stop_requested=lambda: False)
    return flat(model.parameters()) - before, outcome


def reference_grad(cfg: RunConfig, model, batch: torch.Tensor, step: int = 0) -> torch.Tensor:
    """The gradient of the mean loss over the whole batch, with the draws the trainer makes at ``step``."""
    model = copy.deepcopy(model).train()
    model.zero_grad(set_to_none=True)
    with draws.global_batch(derive_seed("draws", cfg.train.seed, step), torch.arange(BATCH), BATCH):
        if model.data_range == "binary":  # dynamic binarization: one uniform draw per pixel
            p = to_model(batch, "unit")
            x = (draws.rand_like(p) < p).float()
        else:
            x = to_model(batch, model.data_range)
        model.losses(x, step=step).loss.mean().backward()
    return flat(param.grad for param in model.parameters())


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def assert_same_update(actual: torch.Tensor, expected: torch.Tensor, model) -> None:
    """Equal up to float32 rounding: of the gradient (relative 1e-5 of the update) and of the weights the update
    was added to (an update is read back as new weights - old weights)."""
    err = (actual.double() - expected.double()).norm().item()
    allowed = 1e-5 * expected.double().norm().item() + 1e-6 * flat(model.parameters()).double().norm().item()
    assert err < allowed, f"error {err:.3g} > {allowed:.3g}; update norm {actual.norm():.4g} vs {expected.norm():.4g}"


# ------------------------------------------------------------------------------------------------------ EMA
EMA_DECAY = 0.3  # reached at the 3rd update: (1 + 3) / (10 + 3) > 0.3, so both the warm-up and the cap count


@pytest.fixture(scope="session")
def ema_run(tmp_path_factory):
    """5 AdamW steps with a large lr (the weights move a lot), a checkpoint after every one."""
    cfg = tiny(steps=5, lr=1e-2, grad_clip=1.0, ema_decay=EMA_DECAY, checkpoint_every=1, keep_checkpoints=10)
    run = tmp_path_factory.mktemp("ema") / "run"
    train(cfg, run)
    return cfg, run


def weights(run, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors")


def test_the_ema_follows_its_recursion_step_by_step(ema_run):
    cfg, run = ema_run
    model = initial_model(cfg)
    params = {k for k, _ in model.named_parameters()}
    shadow = {k: v.detach().double() for k, v in model.named_parameters()}
    for n in range(1, 6):
        raw, ema = weights(run, n, "model"), weights(run, n, "ema")
        d = min(EMA_DECAY, (1 + n) / (10 + n))
        for k in params:
            shadow[k] = d * shadow[k] + (1 - d) * raw[k].double()
            torch.testing.assert_close(ema[k].double(), shadow[k], rtol=1e-5, atol=1e-6, msg=f"update {n}, {k}")
        for k in raw.keys() - params:  # buffers are copied, not averaged
            assert torch.equal(ema[k], raw[k]), k


def test_load_returns_the_ema_weights_and_ema_false_the_raw_ones(ema_run):
    _, run = ema_run
    last = ckpt.latest_checkpoint(run)
    ema, raw = load_file(last / "ema.safetensors"), load_file(last / "model.safetensors")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    for loaded, expected in ((elbox.load(run), ema), (elbox.load(run, ema=False), raw)):
        state = loaded.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------------- precision, compile
@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_autocast_runs_the_network_layers_in_the_chosen_precision(precision, dtype):
    cfg = tiny(precision=precision, lr=1e-3)
    model = fresh_model(cfg)
    seen = []
    layers = [m for m in model.net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype)) for m in layers]
    try:
        sgd_step(cfg, model, digits_batch())
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) >= len(layers) and set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_hands_the_network_a_channels_last_batch(channels_last):
    """3-channel images (with one channel, the two layouts are the same memory): the network gets the batch
    channels-last exactly when asked to."""
    cfg = tiny(channels_last=channels_last, lr=1e-3)
    torch.manual_seed(0)
    model = build_model(resolve(cfg, "8bit"), (3, 8, 8))
    seen = []
    hook = model.net.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                      and not args[0].is_contiguous()))
    try:
        sgd_step(cfg, model, digits_batch().expand(-1, 3, -1, -1).contiguous())
    finally:
        hook.remove()
    assert seen and set(seen) == {channels_last}


def test_compile_hands_the_networks_to_dynamo(tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        train(tiny(steps=1, lr=1e-3, ema_decay=0.9, compile=True, compile_backend="aot_eager"), tmp_path / "c")
        assert counters["frames"]["ok"] > 0 and counters["stats"]["unique_graphs"] > 0, dict(counters)
    finally:
        torch._dynamo.reset()
        counters.clear()


# ------------------------------------------------------------------------------- clipping, accumulation, lr
def test_grad_clip_scales_the_sgd_update_to_the_clip_norm():
    batch, clip = digits_batch(), 1e-3
    g = reference_grad(tiny(), fresh_model(tiny()), batch)
    assert g.norm() > 10 * clip  # the clip is active

    lr = 1.0 / clip  # an update of norm 1
    model = fresh_model(tiny())
    update, outcome = sgd_step(tiny(lr=lr, grad_clip=clip), model, batch)
    assert_same_update(update, -lr * g * (clip / g.norm()), model)
    assert outcome.grad_norm.item() == pytest.approx(g.norm().item(), rel=1e-5)  # the norm before clipping

    model = fresh_model(tiny())
    update, _ = sgd_step(tiny(lr=1.0, grad_clip=0.0), model, batch)  # 0: clipping off
    assert_same_update(update, -g, model)


def test_a_step_frees_its_gradients_instead_of_keeping_zeros():
    """After the update the gradients are set to None, not zero-filled: between steps (sampling, the held-out
    bound, a checkpoint) their memory, one copy of the weights, is given back; the next backward makes them anew."""
    model = fresh_model(tiny())
    sgd_step(tiny(), model, digits_batch())
    assert [name for name, p in model.named_parameters() if p.grad is not None] == []


@pytest.mark.parametrize("kind", ["ddpm", "vae", "vae-iwae"])
def test_grad_accumulation_gives_the_full_batch_mean_gradient(kind):
    batch = digits_batch()
    g = reference_grad(tiny(kind), fresh_model(tiny(kind)), batch)
    lr = 1.0 / g.norm().item()  # an update of norm 1
    for k in (1, 4):
        cfg = tiny(kind, lr=lr, grad_accum=k)
        model = fresh_model(cfg)
        update, outcome = sgd_step(cfg, model, batch)
        assert len(outcome.terms) == k
        assert_same_update(update, -lr * g, model)


def test_lr_warmup_is_linear_and_scales_the_update():
    # consecutive steps of one model: each update must use that step's lr and gradient alone (none left over)
    batch, base_lr, warmup = digits_batch(), 0.2, 4
    cfg = tiny(lr=base_lr, warmup_steps=warmup)
    model = fresh_model(cfg)
    for step in range(6):
        expected_lr = base_lr * min(1.0, (step + 1) / warmup)
        g = reference_grad(cfg, model, batch, step)
        update, outcome = sgd_step(cfg, model, batch, step)
        assert outcome.lr == pytest.approx(expected_lr, rel=1e-12)
        assert_same_update(update, -expected_lr * g, model)


def test_cosine_schedule_follows_its_formula_after_the_warm_up_and_scales_the_update():
    # lr_t = lr * (1 + cos(pi * (t - w) / (T - w))) / 2 after w warm-up steps (Loshchilov & Hutter 2017)
    batch, base_lr, warmup, steps = digits_batch(), 0.2, 2, 6
    cfg = tiny(lr=base_lr, warmup_steps=warmup, lr_schedule="cosine", steps=steps)
    model = fresh_model(cfg)
    lrs = []
    for step in range(steps):
        expected_lr = (base_lr * (step + 1) / warmup if step < warmup
                       else base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))))
        g = reference_grad(cfg, model, batch, step)
        update, outcome = sgd_step(cfg, model, batch, step)
        assert outcome.lr == pytest.approx(expected_lr, rel=1e-12), step
        assert_same_update(update, -expected_lr * g, model)
        lrs.append(outcome.lr)
    assert lrs[warmup] == base_lr and 0 < lrs[-1] < 0.15 * base_lr  # full after the warm-up, nearly 0 at the end
    # past the end (a checkpoint further on than a later, smaller --steps) it stays at 0: cos is periodic, the
    # schedule must not come back up
    from elbox.training.loop import learning_rate

    assert [learning_rate(s, cfg.train) for s in (steps, steps + 2, steps + 4, 3 * steps)] == [0.0] * 4
    # one step after the warm-up (T - w = 1): the full lr at it, 0 from the next on
    short = tiny(lr=base_lr, warmup_steps=warmup, lr_schedule="cosine", steps=warmup + 1).train
    assert [learning_rate(s, short) for s in range(warmup + 3)] == [base_lr / 2, base_lr, base_lr, 0.0, 0.0]


def test_compile_uses_the_chosen_backend_and_rejects_an_unknown_one(tmp_path):
    """The backend named by compile_backend is the one torch.compile calls (a backend of this test's own, which
    records its calls); a name torch does not know is one line listing the known ones."""
    import torch._dynamo

    calls = []

    def recording_backend(gm, example_inputs):
        calls.append(len(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch._dynamo.register_backend(recording_backend, name="elbox_recording_test_backend")
    try:
        train(tiny(steps=1, lr=1e-3, compile=True, compile_backend="elbox_recording_test_backend"), tmp_path / "c")
        assert calls, "the chosen backend was never called"
    finally:
        torch._dynamo.reset()
    with pytest.raises(elbox.UserError, match="compile_backend='no-such' is not known to torch.compile") as e:
        train(tiny(steps=1, compile=True, compile_backend="no-such"), tmp_path / "d")
    listed = str(e.value).split("choose one of ", 1)[1].split(", ")
    assert set(listed) == set(torch._dynamo.list_backends(exclude_tags=())) and "inductor" in listed


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ELBOX_SLOW"), reason="inductor's C++ compilation, a minute on a CPU; "
                    "ELBOX_SLOW=1 runs it")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_mode_reaches_inductor(tmp_path, mode):
    """compile_mode is inductor's mode: reduce-overhead asks for CUDA graphs, which inductor skips on a CPU and
    counts as skipped; the default mode asks for none. (Whether the graphs pay on a GPU: benchmarks/gpu_check.py.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        train(tiny("vae", steps=2, lr=1e-3, compile=True, compile_mode=mode), tmp_path / "c")
        assert counters["stats"]["unique_graphs"] > 0, dict(counters)  # inductor compiled the networks
        assert (counters["inductor"]["cudagraph_skips"] > 0) == (mode == "reduce-overhead"), dict(counters)
    finally:
        torch._dynamo.reset()
        counters.clear()


def test_tensor_digests_tell_bit_identical_tensors_apart_from_any_change():
    """The digest that proves every DDP rank holds the same weights: equal for equal tensors (in any dict order),
    different when a value, a dtype, a shape or a name changes."""
    a = {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(2)}
    digest = ckpt.tensors_digest(a)
    assert len(digest) == 64 and digest == ckpt.tensors_digest({"b": torch.zeros(2), "w": torch.arange(6.0).view(2, 3)})
    changed = [
        {**a, "w": a["w"].clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(5.5))},
        {**a, "w": a["w"].double()},
        {**a, "w": a["w"].reshape(3, 2)},
        {"w2": a["w"], "b": a["b"]},
        {"w": a["w"]},
    ]
    digests = {ckpt.tensors_digest(c) for c in changed}
    assert digest not in digests and len(digests) == len(changed)


def test_optimizer_state_round_trips_through_tensors_and_json():
    """An optimizer state dict splits into safetensors-able tensors and JSON-able scalars and back unchanged, with
    per-parameter keys that themselves hold '/' (names are split at the first two only)."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = opt.state_dict()
    state["state"][1]["a/b"] = torch.tensor([1.0, 2.0])  # a tensor whose key holds a '/'
    state["state"][0]["count/x"] = 7  # a plain number, as some optimizers keep
    state["state"][1]["flag"] = True
    state["state"][5] = {"n_iter": 3}  # a parameter whose state holds numbers only
    tensors, meta = ckpt.optimizer_to_flat(state)
    assert all(torch.is_tensor(v) for v in tensors.values())
    import json

    back = ckpt.optimizer_from_flat(tensors, json.loads(json.dumps(meta)))
    assert back["param_groups"] == json.loads(json.dumps(state["param_groups"]))  # tuples come back as lists
    assert set(back["state"]) == set(state["state"])
    for idx, per_param in state["state"].items():
        assert set(back["state"][idx]) == set(per_param), idx
        for key, value in per_param.items():
            got = back["state"][idx][key]
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value, (idx, key)


def test_binarizing_draws_one_exactly_where_the_uniform_is_below_the_intensity(monkeypatch):
    """x = 1[u < p], p = intensity / 255, u in [0, 1) (torch.rand's range): at the edge draws u = 0 and u = 1 - 2^-24,
    a black pixel (p = 0) stays 0 and a white one (p = 1) stays 1, so neither flips ever, not once in 2^24 draws."""
    from elbox.training.loop import _to_model

    x = torch.tensor([[[[0, 1, 128, 254, 255]]]], dtype=torch.uint8)
    for u, expected in ((0.0, [0, 1, 1, 1, 1]), (1.0 - 2.0**-24, [0, 0, 0, 0, 1])):
        monkeypatch.setattr(draws, "rand_like", lambda p, u=u: torch.full_like(p, u))
        out = _to_model(x, "binary", channels_last=False)
        assert out.dtype == torch.float32
        assert out.flatten().tolist() == expected, u
