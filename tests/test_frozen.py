"""FrozenBatchNorm1d/2d/3d, freeze and unfreeze: against torchvision's FrozenBatchNorm2d and the
definition, checkpoints both ways, and the freeze/unfreeze round trip on nn's, torch_bn's and
SyncBatchNorm layers."""
import pytest
import torch
import torchvision
from torch import nn

import torch_bn


def random_buffers(m, gen, dtype):
    c = m.running_mean.numel()
    with torch.no_grad():
        m.weight.copy_(torch.randn(c, generator=gen, dtype=dtype))
        m.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))
        m.running_mean.copy_(3 * torch.randn(c, generator=gen, dtype=dtype))
        m.running_var.copy_(torch.rand(c, generator=gen, dtype=dtype) * 4 + 0.01)


def definition(x, m):
    """(x - running_mean) / sqrt(running_var + eps) * weight + bias, in float64."""
    s = [1, -1] + [1] * (x.dim() - 2)
    return ((x.double() - m.running_mean.double().view(s)) / torch.sqrt(m.running_var.double().view(s) + m.eps)
            * m.weight.double().view(s) + m.bias.double().view(s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_torchvision_frozen_batch_norm_on_random_buffers(dtype):
    gen = torch.Generator().manual_seed(0)
    theirs = torchvision.ops.FrozenBatchNorm2d(16, eps=1e-3).to(dtype)
    random_buffers(theirs, gen, dtype)
    ours = torch_bn.FrozenBatchNorm2d(16, eps=1e-3, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 16, 7, 5, generator=gen, dtype=dtype) * 2 + 1
    y, y_tv = ours(x), theirs(x)
    assert y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_tv, **tol)
    torch.testing.assert_close(y.double(), definition(x, ours), **tol)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert list(ours.parameters()) == []


def test_checkpoints_load_both_ways_and_from_batch_norm():
    gen = torch.Generator().manual_seed(1)
    tv = torchvision.ops.FrozenBatchNorm2d(8)
    random_buffers(tv, gen, torch.float32)
    ours = torch_bn.FrozenBatchNorm2d(8)
    ours.load_state_dict(tv.state_dict())  # strict: same keys
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(ours, name), getattr(tv, name))
    back = torchvision.ops.FrozenBatchNorm2d(8)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 3, 3, generator=gen)
    torch.testing.assert_close(back(x), tv(x))
    # A batch-norm checkpoint (with num_batches_tracked) loads too, as into torchvision's.
    bn = nn.BatchNorm2d(8)
    random_buffers(bn, gen, torch.float32)
    ours.load_state_dict(bn.state_dict())
    torch.testing.assert_close(ours(x), bn.eval()(x), rtol=1e-5, atol=1e-5)


def model_with(bn_cls, dims):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return nn.Sequential(conv(3, 6, 3), bn_cls(6), nn.ReLU(), conv(6, 4, 1), nn.Sequential(bn_cls(4)))


LAYERS = [(nn.BatchNorm1d, 1, torch_bn.FrozenBatchNorm1d, torch_bn.BatchNorm1d),
          (nn.BatchNorm2d, 2, torch_bn.FrozenBatchNorm2d, torch_bn.BatchNorm2d),
          (nn.BatchNorm3d, 3, torch_bn.FrozenBatchNorm3d, torch_bn.BatchNorm3d),
          (torch_bn.BatchNorm2d, 2, torch_bn.FrozenBatchNorm2d, torch_bn.BatchNorm2d),
          (torch_bn.BatchNorm3d, 3, torch_bn.FrozenBatchNorm3d, torch_bn.BatchNorm3d),
          (torch_bn.SyncBatchNorm, 2, torch_bn.FrozenBatchNorm, torch_bn.SyncBatchNorm),
          (nn.SyncBatchNorm, 1, torch_bn.FrozenBatchNorm, torch_bn.SyncBatchNorm)]


@pytest.mark.parametrize("bn_cls,dims,frozen_cls,unfrozen_cls", LAYERS)
def test_freeze_then_unfreeze_gives_back_the_original_outputs(bn_cls, dims, frozen_cls, unfrozen_cls):
    torch.manual_seed(0)
    model = model_with(bn_cls, dims)
    x = torch.randn(*([4, 3] + [6] * dims))
    with torch.no_grad():
        model.train()
        for _ in range(3):  # running statistics that are not the initial ones
            model(x + torch.randn_like(x))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_out = model(x).detach()  # training mode (updates the running statistics: restored below)
    model.load_state_dict(saved)
    model.eval()
    eval_out = model(x)

    frozen = torch_bn.freeze(model)
    assert frozen is model
    layers = [m for m in frozen.modules() if isinstance(m, torch_bn.FrozenBatchNorm)]
    assert len(layers) == 2 and all(type(m) is frozen_cls for m in layers)
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in frozen.modules())
    frozen.train()  # a frozen layer ignores the mode
    torch.testing.assert_close(frozen(x), eval_out, rtol=1e-5, atol=1e-6)

    back = torch_bn.unfreeze(frozen)
    layers = [m for m in back.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert len(layers) == 2 and all(type(m) is unfrozen_cls for m in layers)
    assert all(isinstance(m.weight, nn.Parameter) and m.momentum == 0.1 for m in layers)
    back.eval()
    torch.testing.assert_close(back(x), eval_out, rtol=1e-5, atol=1e-6)
    back.train()
    torch.testing.assert_close(back(x), train_out, rtol=1e-5, atol=1e-5)


def test_frozen_values_are_copies_without_gradient_and_the_input_gets_one():
    bn = torch_bn.BatchNorm2d(4, momentum=None)
    frozen = torch_bn.freeze(bn)
    assert type(frozen) is torch_bn.FrozenBatchNorm2d and frozen.momentum is None and frozen.eps == bn.eps
    assert frozen.weight.data_ptr() != bn.weight.data_ptr() and not frozen.weight.requires_grad
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    frozen(x).sum().backward()
    assert x.grad is not None and not frozen.weight.requires_grad
    with torch.no_grad():
        bn.weight.mul_(3)  # what an optimizer holding the old parameter would do
    assert torch.equal(frozen.weight, torch.ones(4))
    assert type(torch_bn.unfreeze(frozen)) is torch_bn.BatchNorm2d
    assert torch_bn.unfreeze(frozen).momentum is None


def test_freeze_without_affine_keeps_the_mode_and_resnet_backbones_freeze():
    bn = nn.BatchNorm1d(5, affine=False).train()
    bn(torch.randn(10, 5) * 2 + 1)
    frozen = torch_bn.freeze(bn)
    assert frozen.training and torch.equal(frozen.weight, torch.ones(5)) and torch.equal(frozen.bias, torch.zeros(5))
    x = torch.randn(7, 5)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    net = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    before = net(x)
    torch_bn.freeze(net)
    assert sum(isinstance(m, torch_bn.FrozenBatchNorm2d) for m in net.modules()) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)
    traced = torch.fx.symbolic_trace(net)  # frozen layers are single calls in a torch.fx graph
    assert sum(n.op == "call_module" and isinstance(traced.get_submodule(n.target), torch_bn.FrozenBatchNorm2d)
               for n in traced.graph.nodes) == 20
    torch.testing.assert_close(traced(x), before, rtol=1e-4, atol=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        torch_bn.freeze(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(ValueError, match="num_features"):
        torch_bn.freeze(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="expected 4D input"):
        torch_bn.FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        torch_bn.FrozenBatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        torch_bn.FrozenBatchNorm(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="eps"):
        torch_bn.FrozenBatchNorm2d(3, eps=-1.0)
