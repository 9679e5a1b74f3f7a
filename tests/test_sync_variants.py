"""torch_bn.SyncBatchNorm with mask= and with batch renormalization (rmax, dmax, warmup_steps):
equal to one process on the concatenated batch (tests/dist_helpers.py: 2 CPU processes, gloo), in
float64; and convert_sync_batchnorm keeps renormalization and leaves ghost batch norm local."""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torch_bn
from dist_helpers import init_group, run_workers
from torch_bn.functional import batch_norm, batch_renorm

C = 3
STEPS = 3
# per-rank batch sizes and trailing shape; masks: a rank with nothing counted, a rank with no samples
MASK_CASES = [dict(sizes=[5, 3], tail=(4,)), dict(sizes=[4, 2], tail=(2, 3), empty_mask_rank=1),
              dict(sizes=[6, 0], tail=())]
RENORM_CASES = [dict(sizes=[5, 3], tail=(), warmup_steps=0), dict(sizes=[4, 1], tail=(2, 2), warmup_steps=1)]


def inputs(case, step, masked):
    g = torch.Generator().manual_seed(100 * step + sum(case["sizes"]))
    shape = (sum(case["sizes"]), C, *case["tail"])
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (2 + step) + 3 * step
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand((shape[0], *shape[2:]), generator=g) < 0.7 if masked else None
    if masked:
        mask.view(-1)[:2] = True
        if "empty_mask_rank" in case:
            start = case["sizes"][0]
            mask[start:] = False
    return x, dy, mask


def shard(t, case, rank):
    start = sum(case["sizes"][:rank])
    return None if t is None else t[start:start + case["sizes"][rank]]


def make(case, masked):
    kw = {} if masked else dict(rmax=1.5, dmax=0.3, warmup_steps=case["warmup_steps"])
    return kw


def run(bn, case, rank, masked):
    """STEPS training steps on this rank's shard (rank None: the whole batch, one process)."""
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, C, dtype=torch.float64))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, C, dtype=torch.float64))
    out = []
    for step in range(STEPS):
        x, dy, mask = inputs(case, step, masked)
        if rank is not None:
            x, dy, mask = shard(x, case, rank), shard(dy, case, rank), shard(mask, case, rank)
        x.requires_grad_()
        bn.zero_grad(set_to_none=True)
        y = bn(x, mask=mask) if masked else bn(x)
        (y * dy).sum().backward()
        out.append({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(), "db": bn.bias.grad.clone(),
                    "rm": bn.running_mean.clone(), "rv": bn.running_var.clone()})
    return out


def worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    init_group(rank, world_size, port)
    try:
        results = {}
        for masked, cases in ((True, MASK_CASES), (False, RENORM_CASES)):
            for i, case in enumerate(cases):
                bn = torch_bn.SyncBatchNorm(C, dtype=torch.float64, **make(case, masked))
                results[(masked, i)] = run(bn, case, rank, masked)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def single_process(case, masked):
    """The same steps on the concatenated batch, with torch_bn's single-process layers."""
    if masked:
        bn = torch_bn.BatchNorm1d(C, dtype=torch.float64) if len(case["tail"]) <= 1 else torch_bn.BatchNorm2d(C, dtype=torch.float64)
    else:
        cls = torch_bn.BatchRenorm1d if len(case["tail"]) <= 1 else torch_bn.BatchRenorm2d
        bn = cls(C, dtype=torch.float64, **make(case, masked))
    return run(bn, case, None, masked)


@pytest.mark.slow
def test_equals_one_process_on_the_concatenated_batch(tmp_path):
    run_workers(worker, 2, str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    worst = 0.0
    for masked, cases in ((True, MASK_CASES), (False, RENORM_CASES)):
        for i, case in enumerate(cases):
            ref = single_process(case, masked)
            for step in range(STEPS):
                got = [r[(masked, i)][step] for r in ranks]
                for key in ("y", "dx"):
                    for rank in range(2):
                        torch.testing.assert_close(got[rank][key], shard(ref[step][key], case, rank),
                                                   rtol=1e-10, atol=1e-10, msg=lambda m: f"{case} {key}: {m}")
                        if got[rank][key].numel():
                            worst = max(worst, (got[rank][key] - shard(ref[step][key], case, rank)).abs().max().item())
                for key in ("dw", "db"):  # local per rank; their sum is the whole batch's
                    torch.testing.assert_close(got[0][key] + got[1][key], ref[step][key], rtol=1e-10, atol=1e-10)
                for key in ("rm", "rv"):
                    assert torch.equal(got[0][key], got[1][key])
                    torch.testing.assert_close(got[0][key], ref[step][key], rtol=1e-10, atol=1e-10)
    print(f"\nmax |SyncBatchNorm (2 ranks) - one process|, mask and renorm: {worst:.2g}")


def test_renorm_and_mask_without_process_group():
    assert not dist.is_initialized()
    x = torch.randn(8, C, dtype=torch.float64) * 4 + 2
    sync = torch_bn.SyncBatchNorm(C, rmax=1.2, dmax=0.1, dtype=torch.float64)
    assert "rmax=1.2, dmax=0.1, warmup_steps=0" in repr(sync)
    y_ref = batch_renorm(x, torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64),
                         sync.weight, sync.bias, True, 0.1, 1e-5, 1.2, 0.1)
    torch.testing.assert_close(sync(x), y_ref)
    mask = torch.tensor([True, False, True, True, False, True, True, True])
    plain = torch_bn.SyncBatchNorm(C, dtype=torch.float64)
    torch.testing.assert_close(plain(x, mask=mask), batch_norm(x, None, None, plain.weight, plain.bias, True, mask=mask))
    with pytest.raises(ValueError, match="does not take a mask"):
        sync(x, mask=mask)
    assert list(sync.state_dict()) == list(nn.BatchNorm1d(C).state_dict())


def test_convert_sync_batchnorm_keeps_renorm_and_leaves_ghost_local():
    model = nn.Sequential(torch_bn.BatchRenorm2d(3, rmax=2.0, dmax=1.0, warmup_steps=7), torch_bn.GhostBatchNorm1d(3, 4),
                          nn.BatchNorm1d(3))
    converted = torch_bn.convert_sync_batchnorm(model)
    renorm, ghost, plain = converted
    assert type(renorm) is torch_bn.SyncBatchNorm and renorm.renorm
    assert (renorm.rmax, renorm.dmax, renorm.warmup_steps) == (2.0, 1.0, 7)
    assert type(ghost) is torch_bn.GhostBatchNorm1d
    assert type(plain) is torch_bn.SyncBatchNorm and not plain.renorm
    again = torch_bn.convert_sync_batchnorm(renorm)
    assert again.renorm and again.rmax == 2.0
