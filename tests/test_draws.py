"""Where the random numbers come from (``elbox.draws``): outside a trainer, the global torch RNG; inside
``global_batch``, a draw for the whole global batch from a seeded stream, of which each micro-batch keeps its rows;
through a generator, the same numbers on any device and at any precision."""

import contextlib

import pytest
import torch

from elbox import draws

TOTAL = 6
LIKE = torch.zeros(TOTAL, 3, dtype=torch.float64)


def _inside(rows, fn):
    with draws.global_batch(123, torch.tensor(rows), TOTAL):
        return fn()


DRAWS = {
    "randn_like": (lambda x: draws.randn_like(x), lambda g, n: torch.randn((n, 3), generator=g, dtype=torch.float64)),
    "rand_like": (lambda x: draws.rand_like(x), lambda g, n: torch.rand((n, 3), generator=g, dtype=torch.float64)),
    "randint": (lambda x: draws.randint(9, len(x), x.device), lambda g, n: torch.randint(0, 9, (n,), generator=g)),
    "multinomial": (lambda x: draws.multinomial(torch.tensor([0.1, 0.2, 0.7]), len(x)),
                    lambda g, n: torch.multinomial(torch.tensor([0.1, 0.2, 0.7]), n, replacement=True, generator=g)),
}


@pytest.mark.parametrize("name", list(DRAWS))
def test_outside_a_trainer_a_draw_is_the_global_rngs(name):
    draw, reference = DRAWS[name]
    torch.manual_seed(5)
    got = draw(LIKE[:4])
    g = torch.Generator().manual_seed(5)
    assert torch.equal(got, reference(g, 4))
    assert got.dtype == reference(g, 1).dtype and got.shape[0] == 4


@pytest.mark.parametrize("name", list(DRAWS))
def test_inside_a_global_batch_each_micro_batch_keeps_its_rows_of_one_seeded_draw(name):
    draw, reference = DRAWS[name]
    whole = reference(torch.Generator().manual_seed(123), TOTAL)
    for rows in ([0, 1, 2, 3, 4, 5], [1, 3, 5], [4], [2, 0]):
        got = _inside(rows, lambda: draw(LIKE[: len(rows)]))
        assert torch.equal(got, whole[rows]), rows
    # the global RNG is not touched inside
    torch.manual_seed(9)
    before = torch.get_rng_state()
    _inside([0, 1], lambda: draw(LIKE[:2]))
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(ValueError, match="micro-batch has 2"):
        _inside([0, 1], lambda: draw(LIKE[:3]))


def test_seeded_draws_keep_the_requested_dtype_and_shape():
    for fn, ref in ((draws.randn_from, torch.randn), (draws.rand_from, torch.rand)):
        x = fn(torch.Generator().manual_seed(1), (2, 3), "cpu", torch.float64)
        assert x.dtype == torch.float64 and x.shape == (2, 3)
        # drawn in float32 and cast: the same numbers as a float32 draw
        assert torch.equal(x, ref((2, 3), generator=torch.Generator().manual_seed(1)).double())
        assert fn(None, [4], "cpu").dtype == torch.float32


def test_a_draw_lands_on_its_inputs_device_not_on_the_default_device():
    # torch.set_default_device("cuda") with a model kept on the CPU must still get CPU noise; "meta" stands in for
    # the GPU as the default device here, so any draw that forgets its device comes out on it
    x, rows, probs, cpu = LIKE[:2], torch.tensor([1, 4]), torch.tensor([0.1, 0.2, 0.7]), torch.device("cpu")
    with torch.device("meta"):
        for where, scope in (("outside", contextlib.nullcontext()), ("inside", draws.global_batch(123, rows, TOTAL))):
            with scope:
                got = {"randn_like": draws.randn_like(x), "rand_like": draws.rand_like(x),
                       "randint": draws.randint(9, 2, cpu), "multinomial": draws.multinomial(probs, 2)}
            assert {name: d.device for name, d in got.items()} == dict.fromkeys(got, cpu), where
