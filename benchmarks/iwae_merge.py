"""Join the per-image importance-weighted estimates that ``elbo_family.py`` wrote, shard by shard, into one.

    python benchmarks/iwae_merge.py runs/a/binarized-ldm-iwae.jsonl runs/b/binarized-ldm-iwae.jsonl

Each file holds JSON lines: a header line per run (the variant, model, K, a hash of the weights, the seeds and the
pick), then one line per test image, ``{"index": i, "neg_log_px": v}``. Every run must be of the same model (the
same weights), K, test binarization and pick; an image scored twice is an error, so that no image counts twice.
Prints one JSON line (mean and standard error over images, in nats, how many of the test set) and a table row.
With ``--paired-with FILE...`` (another model's shards, e.g. the VAE under a latent diffusion model), also the
difference between the two on the images both scored, image by image, with its standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# must agree across shards: what makes their values draws of one estimate (``seed`` may differ: shards draw apart)
SAME = ("variant", "model", "k", "weights", "test_seed", "pick", "iwae_seed")
TEST_IMAGES = 10_000  # MNIST's test set


def read(paths: list[Path]) -> tuple[dict, dict[int, float]]:
    """The shared header and each image's -log p(x); exits with a one-line message on a mismatch or a repeat."""
    header, values = None, {}
    for path in paths:
        if not path.is_file():
            sys.exit(f"{path}: no such file; give the OUT/VARIANT-MODEL-iwae.jsonl files of elbo_family.py runs")
        run = None
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a run stopped while writing its last line
                    print(f"  {path}:{number}: an unfinished last line, left out", file=sys.stderr)
                    continue
                sys.exit(f"{path}:{number}: not a JSON line; is this an elbo_family.py -iwae.jsonl file?")
            if "header" in record:
                run = record["header"]
                header = header or run
                differ = [key for key in SAME if run.get(key) != header.get(key)]
                if differ:
                    what = ", ".join(f"{key} {run.get(key)!r} vs {header.get(key)!r}" for key in differ)
                    sys.exit(f"{path}:{number}: a run of another estimate ({what}); merge only shards of one model, "
                             f"K and pick")
                continue
            if run is None:
                sys.exit(f"{path}:{number}: an image before any header line; is this an elbo_family.py file?")
            index = int(record["index"])
            if index in values:
                sys.exit(f"{path}:{number}: test image {index} is scored twice; shards must not overlap "
                         f"(give each run its own --iwae-start range)")
            values[index] = float(record["neg_log_px"])
    if not values:
        sys.exit(f"{', '.join(map(str, paths))}: no scored images")
    return header, values


def summary(header: dict, values: dict[int, float]) -> dict:
    n = len(values)
    mean = math.fsum(values.values()) / n
    var = math.fsum((v - mean) ** 2 for v in values.values()) / (n - 1) if n > 1 else float("nan")
    return {"variant": header["variant"], "model": header["model"], "k": header["k"], "weights": header["weights"],
            "pick": header["pick"], "images": n, "of_test_set": n / TEST_IMAGES, "nll_nats": mean,
            "nll_nats_se": math.sqrt(var / n), "complete": n == TEST_IMAGES}


def paired(values: dict[int, float], other: dict[int, float]) -> dict:
    """The mean and standard error of this estimate minus the other, over the images both scored."""
    common = sorted(values.keys() & other.keys())
    if len(common) < 2:
        sys.exit(f"--paired-with: the two estimates share {len(common)} scored images; pair shards of the same pick")
    diffs = [values[i] - other[i] for i in common]
    mean = math.fsum(diffs) / len(diffs)
    var = math.fsum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return {"images": len(common), "minus_nats": mean, "minus_nats_se": math.sqrt(var / len(diffs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("--paired-with", type=Path, nargs="+", default=[],
                   help="the shards of another model's estimate on the same pick: also the paired difference")
    args = p.parse_args()
    header, values = read(args.files)
    out = summary(header, values)
    if args.paired_with:
        other_header, other = read(args.paired_with)
        if other_header["test_seed"] != header["test_seed"] or other_header["variant"] != header["variant"]:
            sys.exit("--paired-with: the other estimate is on other test images (its variant or --test-seed differs)")
        out["paired"] = {"model": other_header["model"], "k": other_header["k"], **paired(values, other)}
    print(json.dumps(out))
    which = "all" if out["complete"] else f"{out['images']}{' random' if out['pick'] == 'random' else ''}"
    print(f"| {out['variant']} MNIST | {out['model']} | {out['nll_nats']:.2f} ± {out['nll_nats_se']:.2f} "
          f"(K = {out['k']}, {which} test images) |", file=sys.stderr)
    if "paired" in out:
        pair = out["paired"]
        print(f"  {out['model']} - {pair['model']} (K = {pair['k']}), paired on the same {pair['images']} images: "
              f"{pair['minus_nats']:+.3f} ± {pair['minus_nats_se']:.3f} nats", file=sys.stderr)


if __name__ == "__main__":
    main()
