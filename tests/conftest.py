import os
import runpy

import pytest
import torch

# torchvision's model definitions where its C ops cannot load against this torch; the examples' subprocesses get the
# same through PYTHONPATH (tests/test_examples.py)
runpy.run_path(os.path.join(os.path.dirname(__file__), "torchvision_loader", "sitecustomize.py"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
