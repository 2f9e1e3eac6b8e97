import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import needs_fmnist
from imagelm.config import DataConfig, ModelConfig
from imagelm.data import sources
from imagelm.data.loader import BatchLoader
from imagelm.data.transforms import crop_params, random_resized_crop


def _write_idx(path, arr):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def test_idx_reader_and_missing_dataset_message(tmp_path):
    imgs = np.random.randint(0, 255, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5, dtype=np.uint8))
    ds = sources.fashion_mnist("test", str(tmp_path))
    assert ds.images.shape == (5, 1, 28, 28) and torch.equal(ds.images[:, 0], torch.from_numpy(imgs))
    assert ds.labels.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(sources.DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        sources.fashion_mnist("train", str(tmp_path))


@needs_fmnist
def test_real_fashion_mnist():
    ds = sources.load(DataConfig(), ModelConfig(img_size=28, patch_size=4, in_chans=1), "test")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.bincount().tolist() == [1000] * 10
    assert 0.25 < ds.mean[0] < 0.32 and 0.3 < ds.std[0] < 0.4      # train-split statistics


def test_image_folder_skips_and_counts_corrupt_files(tmp_path):
    for split in ("a", "b"):
        (tmp_path / split).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12), 40 * i, dtype=np.uint8)).save(tmp_path / split / f"{i}.png")
    (tmp_path / "b" / "bad.png").write_bytes(b"not a png")
    ds = sources.image_folder(str(tmp_path), size=8, channels=1)
    assert ds.images.shape == (6, 1, 8, 8) and ds.skipped == 1 and ds.classes == ["a", "b"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="bad.png"):
        sources.image_folder(str(tmp_path), size=8, channels=1, strict=True)


def test_crop_with_full_scale_and_no_flip_is_identity():
    x = torch.rand(3, 1, 8, 8)
    theta = crop_params(3, (1.0, 1.0), (1.0, 1.0), False, torch.Generator().manual_seed(0))
    assert torch.allclose(random_resized_crop(x, theta), x, atol=1e-5)
    flip = theta.clone()
    flip[:, 0, 0] = -1
    assert torch.allclose(random_resized_crop(x, flip), x.flip(-1), atol=1e-5)


def test_crops_stay_inside_the_image():
    theta = crop_params(1000, (0.2, 1.0), (0.75, 4 / 3), True, torch.Generator().manual_seed(0))
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    assert ((theta[:, 0, 2].abs() + w) <= 1 + 1e-6).all() and ((theta[:, 1, 2].abs() + h) <= 1 + 1e-6).all()
    assert 0.4 < (theta[:, 0, 0] < 0).float().mean() < 0.6


def test_loader_is_a_function_of_the_step_and_ranks_slice_one_global_batch():
    data = sources.synthetic(64, 8, 1)
    data.mean, data.std = [0.2], [0.3]
    full = BatchLoader(data, DataConfig(), 16, seed=3, noise_dim=5)
    parts = [BatchLoader(data, DataConfig(), 16, seed=3, noise_dim=5, rank=r, world=2) for r in range(2)]
    for step in (0, 5, 9):                      # 9 is in the third epoch: a fresh permutation
        b = full.batch(step)
        ranks = [p.batch(step) for p in parts]
        for k in ("image", "label", "noise"):
            assert torch.equal(torch.cat([r[k] for r in ranks]), b[k])
        assert torch.equal(BatchLoader(data, DataConfig(), 16, seed=3, noise_dim=5).batch(step)["image"], b["image"])
    epoch0 = torch.cat([full.batch(s)["label"] for s in range(4)])
    assert len(epoch0) == 64 and not torch.equal(full.batch(4)["label"], full.batch(0)["label"])
