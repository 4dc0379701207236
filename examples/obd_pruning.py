"""Optimal Brain Damage pruning with exact Hessian diagonals (LeCun et al., 1990).

    python examples/obd_pruning.py
    python examples/obd_pruning.py --device cuda

Trains the small CNN of sophia_training.py on the CIFAR-size synthetic images, computes the exact Hessian
diagonal and the exact GGN diagonal of the training loss at the trained weights, and prunes the weights
(biases are kept) with the lowest saliency 0.5 * H_ii * w_i^2 in each weight tensor, at several
sparsities, against pruning by magnitude |w_i|. No fine-tuning after pruning, so the numbers show the ranking alone.
--scope global ranks across all weight tensors instead. OBD's quadratic
model holds for small changes: it beats magnitude pruning at moderate sparsity and can lose to it when most
weights go. For this ReLU network the Hessian and GGN diagonals coincide (the network's second derivatives vanish
almost everywhere, which the example checks); with smooth activations they differ, the Hessian may have
negative entries (OBD's model assumes a minimum) and the GGN diagonal is never negative.

Writes OUT/obd_pruning.json with the accuracies and losses.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from synthetic import (
    accuracy,
    cifar_like,
    example_parser,
    parse_example_arguments,
    positive_int,
    small_cnn,
    train_and_test,
)

from torch_secorder import model_ggn_diagonal, model_hessian_diagonal


def fraction(text):
    """argparse type: the fraction of weights to remove, in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def pruned_copy_state(model, scores, sparsity, per_layer):
    """The model's state with the `sparsity` fraction of weight entries of lowest score set to zero, in each
    weight tensor (per_layer) or across all of them."""
    weights = [name for name, p in model.named_parameters() if p.dim() > 1]
    groups = [[name] for name in weights] if per_layer else [weights]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for group in groups:
        flat = torch.cat([scores[name].reshape(-1) for name in group])
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[: int(sparsity * flat.numel())]] = False
        offset = 0
        for name in group:
            count = state[name].numel()
            state[name] *= keep[offset : offset + count].reshape(state[name].shape)
            offset += count
    return state


def main(argv=None):
    parser = example_parser(__doc__, train_samples=2048, test_samples=512)
    parser.add_argument("--sparsities", type=fraction, nargs="+", default=[0.3, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--steps", type=positive_int, default=400)
    parser.add_argument(
        "--scope",
        choices=["layer", "global"],
        default="layer",
        help="rank within each weight tensor (default) or across all of them",
    )
    args, device = parse_example_arguments(parser, argv)

    train_x, train_y, test_x, test_y = train_and_test(cifar_like, args, device)
    torch.manual_seed(args.seed)
    model = small_cnn().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.steps):
        batch = torch.randint(0, args.train_samples, (64,), generator=batches).to(device)
        optimizer.zero_grad()
        F.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
        optimizer.step()
    model.eval()

    started = time.perf_counter()
    hessian = model_hessian_diagonal(model, F.cross_entropy, train_x, train_y)
    hessian_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ggn = model_ggn_diagonal(model, F.cross_entropy, train_x, train_y)
    ggn_seconds = time.perf_counter() - started
    named = [name for name, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    scores = {
        "magnitude": {name: params[name].detach().abs() for name in named},
        "obd_hessian": {name: 0.5 * h * params[name].detach() ** 2 for name, h in zip(named, hessian)},
        "obd_ggn": {name: 0.5 * g * params[name].detach() ** 2 for name, g in zip(named, ggn)},
    }
    negative = sum((h < 0).sum().item() for h in hessian)
    hessian_vs_ggn = max(((h - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for h, g in zip(hessian, ggn))
    total = sum(h.numel() for h in hessian)

    def evaluate():
        with torch.no_grad():
            return dict(
                test_accuracy=accuracy(model, test_x, test_y),
                train_loss=F.cross_entropy(model(train_x), train_y).item(),
            )

    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = evaluate()
    print(
        f"dense CNN: test accuracy {dense['test_accuracy']:.3f}, train loss {dense['train_loss']:.3f}; "
        f"exact Hessian diagonal {hessian_seconds:.2f} s ({negative} of {total} entries negative), "
        f"GGN diagonal {ggn_seconds:.2f} s (largest relative difference {hessian_vs_ggn:.1e}), "
        f"over {args.train_samples} samples"
    )
    print(
        f"{'sparsity':>9} | {'test accuracy: magnitude':>24} {'OBD (Hessian)':>14} {'OBD (GGN)':>10} | "
        f"{'train loss: magnitude':>21} {'OBD (Hessian)':>14} {'OBD (GGN)':>10}"
    )
    rows = []
    for sparsity in args.sparsities:
        row = dict(sparsity=sparsity)
        for method, score in scores.items():
            model.load_state_dict(pruned_copy_state(model, score, sparsity, args.scope == "layer"))
            row[method] = evaluate()
            model.load_state_dict(dense_state)
        rows.append(row)
        print(
            f"{sparsity:>9.2f} | {row['magnitude']['test_accuracy']:>24.3f} "
            f"{row['obd_hessian']['test_accuracy']:>14.3f} {row['obd_ggn']['test_accuracy']:>10.3f} | "
            f"{row['magnitude']['train_loss']:>21.3f} {row['obd_hessian']['train_loss']:>14.3f} "
            f"{row['obd_ggn']['train_loss']:>10.3f}"
        )
    with open(os.path.join(args.out, "obd_pruning.json"), "w") as f:
        json.dump(
            dict(
                arguments=vars(args),
                dense=dense,
                rows=rows,
                negative_hessian_entries=negative,
                hessian_vs_ggn=hessian_vs_ggn,
                entries=total,
                hessian_seconds=hessian_seconds,
                ggn_seconds=ggn_seconds,
            ),
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
