"""train.py under torchrun: shards, loss weighting, launch checks, and a 2-process smoke run that
gives the same losses as one process on the same global batches."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import train
from cifar_bn import distributed
from cifar_bn.distributed import Context
from dist_helpers import free_port

TINY = ["--no-verify", "--num-val", "20", "--num-test", "20", "--quiet", "--device", "cpu"]
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@pytest.mark.parametrize("world_size,batch", [(2, 50), (3, 50), (4, 7), (1, 9)])
def test_shards_are_disjoint_and_cover_the_global_batch(world_size, batch):
    idx = torch.randperm(100)[:batch]
    shards = [Context(rank=r, world_size=world_size).shard(idx) for r in range(world_size)]
    assert torch.equal(torch.cat(shards), idx)  # disjoint, in order, nothing left out
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_losses_average_to_the_global_mean_loss():
    """DDP averages the ranks' gradients: with each rank's loss from shard_loss, that average is
    the gradient of the global batch's mean loss, also for uneven shards (50 over 3 ranks)."""
    logits = torch.randn(50, 10, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 10, (50,))
    (full,) = torch.autograd.grad(F.cross_entropy(logits, target), logits)
    averaged = torch.zeros_like(logits)
    for rank in range(3):
        ctx = Context(rank=rank, world_size=3)
        rows = ctx.shard(torch.arange(50))
        loss = ctx.shard_loss(F.cross_entropy(logits[rows], target[rows], reduction="sum"), 50)
        (g,) = torch.autograd.grad(loss, logits)
        averaged += g / 3
    torch.testing.assert_close(averaged, full, rtol=1e-12, atol=1e-15)


def test_a_single_process_is_unchanged():
    ctx = Context()
    logits, target = torch.randn(50, 10), torch.randint(0, 10, (50,))
    assert torch.equal(ctx.shard_loss(F.cross_entropy(logits, target, reduction="sum"), 50),
                       F.cross_entropy(logits, target))  # bitwise the mean loss
    model = torch.nn.Linear(3, 3)
    assert ctx.wrap(model, sync_bn=False) is model and ctx.describe() == {} and ctx.is_main


def test_sync_bn_without_torchrun_is_refused_and_leaves_nothing(tiny_cifar, tmp_path, monkeypatch, capsys):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    code = train.main(["--batchnorm", "--sync-bn", "--data-dir", tiny_cifar, "--logdir", str(tmp_path / "runs"), *TINY])
    assert code == 2 and "torchrun --nproc_per_node" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("args,message", [
    (["--compare"], "run --compare without torchrun"),
    (["--experiment", "deep"], "run --experiment deep without torchrun"),
    (["--norm", "none", "--sync-bn"], "has none; add --batchnorm"),
    (["--norm", "torch", "--sync-bn"], "only on GPUs"),
])
def test_what_cannot_run_under_torchrun_is_refused_before_anything_is_written(args, message, tiny_cifar, tmp_path,
                                                                             monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2")
    code = train.main([*args, "--data-dir", tiny_cifar, "--logdir", str(tmp_path / "runs"), *TINY])
    assert code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs") and not distributed.current().distributed


def run_command(cmd, timeout=240):
    """Run cmd in its own session; on timeout kill the whole session (torchrun and its workers)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    start = time.perf_counter()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out, time.perf_counter() - start


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_losses(tiny_cifar, tmp_path):
    common = ["--batchnorm", "--data-dir", tiny_cifar, "--epochs", "2", "--optimizer", "sgd", "--lr", "0.01",
              "--logdir", str(tmp_path / "runs"), *TINY]
    code, out, t_ddp = run_command([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                                    "--master_addr=127.0.0.1", f"--master_port={free_port()}", "train.py",
                                    *common, "--sync-bn", "--run-name", "ddp"])
    assert code == 0, out
    code, out, t_single = run_command([sys.executable, "train.py", *common, "--run-name", "single"])
    assert code == 0, out
    print(f"\nsmoke run wall time, process start to exit: torchrun 2 processes {t_ddp:.1f} s, "
          f"1 process {t_single:.1f} s")

    ddp_dir, single_dir = tmp_path / "runs" / "ddp", tmp_path / "runs" / "single"
    files = sorted(os.listdir(ddp_dir))  # rank 0's files only: one events file, nothing twice
    assert len(files) == 4 and files[0] == "checkpoint.pt" and files[1].startswith("events.out.tfevents")
    assert files[2:] == ["run.json", "summary.json"]
    ddp, single = (json.loads((d / "summary.json").read_text()) for d in (ddp_dir, single_dir))
    assert ddp["distributed"] == {"world_size": 2, "backend": "gloo"} and "distributed" not in single
    assert ddp["config"]["sync_bn"] and len(ddp["history"]["loss"]) == len(single["history"]["loss"]) == 4
    diff = max(abs(a - b) for a, b in zip(ddp["history"]["loss"], single["history"]["loss"]))
    print(f"max |loss difference| over {len(single['history']['loss'])} iterations: {diff:.3g}")
    assert diff < 1e-5
    assert ddp["history"]["val_acc"] == single["history"]["val_acc"]
    # The checkpoint is a plain model's: it loads into the single-process run's model.
    ddp_state = torch.load(ddp_dir / "checkpoint.pt", weights_only=True)["models"]["model"]
    single_state = torch.load(single_dir / "checkpoint.pt", weights_only=True)["models"]["model"]
    assert ddp_state.keys() == single_state.keys()
    for k in single_state:
        torch.testing.assert_close(ddp_state[k].double(), single_state[k].double(), rtol=1e-5, atol=1e-5)
