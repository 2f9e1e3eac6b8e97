import os
from pathlib import Path

import pytest
import torch

from imagelm import config
from imagelm.data.sources import FASHION_MNIST_ROOT

torch.set_num_threads(min(2, os.cpu_count() or 1))

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
