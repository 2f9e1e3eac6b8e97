"""Streamed image datasets: folders and WebDataset shards read from disk by DataLoader workers."""
import io
import json
import os
import tarfile
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from imagelm.config import DataConfig, ModelConfig
from imagelm.data import sources
from imagelm.data.folder import FolderSet
from imagelm.data.images import DataError, open_image
from imagelm.data.loader import BatchLoader, make_loader
from imagelm.data.shards import ShardSet, write_shards
from imagelm.data.stream import StreamLoader, epoch_order

MODEL = ModelConfig(img_size=8, patch_size=2, in_chans=1)
IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)


def make_folder(root, n_per_class=(6, 6, 6), size=12, split="train"):
    """Class c's i-th image is a constant grey level, unique over the folder: the level names the sample."""
    level = 10
    for c, n in zip("abc", n_per_class):
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((size, size), level, np.uint8)).save(root / split / c / f"{i:03d}.png")
            level += 4
    return root


def ids(images, mean, std):
    """Sample id (grey level) of each standardised constant image."""
    return (images.flatten(1).mean(1) * std[0] + mean[0]).mul(255).round().long().tolist()


def cfg(root, dataset="folder", **kw):
    return DataConfig(dataset=dataset, root=str(root), **{"workers": 0, **kw})


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "f")


def test_streamed_folder_yields_the_in_memory_batches(folder):
    c = cfg(folder, workers=2, **IDENTITY)
    streamed = sources.load(c, MODEL, "train")
    assert isinstance(streamed, FolderSet) and len(streamed) == 18
    mem = sources.image_folder(str(folder / "train"), 8, 1)
    mem.mean, mem.std = streamed.mean, streamed.std
    a, b = BatchLoader(mem, c, 6, seed=2, noise_dim=3), make_loader(streamed, c, 6, seed=2, noise_dim=3)
    assert isinstance(b, StreamLoader)
    for step in (0, 1, 4, 2):          # 4: the second epoch; 2: a jump back restarts the workers there
        x, y = a.batch(step), b.batch(step)
        assert torch.allclose(x["image"], y["image"], atol=1e-5)
        assert torch.equal(x["label"], y["label"]) and torch.equal(x["noise"], y["noise"])


def test_shards_written_from_a_folder_hold_its_samples(folder, tmp_path):
    write_shards(folder, tmp_path / "sh", shard_size=5, workers=2, say=lambda m: None)
    c = cfg(tmp_path / "sh", "shards", **IDENTITY)
    ds = sources.load(c, MODEL, "train")
    assert isinstance(ds, ShardSet) and len(ds) == 18 and len(ds.urls) == 4 and ds.classes == ["a", "b", "c"]
    loader = make_loader(ds, c, 6, seed=0)
    got = []
    for s in range(3):
        b = loader.batch(s)
        got += list(zip(ids(b["image"], ds.mean, ds.std), b["label"].tolist()))
    mem = sources.image_folder(str(folder / "train"), 8, 1)
    expected = sorted(zip(mem.images.flatten(1).float().mean(1).round().long().tolist(), mem.labels.tolist()))
    assert sorted(got) == expected                  # one epoch: every image once, with its label


@pytest.mark.parametrize("dataset", ["folder", "shards"])
def test_resume_replays_the_same_crops_and_noise(folder, tmp_path, dataset):
    root = folder
    if dataset == "shards":
        write_shards(folder, tmp_path / "sh", shard_size=4, workers=1, say=lambda m: None)
        root = tmp_path / "sh"
    c = cfg(root, dataset, workers=2, shuffle_buffer=3)
    ds = sources.load(c, MODEL, "train")
    run = make_loader(ds, c, 4, seed=5, noise_dim=2)
    straight = [run.batch(s) for s in range(10)]
    resumed = make_loader(ds, c, 4, seed=5, noise_dim=2)
    for s in range(7, 10):
        b = resumed.batch(s)
        for k in ("image", "label", "noise"):
            assert torch.equal(b[k], straight[s][k]), (s, k)


def test_two_ranks_with_two_workers_each_see_every_shard_sample_once_per_epoch(folder, tmp_path):
    write_shards(folder, tmp_path / "sh", shard_size=2, workers=1, say=lambda m: None)   # 9 shards of 2
    c = cfg(tmp_path / "sh", "shards", workers=2, shuffle_buffer=3, **IDENTITY)
    ds = sources.load(c, MODEL, "train")
    # 4 streams over 9 shards of 2: an epoch's 18 samples in 4 parts of 4 or 5, whatever shard they are in
    epoch = []
    for stream in range(4):
        it = ds.stream(stream, 4, seed=0)
        epoch += [next(it).key for _ in range((stream + 1) * 18 // 4 - stream * 18 // 4)]
    assert sorted(epoch) == sorted(r.key for r in ds.refs())
    # and the loaders of 2 ranks x 2 workers take disjoint samples
    ranks = [StreamLoader(ds, c, 4, seed=0, rank=r, world=2) for r in range(2)]
    seen = [i for s in range(3) for r in ranks for i in ids(r.batch(s)["image"], ds.mean, ds.std)]
    assert len(seen) == 12 and len(set(seen)) == 12


def test_two_ranks_with_two_workers_cover_a_folder_epoch_once(folder):
    c = cfg(folder, workers=2, **IDENTITY)
    ds = sources.load(c, MODEL, "train")
    ranks = [make_loader(ds, c, 6, seed=1, rank=r, world=2) for r in range(2)]
    seen = [i for s in range(3) for r in ranks for i in ids(r.batch(s)["image"], ds.mean, ds.std)]
    assert sorted(seen) == list(range(10, 10 + 4 * 18, 4))


def test_corrupt_file_is_replaced_and_counted_and_fatal_under_strict(folder):
    (folder / "train" / "b" / "bad.png").write_bytes(b"not a png")
    c = cfg(folder, **IDENTITY)
    ds = sources.load(c, MODEL, "train")
    loader = make_loader(ds, c, 19, seed=0)
    b = loader.batch(0)
    assert b["image"].shape == (19, 1, 8, 8) and loader.skipped == {0: 1}
    strict = cfg(folder, strict=True, **IDENTITY)
    with pytest.raises(DataError, match="bad.png"):
        make_loader(sources.load(strict, MODEL, "train"), strict, 19, seed=0).batch(0)


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _png(level, mode="L"):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), level, np.uint8)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def test_cut_shard_is_read_to_the_cut_and_duplicates_and_bad_samples_are_counted(tmp_path):
    d = tmp_path / "sh"
    d.mkdir()
    _tar(d / "000000.tar", [(f"{i}.png", _png(20 * i)) for i in range(4)]
         + [("1.png", _png(200)), ("4.png", b"garbage"), ("5.png", _png(90, "RGB"))])   # dup key 1, bad 4, RGB 5
    _tar(d / "000001.tar", [(f"k{i}.png", _png(100 + i)) for i in range(6)])
    raw = (d / "000001.tar").read_bytes()
    (d / "000001.tar").write_bytes(raw[:1024 * 3 + 512 + 30])   # members are 1 KiB: cut inside the 4th one's data
    c = cfg(d, "shards", shuffle_buffer=0, **IDENTITY)
    ds = sources.load(c, MODEL, "train")
    assert ds.counts == [6, 4]         # the duplicate key is left out; the cut member's header is still read
    loader = make_loader(ds, c, 10, seed=0)
    b = loader.batch(0)
    assert b["image"].shape == (10, 1, 8, 8) and loader.skipped == {0: 2}    # garbage + the cut member
    strict = cfg(d, "shards", strict=True, shuffle_buffer=0, **IDENTITY)
    with pytest.raises(DataError, match="000000.tar|000001.tar"):
        make_loader(sources.load(strict, MODEL, "train"), strict, 10, seed=0).batch(0)


def test_fifo_named_like_an_image_is_left_out_never_opened(folder):
    os.mkfifo(folder / "train" / "a" / "pipe.png")
    said = []
    fs = FolderSet(folder / "train", 1, 8, say=said.append)
    assert len(fs) == 18 and fs.not_regular == 1 and "not regular files" in said[0]
    assert len(sources.image_folder(str(folder / "train"), 8, 1)) == 18
    with pytest.raises(DataError, match="not a regular file"):
        open_image(str(folder / "train" / "a" / "pipe.png"), "L")


def test_16_bit_png_is_scaled_to_8_bit_not_saturated(tmp_path):
    a = np.full((8, 8), 32896, np.uint16)                     # 0x8080: 128 in 8 bit
    Image.fromarray(a).save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode.startswith("I")
    assert np.asarray(open_image(str(tmp_path / "x.png"), "L")).max() == 128
    assert np.asarray(open_image((tmp_path / "x.png").read_bytes(), "RGB")).max() == 128


def test_test_split_keeps_the_train_class_indices(folder):
    make_folder(folder, (0, 2, 2), split="test")              # no 'a' in test
    (folder / "test" / "z").mkdir()
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(folder / "test" / "z" / "0.png")
    c = cfg(folder)
    train = sources.load(c, MODEL, "train")
    test = sources.load(c, MODEL, "test", train)
    assert test.classes == ["a", "b", "c"] and test.labels.tolist() == [1, 1, 2, 2]   # z left out, with a warning
    assert test.mean == train.mean


def test_val_folder_is_the_test_split(folder):
    make_folder(folder, (1, 1, 1), split="val")
    assert len(sources.load(cfg(folder), MODEL, "test")) == 3


def test_memory_stays_flat_as_the_number_of_files_grows(tmp_path):
    png = _png(50)

    def peak(n):
        root = tmp_path / str(n)
        (root / "train" / "a").mkdir(parents=True)
        for i in range(n):
            (root / "train" / "a" / f"{i:06d}.png").write_bytes(png)
        c = DataConfig(dataset="folder", root=str(root), workers=0)
        m = ModelConfig(img_size=32, patch_size=4, in_chans=3)
        tracemalloc.start()
        loader = make_loader(sources.load(c, m, "train"), c, 8, seed=0)
        loader.batch(0)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    small, large = peak(600), peak(3000)     # both above the 500 images the channel statistics decode
    # in memory, 2,400 more 32x32 RGB images would be 7.4 MB; streamed, only their names (~10 B each)
    # and labels (8 B each) are held, plus listing's transient strings
    assert large - small < 2400 * 300, (small, large)


def test_write_shards_is_resumable(folder, tmp_path):
    write_shards(folder, tmp_path / "sh", shard_size=5, workers=1, say=lambda m: None)
    out = tmp_path / "sh" / "train"
    first = (out / "000001.tar").stat().st_mtime_ns
    (out / "000002.tar").unlink()                               # as if the run died before it
    said = []
    info = write_shards(folder, tmp_path / "sh", shard_size=5, workers=1, say=said.append)["train"]
    assert "1 written now, 3 already complete" in said[-1] and info["images"] == 18
    assert (out / "000001.tar").stat().st_mtime_ns == first
    assert json.loads((out / "shards.json").read_text())["shards"][2] == {"name": "000002.tar", "samples": 5}


def test_streamed_eval_features_equal_the_in_memory_ones(folder):
    from imagelm.eval.features import extract
    from imagelm.nn.vit import ViT

    c = cfg(folder, workers=1)
    ds = sources.load(c, MODEL, "train")
    mem = sources.image_folder(str(folder / "train"), 8, 1)
    mem.mean, mem.std = ds.mean, ds.std
    torch.manual_seed(0)
    enc = ViT(ModelConfig(img_size=8, patch_size=2, in_chans=1, dim=16, depth=2, heads=2))
    a, b = (extract(enc, d, [1, 2], [2], batch_size=5, bf16=False) for d in (mem, ds))
    assert torch.equal(a.labels, b.labels) and torch.allclose(a.pooled[2], b.pooled[2], atol=1e-5)


# ----------------------------------------------------------------------------- through the trainer

def _train_cfg(root, dataset, *extra):
    from conftest import tiny_cfg
    return tiny_cfg(f"data.dataset={dataset}", f"data.root={root}", "data.workers=2", "train.batch_size=6",
                    "train.steps=4", "train.ckpt_every=2", *extra)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_trainer_resumes_a_shard_run_exactly(folder, tmp_path):
    from imagelm import checkpoint
    from imagelm.train import Trainer

    write_shards(folder, tmp_path / "sh", shard_size=4, workers=1, say=lambda m: None)
    c = _train_cfg(tmp_path / "sh", "shards", "data.shuffle_buffer=3")
    Trainer(c, tmp_path / "a", progress=False).fit()
    Trainer(c, tmp_path / "b", progress=False).fit(until=2)
    Trainer(c, tmp_path / "b", resume=True, progress=False).fit()
    wa, wb = (checkpoint.load_weights(checkpoint.latest(tmp_path / r / "checkpoints")) for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_trainer_counts_replaced_images_per_epoch_in_metrics(folder, tmp_path):
    from imagelm.train import Trainer

    (folder / "train" / "a" / "zz.png").write_bytes(b"\x89PNG truncated")
    Trainer(_train_cfg(folder, "folder", "train.steps=6"), tmp_path / "r", progress=False).fit()
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    end_of_epoch = {r["step"] // 3 - 1: r.get("data_skipped", 0) for r in rows if r["step"] % 3 == 0}
    # 19 files, 3 steps of 6 an epoch: the bad one (index 6) is met in the epochs whose first 18 hold it
    expected = {e: int(6 in epoch_order(19, 0, e)[:18].tolist()) for e in (0, 1)}
    assert end_of_epoch == expected and sum(expected.values()) >= 1


def _rank_worker(rank: int, world: int, root: str, out: str) -> None:
    from imagelm.train import Trainer
    try:
        Trainer(_train_cfg(root, "folder", "train.steps=3"), out, progress=False).fit()
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_with_two_workers_each_train_like_one_process(folder, tmp_path):
    from conftest import run_ranks
    from imagelm.train import Trainer

    Trainer(_train_cfg(folder, "folder", "train.steps=3"), tmp_path / "one", progress=False).fit()
    run_ranks(_rank_worker, str(folder), str(tmp_path / "two"))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == 3 and all(abs(a - b) < 1e-5 * max(1, abs(a)) for a, b in zip(one, two))


def test_shards_by_brace_pattern_find_their_val_twin(folder, tmp_path):
    make_folder(folder, (1, 1, 1), split="val")
    write_shards(folder, tmp_path / "sh", shard_size=5, workers=1, say=lambda m: None)   # 4 train, 1 val shard
    for split in ("train", "val"):
        for i, p in enumerate(sorted((tmp_path / "sh" / split).glob("*.tar"))):
            p.rename(tmp_path / "sh" / f"in1k-{split}-{i:06d}.tar")
    c = cfg(str(tmp_path / "sh" / "in1k-train-{000000..000003}.tar"), "shards")
    train = sources.load(c, MODEL, "train")
    test = sources.load(c, MODEL, "test", train)
    assert len(train) == 18 and len(test) == 3 and test.urls[0].endswith("in1k-val-000000.tar")


def test_shard_stream_skips_whole_epochs_by_counts_and_lands_on_the_same_samples(folder, tmp_path):
    write_shards(folder, tmp_path / "sh", shard_size=4, workers=1, say=lambda m: None)     # 4+4+4+4+2
    ds = sources.load(cfg(tmp_path / "sh", "shards", shuffle_buffer=3), MODEL, "train")
    it = ds.stream(1, 2, seed=4)
    straight = [next(it).key for _ in range(40)]                       # > 4 epochs of reader 1
    for skip in (0, 5, 9, 23, 31):
        it = ds.stream(1, 2, seed=4, skip=skip)
        assert [next(it).key for _ in range(40 - skip)] == straight[skip:]


def test_caption_shards_with_odd_sizes_and_modes_are_converted_not_refused(tmp_path):
    from imagelm.data.corpora import load_image_text

    d = tmp_path / "cap"
    d.mkdir()
    members = []
    for i in range(3):
        members += [(f"{i}.png", _png(40 * i)), (f"{i}.txt", b"a caption")]
    big = io.BytesIO()
    Image.fromarray(np.full((20, 12, 3), 200, np.uint8)).save(big, format="PNG")
    members += [("3.png", big.getvalue()), ("3.txt", b"an rgb one")]
    _tar(d / "000000.tar", members)
    data = load_image_text(str(d))
    assert data.images.shape == (4, 1, 8, 8) and int(data.images[3].float().mean().round()) == 200
