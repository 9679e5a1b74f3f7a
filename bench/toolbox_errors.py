"""The errors of torch_bn.fold and torch_bn.recalibrate against their references, over seeds.

    python -m bench.toolbox_errors               # seeds 0-4
    python -m bench.toolbox_errors --seeds 10

fold: torchvision's resnet18 (random weights, non-trivial running statistics and affine values)
after torch_bn.convert, folded; the largest absolute difference of the eval outputs over the
largest absolute output, on a random (4, 3, 224, 224) batch.
recalibrate: a Linear-BN-ReLU-Linear-BN model over batches of 7, 50 and 3 inputs; the largest
relative error of the running statistics against the float64 mean and unbiased variance of all
the values each layer saw (written from the equations, not from torch_bn).
"""
from __future__ import annotations

import argparse
import platform
import statistics

import torch
from torch import nn

import torch_bn

SIZES = (7, 50, 3)


def two_layer_model(bn_cls: type = torch_bn.BatchNorm1d, seed: int = 0) -> nn.Sequential:
    """Linear(5, 6) - BN(6) - ReLU - Linear(6, 4) - BN(4), affine values away from 1 and 0."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), bn_cls(6), nn.ReLU(), nn.Linear(6, 4), bn_cls(4))
    with torch.no_grad():
        for m in (model[1], model[4]):
            m.weight.uniform_(0.5, 2)
            m.bias.uniform_(-1, 1)
    return model


def make_batches(sizes=SIZES, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 5, generator=gen) * 3 + 2 for n in sizes]


def recalibration_reference(model: nn.Sequential, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer of two_layer_model, the float64 mean and unbiased variance of all its
    training-mode inputs: each batch through a float64 copy of the equations, each BN normalizing
    with its batch's mean and biased variance."""
    lin1, bn1, _, lin2, _ = list(model)
    w1, b1, w2, b2 = (t.detach().double() for t in (lin1.weight, lin1.bias, lin2.weight, lin2.bias))
    g1, be1 = bn1.weight.detach().double(), bn1.bias.detach().double()
    seen1, seen2 = [], []
    for x in batches:
        z1 = x.double() @ w1.T + b1
        mean, var = z1.mean(0), ((z1 - z1.mean(0)) ** 2).mean(0)
        z2 = torch.relu((z1 - mean) / torch.sqrt(var + bn1.eps) * g1 + be1) @ w2.T + b2
        seen1.append(z1)
        seen2.append(z2)
    out = []
    for seen in (seen1, seen2):
        z = torch.cat(seen)
        mean = z.sum(0) / z.shape[0]
        out.append((mean, ((z - mean) ** 2).sum(0) / (z.shape[0] - 1)))
    return out


def recalibration_error(seed: int) -> float:
    model = two_layer_model(seed=seed)
    batches = make_batches(seed=seed)
    expected = recalibration_reference(model, batches)
    torch_bn.recalibrate(model, batches)
    return max(((got.double() - e).abs() / e.abs()).max().item()
               for bn, (mean, var) in zip((model[1], model[4]), expected)
               for got, e in ((bn.running_mean, mean), (bn.running_var, var)))


def fold_error(seed: int, shape=(4, 3, 224, 224)) -> float:
    import torchvision  # the benchmark's, not the library's

    torch.manual_seed(seed)
    model = torch_bn.convert(torchvision.models.resnet18()).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 64, 64) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
        model.eval()
        folded = torch_bn.fold(model)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
        x = torch.randn(shape)
        ref, out = model(x), folded(x)
    return ((out - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    seeds = range(args.seeds)
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, seeds 0-{args.seeds - 1}")
    for name, fn in (("fold, resnet18 (4, 3, 224, 224), max |diff| / max |y|", fold_error),
                     ("recalibrate, batches 7/50/3, max relative error", recalibration_error)):
        errors = [fn(s) for s in seeds]
        print(f"{name}: median {statistics.median(errors):.2e}, range {min(errors):.2e}-{max(errors):.2e}")


if __name__ == "__main__":
    main()
