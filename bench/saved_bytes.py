"""Bytes saved for backward: Conv2d-BN-activation stacks, torch.nn vs torch_bn.BatchNormAct2d.

    python -m bench.saved_bytes                        # leaky_relu and elu, (16, 32, 32, 32), 4 blocks
    python -m bench.saved_bytes --shape 16 32 32 32 --blocks 4 --activation leaky_relu

Every tensor autograd saves during one training-mode forward is seen by a
``torch.autograd.graph.saved_tensors_hooks`` pack hook and charged to the part of the stack whose
module was running ("conv", or "bn+act": nn.BatchNorm2d and the activation module, or
torch_bn.BatchNormAct2d). A part's bytes are those of the distinct storages it saved
(parameters included); the total counts each storage once, so a tensor saved by two parts (the
activation's output, which the next conv saves as its input) counts once there. Counting, not
timing: the numbers are exact and the same on every machine.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch import nn

import torch_bn

ACTIVATIONS = {"leaky_relu": lambda: nn.LeakyReLU(0.01), "elu": lambda: nn.ELU(1.0)}


def stacks(channels: int, blocks: int, activation: str) -> dict[str, nn.Sequential]:
    """The nn stack and the torch_bn stack, same convolutions (weights shared in values)."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(blocks)]
    plain = nn.Sequential(*[m for c in convs for m in (c, nn.BatchNorm2d(channels), ACTIVATIONS[activation]())])
    ours_convs = [nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(blocks)]
    for a, b in zip(ours_convs, convs):
        a.load_state_dict(b.state_dict())
    ours = nn.Sequential(*[m for c in ours_convs for m in (c, torch_bn.BatchNormAct2d(channels, activation=activation))])
    return {"nn": plain, "torch_bn": ours}


def _part(module: nn.Module) -> str:
    return "conv" if isinstance(module, nn.Conv2d) else "bn+act"


def saved_bytes(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """{"conv": bytes, "bn+act": bytes, "total": bytes} saved for backward by one forward of model."""
    current: list[str] = []
    seen: dict[str, dict[int, int]] = defaultdict(dict)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[current[-1] if current else "other"][storage.data_ptr()] = storage.nbytes()
        return t

    handles = []
    for m in model.children():
        handles.append(m.register_forward_pre_hook(lambda mod, args: current.append(_part(mod)) and None))
        handles.append(m.register_forward_hook(lambda mod, args, out: current.pop() and None))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    out.sum().backward()  # the graph is complete and runs
    result = {part: sum(d.values()) for part, d in seen.items()}
    result["total"] = sum({ptr: n for d in seen.values() for ptr, n in d.items()}.values())
    return result


def measure(shape: tuple[int, ...] = (16, 32, 32, 32), blocks: int = 4, activation: str = "leaky_relu") -> dict:
    """Saved bytes of both stacks on one random input, and the torch_bn / nn ratios."""
    x = torch.randn(*shape, requires_grad=True)
    rows = {name: saved_bytes(model.train(), x) for name, model in stacks(shape[1], blocks, activation).items()}
    ratio = {part: rows["torch_bn"][part] / rows["nn"][part] for part in ("conv", "bn+act", "total")}
    return {"shape": shape, "blocks": blocks, "activation": activation, "input_bytes": x.numel() * x.element_size(),
            "nn": rows["nn"], "torch_bn": rows["torch_bn"], "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[16, 32, 32, 32])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), nargs="*", default=["leaky_relu", "elu"])
    args = parser.parse_args()
    print(f"Bytes saved for backward, {args.blocks} Conv2d-BN-activation blocks, input {tuple(args.shape)} float32")
    print("| activation | part | torch.nn | torch_bn | torch_bn / nn |")
    print("| --- | --- | ---: | ---: | ---: |")
    for act in args.activation:
        r = measure(tuple(args.shape), args.blocks, act)
        for part in ("conv", "bn+act", "total"):
            print(f"| {act} | {part} | {r['nn'][part]:,} | {r['torch_bn'][part]:,} | {r['ratio'][part]:.3f} |")


if __name__ == "__main__":
    main()
