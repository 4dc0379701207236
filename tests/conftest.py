import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def relative_error(actual, expected):
    """max |actual - expected| / max(|expected|, tiny): one number for a whole tensor (or list of them)."""
    if isinstance(actual, (list, tuple)):
        return max((relative_error(a, e) for a, e in zip(actual, expected)), default=0.0)
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-300)
    return (actual - expected).abs().max().item() / scale if expected.numel() else 0.0
