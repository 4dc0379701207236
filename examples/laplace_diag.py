"""A diagonal Laplace approximation with laplace-torch and torch_secorder's exact GGN diagonal.

    pip install "torch-secorder[laplace]"
    python examples/laplace_diag.py                  # --backend hessian: the exact Hessian diagonal

Trains an MLP classifier on noisy synthetic data (overlapping Gaussian blobs), fits
Laplace(model, "classification", hessian_structure="diag", backend=SecorderGGN), tunes the prior precision
by the marginal likelihood, and compares the MAP network's predictions with the Laplace predictive (probit)
on held-out data (negative log-likelihood, calibration error) and on far-away inputs (confidence), where a
MAP network is overconfident. Writes OUT/laplace_diag.json.
"""

import json
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from laplace import Laplace
except ImportError:
    sys.exit("this example needs laplace-torch: pip install 'torch-secorder[laplace]'")
from synthetic import example_parser, parse_example_arguments, positive_int

from torch_secorder.integrations.laplace import SecorderGGN, SecorderHessian


def blobs(samples, classes, generator):
    centres = 1.5 * torch.randn(classes, 2, generator=generator)
    labels = torch.randint(0, classes, (samples,), generator=generator)
    return centres[labels] + torch.randn(samples, 2, generator=generator), labels


def calibration_error(probabilities, labels, bins=10):
    """Expected calibration error: |accuracy - confidence| per confidence bin, weighted by the bin's size."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.double().mean() * (correct[inside].mean() - confidence[inside].double().mean()).abs()
    return float(error)


def summary(probabilities, labels, far_probabilities):
    return dict(
        nll=F.nll_loss(probabilities.clamp_min(1e-12).log(), labels).item(),
        accuracy=(probabilities.argmax(1) == labels).double().mean().item(),
        ece=calibration_error(probabilities, labels),
        far_confidence=far_probabilities.max(dim=1).values.mean().item(),
    )


def main(argv=None):
    parser = example_parser(__doc__, train_samples=1000, test_samples=1000)
    parser.add_argument("--backend", choices=["ggn", "hessian"], default="ggn")
    parser.add_argument("--classes", type=positive_int, default=4)
    parser.add_argument("--epochs", type=positive_int, default=100)
    args, device = parse_example_arguments(parser, argv)

    generator = torch.Generator().manual_seed(args.seed)
    x, y = blobs(args.train_samples + args.test_samples, args.classes, generator)
    x, y = x.to(device), y.to(device)
    train = torch.utils.data.TensorDataset(x[: args.train_samples], y[: args.train_samples])
    test_x, test_y = x[args.train_samples :], y[args.train_samples :]
    far_x = 12.0 * F.normalize(torch.randn(500, 2, generator=generator), dim=1).to(device)  # far from all data
    loader = torch.utils.data.DataLoader(
        train, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, args.classes)).to(
        device
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.epochs):
        for inputs, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()

    backend = SecorderGGN if args.backend == "ggn" else SecorderHessian
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", backend=backend)
    started = time.perf_counter()
    la.fit(loader)
    fit_seconds = time.perf_counter() - started
    with warnings.catch_warnings():  # laplace reminds that probit is its default, which is what we use
        warnings.filterwarnings("ignore", message="By default `link_approx`")
        la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")

    with torch.no_grad():
        map_result = summary(torch.softmax(model(test_x), 1), test_y, torch.softmax(model(far_x), 1))
    laplace_result = summary(
        la(test_x, pred_type="glm", link_approx="probit"), test_y, la(far_x, pred_type="glm", link_approx="probit")
    )
    prior = la.prior_precision.reshape(-1)[0].item()
    print(
        f"diagonal Laplace ({backend.__name__}): fit over {args.train_samples} samples in {fit_seconds:.2f} s, "
        f"prior precision {prior:.3g} (marginal likelihood), {la.n_params:,} parameters"
    )
    print(f"{'':>10} {'test NLL':>9} {'accuracy':>9} {'ECE':>7} {'confidence far away':>20}")
    for name, result in (("MAP", map_result), ("Laplace", laplace_result)):
        print(
            f"{name:>10} {result['nll']:>9.4f} {result['accuracy']:>9.3f} {result['ece']:>7.4f} "
            f"{result['far_confidence']:>20.3f}"
        )
    with open(os.path.join(args.out, "laplace_diag.json"), "w") as f:
        json.dump(
            dict(
                arguments=vars(args),
                map=map_result,
                laplace=laplace_result,
                prior_precision=prior,
                fit_seconds=fit_seconds,
            ),
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
