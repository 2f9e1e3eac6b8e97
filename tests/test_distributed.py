"""Two gloo processes on CPU must train exactly like one process with the same global batch."""
import json

import torch

from conftest import run_ranks, tiny_cfg
from imagelm import checkpoint


def _worker(rank: int, world: int, out: str) -> None:
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
    run_ranks(_worker, str(tmp_path / "two"))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert all(abs(a - b) < 1e-5 * max(1, abs(a)) for a, b in zip(one, two))
    w1 = checkpoint.load_weights(checkpoint.latest(tmp_path / "one" / "checkpoints"))
    w2 = checkpoint.load_weights(checkpoint.latest(tmp_path / "two" / "checkpoints"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
