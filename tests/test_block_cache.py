"""The CPU block cache (torch_secorder.memory): same numbers with and without it, reuse between calls, its bounds,
and nothing outside our calls goes through it."""

import threading

import pytest
import torch
import torch.nn as nn

import torch_secorder as ts
from torch_secorder import memory

pytestmark = pytest.mark.skipif(not ts.ops.compiled_ops_loaded(), reason="the cache lives in the compiled module")

MIB = 1 << 20


@pytest.fixture(autouse=True)
def fresh_cache():
    memory.set_cache_limit(1 << 30)
    memory.empty_cache()
    yield
    memory.set_cache_limit(1 << 30)
    memory.empty_cache()


def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 10))  # per-sample result: 16 MiB at N=128
    return model, nn.CrossEntropyLoss(), torch.randn(128, 256), torch.randint(0, 10, (128,))


def cnn_problem():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    return model, nn.CrossEntropyLoss(), torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))


def per_sample_ggn(problem):
    model, loss_fn, x, y = problem
    return ts.model_ggn_diagonal(model, loss_fn, x, y, method="backprop", per_sample=True)


@pytest.mark.parametrize("make", [mlp_problem, cnn_problem])
def test_results_are_bitwise_the_same_with_and_without_the_cache(make):
    problem = make()
    per_sample_ggn(problem)  # dropped: the next call reuses its blocks
    cached = [per_sample_ggn(problem) for _ in range(2)]
    assert memory.cache_info()["hits"] > 0
    memory.set_cache_limit(0)
    memory.empty_cache()
    uncached = per_sample_ggn(problem)
    for run in cached:
        for a, b in zip(run, uncached):
            assert torch.equal(a, b)
    # and the numbers are the engine's: the summed diagonal equals the non-per-sample call
    summed = ts.model_ggn_diagonal(*problem, method="backprop")
    for per_sample, total in zip(cached[-1], summed):
        torch.testing.assert_close(per_sample.sum(0), total, rtol=1e-5, atol=1e-7)


def test_a_repeated_call_reuses_the_blocks_of_the_previous_one():
    problem = mlp_problem()
    per_sample_ggn(problem)
    per_sample_ggn(problem)
    before = memory.cache_info()
    per_sample_ggn(problem)
    after = memory.cache_info()
    assert after["misses"] == before["misses"]
    assert after["hits"] > before["hits"]
    assert after["free_bytes"] >= 16 * MIB  # the dropped per-sample result went back to the cache


def test_results_the_caller_keeps_stay_valid_after_empty_cache():
    problem = mlp_problem()
    kept = per_sample_ggn(problem)
    copy = [t.clone() for t in kept]
    assert memory.cache_info()["live_bytes"] >= 16 * MIB
    memory.empty_cache()  # frees only free blocks: kept's storage is live
    per_sample_ggn(problem)  # would overwrite kept if its block had been handed out again
    for a, b in zip(kept, copy):
        assert torch.equal(a, b)
    del kept
    assert memory.cache_info()["live_bytes"] == 0


def test_the_limit_bounds_the_free_bytes_and_zero_turns_caching_off():
    problem = mlp_problem()
    memory.set_cache_limit(4 * MIB)
    for _ in range(3):
        per_sample_ggn(problem)
        assert memory.cache_info()["free_bytes"] <= 4 * MIB
    memory.set_cache_limit(0)
    assert memory.cache_info()["free_bytes"] == 0
    per_sample_ggn(problem)
    assert memory.cache_info()["free_bytes"] == 0


def test_free_and_live_cached_bytes_stay_within_three_halves_of_the_live_peak():
    for make in (cnn_problem, mlp_problem):
        problem = make()
        for _ in range(4):
            ts.model_hessian_diagonal(*problem, method="backprop", per_sample=True)
            ts.model_ggn_diagonal(*problem, method="backprop")
            info = memory.cache_info()
            assert info["free_bytes"] + info["live_bytes"] <= 1.5 * info["live_peak_bytes"]
    memory.empty_cache()
    assert memory.cache_info()["free_bytes"] == 0
    assert memory.cache_info()["live_peak_bytes"] == memory.cache_info()["live_bytes"] == 0


def test_allocations_outside_our_calls_do_not_go_through_the_cache():
    per_sample_ggn(mlp_problem())
    before = memory.cache_info()
    big = [torch.empty(8 * MIB) for _ in range(4)]  # 32 MiB each
    big[0].fill_(1.0)
    del big
    after = memory.cache_info()
    assert (after["hits"], after["misses"], after["free_bytes"]) == (
        before["hits"],
        before["misses"],
        before["free_bytes"],
    )


def test_blocks_freed_on_another_thread_go_back_to_the_cache():
    problem = mlp_problem()
    result = per_sample_ggn(problem)
    holder = [result]
    del result
    free_before = memory.cache_info()["free_bytes"]
    thread = threading.Thread(target=holder.clear)
    thread.start()
    thread.join()
    assert memory.cache_info()["free_bytes"] > free_before


def test_concurrent_calls_from_two_threads_give_the_single_threaded_numbers():
    problems = [mlp_problem(), cnn_problem()]
    expected = [per_sample_ggn(p) for p in problems]
    results = [[None] * 3 for _ in problems]

    def work(index):
        for repeat in range(3):
            results[index][repeat] = per_sample_ggn(problems[index])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, runs in enumerate(results):
        for run in runs:
            for a, b in zip(run, expected[index]):
                assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [-1, 1.5, "1GiB", True, None])
def test_a_bad_limit_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="limit must be a number of bytes"):
        memory.set_cache_limit(bad)


OUT_OF_MEMORY_SCRIPT = """
import resource, torch, torch.nn as nn
import torch_secorder as ts
from torch_secorder import memory
torch.manual_seed(0)
x = torch.randn(40, 2048)
big, small = nn.Linear(2048, 1024), nn.Linear(2048, 400)  # per-sample weight diagonals: 320 MiB, 125 MiB
# two results alive at once, then dropped: 640 MiB free, kept (the live peak was as high)
kept = [ts.model_ggn_diagonal(big, nn.MSELoss(), x, torch.zeros(40, 1024), per_sample=True, method="backprop")
        for _ in range(2)]
del kept
free_before = memory.cache_info()["free_bytes"]
with open("/proc/self/status") as status:
    size = [int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize")][0]
# 125 MiB no longer fits, and the free 320 MiB blocks are too large for it to take (at most twice its size)
resource.setrlimit(resource.RLIMIT_AS, (size + (100 << 20), resource.RLIM_INFINITY))
per_sample = ts.model_ggn_diagonal(small, nn.MSELoss(), x, torch.zeros(40, 400), per_sample=True, method="backprop")
summed = ts.model_ggn_diagonal(small, nn.MSELoss(), x, torch.zeros(40, 400), method="backprop")
print(free_before, memory.cache_info()["free_bytes"], float((per_sample[0].sum(0) - summed[0]).abs().max()))
"""


def test_when_the_system_refuses_memory_the_free_blocks_are_handed_back_first():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    free_before, free_after, difference = result.stdout.split()
    assert int(free_before) >= 600 * MIB and int(free_after) == 0
    assert float(difference) < 1e-6
