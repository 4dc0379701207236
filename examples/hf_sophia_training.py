"""A Hugging Face model trained in train mode with SophiaDiagonal, its curvature refreshed every k steps by one call
that also leaves the gradient (backward=True), against Adam; and the same under DistributedDataParallel.

    python examples/hf_sophia_training.py               # 300 steps, the GGN diagonal every 10 steps, one process
    python examples/hf_sophia_training.py --ddp 2       # the same with 2 gloo processes, each half of every batch

The model is transformers' BertForSequenceClassification from a tiny configuration (random init: width 32, 2
layers, 2 heads), in train mode with dropout 0.1 in its hidden layers (the engine computes the diagonal for the
masks of the call's own forward; attention dropout is 0: under dropout the attention has no exact rule yet and the
call would fall back to the generic method). It is called as people call it: a dict batch {input_ids,
attention_mask}, the loss a function of the model's output (cross-entropy on out.logits). The data is the token
task of examples/synthetic.py. Both optimizers start from the same weights and see the same mini-batches.
Under --ddp, each process wraps the model in DistributedDataParallel; on curvature steps all_reduce=True gives
every process the global batch's diagonal and gradient, on the others backward() goes through the wrapper.

Writes OUT/hf_sophia_training.json: loss curves, final training loss, test accuracy and wall time per optimizer.
"""

import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from synthetic import example_parser, parse_example_arguments, positive_int, token_majority, train_and_test

from torch_secorder import model_ggn_diagonal
from torch_secorder.optim import SophiaDiagonal

LENGTH, VOCAB, CLASSES = 12, 16, 4
# the best by final training loss of those tried once: Adam {1e-3, 3e-3, 1e-2}, Sophia {1e-4, 3e-4, 1e-3, 3e-3}
LEARNING_RATES = {"adam": 1e-2, "sophia": 1e-3}


def bert(seed):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=CLASSES,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def loss_on_logits(out, labels):  # the loss as people write it for a Hugging Face model
    return F.cross_entropy(out.logits, labels)


def batch_of(tokens):
    return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}


def train(name, args, rank=0, world=1):
    """Trains one model; under DDP (world > 1) this process's share of every batch."""
    train_x, train_y, test_x, test_y = train_and_test(
        lambda samples, generator: token_majority(samples, LENGTH, VOCAB, CLASSES, generator), args, "cpu"
    )
    model = bert(args.seed)
    model.train()
    params = list(model.parameters())
    if name == "adam":
        optimizer = torch.optim.Adam(params, lr=LEARNING_RATES[name])
    else:
        optimizer = SophiaDiagonal(params, lr=LEARNING_RATES[name], rho=0.04, update_every=args.update_every)
    called = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    batches = torch.Generator().manual_seed(args.seed + 1)  # the same mini-batches in every run and process
    torch.manual_seed(args.seed + 2 + rank)  # dropout masks: each process its own
    share = args.batch_size // world
    losses, curvature_seconds = [], 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        picked = torch.randint(0, args.train_samples, (args.batch_size,), generator=batches)
        picked = picked[rank * share : (rank + 1) * share]
        inputs, labels = batch_of(train_x[picked]), train_y[picked]
        optimizer.zero_grad()
        curvature_step = name == "sophia" and optimizer.curvature_due()
        if curvature_step:
            started = time.perf_counter()
            # one call: the GGN diagonal, and the gradient in .grad as backward() would leave it (both of the
            # global batch under DDP)
            loss, diagonal = model_ggn_diagonal(
                called, loss_on_logits, inputs, labels, backward=True, all_reduce=world > 1
            )
            optimizer.update_curvature(diagonal)
            curvature_seconds += time.perf_counter() - started
        else:
            loss = loss_on_logits(called(**inputs), labels)
            loss.backward()
        optimizer.step()
        loss = loss.detach()
        if world > 1 and not (name == "sophia" and curvature_step):  # the log shows the global batch's loss
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        train_loss = loss_on_logits(model(**batch_of(train_x)), train_y).item()
        accuracy = (model(**batch_of(test_x)).logits.argmax(1) == test_y).double().mean().item()
    return dict(
        losses=losses,
        train_loss=train_loss,
        test_accuracy=accuracy,
        seconds=seconds,
        curvature_seconds=curvature_seconds,
        lr=LEARNING_RATES[name],
        processes=world,
    )


def _process(rank, world, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on the cores there are
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run = train("sophia", args, rank, world)
        if rank == 0:
            results["sophia"] = run
    finally:
        dist.destroy_process_group()


def train_distributed(args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_process, args=(args.ddp, port, args, results), nprocs=args.ddp, join=True)
        return dict(results)["sophia"]


def main(argv=None):
    parser = example_parser(__doc__, train_samples=2048, test_samples=512)
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--update-every", type=positive_int, default=10)
    parser.add_argument("--ddp", type=positive_int, default=1, help="gloo processes (Sophia only)")
    args, _ = parse_example_arguments(parser, argv)
    if args.batch_size % args.ddp:
        parser.error(f"--batch-size {args.batch_size} does not split into {args.ddp} equal shares")
    if args.ddp > 1:
        results = {"sophia": train_distributed(args)}
    else:
        results = {name: train(name, args) for name in ("adam", "sophia")}
    for name, run in results.items():
        print(
            f"{name:6s} ({run['processes']} process(es)): final training loss {run['train_loss']:.3f}, "
            f"test accuracy {run['test_accuracy']:.3f}, {run['seconds']:.1f} s "
            f"({run['curvature_seconds']:.1f} s in curvature steps)"
        )
    path = os.path.join(args.out, "hf_sophia_training.json")
    with open(path, "w") as handle:
        json.dump({"arguments": vars(args), "results": results}, handle, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    sys.exit(main())
