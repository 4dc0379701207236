"""all_reduce=True: two gloo processes on CPU, each with half of the batch, get the full batch's diagonal."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

D = torch.float64
CASES = {
    "ce-mean": (lambda: nn.CrossEntropyLoss(), lambda g: torch.randint(0, 3, (10,), generator=g)),
    "ce-ignore-weighted": (
        lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=D), ignore_index=1),
        lambda g: torch.randint(0, 3, (10,), generator=g),
    ),
    "mse-sum": (lambda: nn.MSELoss(reduction="sum"), lambda g: torch.randn(10, 3, generator=g, dtype=D)),
    "mse-mean": (lambda: F.mse_loss, lambda g: torch.randn(10, 3, generator=g, dtype=D)),
}


def problem(case):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    loss, targets = CASES[case]
    return model, loss(), torch.randn(10, 4, generator=generator, dtype=D), targets(generator)


def shard(rank, world, port, case, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch_secorder import model_ggn_diagonal, model_hessian_diagonal

        model, loss_fn, x, y = problem(case)
        part = slice(0, 3) if rank == 0 else slice(3, 10)  # unequal shards: the weights matter
        for name, function in (("hessian", model_hessian_diagonal), ("ggn", model_ggn_diagonal)):
            loss, flat = function(model, loss_fn, x[part], y[part], all_reduce=True, return_loss=True, flat=True)
            results[(rank, name)] = (float(loss), flat.tolist())
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_whole_batch_diagonal(case):
    from torch_secorder import model_ggn_diagonal, model_hessian_diagonal

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(shard, args=(2, free_port(), case, results), nprocs=2, join=True)
        results = dict(results)
    model, loss_fn, x, y = problem(case)
    for name, function in (("hessian", model_hessian_diagonal), ("ggn", model_ggn_diagonal)):
        loss, expected = function(model, loss_fn, x, y, return_loss=True, flat=True)
        for rank in (0, 1):
            got_loss, got = results[(rank, name)]
            assert abs(got_loss - float(loss)) <= 1e-12 * abs(float(loss))
            error = (torch.tensor(got, dtype=D) - expected).abs().max() / expected.abs().max()
            assert float(error) < 1e-12, (name, rank, float(error))


def test_all_reduce_needs_an_initialised_process_group():
    from torch_secorder import model_hessian_diagonal

    model, loss_fn, x, y = problem("ce-mean")
    with pytest.raises(RuntimeError, match="init_process_group"):
        model_hessian_diagonal(model, loss_fn, x, y, all_reduce=True)
