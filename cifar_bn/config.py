"""What defines a run, and which runs can be launched: checked before torch is imported.

``TrainConfig`` (every setting of one run), the choices its fields take, the notebook's
experiments' settings, and the rules for training runs together (vectorized) or across torchrun
processes. Nothing here imports torch, so that ``python train.py --help`` and a launch refused
for its flags answer at once; a refused launch has written nothing.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

NORMS = ("torch_bn", "nn", "none")
NORM_ALIASES = {"torch": "nn"}  # "torch" reads like the whole library; accepted, stored as "nn"
OPTIMIZERS = ("adam", "sgd", "sgd_momentum", "rmsprop")
DEVICES = ("auto", "cpu", "cuda")

# The notebook's sections 2 and 3: 1,000 training images, 10 epochs, batch 50, Adam 1e-3.
PRESETS = {
    "deep": dict(hidden_dims=(100,) * 5, weight_scale=2e-2, epochs=10, batch_size=50, optimizer="adam", lr=1e-3,
                 num_train=1000),
    "weight-scale": dict(hidden_dims=(50,) * 7, epochs=10, batch_size=50, optimizer="adam", lr=1e-3,
                         num_train=1000),
}

VECTORIZED_NORMS = ("torch_bn", "none")  # layers that run without side effects under vmap


def canonical_norm(norm: str) -> str:
    """The normalization's name in NORMS ("torch" is accepted for "nn"); ValueError for any other."""
    norm = NORM_ALIASES.get(norm, norm)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)} (or torch, an alias of nn), got {norm!r}")
    return norm


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in its checkpoint and summary."""

    norm: str = "none"
    hidden_dims: tuple[int, ...] = (100, 100, 100, 100, 100)
    weight_scale: float | None = None
    dropout: float = 0.0
    reg: float = 0.0
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_decay: float = 1.0
    batch_size: int = 50
    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    sync_bn: bool = False  # batch norm over the global batch of all torchrun processes (cifar_bn.distributed)

    def __post_init__(self) -> None:
        """Check every field, so that a bad configuration fails before anything is written."""
        self.norm = canonical_norm(self.norm)
        self.hidden_dims = tuple(self.hidden_dims)
        if not self.hidden_dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.hidden_dims):
            raise ValueError(f"hidden_dims must be one or more positive layer widths such as 100,100,100, "
                             f"got {','.join(map(str, self.hidden_dims)) or 'none'}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("lr", "lr_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        for name in ("batch_size", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.weight_scale is not None and not (math.isfinite(self.weight_scale) and self.weight_scale > 0):
            raise ValueError(f"weight_scale is the std of the initial Linear weights and must be positive "
                             f"(leave it out for PyTorch's init), got {self.weight_scale}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout is the probability of zeroing an activation and must be in [0, 1), "
                             f"got {self.dropout}")
        if not (math.isfinite(self.reg) and self.reg >= 0):
            raise ValueError(f"reg (the L2 penalty) must be zero or positive, got {self.reg}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")


# The fields a batch of vectorized runs must share: every one but these.
VECTORIZED_VARY = ("norm", "weight_scale")
VECTORIZED_SHARED = tuple(f.name for f in fields(TrainConfig) if f.name not in VECTORIZED_VARY)


def check_vectorized(configs: list[TrainConfig]) -> None:
    """Raise ValueError unless the configs can be trained together as one vmapped program: the same
    everything but norm and weight scale, a norm of VECTORIZED_NORMS, no dropout."""
    if not configs:
        raise ValueError("the vectorized trainer needs at least one config")
    for c in configs:
        for name in VECTORIZED_SHARED:
            if getattr(c, name) != getattr(configs[0], name):
                raise ValueError(f"vectorized runs must share {name} (got {getattr(configs[0], name)!r} and "
                                 f"{getattr(c, name)!r}); only norm and weight_scale may differ, so train the "
                                 f"others separately")
        if c.norm not in VECTORIZED_NORMS:
            raise ValueError(f"the vectorized trainer runs norm {' or '.join(VECTORIZED_NORMS)} (layers that "
                             f"return their statistics under vmap), got {c.norm!r}; train that run sequentially")
    if configs[0].dropout:
        raise ValueError("the vectorized trainer does not train with dropout (its random masks would differ from "
                         "the sequential runs'); use --dropout 0 or train sequentially")


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a process started without torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def check_launch(mode: str, norm: str, sync_bn: bool, device: str) -> None:
    """Refuse, before anything is written, what cannot run under (or without) torchrun: ValueError
    saying what to do instead.

    mode: train.py's ("single" for one model); device: "cpu" or "cuda", or "auto" before torch
    tells which (the GPU-only rule then waits for a call with the device known).
    """
    if sync_bn and not under_torchrun():
        raise ValueError("--sync-bn synchronizes batch norm across the processes of torchrun; launch with "
                         "torchrun --nproc_per_node=K train.py ... (or leave out --sync-bn)")
    if sync_bn and norm == "none":
        raise ValueError("--sync-bn synchronizes batch norm, but the model has none; add --batchnorm")
    if sync_bn and norm == "nn" and device not in ("cuda", "auto"):
        raise ValueError("--sync-bn with --norm nn uses nn.SyncBatchNorm, which runs only on GPUs; on CPU "
                         "use --batchnorm (torch_bn.SyncBatchNorm)")
    if under_torchrun() and mode != "single":
        flag = "--compare" if mode == "compare" else f"--experiment {mode}"
        raise ValueError(f"under torchrun train.py trains one model; run {flag} without torchrun")
