"""What defines a run, and which runs can be launched: checked before torch is imported.

``TrainConfig`` (every setting of one run), the choices its fields take, the notebook's
experiments' settings, and the rules for training runs together (vectorized) or across torchrun
processes. Nothing here imports torch, so that ``python train.py --help`` and a launch refused
for its flags answer at once; a refused launch has written nothing.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace

# After each hidden Linear: torch_bn.BatchNorm1d, nn.BatchNorm1d, nothing, torch_bn's batch
# renormalization, torch_bn's ghost batch norm (statistics over chunks of virtual_batch_size
# samples), or nn.LayerNorm (statistics over each sample's features: no batch dependence).
NORMS = ("torch_bn", "nn", "none", "renorm", "ghost", "layernorm")
NORM_ALIASES = {"torch": "nn"}  # "torch" reads like the whole library; accepted, stored as "nn"
# --compare's default, in the order the runs start: TensorBoard colours runs by that order, so this
# is the start of cifar_bn.figures.COMPARE_ORDER (a test keeps them equal) and the figures' colours
# are the charts'.
COMPARE_NORMS = ("torch_bn", "none", "nn")
# Batch renormalization's clipping: the paper's final values (Ioffe 2017, rmax 3 and dmax 5, reached
# there by a ramp from 1 and 0), which are torch_bn's defaults. The layer takes fixed limits after a
# warm-up of plain batch norm (TrainConfig.renorm_warmup, in steps).
RENORM_RMAX, RENORM_DMAX = 3.0, 5.0
OPTIMIZERS = ("adam", "sgd", "sgd_momentum", "rmsprop")
DEVICES = ("auto", "cpu", "cuda")

# The notebook's sections 2 and 3: 1,000 training images, 10 epochs, batch 50, Adam 1e-3.
PRESETS = {
    "deep": dict(hidden_dims=(100,) * 5, weight_scale=2e-2, epochs=10, batch_size=50, optimizer="adam", lr=1e-3,
                 num_train=1000),
    "weight-scale": dict(hidden_dims=(50,) * 7, epochs=10, batch_size=50, optimizer="adam", lr=1e-3,
                         num_train=1000),
    # The later editions' batch-size section: section 2's network at Adam 10^-3.5; the experiment
    # sets the batch size of each run (cifar_bn.batch_size).
    "batch-size": dict(hidden_dims=(100,) * 5, weight_scale=2e-2, epochs=10, batch_size=50, optimizer="adam",
                       lr=10 ** -3.5, num_train=1000),
}

VECTORIZED_NORMS = ("torch_bn", "none")  # layers that run without side effects under vmap


def canonical_norm(norm: str) -> str:
    """The normalization's name in NORMS ("torch" is accepted for "nn"); ValueError for any other."""
    norm = NORM_ALIASES.get(norm, norm)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)} (or torch, an alias of nn), got {norm!r}")
    return norm


def check_norm_options(norm: str, virtual_batch_size: int | None, renorm_warmup: int) -> None:
    """ValueError unless the options fit the norm: a virtual batch size of at least 2 for "ghost" and
    only there; a non-negative renorm_warmup, other than 0 only for "renorm"."""
    if norm == "ghost":
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 2:
            given = "none was given" if virtual_batch_size is None else f"got {virtual_batch_size}"
            raise ValueError(f"ghost batch norm normalizes chunks of virtual_batch_size samples, at least 2 "
                             f"(one sample has no variance): pass --virtual-batch-size V; {given}")
    elif virtual_batch_size is not None:
        raise ValueError(f"a virtual batch size is ghost batch norm's (--norm ghost), but norm is {norm!r}; "
                         f"drop --virtual-batch-size or use --norm ghost")
    if isinstance(renorm_warmup, bool) or not isinstance(renorm_warmup, int) or renorm_warmup < 0:
        raise ValueError(f"renorm_warmup is a number of steps, zero or more, got {renorm_warmup}")
    if renorm_warmup and norm != "renorm":
        raise ValueError(f"a renormalization warm-up is batch renormalization's (--norm renorm), but norm is "
                         f"{norm!r}; drop --renorm-warmup or use --norm renorm")


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
    virtual_batch_size: int | None = None  # norm "ghost": statistics over chunks of this many samples
    renorm_warmup: int | None = None  # norm "renorm": steps of plain batch norm first (None: one epoch)

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
        check_norm_options(self.norm, self.virtual_batch_size, self.renorm_warmup or 0)
        if self.renorm_warmup is not None and self.norm != "renorm":
            raise ValueError(f"a renormalization warm-up is batch renormalization's (--norm renorm), but norm is "
                             f"{self.norm!r}; drop --renorm-warmup or use --norm renorm")
        if self.virtual_batch_size is not None:
            if self.virtual_batch_size > self.batch_size:
                raise ValueError(f"--virtual-batch-size {self.virtual_batch_size} is larger than the batch of "
                                 f"{self.batch_size}; ghost batch norm splits each batch into chunks of that size "
                                 f"(one chunk of the whole batch is --norm torch_bn)")
            if self.batch_size % self.virtual_batch_size == 1:
                raise ValueError(f"batch {self.batch_size} in chunks of {self.virtual_batch_size} leaves a last "
                                 f"chunk of one sample, which has no variance; choose a virtual batch size that "
                                 f"divides the batch (or leaves at least 2)")

    def resolved(self, num_train: int) -> "TrainConfig":
        """This config with the defaults that depend on the data made explicit: batch
        renormalization's warm-up None becomes one epoch's iterations (num_train // batch_size)."""
        if self.norm == "renorm" and self.renorm_warmup is None:
            return replace(self, renorm_warmup=num_train // self.batch_size)
        return self


def with_norm(config: TrainConfig, norm: str, virtual_batch_size: int | None = None,
              renorm_warmup: int | None = None) -> TrainConfig:
    """config with ``norm`` and that norm's options only: the virtual batch size for "ghost", the
    warm-up for "renorm" (the other norm's option dropped)."""
    return replace(config, norm=norm, virtual_batch_size=virtual_batch_size if norm == "ghost" else None,
                   renorm_warmup=renorm_warmup if norm == "renorm" else None)


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
    if sync_bn and norm in ("renorm", "ghost", "layernorm"):
        raise ValueError(f"--sync-bn synchronizes plain batch norm; --norm {norm} has no synchronized form here "
                         f"(layer norm needs none; ghost batch norm's chunks are per process): drop --sync-bn")
    if sync_bn and norm == "nn" and device not in ("cuda", "auto"):
        raise ValueError("--sync-bn with --norm nn uses nn.SyncBatchNorm, which runs only on GPUs; on CPU "
                         "use --batchnorm (torch_bn.SyncBatchNorm)")
    if under_torchrun() and mode != "single":
        flag = "--compare" if mode == "compare" else f"--experiment {mode}"
        raise ValueError(f"under torchrun train.py trains one model; run {flag} without torchrun")
