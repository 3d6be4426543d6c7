"""The default data set: the 8x8 handwritten digits that scikit-learn bundles, shipped inside elbox.

1,797 grey 8x8 images with values 0..16 and their labels: the test set of "Optical Recognition of Handwritten
Digits" (Alpaydin & Kaynak, UCI Machine Learning Repository, 1998, CC BY 4.0), exactly as scikit-learn's
``load_digits`` returns them (same order; tests/test_data.py compares the two). ``digits.npz`` (45 KB) carries them,
so the main command needs neither a network nor scikit-learn (and SciPy, which it pulls in) at install time.
The model sees uint8 round(v * 255 / 16). There is no official split: a seeded split puts ~10% in "test" (see
``dataset.seeded_test_mask``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from elbox.data.dataset import Dataset, seeded_split_info, seeded_test_mask
from elbox.data.transforms import fit_images


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(Path(__file__).with_name("digits.npz")) as d:  # uint8: images (1797, 8, 8) in 0..16, labels
        values, labels = d["images"], d["labels"]
    images = np.rint(values * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8); 16 -> 255
    return images, labels.astype(np.int64)


def load(split: str, *, image_size: int | None, channels: int | None, seed: int) -> Dataset:
    images, labels = _digits()
    test = seeded_test_mask([str(i) for i in range(len(images))], seed)
    index = np.flatnonzero(test if split == "test" else ~test)
    x, notes = fit_images(torch.from_numpy(images[index]), image_size, channels)
    return Dataset(
        data=x,
        labels=torch.from_numpy(labels[index]),
        name="digits",
        split=split,
        kind="image",
        description=", ".join(
            [f"8x8 handwritten digits (UCI optdigits, as scikit-learn bundles them; {len(index)} of 1797 images; "
             f"seeded split, seed {seed})", *notes]
        ),
        classes=tuple("0123456789"),
        split_info=seeded_split_info(seed),
    )
