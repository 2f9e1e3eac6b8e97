import json
import math

import pytest
import torch

from conftest import needs_fmnist, tiny_cfg
from imagelm.methods import build_method
from imagelm.methods.beit3 import IMAGE, MASK_ID, PAD_ID, PAIR, TEXT, BEiT3
from imagelm.nn.transformer import LANGUAGE, VISION, Transformer
from imagelm.nn.vit import ViT

BEIT3 = ("method=beit3", "beit3.vocab=32", "beit3.tokenizer_steps=20", "beit3.context_length=12",
         "beit3.text_vocab=400", "beit3.vl_layers=1")


def _beit3(*extra):
    torch.manual_seed(0)
    return build_method(tiny_cfg(*BEIT3, *extra)).eval()


def _text(n=4, L=12):
    g = torch.Generator().manual_seed(1)
    t = torch.randint(5, 400, (n, L), generator=g)
    for i, e in enumerate(torch.randint(4, L - 1, (n,), generator=g)):
        t[i, e], t[i, e + 1:] = 0, PAD_ID                   # <|endoftext|>, then <pad>
    return t


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))


def test_each_token_goes_only_through_its_modalitys_ffn():
    m = _beit3()
    images, text = torch.randn(4, 1, 8, 8), _text()
    img, txt, pair = m.image_features(images), m.text_features(text), m.pair_features(images, text)
    probe = m.encoder.features(images, [1, 2])                # what probes read
    _perturb(torch.nn.ModuleList(b.experts[0] for b in m.encoder.transformer.blocks))    # the language FFNs
    assert torch.equal(m.image_features(images), img)
    assert all(torch.equal(a, b) for a, b in zip(m.encoder.features(images, [1, 2]), probe))
    assert not torch.allclose(m.text_features(text), txt)
    assert not torch.allclose(m.pair_features(images, text), pair)


def test_vision_language_ffn_only_in_the_top_layers_and_only_for_pairs():
    m = _beit3()
    blocks = m.encoder.transformer.blocks
    assert [len(b.experts) for b in blocks] == [1, 2]      # depth 2, vl_layers 1: language (+ VL at the top)
    images, text = torch.randn(4, 1, 8, 8), _text()
    img, txt, pair = m.image_features(images), m.text_features(text), m.pair_features(images, text)
    _perturb(blocks[-1].experts[1])                         # the vision-language FFN
    assert torch.equal(m.image_features(images), img)
    assert torch.equal(m.text_features(text), txt)
    assert not torch.allclose(m.pair_features(images, text), pair)
    routes = m.encoder.transformer.routes([VISION, VISION, LANGUAGE], fuse=True)
    assert routes == [[0, 0, 1], [2, 2, 2]]


def test_one_modality_without_vl_layers_is_the_plain_vit():
    cfg = tiny_cfg().model
    torch.manual_seed(0)
    plain, multi = ViT(cfg), ViT(cfg, multiway=True)
    missing, unexpected = multi.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".experts." in k for k in missing)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(multi.features(x, [1, 2])[1], plain.features(x, [1, 2])[1])
    tokens = multi.embed(x)
    assert torch.equal(multi(tokens, modality=[VISION] * tokens.shape[1]), plain(tokens))
    with pytest.raises(ValueError, match="vl_layers"):
        Transformer(16, 2, 2, vl_layers=1)                  # VL experts need a multiway model


def test_masking_ratios_per_modality():
    m = _beit3("beit3.mix=[1,1,2]")
    text = _text(64)
    u = torch.rand(64, 12)
    for ratio in (0.15, 0.5):
        masked, where = BEiT3.mask_text(text, u, ratio)
        words = ((text != PAD_ID) & (text != 0)).sum(1)
        assert torch.equal(where.sum(1), torch.clamp((ratio * words).round(), min=1).long())
        assert (masked[where] == MASK_ID).all() and torch.equal(masked[~where], text[~where])
        assert not where[text == PAD_ID].any() and not where[text == 0].any()      # never padding or <eot>
    vis = m.mask_image(torch.rand(32))
    assert (vis.sum(1) == m.count).all() and m.count == round(0.4 * m.encoder.num_patches)
    roles = m.roles(torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    share = torch.bincount(roles, minlength=3).float() / len(roles)
    assert torch.allclose(share, torch.tensor([0.25, 0.25, 0.5]), atol=0.02)
    assert m.roles(torch.tensor([0.0, 0.26, 0.99])).tolist() == [IMAGE, TEXT, PAIR]


def test_loss_covers_only_masked_positions():
    m = _beit3("beit3.mix=[0,0,1]").train()                 # pairs only: masked patches and words
    codes = torch.randint(0, 32, (4, m.encoder.num_patches))
    m.tokenizer.encode = lambda images: codes
    seen = []
    loss = m.loss
    m.loss = lambda preds, batch: seen.extend(preds) or loss(preds, batch)
    text = _text(4)
    batch = {"image": torch.randn(4, 1, 8, 8), "noise": torch.rand(4, m.noise_dim), "text": text, "text_only": text}
    m(batch)
    (img_logits, img_target, img_rows), (txt_logits, txt_target, txt_rows) = seen
    vis = m.mask_image(batch["noise"][:, 1]).bool()
    _, where = BEiT3.mask_text(text, batch["noise"][:, 2:], m.cfg.pair_text_mask_ratio)
    assert torch.equal(img_target, codes[vis]) and len(img_logits) == vis.sum() == 4 * m.count
    assert torch.equal(txt_target, text[where]) and len(txt_logits) == where.sum()
    assert torch.equal(img_rows, vis.nonzero()[:, 0]) and torch.equal(txt_rows, where.nonzero()[:, 0])
    # the loss: each sample's mean cross-entropy over its masked patches and words, then the batch mean
    ce = [torch.nn.functional.cross_entropy(l.float(), t, reduction="none") for l, t in
          ((img_logits, img_target), (txt_logits, txt_target))]
    per_sample = [torch.cat([c[r == i] for c, r in zip(ce, (img_rows, txt_rows))]).mean() for i in range(4)]
    assert torch.allclose(loss(seen, 4), torch.stack(per_sample).mean())


@needs_fmnist
def test_beit3_trains_on_built_corpora_and_evaluates_retrieval_and_itm(tmp_path, capsys):
    from imagelm.cli import main
    from imagelm.train import Trainer

    root = tmp_path / "corpora"
    args = [*BEIT3, "data.dataset=captions+scenes", f"data.root={root}", "data.corpus_size=64", "data.flip=false",
            "train.steps=30", "train.batch_size=32", "train.lr=2e-3", "eval.dataset=fashion-mnist",
            "eval.vl_steps=4", "eval.vl_batch=16"]
    Trainer(tiny_cfg(*args), tmp_path / "run", progress=False).fit()
    assert (root / "interleaved" / "train").exists()        # the text-only stream reads the documents
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5       # masked data modeling learns
    assert {"image_acc", "text_acc", "pair_image_acc", "pair_text_acc"} <= set(rows[-1])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--probe", "linear", "--retrieval", "--itm", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"i2t_r1", "t2i_r1", "i2t_r10"} <= set(res["retrieval"]) and res["retrieval"]["n"] == 64
    assert 0 <= res["itm"]["acc"] <= 1 and res["itm"]["pairs"] == 128
    assert 0 <= res["linear"]["acc"] <= 1
