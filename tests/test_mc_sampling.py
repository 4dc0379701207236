"""The Monte-Carlo Fisher's class draws (origins._draw_classes): the model's own distribution, never a class of
probability 0, never an index past the last class, reproducible with a generator."""

import torch

from torch_secorder.backprop.origins import _draw_classes


def test_draw_frequencies_follow_the_probabilities():
    probabilities = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0, 0.9, 0.0, 0.1]], dtype=torch.float64)
    draws = 200_000
    drawn = _draw_classes(probabilities, draws, torch.Generator().manual_seed(0))
    assert drawn.shape == (2, draws) and drawn.dtype == torch.int64
    frequencies = torch.stack([torch.bincount(row, minlength=4) for row in drawn]).double() / draws
    standard_error = (probabilities * (1 - probabilities) / draws).sqrt()
    assert ((frequencies - probabilities).abs() <= 5 * standard_error + 1e-12).all(), frequencies
    assert (frequencies[probabilities == 0] == 0).all()  # exactly never


def test_rounding_never_draws_past_the_last_class_or_a_zero_class():
    # float32 rows whose cumulative sums end below 1, a zero-probability last class, uniforms near the top
    logits = torch.randn(4096, 7)
    logits[:, -1] = -float("inf")
    probabilities = torch.softmax(logits, dim=1)
    drawn = _draw_classes(probabilities, 64, torch.Generator().manual_seed(1))
    assert int(drawn.max()) <= 5 and int(drawn.min()) >= 0


def test_a_generator_makes_draws_reproducible():
    probabilities = torch.softmax(torch.randn(32, 10), dim=1)
    first = _draw_classes(probabilities, 3, torch.Generator().manual_seed(7))
    second = _draw_classes(probabilities, 3, torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
