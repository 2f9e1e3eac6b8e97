import json
import math

import pytest
import torch

from conftest import needs_fmnist, tiny_cfg
from imagelm.eval.zeroshot import recall_at
from imagelm.methods import build_method

CLIP = ("method=clip", "clip.embed_dim=16", "clip.context_length=12", "clip.text_vocab=300", "clip.text_dim=32",
        "clip.text_depth=2", "clip.text_heads=2")


def _batch(n=8):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(5, 300, (n, 12), generator=g)
    ends = torch.randint(3, 11, (n,), generator=g)
    for i, e in enumerate(ends):
        text[i, e], text[i, e + 1:] = 0, 1                # <|endoftext|>, then <pad>
    return {"image": torch.randn(n, 1, 8, 8, generator=g), "text": text}


def _clip():
    torch.manual_seed(0)
    return build_method(tiny_cfg(*CLIP))


def test_infonce_is_symmetric_and_the_temperature_is_clamped():
    model = _clip()
    img = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    loss, logits = model.loss(img, img)
    assert torch.allclose(logits, logits.T)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)                     # exp(10) > 100
    _, logits = model.loss(img, img)
    assert torch.allclose(logits.diagonal(), torch.full((4,), 100.0), atol=1e-3)


def test_text_tower_reads_out_at_end_of_text_and_ignores_padding():
    model = _clip().eval()
    b = _batch(2)
    a = model.encode_text(b["text"])
    t = b["text"].clone()
    t[:, -1] = 7 if t[0, -1] == 1 else t[0, -1]           # change a padding token after <|endoftext|>
    assert torch.allclose(model.encode_text(t), a, atol=1e-6)


def test_recall_at_k():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])
    r = recall_at(sim, (1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


@needs_fmnist
def test_clip_trains_on_built_corpora_and_evaluates_zero_shot_and_retrieval(tmp_path, capsys):
    from imagelm.cli import main

    root = tmp_path / "corpora"
    args = [f"{o}" for o in CLIP] + ["data.dataset=captions+scenes", f"data.root={root}", "data.corpus_size=64",
                                     "data.flip=false", "train.steps=4", "train.batch_size=32",
                                     "eval.dataset=fashion-mnist"]
    from imagelm.train import Trainer
    Trainer(tiny_cfg(*args), tmp_path / "run", progress=False).fit(until=2)      # interrupted, then resumed:
    Trainer(tiny_cfg(*args), tmp_path / "run", resume=True, progress=False).fit()   # tokenizer and captions reload
    assert (tmp_path / "run" / "text_tokenizer" / "tokenizer.json").exists()
    assert len(list((root / "scenes" / "train").glob("*.tar"))) >= 1   # built on first use
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x) for x in losses)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--probe", "none", "--zero-shot", "--retrieval", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0 <= res["zero_shot"]["acc"] <= 1 and res["retrieval"]["n"] == 64
    per_class = res["zero_shot"]["per_class"]     # recall of each class; their mean is the balanced accuracy
    assert len(per_class) == 10 and all(0 <= v <= 1 for v in per_class.values())
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"} <= set(res["retrieval"])
