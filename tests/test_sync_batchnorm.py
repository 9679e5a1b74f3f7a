"""torch_bn.SyncBatchNorm and convert_sync_batchnorm.

The distributed tests run 2 and 3 CPU processes joined by gloo (tests/dist_helpers.py); each rank
normalizes its shard of a global batch, and the parent compares every rank's outputs, input and
parameter gradients and running statistics with single-process torch_bn on the concatenated
batch (float32 within 1e-5, float64 within 1e-10, half precision within one rounding of the
output dtype). Shards are uneven, including a rank with a batch of 1 and one with none.
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torch_bn
from dist_helpers import init_group, run_workers
from torch_bn.functional import batch_norm

ITERATIONS = 2  # two training steps, so the running statistics are updated twice

# One case: dtype, per-rank batch sizes, trailing (spatial) shape; optional module arguments.
CASES = {
    2: [
        dict(dtype=torch.float64, sizes=[5, 3], tail=()),                        # 2D
        dict(dtype=torch.float64, sizes=[4, 1], tail=(3,)),                      # 3D, a rank with batch 1
        dict(dtype=torch.float64, sizes=[3, 0], tail=(2, 3)),                    # 4D, an empty rank
        dict(dtype=torch.float64, sizes=[2, 3], tail=(2, 2, 3), momentum=None),  # 5D, cumulative average
        dict(dtype=torch.float32, sizes=[6, 2], tail=(3, 3), channels_last=True),
        dict(dtype=torch.float32, sizes=[7, 5], tail=(), affine=False),
        dict(dtype=torch.float32, sizes=[4, 4], tail=(5,), track_running_stats=False),
        dict(dtype=torch.bfloat16, sizes=[5, 2], tail=(4, 4)),
        dict(dtype=torch.float16, sizes=[3, 6], tail=()),
    ],
    3: [
        dict(dtype=torch.float64, sizes=[4, 1, 0], tail=()),
        dict(dtype=torch.float64, sizes=[1, 2, 1], tail=(2, 2, 2)),
        dict(dtype=torch.float32, sizes=[2, 3, 5], tail=(3, 4)),
        dict(dtype=torch.float16, sizes=[3, 3, 2], tail=(6,)),
        dict(dtype=torch.bfloat16, sizes=[0, 4, 3], tail=(2, 2, 2)),
    ],
}
C = 5


def case_inputs(case, iteration):
    """The global batch x, upstream gradient dy, weight and bias of one case and step."""
    gen = torch.Generator().manual_seed(1000 * iteration + 17 * len(case["sizes"]) + sum(case["sizes"]))
    shape = (sum(case["sizes"]), C, *case["tail"])
    x = (3.0 + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(case["dtype"])
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(case["dtype"])
    weight = torch.linspace(0.5, 2.0, C, dtype=torch.float64)
    bias = torch.linspace(-1.0, 1.0, C, dtype=torch.float64)
    return x, dy, weight, bias


def param_dtype(case):
    return torch.float64 if case["dtype"] == torch.float64 else torch.float32


def shard(t, case, rank):
    start = sum(case["sizes"][:rank])
    return t[start:start + case["sizes"][rank]]


def module_kwargs(case):
    return {k: case[k] for k in ("momentum", "affine", "track_running_stats") if k in case}


def run_case(case, rank):
    """One rank's side of a case: ITERATIONS training steps of SyncBatchNorm on its shard, then eval."""
    bn = torch_bn.SyncBatchNorm(C, dtype=param_dtype(case), **module_kwargs(case))
    steps = []
    for it in range(ITERATIONS):
        x, dy, weight, bias = case_inputs(case, it)
        if bn.affine:
            with torch.no_grad():
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)
            bn.zero_grad(set_to_none=True)
        x = shard(x, case, rank)
        if case.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = bn(x)
        (y * shard(dy, case, rank)).sum().backward()
        steps.append({"y": y.detach(), "dx": x.grad,
                      "dweight": None if bn.weight is None else bn.weight.grad.clone(),
                      "dbias": None if bn.bias is None else bn.bias.grad.clone(),
                      "running_mean": None if bn.running_mean is None else bn.running_mean.clone(),
                      "running_var": None if bn.running_var is None else bn.running_var.clone()})
    bn.eval()
    with torch.no_grad():
        y_eval = bn(shard(case_inputs(case, ITERATIONS)[0], case, rank))
    return {"steps": steps, "y_eval": y_eval}


def reference_case(case):
    """Single-process torch_bn on the concatenated batch: the same steps, the full batch's tensors."""
    kw = module_kwargs(case)
    pd = param_dtype(case)
    running = (torch.zeros(C, dtype=pd), torch.ones(C, dtype=pd)) if kw.get("track_running_stats", True) else (None, None)
    steps = []
    for it in range(ITERATIONS):
        x, dy, weight, bias = case_inputs(case, it)
        x.requires_grad_(True)
        w = weight.to(pd).requires_grad_(True) if kw.get("affine", True) else None
        b = bias.to(pd).requires_grad_(True) if kw.get("affine", True) else None
        momentum = kw.get("momentum", 0.1)
        y = batch_norm(x, *running, w, b, True, 1.0 / (it + 1) if momentum is None else momentum)
        (y * dy).sum().backward()
        steps.append({"y": y.detach(), "dx": x.grad, "dweight": None if w is None else w.grad,
                      "dbias": None if b is None else b.grad,
                      "running_mean": None if running[0] is None else running[0].clone(),
                      "running_var": None if running[1] is None else running[1].clone()})
    x_eval = case_inputs(case, ITERATIONS)[0]
    w = weight.to(pd) if kw.get("affine", True) else None
    b = bias.to(pd) if kw.get("affine", True) else None
    if running[0] is None:  # eval without running statistics: each rank's own batch statistics
        y_eval = [batch_norm(shard(x_eval, case, r), None, None, w, b, True) for r in range(len(case["sizes"]))]
    else:
        y_eval = [shard(batch_norm(x_eval, *running, w, b, False), case, r) for r in range(len(case["sizes"]))]
    return {"steps": steps, "y_eval": y_eval}


def ddp_step(rank, world_size, sizes):
    """Two SGD steps of a converted model under DistributedDataParallel, each rank on its shard;
    the loss is weighted so that DDP's average of gradients is the global batch's mean loss."""
    torch.manual_seed(0)
    model = torch_bn.convert_sync_batchnorm(ddp_model())
    with pytest.raises(ValueError, match="only work with GPU"):  # why torch_bn has its own DDP
        nn.parallel.DistributedDataParallel(model)
    with pytest.raises(ValueError, match="only work with GPU"):  # nn's own layers are still refused
        torch_bn.DistributedDataParallel(nn.Sequential(nn.Linear(2, 3), nn.SyncBatchNorm(3)))
    model = torch_bn.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for it in range(2):
        x, target = ddp_batch(it, sum(sizes))
        start = sum(sizes[:rank])
        xs, ts = x[start:start + sizes[rank]], target[start:start + sizes[rank]]
        loss = (model(xs) - ts).pow(2).sum() * world_size / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def ddp_model():
    return nn.Sequential(nn.Linear(6, 4, dtype=torch.float64), torch_bn.BatchNorm1d(4, dtype=torch.float64),
                         nn.ReLU(), nn.Linear(4, 3, dtype=torch.float64))


def ddp_batch(it, n):
    gen = torch.Generator().manual_seed(it)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randn(n, 3, generator=gen, dtype=torch.float64)


DDP_SIZES = [5, 2]


def worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    init_group(rank, world_size, port)
    try:
        results = {"cases": [run_case(case, rank) for case in CASES[world_size]]}
        # A global batch of one value per channel cannot be normalized: every rank raises.
        bn = torch_bn.SyncBatchNorm(C)
        try:
            bn(torch.randn(1 if rank == 0 else 0, C))
            results["one_value_error"] = None
        except ValueError as e:
            results["one_value_error"] = str(e)
        if world_size == 2:
            results["ddp"] = ddp_step(rank, world_size, DDP_SIZES)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def tolerance(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5)
    return dict(rtol=torch.finfo(dtype).eps, atol=1e-5)  # one rounding of the half-precision output


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_matches_single_process_on_the_concatenated_batch(world_size, tmp_path):
    run_workers(worker, world_size, str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    worst = {}
    for i, case in enumerate(CASES[world_size]):
        ref = reference_case(case)
        out_tol = tolerance(case["dtype"])
        stat_tol = tolerance(param_dtype(case))
        for step, ref_step in enumerate(ref["steps"]):
            got = [r["cases"][i]["steps"][step] for r in ranks]
            for key in ("y", "dx"):  # each rank holds its shard's rows
                for rank, g in enumerate(got):
                    torch.testing.assert_close(g[key], shard(ref_step[key], case, rank), **out_tol,
                                               msg=lambda m: f"{case} step {step} {key} rank {rank}: {m}")
                    worst[(case["dtype"], key)] = max(worst.get((case["dtype"], key), 0.0),
                                                      max_diff(g[key], shard(ref_step[key], case, rank)))
            for key in ("dweight", "dbias"):  # local per rank; their sum is the whole batch's
                if ref_step[key] is None:
                    assert all(g[key] is None for g in got)
                    continue
                total = sum(g[key] for g in got)
                torch.testing.assert_close(total, ref_step[key], **stat_tol, msg=lambda m: f"{case} {key}: {m}")
                worst[(case["dtype"], key)] = max(worst.get((case["dtype"], key), 0.0), max_diff(total, ref_step[key]))
            for key in ("running_mean", "running_var"):
                if ref_step[key] is None:
                    assert all(g[key] is None for g in got)
                    continue
                for g in got:  # bitwise the same on every rank, and equal to the single process's
                    assert torch.equal(g[key], got[0][key]), f"{case} {key} differs between ranks"
                torch.testing.assert_close(got[0][key], ref_step[key], **stat_tol, msg=lambda m: f"{case} {key}: {m}")
                worst[(case["dtype"], key)] = max(worst.get((case["dtype"], key), 0.0),
                                                  max_diff(got[0][key], ref_step[key]))
        for rank, r in enumerate(ranks):  # eval: plain batch norm with the (shared) running statistics
            torch.testing.assert_close(r["cases"][i]["y_eval"], ref["y_eval"][rank], **out_tol)
    for r in ranks:
        assert r["one_value_error"] is not None and "more than 1 value per channel" in r["one_value_error"]
        assert "over all ranks" in r["one_value_error"]
    if world_size == 2:
        torch.manual_seed(0)
        model = ddp_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for it in range(2):
            x, target = ddp_batch(it, sum(DDP_SIZES))
            loss = (model(x) - target).pow(2).sum() / len(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for k, v in model.state_dict().items():
            for r in ranks:
                torch.testing.assert_close(r["ddp"][k], v, rtol=1e-10, atol=1e-10, msg=lambda m: f"DDP {k}: {m}")
    print(f"\nworld {world_size}, max |distributed - single process|:")
    for (dtype, key), d in sorted(worst.items(), key=str):
        print(f"  {str(dtype):15} {key:13} {d:.3g}")


# ---- without a process group, and conversion ------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 4), (4, 3, 2, 5), (3, 3, 2, 2, 3)])
def test_without_process_group_it_is_plain_batch_norm(shape):
    assert not dist.is_initialized()
    sync = torch_bn.SyncBatchNorm(3, dtype=torch.float64)
    theirs = nn.SyncBatchNorm(3, dtype=torch.float64)  # falls back to F.batch_norm here
    with torch.no_grad():
        for m in (sync, theirs):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    x = (2 + 3 * torch.randn(shape, dtype=torch.float64)).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = sync(x), theirs(x2)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    dy = torch.randn(shape, dtype=torch.float64)
    (y * dy).sum().backward()
    (y2 * dy).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sync.weight.grad, theirs.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sync.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)
    sync.eval(), theirs.eval()
    torch.testing.assert_close(sync(x), theirs(x2), rtol=1e-12, atol=1e-12)


def test_is_an_nn_sync_batch_norm_with_the_same_state():
    bn = torch_bn.SyncBatchNorm(4, momentum=None, process_group="group")
    assert isinstance(bn, nn.SyncBatchNorm) and bn.process_group == "group"
    assert bn.state_dict().keys() == nn.BatchNorm2d(4).state_dict().keys()
    bn.load_state_dict(nn.BatchNorm2d(4).state_dict())
    with pytest.raises(ValueError, match="at least 2D"):
        bn(torch.randn(4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 4))  # not distributed: a one-value batch is an error as in plain BN
    with pytest.raises(torch_bn.functional.ChannelMismatchError, match="5 channels"):
        bn(torch.randn(3, 5))


BN_LAYERS = [lambda: nn.BatchNorm1d(3), lambda: nn.BatchNorm2d(3, affine=False), lambda: nn.BatchNorm3d(3, momentum=None),
             lambda: nn.BatchNorm1d(3, track_running_stats=False), lambda: nn.SyncBatchNorm(3, eps=1e-3),
             lambda: torch_bn.BatchNorm1d(3), lambda: torch_bn.BatchNorm2d(3, bias=False)]


@pytest.mark.parametrize("make", BN_LAYERS)
def test_convert_shares_state_and_keeps_settings(make):
    bn = make()
    bn.eval()
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(bn), nn.ReLU())
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    converted = torch_bn.convert_sync_batchnorm(model, process_group="pg")
    assert converted is model  # a container is converted in place
    new = model[1][0]
    assert type(new) is torch_bn.SyncBatchNorm and new.process_group == "pg" and not new.training
    for k, v in model.state_dict(keep_vars=True).items():
        assert v is before[k], k  # the very same tensors: an optimizer built before still holds them
    assert model.state_dict().keys() == before.keys()
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(new, attr) == getattr(bn, attr)
    assert (new.bias is None) == (bn.bias is None)
    assert not any(t.is_meta for t in model.state_dict().values())


def test_convert_a_bare_layer_returns_a_new_one_and_the_classmethod_is_torch_bns():
    bn = nn.BatchNorm2d(3)
    new = torch_bn.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert type(new) is torch_bn.SyncBatchNorm and new.weight is bn.weight and new.training
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(new(x), nn.BatchNorm2d(3)(x))
    assert new.running_mean is bn.running_mean and new.num_batches_tracked.item() == 1


def test_convert_refuses_a_lazy_layer_before_its_first_forward():
    with pytest.raises(ValueError, match="run one forward pass"):
        torch_bn.convert_sync_batchnorm(nn.Sequential(nn.LazyBatchNorm1d()))


def test_function_gradcheck_in_a_group_of_one():
    """The Function's own backward (global sums, count, local parameter gradients) against finite
    differences, in float64, in an in-process group of one rank (where the layer falls back)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        x = (1 + 2 * torch.randn(4, 3, 2, dtype=torch.float64)).requires_grad_(True)
        w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
        b = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
        fn = lambda x, w, b: torch_bn.sync_batchnorm.SyncBatchNormFunction.apply(x, w, b, 1e-5, group)[0]
        assert torch.autograd.gradcheck(fn, (x, w, b))
        y, mean, var = torch_bn.sync_batchnorm.SyncBatchNormFunction.apply(x, w, b, 1e-5, group)
        torch.testing.assert_close(var, x.detach().var((0, 2)), rtol=1e-12, atol=1e-12)  # unbiased
        assert torch_bn.SyncBatchNorm(3)._sync_group() is None  # one rank: nothing to synchronize
    finally:
        dist.destroy_process_group()
