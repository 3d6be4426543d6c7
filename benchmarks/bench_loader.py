"""Images per second of InMemoryLoader (the batches a training step receives), for digits, mnist and cifar10.

    python benchmarks/bench_loader.py [--data-dir ../shared/data] [--device cpu|cuda] [--batch-size 128]

Prints one JSON line (for records) and a small table. Each case runs whole epochs until --seconds have passed;
"+to_model" also converts each batch to the model's float range, as the trainer does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from elbox.data import InMemoryLoader, load_dataset, to_model
from elbox.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def measure(data: torch.Tensor, batch_size: int, *, hflip: bool, convert: bool, device: str, seconds: float) -> float:
    loader = InMemoryLoader(data, batch_size, hflip=hflip, device=device, seed=0)
    sync = torch.cuda.synchronize if loader.device.type == "cuda" else (lambda: None)
    for x in loader:  # warm-up: one epoch (allocator, kernels)
        pass
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for x in loader:
            if convert:
                x = to_model(x, "symmetric")
            images += len(x)
        sync()
    return images / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("ELBOX_DATA") or (str(SHARED) if SHARED.is_dir() else None))
    p.add_argument("--datasets", default="digits,mnist,cifar10")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name in args.datasets.split(","):
        try:
            t0 = time.perf_counter()
            ds = load_dataset(name, "train", data_dir=args.data_dir)
            load_s = time.perf_counter() - t0
        except UserError as e:
            print(f"skipping {name}: {e}")
            continue
        for hflip in (False, True):
            for convert in (False, True):
                rate = measure(ds.data, args.batch_size, hflip=hflip, convert=convert, device=args.device, seconds=args.seconds)
                rows.append({"data": name, "shape": list(ds.shape), "n": len(ds), "hflip": hflip, "to_model": convert,
                             "images_per_s": round(rate), "load_s": round(load_s, 2)})
    record = {"bench": "loader", "batch_size": args.batch_size, "device": args.device, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "results": rows}
    print(json.dumps(record))
    print(f"\n{'data':<10} {'shape':<12} {'hflip':<6} {'+to_model':<10} {'images/s':>12} {'load s':>7}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['data']:<10} {shape:<12} {r['hflip']!s:<6} {r['to_model']!s:<10} {r['images_per_s']:>12,} {r['load_s']:>7}")


if __name__ == "__main__":
    main()
