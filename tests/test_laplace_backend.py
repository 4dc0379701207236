"""The laplace-torch backends against laplace's own (skipped without laplace-torch: pip install
'torch-secorder[laplace]')."""

import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN  # noqa: E402

from torch_secorder.integrations.laplace import SecorderGGN, SecorderHessian  # noqa: E402
from torch_secorder.testing import dense_hessian_diagonal, model_loss_of_params  # noqa: E402

D = torch.float64


def problem(likelihood):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4 if likelihood == "classification" else 2))
    x = torch.randn(24, 3, dtype=D)
    y = torch.randint(0, 4, (24,)) if likelihood == "classification" else torch.randn(24, 2, dtype=D)
    return model.double(), DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("subset", ["all", "last_layer", "subnetwork"])
def test_the_ggn_backend_matches_laplace_own_ggn(likelihood, subset):
    model, loader = problem(likelihood)
    extra = {}
    if subset == "subnetwork":
        extra["subnetwork_indices"] = torch.tensor([0, 3, 7, 20, 30, 37])
    fits = []
    for backend in (SecorderGGN, CurvlinopsGGN):
        la = Laplace(model, likelihood, subset_of_weights=subset, hessian_structure="diag", backend=backend, **extra)
        with warnings.catch_warnings():
            if backend is SecorderGGN:
                warnings.simplefilter("error")  # every setting runs through the engine, no fallback
            la.fit(loader)
        fits.append(la)
    ours, theirs = fits
    assert torch.allclose(ours.H, theirs.H, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ours.loss, theirs.loss, rtol=1e-12)


def test_the_hessian_backend_is_the_exact_hessian_diagonal_of_the_summed_loss():
    model, loader = problem("classification")
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", backend=SecorderHessian)
    la.fit(loader)
    x, y = loader.dataset.tensors
    expected = dense_hessian_diagonal(
        model_loss_of_params(model, nn.CrossEntropyLoss(reduction="sum"), x, y), list(model.parameters())
    )
    assert torch.allclose(la.H, torch.cat([e.reshape(-1) for e in expected]), rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:By default `link_approx` is `probit`")  # laplace-torch's own notice
def test_fit_predict_and_marginal_likelihood_prior_optimisation_end_to_end():
    model, loader = problem("classification")
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", backend=SecorderGGN)
    la.fit(loader)
    before = float(la.log_marginal_likelihood())
    la.optimize_prior_precision(method="marglik", n_steps=50)
    assert float(la.log_marginal_likelihood()) >= before - 1e-9
    probabilities = la(loader.dataset.tensors[0][:5], pred_type="glm", link_approx="probit")
    assert probabilities.shape == (5, 4) and torch.allclose(probabilities.sum(1), torch.ones(5, dtype=D))
    assert bool((la.posterior_variance > 0).all())  # the GGN keeps the posterior variances positive


class MappingBatches(torch.utils.data.Dataset):
    """Hugging Face-style batches: each item a mapping, collated into a UserDict (as BatchEncoding is)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return {"features": self.x[index], "labels": self.y[index]}


def collate_user_dict(items):
    from collections import UserDict

    return UserDict({key: torch.stack([item[key] for item in items]) for key in items[0]})


class ReadsFeatures(nn.Module):
    """A forward that takes the whole mapping, as laplace calls it: model(batch)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch["features"])


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_mapping_batches_are_passed_to_the_model_whole_as_laplace_does(likelihood, subset):
    net, loader = problem(likelihood)
    x, y = loader.dataset.tensors
    batches = DataLoader(MappingBatches(x, y), batch_size=8, collate_fn=collate_user_dict)
    model = ReadsFeatures(net)
    fits = []
    for backend in (SecorderGGN, CurvlinopsGGN):
        la = Laplace(
            model,
            likelihood,
            subset_of_weights=subset,
            hessian_structure="diag",
            backend=backend,
            dict_key_x="features",
            dict_key_y="labels",
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            la.fit(batches)
        fits.append(la)
        if backend is SecorderGGN:
            ours_warnings = [str(w.message) for w in caught if "torch_secorder" in str(w.message)]
            if subset == "all":  # the engine takes one tensor: the generic method, exact, said once for 3 batches
                assert len(ours_warnings) == 1 and "a model input that is a UserDict" in ours_warnings[0]
            else:  # the last layer runs on the features: the engine
                assert ours_warnings == []
    ours, theirs = fits
    assert torch.allclose(ours.H, theirs.H, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ours.loss, theirs.loss, rtol=1e-12)
