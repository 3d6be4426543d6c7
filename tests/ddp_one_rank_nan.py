"""Run by tests/test_train_ddp.py under torchrun: a DDPM whose prior term is NaN on step 3 on the last process
only (with one process, that process), trained with --on-nonfinite skip; it also fails if anything still holds the
process group when training tears it down. With a third argument "deferred", the checks are the GPU's (decided on
the device, read back a step late: see test_train_deferred.py). Not a test file itself."""

import gc
import os
import sys
from pathlib import Path

from torch.nn.parallel import DistributedDataParallel

import elbox.training.loop
from elbox.config import MODELS, DataConfig, RunConfig, TrainConfig
from elbox.objectives.ddpm import DDPM, DDPMConfig
from elbox.training.loop import train


class LastRankNaN(DDPM):
    def losses(self, x, *, step=0):
        terms = super().losses(x, step=step)
        if step == 2 and int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
            terms.terms["prior"] = terms.terms["prior"] * float("nan")
        return terms


def teardown_last(real=elbox.training.loop.teardown) -> None:
    """The real teardown, checked: nothing may still hold the process group (DDP's reducer does) when it goes."""
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    real()
    if alive:
        raise SystemExit(f"rank {os.environ.get('RANK')}: {alive} DDP wrapper(s) alive at the process group's teardown")


def run(out: Path, deferred: bool = False) -> None:
    MODELS["last-rank-nan"] = (DDPMConfig, LastRankNaN)
    if deferred:
        elbox.training.loop.defer_checks = lambda run: True
    # no dropout: two processes then train as one (see test_train_ddp.py), so the skipped step is the only difference
    cfg = RunConfig(model="last-rank-nan", model_config=DDPMConfig(net="micro", timesteps=20, dropout=0.0),
                    data=DataConfig(),
                    train=TrainConfig(steps=4, batch_size=16, num_samples=4, final_eval_examples=0, quiet=True,
                                      log_every=1, checkpoint_every=1, keep_checkpoints=10, on_nonfinite="skip",
                                      device="cpu"))
    train(cfg, out)


if __name__ == "__main__":
    elbox.training.loop.teardown = teardown_last
    run(Path(sys.argv[1]), deferred=sys.argv[2:] == ["deferred"])
