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


@pytest.mark.parametrize("lo, hi", [(50, 300), (0.3485, 0.7826), (-3, 7), (4.09, 4.13), (1, 10_000)])
def test_the_loss_plots_ticks_are_round_numbers_that_cover_the_values(lo, hi):
    from elbox.viz import nice_ticks

    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 7
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** np.floor(np.log10(step))
    assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 5))  # 1, 2 or 5 times a power of ten apart
    assert ticks[-2] < hi  # no tick past the one that covers the top


def test_a_loss_plot_of_one_point_shows_it():
    from elbox.viz import line_plot

    picture = np.asarray(line_plot({"loss": [(20, 0.5)]}, "training loss"))
    blue = (picture[..., 2] > 150) & (picture[..., 0] < 80)
    assert blue[:, :400].sum() >= 20  # the point itself, left of the legend


def test_tick_labels_tell_neighbouring_ticks_apart_and_odd_values_do_not_crash_the_plot():
    from elbox.viz import _tick_label, line_plot, nice_ticks

    ticks = nice_ticks(1234.5, 1236.5)
    labels = [_tick_label(t, ticks[1] - ticks[0]) for t in ticks]
    assert len(set(labels)) == len(labels) and labels[0] == "1234.5"  # not "1234, 1235, 1236, 1236, 1236"
    assert nice_ticks(3.0, 3.0000002)[-1] < 3.000001  # a tiny span is drawn at its own scale
    for series in ([(1, -1e308), (2, 1e308)], [(float("nan"), 1.0), (2, 2.0)], [], [(3, float("inf"))],
                   [(1, 0.0), (2, 5e-324)], [(0, 5.0), (1e6, 7.0)]):
        assert line_plot({"loss": series}, "odd").size == (640, 400)
