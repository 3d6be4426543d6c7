"""Run by tests/test_train_ddp.py under torchrun: rank 1 is asked to stop (as by a SIGTERM) from its third step on,
and rank 0's batch of the fourth step holds a NaN (--on-nonfinite skip). Rank 0 writes what the run did to
OUT/result.json. With a third argument "deferred", the checks are the GPU's (see test_train_deferred.py). Not a
test file itself."""

import json
import os
import sys
from pathlib import Path

import elbox.training.loop as loop
from elbox import checkpoint as ckpt
from elbox.config import MODELS, DataConfig, RunConfig, TrainConfig
from elbox.objectives.ddpm import DDPM, DDPMConfig


class FirstRankNaN(DDPM):
    def losses(self, x, *, step=0):
        terms = super().losses(x, step=step)
        if step == 3 and os.environ.get("RANK", "0") == "0":
            terms.terms["prior"] = terms.terms["prior"] * float("nan")
        return terms


def main(out: Path, deferred: bool) -> None:
    real_step, calls = loop.train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 3 and os.environ.get("RANK") == "1":
            kwargs["stop_requested"] = lambda: True
        return real_step(*args, **kwargs)

    loop.train_step = train_step
    if deferred:
        loop.defer_checks = lambda run: True
    MODELS["first-rank-nan"] = (DDPMConfig, FirstRankNaN)
    cfg = RunConfig(model="first-rank-nan", model_config=DDPMConfig(net="micro", timesteps=20, dropout=0.0),
                    data=DataConfig(),
                    train=TrainConfig(steps=10, batch_size=16, num_samples=4, final_eval_examples=0, quiet=True,
                                      log_every=100, checkpoint_every=100, on_nonfinite="skip", device="cpu"))
    result = loop.train(cfg, out)
    if os.environ.get("RANK") == "0":
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        (out / "result.json").write_text(json.dumps({
            "step": result.step, "stopped_by": result.stopped_by, "skipped": result.skipped,
            "checkpoints": [p.name for p in ckpt.list_checkpoints(out)],
            "nonfinite": [[r["step"], r["nonfinite"]] for r in rows if "nonfinite" in r]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), deferred=sys.argv[2:] == ["deferred"])
