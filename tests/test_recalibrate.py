"""recalibrate: the running statistics equal a float64 reference of all the values each layer saw
(bench.toolbox_errors.recalibration_reference, from the equations), on batches of different
sizes; swa_utils.update_bn's mean on equal sizes; nothing else changes."""
import functools
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import update_bn

import torch_bn
from bench.toolbox_errors import SIZES, make_batches, two_layer_model
from bench.toolbox_errors import recalibration_reference as reference
from dist_helpers import init_group, run_workers

def rel_err(a, b):
    return ((a.double() - b).abs() / b.abs().clamp(min=1e-12)).max().item()


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, torch_bn.BatchNorm1d, torch_bn.SyncBatchNorm,
                                    torch_bn.BatchNormAct1d])
def test_running_statistics_equal_the_float64_reference_over_all_values(bn_cls):
    model = two_layer_model(bn_cls)
    batches = make_batches(SIZES)
    expected = reference(model, batches)
    torch_bn.recalibrate(model, batches)
    for bn, (mean, var) in zip((model[1], model[4]), expected):
        assert rel_err(bn.running_mean, mean) < 1e-5
        assert rel_err(bn.running_var, var) < 1e-5


def test_the_mean_of_swa_update_bn_on_equal_batches_and_its_lower_variance():
    batches = make_batches([16, 16, 16])
    ours, theirs = two_layer_model(), two_layer_model()
    torch_bn.recalibrate(ours, batches)
    update_bn(batches, theirs)
    for a, b in ((ours[1], theirs[1]), (ours[4], theirs[4])):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
    # update_bn's variance is the mean of the batches' unbiased variances (layer 1: Linear's output);
    # the variance of all values adds the spread of the batch means: with B batches of m values,
    # (B m - 1) var = (m - 1) sum_b var_b + m sum_b (mean_b - mean)^2.
    z = [ours[0](x).detach().double() for x in batches]
    torch.testing.assert_close(theirs[1].running_var.double(), torch.stack([t.var(0) for t in z]).mean(0),
                               rtol=1e-5, atol=1e-6)
    means = torch.stack([t.mean(0) for t in z])
    spread = ((means - means.mean(0)) ** 2).sum(0)
    pooled = (15 * 3 * theirs[1].running_var.double() + 16 * spread) / 47
    torch.testing.assert_close(ours[1].running_var.double(), pooled, rtol=1e-5, atol=1e-6)
    # On batches of different sizes update_bn's mean differs: it weighs every batch alike.
    ours, theirs = two_layer_model(), two_layer_model()
    batches = make_batches(SIZES)
    torch_bn.recalibrate(ours, batches)
    update_bn(batches, theirs)
    assert not torch.allclose(ours[1].running_mean, theirs[1].running_mean, rtol=1e-3)


@pytest.mark.parametrize("dims", [2, 3])
def test_conv_models_with_tuples_num_batches_and_a_data_loader(dims):
    conv, bn = (nn.Conv2d, torch_bn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 3, 3), bn(3))
    xs = torch.randn(12, 2, *([5] * dims)) + 1
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, torch.zeros(12)), batch_size=4)
    torch_bn.recalibrate(model, loader, num_batches=2)
    z = model[0](xs[:8]).detach().double().transpose(0, 1).reshape(3, -1)
    assert rel_err(model[1].running_mean, z.mean(1)) < 1e-5
    assert rel_err(model[1].running_var, z.var(1)) < 1e-5
    assert int(model[1].num_batches_tracked) == 2


def test_parameters_modes_momentum_and_no_gradient():
    model = two_layer_model()
    model[4].eval()  # a mixed mode, to be restored
    params = {k: v.clone() for k, v in model.named_parameters()}
    grad_enabled = []
    model[1].register_forward_hook(lambda m, a, out: grad_enabled.append(torch.is_grad_enabled()))
    torch_bn.recalibrate(model, make_batches(SIZES))
    assert grad_enabled == [False] * 3
    assert [m.training for m in model] == [True, True, True, True, False] and model.training
    assert all(torch.equal(v, params[k]) and v.grad is None for k, v in model.named_parameters())
    assert model[1].momentum == 0.1 and int(model[1].num_batches_tracked) == 3


def test_progress_bar_where_asked():
    calls = []

    def bar(iterable, total):
        calls.append(total)
        return iterable

    model = two_layer_model()
    torch_bn.recalibrate(model, make_batches(SIZES), progress=bar)
    torch_bn.recalibrate(model, make_batches(SIZES), num_batches=2, progress=bar)
    torch_bn.recalibrate(model, iter(make_batches(SIZES)), progress=bar)
    assert calls == [3, 2, None]
    pytest.importorskip("tqdm")
    torch_bn.recalibrate(model, make_batches(SIZES), progress=True)


def test_progress_true_without_tqdm_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        torch_bn.recalibrate(two_layer_model(), make_batches(SIZES), progress=True)


def test_a_failing_batch_leaves_every_buffer_as_it_was():
    model = two_layer_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = make_batches(SIZES) + [torch.randn(4, 7)]  # the last has 7 features, not 5
    with pytest.raises(RuntimeError):
        torch_bn.recalibrate(model, batches)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unreached_layers_keep_their_statistics_with_a_warning():
    model = two_layer_model()
    model.add_module("unused", nn.BatchNorm1d(4))
    model.unused.running_mean.fill_(5.0)
    model.forward = functools.partial(nn.Sequential.forward, model[:5])
    with pytest.warns(RuntimeWarning, match="never reached unused"):
        torch_bn.recalibrate(model, make_batches(SIZES))
    assert torch.equal(model.unused.running_mean, torch.full((4,), 5.0))
    with pytest.raises(ValueError, match="num_batches"):
        torch_bn.recalibrate(model, make_batches(SIZES), num_batches=0)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """Stands for a layer with masked statistics: forward(input, mask) (the mask unused here)."""

    def forward(self, input, mask=None):
        return super().forward(input)


class MaskedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = MaskedBatchNorm1d(3)

    def forward(self, batch):
        x, mask = batch
        return self.bn(x, mask=mask) + self.bn(x, mask)  # keyword, then positional


def test_a_layer_called_with_a_mask_counts_only_its_positions():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, 4, generator=gen) * 2 + 1, torch.rand(n, 4, generator=gen) > 0.4) for n in SIZES]
    model = MaskedModel()
    torch_bn.recalibrate(model, [[b] for b in batches])  # each batch a list whose first element is the input
    counted = torch.cat([x.double().movedim(1, -1)[mask] for x, mask in batches] * 2)  # two calls a batch
    assert rel_err(model.bn.running_mean, counted.mean(0)) < 1e-5
    assert rel_err(model.bn.running_var, counted.var(0)) < 1e-5
    assert int(model.bn.num_batches_tracked) == 6


def sync_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    init_group(rank, world_size, port)
    try:
        model = two_layer_model(torch_bn.SyncBatchNorm)
        batches = make_batches(SIZES, seed=rank)  # each rank its own batches
        torch_bn.recalibrate(model, batches)
        torch.save({k: v for k, v in model.state_dict().items() if "running" in k},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_batch_norm_combines_the_ranks_statistics(tmp_path):
    run_workers(sync_worker, 2, str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # One process on the concatenated batches (the global batch of every step).
    model = two_layer_model(torch_bn.BatchNorm1d)
    b0, b1 = make_batches(SIZES, seed=0), make_batches(SIZES, seed=1)
    expected = reference(model, [torch.cat(pair) for pair in zip(b0, b1)])
    for state in ranks:
        for i, (mean, var) in zip((1, 4), expected):
            assert rel_err(state[f"{i}.running_mean"], mean) < 1e-5
            assert rel_err(state[f"{i}.running_var"], var) < 1e-5
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
