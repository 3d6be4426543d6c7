"""VAE on binarized MNIST: train for a wall-clock budget, then report the test NLL as an IWAE estimate.

    python benchmarks/vae_mnist.py --minutes 30 --data-dir ../shared/data/mnist [VAEConfig flags] > result.json

- Training data: the 60,000 training images, dynamically binarized (a fresh Bernoulli(x/255) draw for every
  batch; Salakhutdinov & Murray 2008, as in Burda et al. 2016).
- Test data: the 10,000 test images binarized ONCE, by Bernoulli(x/255) draws from a torch.Generator seeded with
  ``--test-seed`` (default 0), so every run and every model is scored on the same binary images.
- Optimisation: Adam, the learning rate decayed with a cosine over the *time* budget (so the schedule ends when
  the budget does, whatever the machine's speed), KL warm-up if asked for.
- Score: -log p(x) by the importance-weighted bound with K samples (Burda et al. 2016, eq. 8; K=5000 as in their
  table 1), averaged over the test set, with its standard error over test images. The single-sample negative ELBO
  is reported beside it.

Prints a table to stderr and one JSON line to stdout. Every VAEConfig field is a flag (``--latent-dim 32``).

Measured (2026-11-26, 2-core AMD EPYC shared with other jobs, torch 2.13 CPU, 1 thread because two threads
slowed down up to 10x whenever the other core was busy):

    python benchmarks/vae_mnist.py --minutes 30 --threads 1 --arch conv-mlp --res-blocks 0 --ar-kernel 7 \
        --activation silu --data-dir ../shared/data/mnist

    test NLL, IWAE K=5000   85.07 +- 0.21 nats   (all 10,000 test images; test set binarized with seed 0)
    test -ELBO, 1 sample    87.33 +- 0.22 nats
    training                30.0 min, 50,436 steps of 100, 84 epochs; scoring took 21 min more

That is a conv encoder, the Kingma & Welling MLP decoder (500-500, latent 50) and a 7x7 masked-convolution
autoregressive context on the Bernoulli logits. A conv decoder was not used: on this CPU it costs ~0.5 ms per
decoder pass, so K=5000 on 10,000 images would take about 7 hours to score (the MLP decoder: ~10 us per pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from elbox.data import load_dataset, to_model
from elbox.objectives.vae import VAE, VAEConfig


def load_mnist(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) uint8 images (N, 1, 28, 28), read by ``elbox.data`` (never downloaded here)."""
    return tuple(load_dataset("mnist", split, data_dir=data_dir, download=False).data for split in ("train", "test"))


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per VAEConfig field, typed from its annotation (tuples take comma-separated integers)."""
    hints = typing.get_type_hints(VAEConfig)
    for f in dataclasses.fields(VAEConfig):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if typing.get_origin(tp) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(tp), default=f.default)
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",") if v), default=f.default)
        else:
            parser.add_argument(flag, type=tp, default=f.default)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    p.add_argument("--minutes", type=float, default=30.0, help="training budget, wall clock")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-min", type=float, default=0.0, help="the cosine ends here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-seed", type=int, default=0, help="seed of the fixed binarization of the test set")
    p.add_argument("--k", type=int, default=5000, help="importance samples per test image")
    p.add_argument("--chunk", type=int, default=500, help="importance samples per decoder pass")
    p.add_argument("--eval-batch", type=int, default=20, help="test images per IWAE pass")
    p.add_argument("--eval-n", type=int, default=10000, help="test images to score (10000: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--save", help="folder to write the trained model to (model.safetensors, config.json)")
    p.add_argument("--load", help="a folder written by --save: score that model instead of training one")
    add_config_flags(p)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.load:
        config = VAEConfig(**json.loads((Path(args.load) / "config.json").read_text()))
    else:
        config = VAEConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(VAEConfig)})
    torch.manual_seed(args.seed)
    train_u8, test_u8 = load_mnist(args.data_dir)
    vae = VAE(config, tuple(train_u8.shape[1:]))
    if args.load:
        vae.load_state_dict(load_file(Path(args.load) / "model.safetensors"))
        budget = 0.0
    else:
        budget = args.minutes * 60.0
    assert vae.data_range == "binary", "this benchmark is for the bernoulli decoder"
    # the test set is binarized once, with its own seeded generator; training batches afresh (to_model, "binary")
    test = to_model(test_u8, "binary", generator=torch.Generator().manual_seed(args.test_seed))[: args.eval_n]

    # ---- train: Adam, a cosine learning rate over the wall-clock budget -----------------------------------
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    data_gen = torch.Generator().manual_seed(args.seed)
    step, epoch, start, log_at = 0, 0, time.time(), 0.0
    running = None
    while time.time() - start < budget:
        order = torch.randperm(len(train_u8), generator=data_gen)
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            elapsed = time.time() - start
            if elapsed >= budget:
                break
            lr = args.lr_min + 0.5 * (args.lr - args.lr_min) * (1 + math.cos(math.pi * elapsed / budget))
            for group in opt.param_groups:
                group["lr"] = lr
            x = to_model(train_u8[order[i : i + args.batch_size]], "binary", generator=data_gen)
            terms = vae.losses(x, step=step)
            opt.zero_grad(set_to_none=True)
            terms.loss.mean().backward()
            opt.step()
            step += 1
            nelbo = float(terms.nll.detach().mean())
            running = nelbo if running is None else 0.98 * running + 0.02 * nelbo
            if elapsed >= log_at:
                print(f"  {elapsed / 60:5.1f} min  epoch {epoch:3d}  step {step:6d}  lr {lr:.2e}  "
                      f"train -ELBO {running:7.2f}", file=sys.stderr, flush=True)
                log_at += 60.0
        else:
            epoch += 1
    train_seconds = time.time() - start
    if args.save:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config)))

    # ---- evaluate: the single-sample bound and the K-sample IWAE estimate on the fixed binarized test set ------
    vae.eval()
    eval_gen_seed = args.seed + 1
    torch.manual_seed(eval_gen_seed)
    start = time.time()
    with torch.no_grad():
        nelbo = torch.cat([vae.bound(test[i : i + 500]).nll for i in range(0, len(test), 500)])
        nll = []
        for i in range(0, len(test), args.eval_batch):
            nll.append(-vae.iwae_bound(test[i : i + args.eval_batch], args.k, chunk=args.chunk))
            done = i + args.eval_batch
            if done % 1000 == 0:
                so_far = torch.cat(nll)
                print(f"  eval {done:5d}/{len(test)}  NLL so far {so_far.mean():.2f}  "
                      f"({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
        nll = torch.cat(nll)
    eval_seconds = time.time() - start

    def se(v: torch.Tensor) -> float:
        return float(v.std() / math.sqrt(len(v)))

    result = {
        "benchmark": "vae_mnist",
        "data": "MNIST, dynamically binarized for training; test set binarized once, Bernoulli(x/255) with "
        f"torch.Generator seed {args.test_seed}",
        "test_images": len(test),
        "k": args.k,
        "test_nll_nats": round(float(nll.mean()), 3),
        "test_nll_se": round(se(nll), 3),
        "test_nelbo_nats": round(float(nelbo.mean()), 3),
        "test_nelbo_se": round(se(nelbo), 3),
        "train_minutes": round(train_seconds / 60, 2),
        "eval_minutes": round(eval_seconds / 60, 2),
        "steps": step,
        "epochs": round(step * args.batch_size / len(train_u8), 1),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "params": sum(p.numel() for p in vae.parameters()),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        "command": " ".join(["python", *sys.argv]),
    }
    rows = [
        ("test NLL, IWAE K=%d (nats)" % args.k, f"{result['test_nll_nats']:.2f} +- {result['test_nll_se']:.2f}"),
        ("test -ELBO, 1 sample (nats)", f"{result['test_nelbo_nats']:.2f} +- {result['test_nelbo_se']:.2f}"),
        ("test images", str(len(test))),
        ("training", f"{result['train_minutes']:.1f} min, {step} steps, {result['epochs']} epochs"),
        ("evaluation", f"{result['eval_minutes']:.1f} min"),
        ("reference", "pythae VAE 89.78; IWAE paper 2-layer IWAE 82.90"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{a:<{width}}  {b}" for a, b in rows), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
