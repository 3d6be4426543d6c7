"""DDPM training and sampling speed: elbox beside diffusers and denoising-diffusion-pytorch, in one run.

    pip install -e '.[bench]' && pip install --no-deps denoising-diffusion-pytorch
    python benchmarks/speed.py --preset small --threads 2                 # this CPU: minutes
    python benchmarks/speed.py --preset full --device cuda --compile       # one GPU: the 35.7M U-Net of Ho et al.

Each library's model is built from code (nothing is downloaded) with the U-Net of Ho et al. (2020, appendix B) at
the preset's width: elbox's ``ddpm-cifar10`` layout, diffusers' ``UNet2DModel`` with the google/ddpm-cifar10-32
block layout, and denoising-diffusion-pytorch's ``Unet`` (its own design: linear attention, ~ the same parameter
count at ``dim_mults=(1, 2, 2, 2)``). All three train the epsilon-MSE of eq. 14 with the linear schedule, T = 1000,
dropout 0.1, AdamW, gradient clipping at 1.0, on batches of CIFAR-10 (``../shared/data/cifar10``, a JPEG q75 copy;
its test split, loaded once per process). elbox's step is its real training step (``training.loop.train_step``
on a ``set_up`` run, with ``--loss simple --var-type fixed_large``): it also updates the EMA of the weights, which
the peers' steps here do not.

Every configuration runs in its own process, one after another, so that memory figures and thread pools are its
own. Per configuration: training images/s and step time (the median of ``--repeats`` timed blocks of ``--steps``
steps after ``--warmup`` steps), peak memory (CUDA: allocated by torch; CPU: the process's peak resident set),
parameters, network GFLOP per training image (forward and backward, counted by torch.utils.flop_counter) and the
fraction of the peak that makes: peak = a large matrix product's FLOP/s in the same dtype, measured in the same
process. Sampling: the time of one ancestral step (network and update) at ``--sample-batch``, over
``--sample-steps`` steps, extrapolated to the 1000-step chain (images/s = batch / (1000 x step time)). For elbox
also the time of 10,000 samples and of the full bound (all 1000 terms, fp32) on 10,000 test images, extrapolated
from one step of each at ``--sample-batch``.

Prints one JSON line per configuration, then a table with elbox's speed as a ratio of the faster peer's at the
same precision. ``--json FILE`` also writes the lines to a file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("elbox", "diffusers", "denoising-diffusion-pytorch")
PRESETS = {
    # CPU-sized: ~2.3M parameters at 32x32x3 (issue 13's side-by-side), batch 16
    "small": dict(width=32, batch=16, sample_batch=16),
    # Ho et al.'s CIFAR-10 model, 35.7M parameters, batch 128; sampling at batch 256
    "full": dict(width=128, batch=128, sample_batch=256),
}
T = 1000


# ------------------------------------------------------------------------------------------------ the models
@dataclass
class Harness:
    """What a library's builder hands the timer."""

    step: Callable[[], None]  # one training step on the next batch
    net: object  # the network, for its parameter count
    sample: Callable[[int, int], None]  # (batch, ancestral steps)
    loss: Callable[[], object]  # the training loss on one batch, eager, for the FLOP count
    batch: int  # images in that batch
    bound_step: Callable[[int], None] | None = None  # elbox: one timestep of the full bound at a batch size


def build_elbox(width: int, batch: int, precision: str, compile_: bool, device: str, data_dir: str):
    """elbox's real training set-up (set_up) for a DDPM with the ddpm-cifar10 U-Net at ``width``; returns
    (step function, network, sampler function, data batch for the FLOP count)."""
    import torch

    from elbox.config import DataConfig, RunConfig, TrainConfig
    from elbox.data import to_model
    from elbox.devices import autocast
    from elbox.objectives.ddpm import DDPMConfig
    from elbox.samplers import ancestral_sample
    from elbox.training.distributed import setup
    from elbox.training.loop import defer_checks, train_step
    from elbox.training.session import DATA_KINDS, build_model, resolve, set_up

    cfg = RunConfig(model_config=DDPMConfig(net="ddpm-cifar10", base_channels=width, dropout=0.1, loss="simple",
                                            var_type="fixed_large"),
                    data=DataConfig(data="cifar10", data_dir=data_dir),
                    train=TrainConfig(batch_size=batch, lr=2e-4, precision=precision, compile=compile_,
                                      device=device, quiet=True))
    info = setup(device)
    dataset = cfg.data.load("test")
    cfg = resolve(cfg, DATA_KINDS[dataset.kind])
    torch.manual_seed(0)
    model = build_model(cfg, dataset.shape)
    run = set_up(cfg, dataset, model, Path(tempfile.mkdtemp()), None, info, False)
    batches = run.loader.forever()
    deferred = defer_checks(run)  # as `elbox train` steps: on a GPU nothing is read back inside a step

    def step():
        train_step(run.step, next(batches), t=cfg.train, model=run.model, loss_module=run.loss_module,
                   optimizer=run.optimizer, scaler=run.scaler, ema=run.ema, info=info, micro_rows=run.micro_rows,
                   stop_requested=lambda: False, deferred=deferred)
        run.step += 1

    def sample(n: int, steps: int):
        net, diffusion = run.sampling_model.net, run.sampling_model.diffusion
        with autocast(precision, info.device):
            _stop_after(steps, lambda progress: ancestral_sample(
                diffusion, net, (n, 3, 32, 32), device=info.device, progress=progress))

    x = to_model(next(iter(run.loader.forever())), run.model.data_range).to(info.device)

    def bound_step(n: int):
        """One timestep of the full bound (``DDPM.bound``'s loop body), in fp32 as evaluation runs."""
        d, xb = run.sampling_model.diffusion, x[:1].expand(n, -1, -1, -1)
        t = torch.full((n,), T // 2, device=info.device, dtype=torch.long)
        with torch.no_grad():
            d.vlb_terms(run.sampling_model.net, xb, d.q_sample(xb, t, torch.randn_like(xb)), t, clip_denoised=True)

    return Harness(step, run.model.net, sample, lambda: run.model.losses(x, step=0).loss.mean(), len(x), bound_step)


class _Enough(Exception):
    pass


def _stop_after(steps: int, start) -> None:
    """Run a sampler that reports progress after each step, and stop it after ``steps`` steps."""

    def progress(done: int, total: int) -> None:
        if done >= steps:
            raise _Enough

    try:
        start(progress)
    except _Enough:
        pass


def _cifar_batches(batch: int, device: str, data_dir: str):
    import torch

    from elbox.config import DataConfig

    data = DataConfig(data="cifar10", data_dir=data_dir).load("test").data
    g = torch.Generator().manual_seed(0)
    while True:
        for idx in torch.randperm(len(data), generator=g).split(batch):
            if len(idx) == batch:
                yield data[idx].to(device)


def _peer_step(net, loss_fn, batches, precision: str, device: str):
    import torch

    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-4)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step():
        x = next(batches).float() / 255.0  # [0, 1]; each loss maps it to [-1, 1] itself
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build_diffusers(width: int, batch: int, precision: str, compile_: bool, device: str, data_dir: str):
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    # google/ddpm-cifar10-32's layout (attention at 16x16), at this width
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(width, 2 * width, 2 * width, 2 * width),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                       dropout=0.1).to(device)
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type="fixed_large")
    net = torch.compile(unet) if compile_ else unet
    alphas = sched.alphas_cumprod.to(device)

    def loss_fn(x01):
        x = x01 * 2 - 1
        noise = torch.randn_like(x)
        t = torch.randint(0, T, (x.shape[0],), device=x.device)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise  # scheduler.add_noise, without its host copies
        return F.mse_loss(net(x_t, t).sample.float(), noise)

    def sample(n: int, steps: int):
        sched.set_timesteps(T)
        dtype = torch.bfloat16 if precision == "bf16" else None
        x = torch.randn(n, 3, 32, 32, device=device)
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            for t in sched.timesteps[:steps]:
                x = sched.step(net(x, t).sample.float(), t, x).prev_sample

    batches = _cifar_batches(batch, device, data_dir)
    x = next(batches).float() / 255.0
    return Harness(_peer_step(unet, loss_fn, batches, precision, device), unet, sample, lambda: loss_fn(x), len(x))


def _import_denoising_diffusion_pytorch():
    """The package's top module imports torchvision for its Trainer's data pipeline (transforms, save_image),
    which the U-Net and GaussianDiffusion never call. PyPI's torchvision does not load beside a CPU-only torch, so
    when it cannot be imported an empty stand-in takes its place during the import (and is removed after)."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in ("torchvision", "torchvision.transforms", "torchvision.utils"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]
    try:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    finally:
        for name in ("torchvision", "torchvision.transforms", "torchvision.utils"):
            if isinstance(sys.modules.get(name), types.ModuleType) and not hasattr(sys.modules[name], "__file__"):
                del sys.modules[name]
    return GaussianDiffusion, Unet


def build_ddpm_pytorch(width: int, batch: int, precision: str, compile_: bool, device: str, data_dir: str):
    import torch

    GaussianDiffusion, Unet = _import_denoising_diffusion_pytorch()
    torch.manual_seed(0)
    unet = Unet(dim=width, dim_mults=(1, 2, 2, 2), dropout=0.1, flash_attn=False)
    diffusion = GaussianDiffusion(unet, image_size=32, timesteps=T, objective="pred_noise",
                                  beta_schedule="linear").to(device)
    if compile_:
        diffusion.model = torch.compile(diffusion.model)

    def sample(n: int, steps: int):
        x = torch.randn(n, 3, 32, 32, device=device)
        dtype = torch.bfloat16 if precision == "bf16" else None
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            for t in list(reversed(range(T)))[:steps]:
                x, _ = diffusion.p_sample(x, t)

    batches = _cifar_batches(batch, device, data_dir)
    x = next(batches).float() / 255.0
    return Harness(_peer_step(diffusion, diffusion, batches, precision, device), unet, sample, lambda: diffusion(x),
                   len(x))


BUILDERS = {"elbox": build_elbox, "diffusers": build_diffusers, "denoising-diffusion-pytorch": build_ddpm_pytorch}


# ------------------------------------------------------------------------------------------------ measuring
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _matmul_peak(precision: str, device: str) -> float:
    """FLOP/s of a large square matrix product in the precision's dtype: the peak the fraction is taken of."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 8192 if device.startswith("cuda") else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def worker(spec: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(spec["threads"])
    device, precision = spec["device"], spec["precision"]
    preset = PRESETS[spec["preset"]]
    h = BUILDERS[spec["library"]](preset["width"], preset["batch"], precision, spec["compile"], device,
                                  spec["data_dir"])
    step, sample = h.step, h.sample
    params = sum(p.numel() for p in h.net.parameters())
    with FlopCounterMode(display=False) as counter:  # eager, fp32: the network's arithmetic, whatever runs it
        h.loss().backward()
    h.net.zero_grad(set_to_none=True)
    flop_per_image = counter.get_total_flops() / h.batch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    compile_start = time.perf_counter()
    for _ in range(spec["warmup"]):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - compile_start
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        for _ in range(spec["steps"]):
            step()
        _sync(device)
        times.append((time.perf_counter() - start) / spec["steps"])
    step_s = statistics.median(times)
    peak_mem = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    sample(spec["sample_batch"], 2)  # warm-up (and compilation)
    _sync(device)
    start = time.perf_counter()
    sample(spec["sample_batch"], spec["sample_steps"])
    _sync(device)
    sample_step_s = (time.perf_counter() - start) / spec["sample_steps"]

    images_per_s = preset["batch"] / step_s
    peak = _matmul_peak(precision, device)
    extra = {}
    if h.bound_step is not None:  # elbox: what 10k samples and the bound on 10k test images take
        h.bound_step(spec["sample_batch"])
        _sync(device)
        start = time.perf_counter()
        for _ in range(3):
            h.bound_step(spec["sample_batch"])
        _sync(device)
        bound_step_s = (time.perf_counter() - start) / 3
        extra = {"bound_step_ms": bound_step_s * 1e3,
                 "bound_10k_test_images_s": 10_000 / spec["sample_batch"] * T * bound_step_s,
                 "sample_10k_images_s": 10_000 / spec["sample_batch"] * T * sample_step_s}
    return {
        "library": spec["library"], "device": _device_name(device), "threads": spec["threads"],
        "preset": spec["preset"], "precision": precision, "compile": spec["compile"], "batch": preset["batch"],
        "params": params, "train_images_per_s": images_per_s, "step_ms": step_s * 1e3,
        "step_ms_blocks": [t * 1e3 for t in times], "warmup_s": warmup_s,
        "peak_memory_mib": peak_mem / 2**20, "memory_kind": "cuda allocated" if device.startswith("cuda")
        else "process peak RSS", "gflop_per_image": flop_per_image / 1e9,
        "peak_tflops": peak / 1e12, "fraction_of_peak": images_per_s * flop_per_image / peak,
        "sample_batch": spec["sample_batch"], "sample_step_ms": sample_step_s * 1e3,
        "sample_images_per_s_1000_steps": spec["sample_batch"] / (sample_step_s * T),
        "torch": torch.__version__, **extra,
    }


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores)"


def table(rows: list[dict]) -> str:
    best_peer = {}
    for r in rows:
        if r["library"] != "elbox" and "error" not in r:
            key = (r["precision"], r["compile"])
            best_peer[key] = max(best_peer.get(key, 0.0), r["train_images_per_s"])
    head = (f"{'library':<28} {'prec.':<5} {'comp.':<5} {'params':>7} {'train img/s':>11} {'step ms':>8} "
            f"{'vs peer':>7} {'GFLOP/img':>9} {'of peak':>7} {'mem MiB':>8} {'sample step ms':>14} "
            f"{'1000-step img/s':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['library']:<28} {r['precision']:<5} {str(r['compile']):<5} failed: {r['error']}")
            continue
        peer = best_peer.get((r["precision"], r["compile"]))
        ratio = f"{r['train_images_per_s'] / peer:.2f}x" if r["library"] == "elbox" and peer else ""
        lines.append(
            f"{r['library']:<28} {r['precision']:<5} {str(r['compile']):<5} {r['params'] / 1e6:>6.2f}M "
            f"{r['train_images_per_s']:>11.1f} {r['step_ms']:>8.1f} {ratio:>7} {r['gflop_per_image']:>9.2f} "
            f"{r['fraction_of_peak']:>7.1%} {r['peak_memory_mib']:>8.0f} {r['sample_step_ms']:>14.1f} "
            f"{r['sample_images_per_s_1000_steps']:>15.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="also time each library with torch.compile")
    ap.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    ap.add_argument("--sample-steps", type=int, default=10, help="ancestral steps timed (50 on a GPU)")
    ap.add_argument("--sample-batch", type=int, default=None, help="default: the preset's")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--rounds", type=int, default=1, help="sweeps over every configuration, taking turns; the "
                    "table shows each configuration's median round")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON lines here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    rows = []
    compiles = [False, True] if args.compile else [False]
    for round_, precision, compile_, library in itertools.product(range(args.rounds), args.precision, compiles,
                                                                  args.libraries):
        spec = dict(library=library, precision=precision, compile=compile_, device=args.device, threads=args.threads,
                    preset=args.preset, warmup=args.warmup, steps=args.steps, repeats=args.repeats,
                    sample_steps=args.sample_steps, data_dir=args.data_dir,
                    sample_batch=args.sample_batch or PRESETS[args.preset]["sample_batch"])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                              text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            row = {"library": library, "precision": precision, "compile": compile_, "error": tail[:200]}
        else:
            row = json.loads(lines[-1])
        row["round"] = round_
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print()
    print(table(medians(rows)))
    if args.rounds > 1:
        print(f"\nthe median of {args.rounds} rounds per configuration (by training img/s); every round above")


def medians(rows: list[dict]) -> list[dict]:
    """Per configuration, the round with the median training speed (this machine's speed drifts over minutes, so
    the configurations take turns within each round and the ratios are taken between medians)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["library"], r["precision"], r["compile"]), []).append(r)
    out = []
    for group in groups.values():
        ok = sorted((r for r in group if "error" not in r), key=lambda r: r["train_images_per_s"])
        out.append(ok[(len(ok) - 1) // 2] if ok else group[-1])
    return out


if __name__ == "__main__":
    main()
