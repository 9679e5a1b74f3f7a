"""The compiled kernels' cache of large output buffers (csrc/outputs.cpp): y and dx of 4 MiB and
more take buffers that earlier outputs freed. What must hold: a reused buffer changes no value
(its old contents never show), outputs keep every layout and behave as any tensor (resize_, save,
numpy, shared memory), the limit bounds what is held, bad limits are refused, and the cache is
safe under threads, fork and the memory profiler.

Every test calls the compiled ops directly (the ``ops`` fixture) and reads the cache's counters
(torch_bn.cpp.output_cache_info), so each one checks the path it means to.
"""
import io
import multiprocessing
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_bn import cpp

from helpers import float64_reference

EPS = 1e-5
MiB = 2**20


class Cache:
    """torch_bn.cpp's cache functions, with hits and misses counted from the test's start (the
    process's counters include every earlier test's)."""

    def __init__(self):
        cpp.empty_output_cache()
        self.start = cpp.output_cache_info()

    def output_cache_info(self):
        info = cpp.output_cache_info()
        return info | {k: info[k] - self.start[k] for k in ("hits", "misses")}

    set_output_cache_limit = staticmethod(cpp.set_output_cache_limit)
    empty_output_cache = staticmethod(cpp.empty_output_cache)


@pytest.fixture
def cache(ops):
    """The cache, emptied before and after the test, with the default limit restored."""
    limit = cpp.output_cache_info()["limit_bytes"]
    yield Cache()
    cpp.set_output_cache_limit(limit)
    cpp.empty_output_cache()


def inputs(shape, dtype=torch.float32, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    w = torch.linspace(0.5, 2.0, shape[1])
    b = torch.linspace(-1.0, 1.0, shape[1])
    return x, dy, w, b


def run(ops, x, dy, w, b):
    y, mean, _var, rstd = ops.forward(x, w, b, None, None, None, 0.1, EPS)
    dx, _dw, _db = ops.backward(dy, x, w, mean, rstd, True)
    return y, dx


def test_reused_buffers_give_the_same_values_and_never_show_old_contents(cache, ops):
    x, dy, w, b = inputs((4096, 300))  # y and dx of 4.7 MiB each
    y64 = float64_reference(x, w, b, EPS)
    y, dx = run(ops, x, dy, w, b)
    assert cache.output_cache_info()["misses"] == 2
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-5)
    first_y, first_dx = y.clone(), dx.clone()
    y.fill_(float("nan"))  # what a reused buffer holds when it comes back
    dx.fill_(float("nan"))
    del y, dx
    assert cache.output_cache_info()["cached_bytes"] >= 2 * x.nbytes
    for _ in range(3):
        y, dx = run(ops, x, dy, w, b)
        assert torch.equal(y, first_y) and torch.equal(dx, first_dx)
        y.fill_(float("nan"))
        dx.fill_(float("nan"))
        del y, dx
    info = cache.output_cache_info()
    assert (info["hits"], info["misses"]) == (6, 2)


def test_only_outputs_of_4_mib_and_more_are_cached(cache, ops):
    below = inputs((1024, 1023))[0]  # 4 MiB less 4 KiB
    at = inputs((1024, 1024))[0]  # exactly 4 MiB
    ops.forward(below, None, None, None, None, None, 0.1, EPS)
    assert cache.output_cache_info()["misses"] == 0 and cache.output_cache_info()["cached_bytes"] == 0
    ops.forward(at, None, None, None, None, None, 0.1, EPS)
    assert cache.output_cache_info()["misses"] == 1 and cache.output_cache_info()["cached_bytes"] == 4 * MiB


@pytest.mark.parametrize("shape", [(32, 40, 32, 32), (8, 20, 16, 16, 32)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cached_outputs_keep_the_input_layout(cache, ops, shape, channels_last):
    x, dy, w, b = inputs(shape, channels_last=channels_last)
    for _ in range(2):  # a new buffer, then a reused one
        y, dx = run(ops, x, dy, w, b)
        assert y.stride() == torch.empty_like(x).stride() == dx.stride()
        torch.testing.assert_close(y, F.batch_norm(x, None, None, w, b, training=True, eps=EPS), rtol=1e-5,
                                   atol=2e-5)
        del y, dx
    assert cache.output_cache_info()["hits"] == 2


def test_cached_outputs_behave_as_any_tensor(cache, ops, tmp_path):
    x, dy, w, b = inputs((4096, 300))
    y, _ = run(ops, x, dy, w, b)
    expected = y.clone()
    buffer = io.BytesIO()
    torch.save(y, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), expected)
    array = y.numpy()  # a view that keeps the buffer alive after the tensor is gone
    del y
    assert np.array_equal(array, expected.numpy())
    y, _ = run(ops, x, dy, w, b)
    y.resize_(8192, 300)  # larger: a new buffer from the cache's allocator, the old values kept
    assert torch.equal(y[:4096], expected)
    y.resize_(10)
    assert torch.equal(y, expected.view(-1)[:10])
    y, _ = run(ops, x, dy, w, b)
    y.share_memory_()  # (a shared tensor is never resized: PyTorch itself crashes there, ours or not)
    assert y.is_shared() and torch.equal(y, expected)


def test_the_limit_bounds_what_is_held(cache, ops):
    x, dy, w, b = inputs((4096, 300))
    cache.set_output_cache_limit(0)
    y, dx = run(ops, x, dy, w, b)
    del y, dx
    info = cache.output_cache_info()
    assert info["cached_bytes"] == 0 and info["limit_bytes"] == 0 and info["misses"] == 2
    cache.set_output_cache_limit(6 * MiB)  # room for one 6 MiB buffer (4.7 MiB rounded up to 2 MiB)
    y, dx = run(ops, x, dy, w, b)
    del y, dx
    assert cache.output_cache_info()["cached_bytes"] == 6 * MiB
    assert cache.set_output_cache_limit(4 * MiB) == 6 * MiB  # frees it, says how much
    assert cache.output_cache_info()["cached_bytes"] == 0


def test_empty_output_cache_gives_everything_back_and_keeps_the_limit(cache, ops):
    x, dy, w, b = inputs((4096, 300))
    y, dx = run(ops, x, dy, w, b)
    del y, dx
    assert cache.empty_output_cache() == 12 * MiB
    info = cache.output_cache_info()
    assert info["cached_bytes"] == 0 and info["limit_bytes"] == 2**30


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GB", None])
def test_a_bad_limit_is_refused(cache, bad):
    with pytest.raises(ValueError, match="number of bytes >= 0"):
        cache.set_output_cache_limit(bad)
    with pytest.raises(RuntimeError, match="number of bytes >= 0, got -1"):
        torch.ops.torch_bn_cpp.set_output_cache_limit(-1)


def test_threads_share_the_cache_safely(cache, ops):
    shapes = [(4096, 300), (4096, 400), (2048, 700), (4096, 300)]
    expected = [run(ops, *inputs(s, seed=i)) for i, s in enumerate(shapes)]
    failures = []

    def work(i):
        args = inputs(shapes[i], seed=i)
        for _ in range(10):
            y, dx = run(ops, *args)
            if not (torch.equal(y, expected[i][0]) and torch.equal(dx, expected[i][1])):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shapes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert cache.output_cache_info()["hits"] >= 60


def _child(queue):
    # A forked child cannot use its parent's OpenMP threads (native batch norm hangs there too):
    # it runs on one thread, as DataLoader workers do.
    torch.set_num_threads(1)
    hits = cpp.output_cache_info()["hits"]
    x = inputs((4096, 300))[0]
    y = torch.ops.torch_bn_cpp.batch_norm_forward(x, None, None, None, None, None, 0.1, EPS)[0]
    queue.put((y.double().abs().sum().item(), cpp.output_cache_info()["hits"] - hits))


def test_a_forked_child_uses_the_cache(cache, ops):
    x = inputs((4096, 300))[0]
    y = ops.forward(x, None, None, None, None, None, 0.1, EPS)[0]
    expected = y.double().abs().sum().item()
    del y  # the child inherits the held buffer
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    total, hits = queue.get(timeout=5)
    assert hits == 1
    assert total == pytest.approx(expected, rel=1e-6)


def test_the_memory_profiler_sees_cached_outputs(cache, ops):
    x = inputs((4096, 300))[0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        y = ops.forward(x, None, None, None, None, None, 0.1, EPS)[0]
        del y
    (row,) = [e for e in prof.key_averages() if e.key == "torch_bn_cpp::batch_norm_forward"]
    assert row.cpu_memory_usage >= x.nbytes  # y, 2 MiB-rounded, plus the (C,) statistics
