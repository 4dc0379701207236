import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|: one number for a tensor, or for a list of them taken
    together (a parameter whose true diagonal is ~1e-32, such as a bias before BatchNorm, is then
    judged against the scale of the whole Hessian diagonal, not against its own rounding noise)."""
    if not isinstance(actual, (list, tuple)):
        actual, expected = [actual], [expected]
    assert len(actual) == len(expected)
    error, scale = 0.0, 0.0
    for a, e in zip(actual, expected):
        a, e = a.detach().double().cpu(), e.detach().double().cpu()
        assert a.shape == e.shape, (a.shape, e.shape)
        if e.numel():
            error = max(error, (a - e).abs().max().item())
            scale = max(scale, e.abs().max().item())
    return error / max(scale, 1e-300)
