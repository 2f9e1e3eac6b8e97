import io
import itertools
import json
import random
import re
import tarfile

import pytest
import torch

from conftest import needs_fmnist
from imagelm.cli import main
from imagelm.data import corpora, sources
from imagelm.data.webdataset import (ReadStats, ShardWriter, WebDataset, brace_expand, expand_urls, iter_samples,
                                     shard_slice)
from imagelm.tokenizers.text import SPECIAL_TOKENS, TextTokenizer, train_text_tokenizer

WORDS = {w for pair in corpora.ATTRIBUTES.values() for w in pair}


@pytest.fixture(scope="module")
def fm() -> sources.ImageData:
    """The first 200 Fashion-MNIST train images, or look-alike synthetic ones where it is not installed."""
    try:
        d = sources.fashion_mnist("train")
        return sources.ImageData(d.images[:200].clone(), d.labels[:200].clone(), d.classes)
    except sources.DatasetMissing:
        d = sources.synthetic(200, 28, 1, classes=10)
        return sources.ImageData(d.images, d.labels, list(sources.FASHION_MNIST_CLASSES))


def _samples(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"__key__": f"{i:06d}", "png": torch.randint(0, 256, (1 if i % 2 else 3, 5, 7), generator=g,
                                                         dtype=torch.uint8),
             "txt": f"caption {i} — naïve ✓", "json": {"label": i}} for i in range(n)]


def test_shards_round_trip(tmp_path):
    samples = _samples(7)
    with ShardWriter(tmp_path, "cap", maxcount=3) as w:
        for s in samples:
            w.write(s)
    assert [p.name for p in w.shards] == ["cap-000000.tar", "cap-000001.tar", "cap-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in w.shards]      # no temp files left
    stats = ReadStats()
    got = list(iter_samples(str(tmp_path / "cap-{000000..000002}.tar"), stats=stats))
    assert stats == ReadStats(samples=7, skipped=0, bad_shards=0)
    for a, b in zip(samples, got):
        assert b["__key__"] == a["__key__"] and b["txt"] == a["txt"] and b["json"] == a["json"]
        assert b["png"].dtype == torch.uint8 and torch.equal(b["png"], a["png"])
    assert [s["__key__"] for s in iter_samples(tmp_path)] == [s["__key__"] for s in samples]          # a directory
    assert [s["__key__"] for s in iter_samples(str(tmp_path / "cap-*.tar"))][:3] == ["000000", "000001", "000002"]


def test_corrupt_sample_is_skipped_and_counted_and_fails_under_strict(tmp_path):
    with ShardWriter(tmp_path, "x") as w:
        for s in _samples(3):
            w.write(s)
    bad = tmp_path / "x-000001.tar"
    with tarfile.open(bad, "w") as tf:
        for name, data in [("a.png", b"\x89PNG\r\n\x1a\n garbage"), ("a.txt", b"broken"),
                           ("b.png", _png_bytes()), ("b.txt", b"fine")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    stats = ReadStats()
    keys = [s["__key__"] for s in iter_samples(tmp_path, stats=stats)]
    assert keys == ["000000", "000001", "000002", "b"] and stats.skipped == 1 and stats.samples == 4
    with pytest.raises(ValueError, match=r"'a'.*x-000001\.tar"):
        list(iter_samples(tmp_path, strict=True))
    truncated = tmp_path / "x-000002.tar"                       # a shard cut off mid-member: what it had, then counted
    truncated.write_bytes(w.shards[0].read_bytes()[:3 * 1024 + 600])         # sample 0 (3 members), then a cut
    stats = ReadStats()
    assert [s["__key__"] for s in iter_samples(truncated, stats=stats)] == ["000000"] and stats.bad_shards == 1
    with pytest.raises(ValueError, match="x-000002.tar"):
        list(iter_samples(truncated, strict=True))


def _png_bytes() -> bytes:
    from imagelm.data.webdataset import encode_png
    return encode_png(torch.zeros(1, 4, 4, dtype=torch.uint8))


def test_ranks_and_workers_read_every_shard_once(tmp_path):
    assert brace_expand("a-{008..010}-{x,y}.tar") == ["a-008-x.tar", "a-008-y.tar", "a-009-x.tar", "a-009-y.tar",
                                                      "a-010-x.tar", "a-010-y.tar"]
    shards = [f"s{i}" for i in range(11)]
    parts = [shard_slice(shards, r, 2, k, 3) for r in range(2) for k in range(3)]
    assert sorted(itertools.chain(*parts)) == sorted(shards) and sum(map(len, parts)) == len(shards)
    with ShardWriter(tmp_path, "s", maxcount=2) as w:
        for s in _samples(9):
            w.write(s)
    urls = expand_urls(tmp_path)
    assert len(urls) == 5
    keys = [s["__key__"] for r in range(2) for k in range(2) for s in iter_samples(urls, r, 2, k, 2)]
    assert sorted(keys) == [f"{i:06d}" for i in range(9)]
    loader = torch.utils.data.DataLoader(WebDataset(urls), batch_size=None, num_workers=2)
    assert sorted(s["__key__"] for s in loader) == [f"{i:06d}" for i in range(9)]


def test_attribute_words_follow_the_pixels(fm, tmp_path):
    th = corpora.attribute_thresholds(fm.images, fm.labels, 10)
    attrs = corpora.instance_attributes(fm.images, fm.labels, th)
    i = next(i for i, a in enumerate(attrs) if a["brightness"] == "light")
    x = fm.images[i:i + 1].int()
    ink = x > corpora.INK
    darker = torch.where(ink, (x * 0.3).clamp(min=corpora.INK + 1), x).to(torch.uint8)   # same ink area and box
    a2 = corpora.instance_attributes(darker, fm.labels[i:i + 1], th)[0]
    assert a2["brightness"] == "dark" and a2["size"] == attrs[i]["size"] and a2["width"] == attrs[i]["width"]
    data = sources.ImageData(torch.cat([fm.images, darker]), torch.cat([fm.labels, fm.labels[i:i + 1]]), fm.classes)
    corpora.build_captions(tmp_path, "train", data=data)
    got = corpora.load_image_text(tmp_path)
    assert len(got) == 201 and torch.equal(got.images, data.images) and torch.equal(got.labels, data.labels)
    assert got.meta[-1]["attributes"]["brightness"] == "dark" and len(set(got.captions)) > 150
    mentioned = total = 0
    for cap, m in zip(got.captions, got.meta):
        said = set(re.findall(r"[a-z]+", cap)) & WORDS
        true = {w for w in m["attributes"].values() if w}
        assert said <= true, (cap, m)                        # never a word the pixels do not support
        mentioned, total = mentioned + len(said), total + len(true)
        assert any(re.search(rf"\b{re.escape(s)}\b", cap) for s in corpora.SYNONYMS[m["class"]]), cap
    assert mentioned > 0.7 * total


def test_scene_captions_say_what_is_where(fm, tmp_path):
    items = [{"class": "sneaker", "attributes": {}}, {"class": "bag", "attributes": {}}]

    def phrasings(a, b, layout):
        return {t.format(corpora.noun_phrase(x), corpora.noun_phrase(y)) for t in corpora.SCENE_TEMPLATES[layout]
                for x in corpora.SYNONYMS[a] for y in corpora.SYNONYMS[b]}
    rng = random.Random(0)
    caps = {corpora.scene_caption(items, "horizontal", rng) for _ in range(50)}
    assert caps <= phrasings("sneaker", "bag", "horizontal") and not caps & phrasings("bag", "sneaker", "horizontal")
    assert "a sneaker on the left and a bag on the right." in phrasings("sneaker", "bag", "horizontal")

    corpora.build_scenes(tmp_path, "train", n=30, data=fm)
    got = corpora.load_image_text(tmp_path)
    assert got.images.shape == (30, 1, 56, 56) and (got.labels == -1).all()
    for img, cap, m in zip(got.images, got.captions, got.meta):
        covered = torch.zeros_like(img, dtype=torch.bool)
        for it in m["items"]:
            x, y, w, h = it["box"]
            assert (img[:, y:y + h, x:x + w] >= fm.images[it["index"]]).all()      # the item is where it says
            covered[:, y:y + h, x:x + w] = True
            assert any(s in cap for s in corpora.SYNONYMS[it["class"]]), cap
        assert (img[~covered] == 0).all()
        words = {"horizontal": ("left", "right"), "vertical": ("top", "bottom", "above", "below")}[m["layout"]]
        assert [it["position"] for it in m["items"]] == list(corpora.POSITIONS[m["layout"]])
        assert any(w in cap for w in words), cap


def test_interleaved_documents(fm, tmp_path):
    corpora.build_interleaved(tmp_path, "train", n=40, data=fm)
    docs = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    names = {s["__key__"] for s in iter_samples(tmp_path)}
    assert len(docs) == 40 and all(1 <= len(d["image_info"]) <= 4 for d in docs)
    for d in docs:
        for im in d["image_info"]:
            i = im["matched_text_index"]
            assert 0 <= i < len(d["text_list"]) and im["image_name"] == im["image_name"].split(".")[0] + ".png"
            assert im["image_name"][:-4] in names
            told = d["text_list"][i - 1] if i > 0 else d["text_list"][i]       # the text that describes it
            assert any(s in told for s in corpora.SYNONYMS[im["class"]]), (told, im["class"])
    assert any(d["image_info"][0]["matched_text_index"] == 0 for d in docs)      # documents that open with an image
    assert any(d["image_info"][0]["matched_text_index"] > 0 for d in docs)
    loaded = corpora.load_interleaved(tmp_path / "docs.jsonl", tmp_path)
    assert loaded.missing_images == 0
    doc = loaded.docs[0]
    for im, meta in zip(doc.images, doc.meta):
        assert torch.equal(im, fm.images[meta["index"]])
    seq = doc.interleave()
    assert [s for s in seq if isinstance(s, str)] == doc.texts
    assert sum(isinstance(s, torch.Tensor) for s in seq) == len(doc.images)
    (tmp_path / "images-000000.tar").unlink()
    assert corpora.load_interleaved(tmp_path / "docs.jsonl", tmp_path).missing_images > 0


@needs_fmnist
def test_ensure_corpus_builds_once_rebuilds_half_built_and_cli(tmp_path, capsys):
    c = corpora.ensure_corpus("captions", "test", root=tmp_path, n=30)
    assert c.manifest["samples"] == 30 and len(c.shards) == 1 and c.jsonl is None
    stamp = (c.dir / "manifest.json").stat().st_mtime_ns
    again = corpora.ensure_corpus("captions", "test", root=tmp_path, n=30)
    assert (again.dir / "manifest.json").stat().st_mtime_ns == stamp                  # cached: not rebuilt
    (c.dir / "manifest.json").unlink()                         # as if the build had been killed
    c2 = corpora.ensure_corpus("captions", "test", root=tmp_path, n=30)
    assert c2.manifest["samples"] == 30 and (c2.dir / "manifest.json").exists()
    assert main(["data", "interleaved", "--out", str(tmp_path / "i"), "--split", "test", "--n", "5"]) == 0
    assert "5 documents" in capsys.readouterr().out and (tmp_path / "i" / "test" / "docs.jsonl").exists()


def test_text_tokenizer_round_trips_pads_and_truncates(fm, tmp_path):
    rng = random.Random(0)
    texts = [corpora.caption(fm.classes[int(c)], a, rng) for c, a in
             zip(fm.labels, corpora.instance_attributes(fm.images, fm.labels,
                                                        corpora.attribute_thresholds(fm.images, fm.labels, 10)))]
    tok = train_text_tokenizer(texts, vocab_size=400)
    assert 261 < tok.vocab_size <= 400
    assert [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    for t in texts[:20] + ["unseen wörds ✓, spaces  and <pad> text", ""]:
        ids = tok.encode(t, 64)
        assert ids.shape == (1, 64) and ids.dtype == torch.int64 and tok.decode(ids[0]) == t
    ids = tok.encode(["a bag.", texts[0] * 5], context_length=8)
    n = len(tok.encode_ids("a bag."))
    assert ids[0, n] == tok.eot_id and (ids[0, n + 1:] == tok.pad_id).all()
    assert ids[1, -1] == tok.eot_id and (ids[1] != tok.pad_id).all()        # cut, still ends with end-of-text
    assert tok.eot_positions(ids).tolist() == [n, 7]
    assert len(tok.encode_ids(texts[1])) < len(texts[1].encode()) / 2     # merges learnt: fewer tokens than bytes
    path = tok.save(tmp_path / "run")
    assert path.name == "tokenizer.json"
    again = TextTokenizer.load(tmp_path / "run")
    assert torch.equal(again.encode(texts[:5], 16), tok.encode(texts[:5], 16)) and again.decode(ids) == tok.decode(ids)
