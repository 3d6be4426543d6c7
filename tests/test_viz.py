"""The pictures elbox writes: a reconstruction grid keeps each test image beside its reconstruction and says which
column is which."""

import numpy as np
import pytest
import torch

from elbox.viz import image_grid, pairs_grid


@pytest.mark.parametrize("pairs, columns", [(1, 2), (2, 2), (4, 4), (9, 6), (32, 8)])
def test_a_reconstruction_grid_is_an_even_number_of_columns_under_a_header(pairs, columns):
    data, recon = torch.zeros(pairs, 1, 8, 8, dtype=torch.uint8), torch.full((pairs, 1, 8, 8), 255, dtype=torch.uint8)
    picture = np.asarray(pairs_grid(torch.stack([data, recon], 1).flatten(0, 1)))
    plain = np.asarray(image_grid(torch.stack([data, recon], 1).flatten(0, 1), nrow=columns))
    header = picture.shape[0] - plain.shape[0]
    assert picture.shape[1] == plain.shape[1] and 10 <= header <= 30
    assert (picture[header:] == plain).all()  # the grid itself, unchanged, below the header
    assert (picture[:header] < 128).any()  # the header has writing on it
    cell, pad = 64, 2  # 8 px images scaled up 8 times, 2 px apart
    middle = header + pad + cell // 2
    for column in range(columns):  # every row starts with a test image, then its reconstruction: black, white, ...
        x = pad + column * (cell + pad) + cell // 2
        assert picture[middle, x, 0] == (0 if column % 2 == 0 else 255), column
