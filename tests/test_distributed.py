"""Two gloo processes on CPU must train exactly like one process with the same global batch."""
import json
import os
import socket

import torch
import torch.multiprocessing as mp

from conftest import tiny_cfg
from imagelm import checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from imagelm.train import Trainer
    try:
        Trainer(tiny_cfg("train.steps=3"), out, progress=False).fit()
    finally:
        torch.distributed.destroy_process_group()


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    from imagelm.train import Trainer
    Trainer(tiny_cfg("train.steps=3"), tmp_path / "one", progress=False).fit()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert all(abs(a - b) < 1e-5 * max(1, abs(a)) for a, b in zip(one, two))
    w1 = checkpoint.load_weights(checkpoint.latest(tmp_path / "one" / "checkpoints"))
    w2 = checkpoint.load_weights(checkpoint.latest(tmp_path / "two" / "checkpoints"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
