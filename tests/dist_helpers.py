"""Run a function in several local processes joined by a gloo process group, never hanging.

Workers start from a forkserver that has torch and torch_bn imported already, so each one starts
in a fraction of a second instead of importing torch anew; every process group gets a timeout,
and the parent terminates workers still running at its own deadline.
"""
import datetime
import multiprocessing
import socket
import time

import torch.distributed as dist
import torch.multiprocessing as mp

GROUP_TIMEOUT = datetime.timedelta(seconds=30)  # every collective gives up after this
PRELOAD = ["torch", "torch.distributed", "torch_bn"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world_size: int, port: int) -> None:
    """Join the gloo process group of world_size local processes on 127.0.0.1:port."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=GROUP_TIMEOUT)


def run_workers(fn, world_size: int, *args, timeout: float = 120.0) -> None:
    """Run fn(rank, world_size, port, *args) in world_size processes and wait for all of them.

    fn must be importable at module level; it calls init_group(rank, world_size, port). A worker's
    exception is raised here (torch.multiprocessing.ProcessRaisedException, with its traceback);
    workers still running after timeout seconds are terminated and TimeoutError is raised.
    """
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    ctx = mp.start_processes(fn, args=(world_size, free_port(), *args), nprocs=world_size, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} workers still running after {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
                if p.is_alive():
                    p.kill()
