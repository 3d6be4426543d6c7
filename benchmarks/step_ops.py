"""What one `elbox train` step runs: aten operators per DDPM training step, with and without the bound's terms.

    python benchmarks/step_ops.py                              # operator counts: seconds
    python benchmarks/step_ops.py --time-steps 400 --rounds 3  # also img/s, taking turns (a quiet machine)

On a GPU a small network's step is bound by how many kernels it launches, not by their arithmetic (issue 13: the
GPU waits on Python and small kernels), and each aten operator launches one kernel or more. So the count, which is
the same on any device, says what a change saves there; this CPU can count it exactly. Counted with a
``TorchDispatchMode`` around the real ``training.loop.train_step`` of an ``elbox train`` run on the embedded 8x8
digits: forward, backward, clipping, the NaN/Inf check, the optimizer (foreach AdamW on a CPU; fused on a GPU) and
the EMA. A step that writes a metrics line computes the bound's terms; with the simple loss the others skip them
(``objectives.base.loss_only``). ``--time-steps`` also trains each configuration with the terms at every step and
only when logged, taking turns, and reports the median training img/s of ``--rounds`` runs each.

Prints one JSON line per configuration, then a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from elbox.config import DataConfig, RunConfig, TrainConfig
from elbox.objectives.ddpm import DDPMConfig
from elbox.training import loop

LOSSES = {"simple": dict(loss="simple", var_type="fixed_large"), "hybrid": dict(loss="hybrid", var_type="learned")}


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _config(net: str, loss: str, steps: int, batch: int, log_every: int) -> RunConfig:
    return RunConfig(model="ddpm", model_config=DDPMConfig(net=net, **LOSSES[loss]), data=DataConfig(),
                     train=TrainConfig(steps=steps, batch_size=batch, log_every=log_every, sample_every=0,
                                       checkpoint_every=10**9, final_eval_examples=0, num_samples=1, quiet=True))


def count(net: str, loss: str, batch: int) -> dict:
    """Operators in steps 2-4 of a 4-step run logging every 2nd step (step 1 also makes the optimizer's state)."""
    ops: dict[int, int] = {}
    real = loop.train_step

    def counted(step, *args, **kwargs):
        with _Count() as mode:
            done = real(step, *args, **kwargs)
        ops[step + 1] = mode.ops
        return done

    loop.train_step = counted
    try:
        with tempfile.TemporaryDirectory() as out:
            loop.train(_config(net, loss, 4, batch, 2), out)
    finally:
        loop.train_step = real
    return {"net": net, "loss": loss, "batch": batch, "ops_logged_step": ops[4], "ops_other_step": ops[3]}


def speed(net: str, loss: str, batch: int, steps: int, rounds: int) -> dict:
    """Median training img/s with the bound's terms at every step and only when logged (every 50th), in turns."""
    real = loop.loss_only
    ips: dict[str, list[float]] = {"every_step": [], "when_logged": []}
    try:
        for _ in range(rounds):
            for mode in ips:
                loop.loss_only = contextlib.nullcontext if mode == "every_step" else real
                with tempfile.TemporaryDirectory() as out:
                    ips[mode].append(loop.train(_config(net, loss, steps, batch, 50), out).images_per_second)
    finally:
        loop.loss_only = real
    return {f"img_s_{mode}": round(statistics.median(v), 1) for mode, v in ips.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", nargs="+", default=["tiny", "small"], help="U-Net presets")
    ap.add_argument("--losses", nargs="+", choices=sorted(LOSSES), default=["simple", "hybrid"])
    ap.add_argument("--batch", type=int, default=16, help="batch size of the counted steps")
    ap.add_argument("--time-steps", type=int, default=0, help="also time runs of this many steps (batch 128)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per mode, taking turns")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for net in args.nets:
        for loss in args.losses:
            row = count(net, loss, args.batch)
            if args.time_steps:
                row.update(speed(net, loss, 128, args.time_steps, args.rounds))
            print(json.dumps(row), flush=True)
            rows.append(row)
    timed_head = " img/s, the terms every step | img/s, only when logged |" if args.time_steps else ""
    print(f"\n| net | loss | ops, logged step | ops, other step | fewer |{timed_head}")
    print(f"|---|---|---|---|---|{'---|---|' if args.time_steps else ''}")
    for r in rows:
        fewer = 1 - r["ops_other_step"] / r["ops_logged_step"]
        timed = f" {r['img_s_every_step']} | {r['img_s_when_logged']} |" if args.time_steps else ""
        print(f"| {r['net']} | {r['loss']} | {r['ops_logged_step']} | {r['ops_other_step']} | {fewer:.1%} |{timed}")


if __name__ == "__main__":
    main()
