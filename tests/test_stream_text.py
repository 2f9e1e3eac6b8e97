"""Image-text data streamed from disk: WebDataset shards with captions (a user's own, and the built
corpora) and interleaved documents, with each sample's text tokenized (laid out) in the workers."""
import io
import itertools
import json
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_cfg
from imagelm.config import ModelConfig
from imagelm.data import corpora, sources
from imagelm.data.documents import InterleavedSet, parts
from imagelm.data.images import DataError
from imagelm.data.loader import BatchLoader, make_loader
from imagelm.data.shards import ShardSet
from imagelm.data.stream import StreamLoader, epoch_order
from imagelm.tokenizers.text import CaptionTokens, train_text_tokenizer
from test_stream import cfg as folder_cfg
from test_stream import _tar, ids

MODEL = ModelConfig(img_size=8, patch_size=2, in_chans=1)
IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
WORDS = ["top", "upper middle", "lower middle", "bottom"]


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def caption(i: int) -> str:
    return f"item {i}: a bright bar at the {WORDS[i % 4]}."


def write_pairs(root, n: int, per_shard: int = 6, size: int = 8, bars: bool = False, stats: bool = True):
    """img2dataset-style shards: KEY.png + KEY.txt + KEY.json, and NNNNN_stats.json. Sample i is a
    constant grey level 10 + 2i (its id), or with `bars` a bright bar whose place its caption names."""
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for s in range(0, n, per_shard):
        members = []
        for i in range(s, min(n, s + per_shard)):
            if bars:
                a = g.integers(0, 60, (size, size), dtype=np.uint8)
                a[(i % 4) * size // 4:(i % 4 + 1) * size // 4] += 150
            else:
                a = np.full((size, size), (10 + 2 * i) % 256, np.uint8)
            members += [(f"{i:06d}.png", _png(a)), (f"{i:06d}.txt", caption(i).encode()),
                        (f"{i:06d}.json", json.dumps({"label": i % 4}).encode())]
        _tar(root / f"{s // per_shard:05d}.tar", members)
        if stats:
            (root / f"{s // per_shard:05d}_stats.json").write_text(json.dumps({"successes": min(n, s + per_shard) - s}))
    return root


def cfg(root, dataset="image-text", **kw):
    return folder_cfg(root, dataset, **kw)


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs", 24)


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer([caption(i) for i in range(200)], 300)


def test_streamed_image_text_shards_yield_the_in_memory_pairs(pairs, tok):
    c = cfg(pairs, workers=2, **IDENTITY)
    ds = sources.load(c, MODEL, "train")
    assert isinstance(ds, ShardSet) and ds.text and len(ds) == 24
    mem = corpora.load_image_text(str(pairs))
    mem = sources.ImageData(mem.images, mem.labels, [], texts=mem.captions, mean=ds.mean, std=ds.std)
    text = CaptionTokens(tok, 16)
    a, b = BatchLoader(mem, c, 6, seed=3, text=text), make_loader(ds, c, 6, seed=3, text=text)
    seen = {}
    for loader in (a, b):
        got = {}
        for s in range(4):                                   # one epoch
            x = loader.batch(s)
            for i, y, t in zip(ids(x["image"], ds.mean, ds.std), x["label"].tolist(), x["text"]):
                got[i] = (y, t.tolist())
        seen[loader] = got
    assert seen[a] == seen[b] and len(seen[b]) == 24               # every sample once, the same pair
    for i, (y, t) in seen[b].items():
        k = (i - 10) // 2
        assert y == k % 4 and t == tok.encode([caption(k)], 16)[0].tolist()


def test_image_text_resume_replays_images_texts_and_noise(pairs, tok):
    c = cfg(pairs, workers=2, shuffle_buffer=5)
    ds = sources.load(c, MODEL, "train")
    text = CaptionTokens(tok, 16)
    straight = [make_loader(ds, c, 4, seed=5, noise_dim=2, text=text).batch(s) for s in range(12)]
    resumed = make_loader(ds, c, 4, seed=5, noise_dim=2, text=text)
    for s in (7, 8, 11):                                    # across the epoch's end (6 steps)
        b = resumed.batch(s)
        for k in ("image", "label", "noise", "text"):
            assert torch.equal(b[k], straight[s][k]), (s, k)


def test_two_ranks_of_two_workers_read_one_process_batches_each_sample_once_an_epoch(pairs, tok):
    ds = sources.load(cfg(pairs, **IDENTITY), MODEL, "train")
    text = CaptionTokens(tok, 16)
    one = StreamLoader(ds, cfg(pairs, workers=0, **IDENTITY), 8, seed=1, noise_dim=3, text=text)
    ranks = [StreamLoader(ds, cfg(pairs, workers=2, **IDENTITY), 8, seed=1, noise_dim=3, rank=r, world=2, text=text)
             for r in range(2)]
    epoch = []
    for s in range(6):                                      # two epochs of 3 steps
        b = one.batch(s)
        parts_ = [r.batch(s) for r in ranks]
        for k in ("image", "label", "noise", "text"):
            assert torch.equal(torch.cat([p[k] for p in parts_]), b[k]), (s, k)
        if s < 3:
            epoch += ids(b["image"], ds.mean, ds.std)
    assert sorted(epoch) == list(range(10, 10 + 2 * 24, 2))


def test_a_sample_without_caption_or_image_is_replaced_and_counted_and_fatal_under_strict(tmp_path, tok):
    d = tmp_path / "bad"
    write_pairs(d, 12)
    _tar(d / "00002.tar", [("k0.png", _png(np.full((8, 8), 200, np.uint8))), ("k0.txt", b"a caption"),
                           ("k1.png", b"garbage"), ("k1.txt", b"the image is garbage"),
                           ("k2.txt", b"a caption alone")])     # k0 fine, k1 undecodable, k2 no image (left out)
    (d / "00002_stats.json").write_text(json.dumps({"successes": 2}))
    _tar(d / "00003.tar", [("k3.png", _png(np.full((8, 8), 90, np.uint8)))])        # an image without caption
    (d / "00003_stats.json").write_text(json.dumps({"successes": 1}))
    c = cfg(d, shuffle_buffer=0, **IDENTITY)
    loader = make_loader(sources.load(c, MODEL, "train"), c, 15, seed=0, text=CaptionTokens(tok, 16))
    b = loader.batch(0)
    assert b["image"].shape == (15, 1, 8, 8) and b["text"].shape == (15, 16) and loader.skipped == {0: 2}
    strict = cfg(d, strict=True, shuffle_buffer=0, **IDENTITY)
    with pytest.raises(DataError, match="'k1'.*00002.tar|'k3'.*00003.tar"):
        make_loader(sources.load(strict, MODEL, "train"), strict, 15, seed=0, text=CaptionTokens(tok, 16)).batch(0)


def test_a_cut_image_text_shard_is_read_to_the_cut(tmp_path, tok):
    d = write_pairs(tmp_path / "cut", 12, stats=False)
    raw = (d / "00001.tar").read_bytes()
    (d / "00001.tar").write_bytes(raw[:len(raw) // 2])
    c = cfg(d, shuffle_buffer=0, **IDENTITY)
    ds = sources.load(c, MODEL, "train")
    assert ds.counts[0] == 6 and 0 < ds.counts[1] < 6         # the header scan stops at the cut
    loader = make_loader(ds, c, len(ds), seed=0, text=CaptionTokens(tok, 16))
    b = loader.batch(0)
    assert len(b["image"]) == len(ds) and sum(loader.skipped.values()) <= 1     # a member cut inside its data


def test_a_shard_cut_after_its_count_keeps_the_epoch_length_and_resume_exact(tmp_path):
    d = write_pairs(tmp_path / "cut", 24)                    # _stats.json: 6 a shard
    raw = (d / "00001.tar").read_bytes()
    (d / "00001.tar").write_bytes(raw[:len(raw) // 2])       # cut after counting: 4 samples, not 6
    ds = sources.load(cfg(d), MODEL, "train")
    assert ds.counts == [6, 6, 6, 6]
    for stream in range(4):
        straight = [r.key for r in itertools.islice(ds.stream(stream, 4, seed=2, buffer=2), 30)]
        for skip in (4, 6, 7, 13, 25):                       # epochs of 6 (as counted) however the shards fall
            assert [r.key for r in itertools.islice(ds.stream(stream, 4, seed=2, skip=skip, buffer=2),
                                                    30 - skip)] == straight[skip:], (stream, skip)


def test_memory_stays_flat_as_the_image_text_corpus_grows(tmp_path, tok):
    def peak(n):
        root = write_pairs(tmp_path / str(n), n, per_shard=100, size=32)
        c = cfg(root, shuffle_buffer=200)
        m = ModelConfig(img_size=32, patch_size=4, in_chans=1)
        tracemalloc.start()
        loader = make_loader(sources.load(c, m, "train"), c, 8, seed=0, text=CaptionTokens(tok, 16))
        loader.batch(0)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    small, large = peak(600), peak(3000)
    # in memory, 2,400 more 32x32 images and their captions would be > 2.5 MB; streamed, only a
    # shard's name and count each (24 more shards), the shuffle buffer is the same 200 references
    assert large - small < 2400 * 40, (small, large)


# ----------------------------------------------------------------------------- through the trainer

CLIP = ("method=clip", "clip.embed_dim=16", "clip.context_length=16", "clip.text_vocab=300", "clip.text_dim=32",
        "clip.text_depth=2", "clip.text_heads=2", "model.in_chans=1", "eval.dataset=synthetic")


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_clip_learns_from_a_users_image_text_shards(tmp_path):
    from imagelm.train import Trainer

    root = write_pairs(tmp_path / "pairs", 96, per_shard=16, bars=True)
    c = tiny_cfg(*CLIP, "data.dataset=image-text", f"data.root={root}", "data.workers=1", "train.batch_size=16",
                 "train.steps=40", "train.lr=2e-3", "train.warmup=0.1", "data.flip=false", "train.ckpt_every=100")
    t = Trainer(c, tmp_path / "run", progress=False)
    assert isinstance(t.loader, StreamLoader)
    t.fit()
    losses = _losses(tmp_path / "run")
    # InfoNCE over 16 pairs starts at ln 16 = 2.77 (chance); four kinds of caption, so it can fall to ~ln 4
    assert all(np.isfinite(losses)) and np.mean(losses[-10:]) < np.log(16) - 0.2, losses


def test_trainer_counts_unreadable_image_text_samples_in_metrics(tmp_path):
    from imagelm.train import Trainer

    root = write_pairs(tmp_path / "pairs", 15, per_shard=15)
    _tar(root / "00001.tar", [("bad.png", b"not a png"), ("bad.txt", b"a caption of nothing")])
    (root / "00001_stats.json").write_text(json.dumps({"successes": 1}))
    c = tiny_cfg(*CLIP, "data.dataset=image-text", f"data.root={root}", "data.workers=1", "train.batch_size=16",
                 "train.steps=2", "train.ckpt_every=100")
    Trainer(c, tmp_path / "run", progress=False).fit()           # every step is the whole epoch: 'bad' in each
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data_skipped"] for r in rows] == [1, 1]


@pytest.mark.parametrize("method", ["lcl", "beit3"])
def test_lcl_and_beit3_train_from_a_users_image_text_shards(tmp_path, method):
    from test_contract import TINY
    from imagelm.train import Trainer

    root = write_pairs(tmp_path / "pairs", 48, per_shard=12, bars=True)
    own = [o for o in TINY[method] if not o.startswith(("data.", "eval."))]
    c = tiny_cfg(f"method={method}", *own, "data.dataset=image-text", f"data.root={root}", "data.workers=1",
                 "train.batch_size=8", "train.steps=3", "eval.dataset=synthetic")
    Trainer(c, tmp_path / "run", progress=False).fit()
    assert all(np.isfinite(_losses(tmp_path / "run")))


@pytest.mark.parametrize("method", ["clip", "lcl", "beit3"])
def test_bench_times_text_methods_on_a_users_image_text_shards(tmp_path, method):
    """`imagelm bench` fits the method's tokenizers as the trainer does and times steps whose
    batches carry the text laid out per sample."""
    from test_contract import TINY
    from imagelm.bench import bench

    root = write_pairs(tmp_path / "pairs", 32, per_shard=8)
    own = [o for o in TINY[method] if not o.startswith(("data.", "eval."))]
    c = tiny_cfg(f"method={method}", *own, "data.dataset=image-text", f"data.root={root}", "data.workers=1")
    res = bench(c, batch_size=8, steps=1, peer=False)
    assert res["recipe_method"] == method and res["img_per_s"] > 0 and res["flops_per_img"] > 0


def test_prepare_sees_a_bounded_text_sample_and_decodes_no_image_for_a_text_tokenizer(pairs, monkeypatch, tmp_path):
    from imagelm.methods import build_method

    monkeypatch.setattr(sources, "PREPARE_TEXTS", 8)
    ds = sources.load(cfg(pairs), MODEL, "train")
    view = sources.preview(ds)
    m = build_method(tiny_cfg(*CLIP))
    m.prepare(view, tmp_path, log=lambda *a: None)
    assert len(view.texts) == 8 and "_decoded" not in view.__dict__       # 8 captions, no image decoded
    assert {t.split(":")[0] for t in view.texts} == {f"item {i}" for i in (0, 1, 6, 7, 12, 13, 18, 19)}   # spread


@pytest.mark.parametrize("documents", [True, False])
def test_beit3_text_only_stream_draws_from_a_bounded_pool(tmp_path, monkeypatch, documents):
    from test_contract import TINY
    from imagelm.methods import build_method

    monkeypatch.setattr(sources, "PREPARE_TEXTS", 8)
    root = tmp_path / "corpora"
    fm = sources.synthetic(40, 8, 1, classes=10)
    fm.classes = list(sources.FASHION_MNIST_CLASSES)
    corpora.build_captions(root / "captions" / "train", "train", n=30, data=fm)
    corpora.build_interleaved(root / "interleaved" / "train", "train", n=12, data=fm)
    c = tiny_cfg("method=beit3", *TINY["beit3"], "data.dataset=captions", f"data.root={root}", "data.corpus_size=30",
                 f"beit3.text_documents={str(documents).lower()}")
    ds = sources.load(c.data, c.model, "train")
    m = build_method(c)
    m.prepare(sources.preview(ds), tmp_path / "run", log=lambda *a: None)
    assert len(m.pool) == (16 if documents else 8)            # 8 captions (+ 8 documents' text), tokenized once
    b = make_loader(ds, c.data, 10, seed=0, noise_dim=m.noise_dim, text=m.text_transform()).batch(0)
    pool = {tuple(r) for r in m.pool.long().tolist()}
    assert all(tuple(r) in pool for r in b["text_only"].tolist())


# ----------------------------------------------------------------------------- interleaved documents

@pytest.fixture
def docs(tmp_path):
    """A built interleaved corpus of 12 documents with 8x8 images (no resizing on either path)."""
    fm = sources.synthetic(40, 8, 1, classes=10)
    fm.classes = list(sources.FASHION_MNIST_CLASSES)
    out = tmp_path / "corpora" / "interleaved" / "train"
    corpora.build_interleaved(out, "train", n=12, data=fm)
    return out


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_streamed_documents_are_the_in_memory_ones_laid_out_in_the_worker(docs, tok):
    from imagelm.methods.lcl import DocumentLayout

    c = cfg(docs.parent.parent, "interleaved", workers=2, corpus_size=12, max_images=4, **IDENTITY)
    ds = sources.load(c, MODEL, "train")
    assert isinstance(ds, InterleavedSet) and len(ds) == 12 and ds.images_per_sample == 4
    mem = corpora.load_interleaved(docs / "docs.jsonl", sorted(map(str, docs.glob("*.tar"))))
    lay = DocumentLayout(tok, 40, 1, 4)
    loader = make_loader(ds, c, 4, seed=2, text=lay)
    lines = _lines(docs / "docs.jsonl")
    for s in (0, 1, 2, 3):                                  # into the second epoch
        b = loader.batch(s)
        assert b["image"].shape == (4, 4, 1, 8, 8) and b["tokens"].shape == (4, 40)
        idx = epoch_order(12, 2, s // 3)[(s % 3) * 4:(s % 3 + 1) * 4].tolist()     # the in-memory loader's order
        for k, i in enumerate(idx):
            d = mem.docs[i]
            got = (b["image"][k] * ds.std[0] + ds.mean[0]).mul(255).round()
            for j, im in enumerate(d.images):
                assert torch.equal(got[j], im.float()), (s, k, j)
            assert not got[len(d.images):].any()            # empty slots stay zero
            want = lay(parts(lines[i], list(range(len(d.images)))), None)
            assert all(torch.equal(b[key][k], want[key]) for key in want)


def test_a_missing_image_is_left_out_and_counted_and_a_bad_line_replaced_or_fatal_under_strict(docs, tok):
    from imagelm.methods.lcl import DocumentLayout

    lines = (docs / "docs.jsonl").read_bytes().splitlines()
    missing = json.dumps({"text_list": ["a.", "b."], "image_info": [{"image_name": "nowhere.png",
                                                                     "matched_text_index": 1}]}).encode()
    (docs / "docs.jsonl").write_bytes(b"\n".join(lines[:2] + [missing, b"{not json"] + lines[2:10]) + b"\n")
    c = cfg(docs.parent.parent, "interleaved", corpus_size=12, **IDENTITY)
    loader = make_loader(sources.load(c, MODEL, "train"), c, 12, seed=0, text=DocumentLayout(tok, 40, 1, 4))
    loader.batch(0)
    assert loader.skipped == {0: 2}                          # the missing image, the line that is not JSON
    strict = cfg(docs.parent.parent, "interleaved", corpus_size=12, strict=True, **IDENTITY)
    ds = sources.load(strict, MODEL, "train")
    with pytest.raises(DataError, match=r"nowhere.png|docs.jsonl:4: invalid JSON"):
        make_loader(ds, strict, 12, seed=0, text=DocumentLayout(tok, 40, 1, 4)).batch(0)


def test_document_memory_is_an_index_not_the_documents(tmp_path):
    def held(n):
        fm = sources.synthetic(64, 32, 1, classes=10)
        fm.classes = list(sources.FASHION_MNIST_CLASSES)
        out = tmp_path / str(n) / "interleaved" / "train"
        corpora.build_interleaved(out, "train", n=n, data=fm)
        c = cfg(out.parent.parent, "interleaved", corpus_size=n)
        m = ModelConfig(img_size=32, patch_size=4, in_chans=1)
        tracemalloc.start()
        ds = sources.load(c, m, "train")
        make_loader(ds, c, 8, seed=0).batch(0)
        now, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return now, peak, sum(len(json.loads(line)["image_info"]) for line in (out / "docs.jsonl").open())

    (now_a, peak_a, a), (now_b, peak_b, b) = held(400), held(2000)
    # held: 8 B a document (its line's offset) and ~35 B an image (key, shard, offset, size); in
    # memory the 1,600 more documents' 32x32 images alone would be ~4 MB
    assert now_b - now_a < 1600 * 8 + (b - a) * 48, (now_a, now_b, b - a)
    assert peak_b - peak_a < 3 * 2 ** 20, (peak_a, peak_b)    # reading the JSONL by 1 MiB chunks: a bound


def test_the_document_index_is_read_from_the_cache_until_the_corpus_changes(docs, monkeypatch, tmp_path):
    from imagelm.data import documents

    monkeypatch.setenv("IMAGELM_CACHE", str(tmp_path / "cache"))
    built = []
    real = documents.line_starts
    monkeypatch.setattr(documents, "line_starts", lambda path: built.append(path) or real(path))
    c = cfg(docs.parent.parent, "interleaved", corpus_size=12, **IDENTITY)
    first, again = sources.load(c, MODEL, "train"), sources.load(c, MODEL, "train")
    assert len(built) == 1 and len(list((tmp_path / "cache" / "index").glob("documents-*.npz"))) == 1
    for a in ("starts", "keys", "where"):
        assert np.array_equal(getattr(first, a), getattr(again, a))
    assert again.find(documents.image_key(json.loads(
        (docs / "docs.jsonl").read_text().splitlines()[0])["image_info"][0]["image_name"])) is not None
    lines = (docs / "docs.jsonl").read_bytes().splitlines()
    (docs / "docs.jsonl").write_bytes(b"\n".join(lines[:5]) + b"\n")       # rewritten: indexed again
    assert len(sources.load(c, MODEL, "train")) == 5 and len(built) == 2
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("IMAGELM_CACHE", str(tmp_path / "a-file" / "cache"))   # no cache can be written: still loads
    assert len(sources.load(c, MODEL, "train")) == 5 and len(built) == 3
