"""fold: resnet18 after torch_bn.convert, MLPs and convolution stacks of nn's, torch_bn's,
SyncBatchNorm and frozen layers, pairs left alone where the output has other users; and torch's
own fuse_conv_bn_eval on torch_bn's layers."""
import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import torch_bn


def batch_norms(model):
    return [m for m in model.modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, torch_bn.FrozenBatchNorm))]


def randomize(model, *inputs):
    """Non-trivial running statistics and affine values in every batch-norm layer."""
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for x in inputs:
            model(x)
        for m in batch_norms(model):
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def rel_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_resnet18_after_convert_folds_every_batch_norm():
    torch.manual_seed(0)
    model = torch_bn.convert(torchvision.models.resnet18(num_classes=10))
    randomize(model, torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64) * 2)
    assert len(batch_norms(model)) == 20
    folded = torch_bn.fold(model)
    assert batch_norms(folded) == [] and not folded.training
    assert len(batch_norms(model)) == 20  # the original is untouched
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) < 1e-4
    assert type(folded) is type(model)


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, torch_bn.BatchNorm1d, torch_bn.SyncBatchNorm,
                                    torch_bn.FrozenBatchNorm1d])
def test_mlp_with_batch_norm_after_linear(bn_cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), bn_cls(8), nn.ReLU(), nn.Linear(8, 6, bias=False), bn_cls(6), nn.ReLU(),
                          nn.Linear(6, 3))
    if bn_cls is torch_bn.FrozenBatchNorm1d:
        with torch.no_grad():
            for m in batch_norms(model):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    randomize(model, torch.randn(32, 10) * 3 + 1)
    folded = torch_bn.fold(model)
    assert batch_norms(folded) == [] and isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)
    x = torch.randn(16, 10)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_convolutions_in_a_traced_model(dims):
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, torch_bn.BatchNorm2d),
                3: (nn.Conv3d, torch_bn.BatchNorm3d)}[dims]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = conv(3, 4, 3, groups=1), bn(4)
            self.b, self.bn_b = conv(4, 4, 1, groups=2, bias=False), bn(4)

        def forward(self, x):
            y = torch.relu(self.bn_a(self.a(x)))
            return self.bn_b(self.b(y)) + y

    torch.manual_seed(0)
    model = randomize(Net(), torch.randn(4, 3, *([6] * dims)))
    folded = torch_bn.fold(model)
    assert batch_norms(folded) == []
    x = torch.randn(2, 3, *([6] * dims))
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class TwoConsumers(nn.Module):
    """conv's output feeds the batch norm and the residual sum: the pair must not be folded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), torch_bn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        z = self.conv(x)
        return self.bn2(self.conv2(self.bn(z) + z))


def test_a_conv_output_with_two_consumers_is_left_unfolded():
    torch.manual_seed(0)
    model = randomize(TwoConsumers(), torch.randn(4, 3, 5, 5))
    folded = torch_bn.fold(model)
    assert type(folded.bn) is torch_bn.BatchNorm2d and isinstance(folded.bn2, nn.Identity)
    assert torch.equal(folded.conv.weight, model.conv.weight)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_shared_layers_batch_act_and_layers_without_running_statistics_are_left_alone():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 1)
    shared = nn.Sequential(conv, nn.BatchNorm2d(3), conv)  # conv called twice
    no_stats = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    for model in (shared, no_stats):
        randomize(model, torch.randn(4, 3, 5, 5))
        folded = torch_bn.fold(model)
        assert not any(isinstance(m, nn.Identity) for m in folded.modules())
        x = torch.randn(2, 3, 5, 5)
        torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize("activation,expected", [("leaky_relu", nn.LeakyReLU), ("elu", nn.ELU),
                                                 ("identity", nn.Identity)])
def test_batch_norm_act_leaves_its_activation(activation, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), torch_bn.BatchNormAct2d(4, activation=activation, negative_slope=0.2,
                                                                      alpha=0.7))
    randomize(model, torch.randn(4, 3, 6, 6) * 2 + 1)
    folded = torch_bn.fold(model)
    assert type(folded[1]) is expected
    assert getattr(folded[1], "negative_slope", 0.2) == 0.2 and getattr(folded[1], "alpha", 0.7) == 0.7
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_an_untraceable_model_folds_its_sequential_pairs_with_a_warning():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else -self.body(x)  # data-dependent control flow

    torch.manual_seed(0)
    model = randomize(Untraceable(), torch.randn(4, 3, 6, 6) + 1)
    with pytest.warns(RuntimeWarning, match="cannot trace"):
        folded = torch_bn.fold(model)
    assert batch_norms(folded) == []
    x = torch.randn(2, 3, 6, 6) + 1
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bn_cls", [torch_bn.BatchNorm1d, torch_bn.BatchNorm2d, torch_bn.BatchNorm3d])
def test_torch_fuse_conv_bn_eval_on_torch_bn_layers(bn_cls):
    dims = {torch_bn.BatchNorm1d: 1, torch_bn.BatchNorm2d: 2, torch_bn.BatchNorm3d: 3}[bn_cls]
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](3, 5, 3)
    torch.manual_seed(0)
    model = randomize(nn.Sequential(conv, bn_cls(5)), torch.randn(4, 3, *([7] * dims)) * 2 + 1)
    fused = fuse_conv_bn_eval(model[0], model[1])
    x = torch.randn(2, 3, *([7] * dims))
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    if dims == 1:
        lin = randomize(nn.Sequential(nn.Linear(4, 5), torch_bn.BatchNorm1d(5)), torch.randn(8, 4) + 2)
        x = torch.randn(3, 4)
        torch.testing.assert_close(fuse_linear_bn_eval(lin[0], lin[1])(x), lin(x), rtol=1e-5, atol=1e-5)
