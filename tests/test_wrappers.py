"""Wrappers as training loops hold models: DataParallel, AveragedModel (EMA / SWA), torch.compile, DDP (two gloo
processes), a class whose forward only forwards: the engine runs the module inside, exact, without a warning,
and the diagonals come back in the wrapper's parameters() order."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from helpers import brute_force, relative_error
from test_distributed import free_port
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from torch_secorder import explain_method, model_ggn_diagonal, model_hessian_diagonal

D = torch.float64


def small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4)
    ).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def batch(samples=6):
    generator = torch.Generator().manual_seed(3)
    return torch.randn(samples, 2, 4, 4, generator=generator, dtype=D), torch.randint(
        0, 4, (samples,), generator=generator
    )


class Forwarding(nn.Module):
    """A wrapper as people write them: the forward passes everything on."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def ema(model):
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    with torch.no_grad():  # an average that differs from the model it follows
        for p in model.parameters():
            p.add_(0.1)
    averaged.update_parameters(model)
    return averaged.eval()


def compiled_average_of_data_parallel(model):
    return torch.compile(ema(nn.DataParallel(model)))


WRAPPERS = {  # the wrapper, and the module its forward runs (found by hand: the reference's model)
    "DataParallel": (lambda m: nn.DataParallel(m), lambda w: w.module),
    "AveragedModel": (ema, lambda w: w.module),
    "forwarding class": (Forwarding, lambda w: w.inner),
    "compiled AveragedModel of DataParallel": (compiled_average_of_data_parallel, lambda w: w._orig_mod.module.module),
}


@pytest.mark.parametrize("wrap", list(WRAPPERS))
@pytest.mark.parametrize("function", [model_hessian_diagonal, model_ggn_diagonal], ids=["hessian", "ggn"])
def test_a_wrapper_runs_its_module_on_the_engine(wrap, function):
    make, inner = WRAPPERS[wrap]
    wrapper = make(small_cnn())
    x, y = batch()
    assert explain_method(wrapper, F.cross_entropy, x, targets=y).method == "backprop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = function(wrapper, F.cross_entropy, x, y, flat=True, method="backprop")
        listed = function(wrapper, F.cross_entropy, x, y)
    reference = function(wrapper, F.cross_entropy, x, y, flat=True, method="autograd")
    assert relative_error(flat, reference) < 1e-10
    assert [d.shape for d in listed] == [p.shape for p in wrapper.parameters()]
    if function is model_hessian_diagonal:
        expected = brute_force(inner(wrapper), F.cross_entropy, x, y)  # the same parameters, the same loss
        assert relative_error(listed, expected) < 1e-10


def test_a_wrapper_with_a_hook_of_its_own_keeps_it():
    """The hook runs in the wrapper's forward: what the engine or the generic method computes includes it."""
    wrapper = AveragedModel(small_cnn()).eval()
    wrapper.register_forward_hook(lambda module, args, out: out * torch.linspace(0.5, 2.0, 4, dtype=D))
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # engine or generic: both must give the hooked loss's numbers
        result = model_hessian_diagonal(wrapper, F.cross_entropy, x, y)
    assert relative_error(result, brute_force(wrapper, F.cross_entropy, x, y)) < 1e-10
    plain = brute_force(wrapper.module, F.cross_entropy, x, y)
    assert relative_error(result, plain) > 1e-3  # the hook changed the loss


class ScalesInPlace(Forwarding):
    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        out.mul_(2.0)  # the child's output, changed after the child returned it: part of the loss
        return out


class ScalesTheInputInPlace(Forwarding):
    def forward(self, *args, **kwargs):
        args[0].mul_(2.0)
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("wrapper", [ScalesInPlace, ScalesTheInputInPlace])
def test_a_forwarding_wrapper_that_writes_in_place_is_not_unwrapped(wrapper):
    from torch_secorder.core._validation import model_to_run

    model = wrapper(small_cnn())
    x, _ = batch()
    assert model_to_run(model, x.clone()) is model


def test_a_forwarding_wrapper_in_train_mode_keeps_the_draw_and_threads_see_no_hook():
    """Found without running its forward: the dropout mask is the one the model's next forward would draw, and
    calls from several threads at once all run the engine (no probe hook for another thread's trace to see)."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double().train()
    wrapper = Forwarding(inner)
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(5)
        result = model_hessian_diagonal(wrapper, F.cross_entropy, x, y)
        torch.manual_seed(5)
        assert relative_error(result, brute_force(inner, F.cross_entropy, x, y)) < 1e-10
        inner.eval()
        expected = brute_force(inner, F.cross_entropy, x, y)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: model_hessian_diagonal(wrapper, F.cross_entropy, x, y), range(8)))
    assert max(relative_error(r, expected) for r in results) < 1e-10


def test_data_parallel_over_several_devices_in_train_mode_is_not_unwrapped():
    from torch_secorder.core._validation import unwrapped

    wrapper = nn.DataParallel(small_cnn())
    wrapper.device_ids = [0, 1]  # what two GPUs would give: each replica sees its own part of the batch
    assert unwrapped(wrapper.eval()) is wrapper.module
    assert unwrapped(wrapper.train()) is wrapper
    wrapper.device_ids, wrapper.src_device_obj = [0], torch.device("cuda", 0)  # one GPU, inputs on the CPU
    x, _ = batch()
    assert unwrapped(wrapper, inputs=x) is wrapper and unwrapped(wrapper) is wrapper.module


def test_a_torchscript_model_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    scripted = torch.jit.script(model)
    choice = explain_method(scripted, F.cross_entropy)
    assert choice.method == "autograd" and "TorchScript" in choice.reason, choice
    x, y = torch.randn(5, 3, dtype=D), torch.randint(0, 2, (5,))
    with pytest.warns(RuntimeWarning, match="TorchScript"):
        result = model_hessian_diagonal(scripted, F.cross_entropy, x, y)
    assert relative_error(result, brute_force(model, F.cross_entropy, x, y)) < 1e-10  # it shares model's parameters


# ---------------------------------------------------------------- DistributedDataParallel, two gloo processes
def ddp_rank(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = small_cnn()
        ddp = nn.parallel.DistributedDataParallel(model)
        if rank == 1:  # buffers drifted on this rank: DDP's forward computes with rank 0's
            with torch.no_grad():
                model[1].running_mean.add_(0.3)
        x, y = batch(10)
        part = slice(0, 4) if rank == 0 else slice(4, 10)  # unequal shards: the mean's weights matter
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for name, function in (("hessian", model_hessian_diagonal), ("ggn", model_ggn_diagonal)):
                loss, flat = function(
                    ddp, F.cross_entropy, x[part], y[part], all_reduce=True, return_loss=True, flat=True
                )
                results[(rank, name)] = (float(loss), flat.tolist())
            ddp.zero_grad()  # one call for a curvature step: the global batch's gradient in .grad too
            model_hessian_diagonal(ddp, F.cross_entropy, x[part], y[part], all_reduce=True, backward=True)
            results[(rank, "grad")] = torch.cat([p.grad.flatten() for p in ddp.parameters()]).tolist()
        ddp.train()  # training goes on through the wrapper: its reducer was not left waiting
        for _ in range(2):
            ddp.zero_grad()
            F.cross_entropy(ddp(x[part]), y[part]).backward()
        results[(rank, "trained")] = True
    finally:
        dist.destroy_process_group()


def test_ddp_with_all_reduce_gives_the_whole_batch_diagonal():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(ddp_rank, args=(2, free_port(), results), nprocs=2, join=True)
        results = dict(results)
    model = small_cnn()
    x, y = batch(10)
    for name, function in (("hessian", model_hessian_diagonal), ("ggn", model_ggn_diagonal)):
        loss, expected = function(model, F.cross_entropy, x, y, return_loss=True, flat=True, method="autograd")
        for rank in (0, 1):
            got_loss, got = results[(rank, name)]
            assert abs(got_loss - float(loss)) <= 1e-12 * abs(float(loss))
            error = (torch.tensor(got, dtype=D) - expected).abs().max() / expected.abs().max()
            assert float(error) < 1e-12, (name, rank, float(error))
        assert results[(rank, "trained")]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    whole = torch.cat([p.grad.flatten() for p in model.parameters()])
    for rank in (0, 1):
        error = (torch.tensor(results[(rank, "grad")], dtype=D) - whole).abs().max() / whole.abs().max()
        assert float(error) < 1e-12, (rank, float(error))
