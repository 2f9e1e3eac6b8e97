import atexit
import faulthandler
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from imagelm import config
from imagelm.data.sources import FASHION_MNIST_ROOT

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    """What the tests cache (baselines, document indexes) goes to a folder of this session, not
    ~/.cache; processes the tests spawn inherit it."""
    os.environ["IMAGELM_CACHE"] = tempfile.mkdtemp(prefix="imagelm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["IMAGELM_CACHE"], True)


TINY = {
    "method": "aim",
    "model": {"img_size": 8, "patch_size": 2, "in_chans": 1, "dim": 32, "depth": 2, "heads": 2},
    "aim": {"head_depth": 1, "head_width": 64},
    "data": {"dataset": "synthetic"},
    "train": {"batch_size": 16, "steps": 6, "lr": 1e-3, "warmup": 0.2, "ckpt_every": 3, "log_every": 1,
              "precision": "fp32"},
    "eval": {"batch_size": 128, "linear_iters": 50, "attentive_epochs": 2, "val_size": 64,
             "attentive_layers": "last:1"},
}


def tiny_cfg(*overrides: str) -> config.Config:
    import copy
    d = config.apply_overrides(copy.deepcopy(TINY), list(overrides))
    if d["method"] != "aim":
        d.pop("aim")
    return config.from_dict(d)


@pytest.fixture
def tiny():
    return tiny_cfg


needs_fmnist = pytest.mark.skipif(not (Path(FASHION_MNIST_ROOT) / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _rank_main(rank: int, world: int, port: int, worker, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # gloo binds to the address the hostname resolves to; where the ranks cannot reach each other there
    # (a sandbox that filters it) they wait rather than fail, so the tests pin gloo to loopback.
    lo = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if lo:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo[0])
    torch.set_num_threads(1)
    faulthandler.enable()                     # a rank that aborts prints where it was
    faulthandler.register(signal.SIGUSR1)     # run_ranks asks a hung rank where it is before killing it
    worker(rank, world, *args)
    # A rank whose work is done leaves without Python's teardown: gloo's worker thread can free the
    # tensors of a finished collective after finalization has begun, and that aborts the rank
    # (the race pytorch/pytorch#179291 describes; one run in ~15 of the CLIP test on 2 cores).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker, *args, world: int = 2, timeout: float = 180.0) -> None:
    """worker(rank, world, *args) in `world` spawned processes, with torchrun's environment on a free
    loopback port. A rank that raises fails the test with its traceback; ranks that hang are killed
    after `timeout` seconds and fail it too, rather than holding the suite until CI's limit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank_main, args=(world, port, worker, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in filter(lambda p: p.is_alive(), ctx.processes):   # one at a time: stacks don't interleave
                os.kill(p.pid, signal.SIGUSR1)
                time.sleep(0.5)
                p.kill()
            pytest.fail(f"{world} gloo ranks did not finish in {timeout:.0f}s: killed; "
                        "their stacks are in the captured stderr")
