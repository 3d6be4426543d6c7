"""The default data set: scikit-learn's bundled 8x8 handwritten digits, so the main command needs no network.

1,797 grey 8x8 images (the UCI "optdigits" test set) with values 0..16, stored as uint8 round(v * 255 / 16).
There is no official split: a seeded split puts ~10% in "test" (see ``dataset.seeded_test_mask``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from elbox.data.dataset import Dataset, seeded_split_info, seeded_test_mask
from elbox.data.transforms import fit_images


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported here: scikit-learn takes a moment to import

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8); 16 -> 255
    return images, d.target.astype(np.int64)


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
            [f"8x8 handwritten digits from scikit-learn ({len(index)} of 1797 images; seeded split, seed {seed})", *notes]
        ),
        classes=tuple("0123456789"),
        split_info=seeded_split_info(seed),
    )
