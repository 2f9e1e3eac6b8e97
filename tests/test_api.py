import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import imagelm
from conftest import tiny_cfg
from imagelm import checkpoint
from imagelm.api import Encoder
from imagelm.cli import main
from imagelm.config import ConfigError
from imagelm.data import sources
from imagelm.eval import features as feats
from imagelm.export import export
from imagelm.methods import build_method
from runs import METHODS, make_run


def _images(n=6, size=8, seed=0):
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_load_gives_the_features_eval_extracts(tmp_path):
    run = make_run(tmp_path / "run", *METHODS["mae"])
    cfg = tiny_cfg(*METHODS["mae"])
    method = build_method(cfg)      # as `imagelm eval` loads it
    method.load_state_dict(checkpoint.load_weights(checkpoint.latest(run / "checkpoints")))
    test = sources.load(cfg.data, cfg.model, "test")
    f = feats.extract(method.encoder, test, [1, 2], [], bf16=False)
    enc = imagelm.load(run)
    with torch.inference_mode():
        x = enc.preprocess(test.images)
        assert torch.allclose(enc(x), f.pooled[2], atol=1e-5)                  # the last layer, mean-pooled
        assert torch.allclose(enc.features(x, [1])[0].mean(1), f.pooled[1], atol=1e-5)
    assert json.loads((run / "preprocess.json").read_text())["mean"] == test.mean   # saved with the run


def test_preprocess_takes_uint8_float_pil_and_any_size(tmp_path):
    enc = imagelm.load(make_run(tmp_path / "run"))
    u8 = _images()
    x = enc.preprocess(u8)
    assert x.shape == (6, 1, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(enc.preprocess(u8.float() / 255), x, atol=1e-6)
    assert torch.equal(enc.preprocess(u8[0]), x[:1])                            # (C, H, W)
    pil = [Image.fromarray(im[0].numpy()) for im in u8]
    assert torch.equal(enc.preprocess(pil), x) and torch.equal(enc.preprocess(pil[0]), x[:1])
    rgb = Image.fromarray(np.stack([u8[0, 0].numpy()] * 3, -1))                 # to grey, as the model takes
    assert torch.allclose(enc.preprocess(rgb), x[:1], atol=1e-6)
    big = _images(2, 32)
    assert torch.equal(enc.preprocess(big), enc.preprocess(sources.resize(big, 8)))   # resized as the training data
    with pytest.raises(ValueError, match="channels"):
        enc.preprocess(torch.zeros(1, 3, 8, 8))


def test_hf_folder_round_trips_weights_and_features_without_the_training_data(tmp_path, capsys):
    run = make_run(tmp_path / "run", *METHODS["beit"])
    (run / "eval").mkdir()
    ckpt = str(checkpoint.latest(run / "checkpoints").resolve())
    (run / "eval" / "probes.json").write_text(json.dumps({"linear": {"acc": 0.8123, "layer": 2},
                                                          "knn": {"acc": 0.7654, "layer": 1}, "checkpoint": ckpt}))
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "imagelm.load" in capsys.readouterr().out
    enc = imagelm.load(run)
    shutil.rmtree(run)     # the export carries its statistics: no training data or run is read
    out = tmp_path / "hf"
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    card = (out / "README.md").read_text()
    assert "`beit` method" in card and "3 steps" in card and "81.23%" in card and "76.54%" in card
    for loaded in (imagelm.load(out), Encoder.from_pretrained(out)):
        a, b = enc.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        x = enc.preprocess(_images())
        assert torch.equal(loaded.preprocess(_images()), x)
        with torch.inference_mode():
            assert torch.equal(loaded(x), enc(x))


def test_clip_text_tower_and_zero_shot_survive_export(tmp_path):
    run = make_run(tmp_path / "run", *METHODS["clip"])
    enc = imagelm.load(run)
    with torch.inference_mode():
        t = enc.encode_text(["a sneaker", "a bag"])
        assert t.shape == (2, 16) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
        probs = enc.zero_shot(_images(4), ["sneaker", "bag", "coat"])
        assert probs.shape == (4, 3) and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5)
        # the same prediction the method's own towers give with eval's prompt ensemble
        from imagelm.eval import zeroshot as Z
        m = build_method(tiny_cfg(*METHODS["clip"]))
        m.load_state_dict(checkpoint.load_weights(checkpoint.latest(run / "checkpoints")))
        m.load_tokenizer(run)
        ref = Z.embed_images(m, enc.preprocess(_images(4)), bf16=False) @ \
            Z.class_embeddings(m, ["sneaker", "bag", "coat"], bf16=False).T
        assert torch.equal(probs.argmax(1), ref.argmax(1))
    export(run, "hf", tmp_path / "hf")
    assert (tmp_path / "hf" / "text_tokenizer" / "tokenizer.json").exists()
    loaded = imagelm.load(tmp_path / "hf")
    with torch.inference_mode():
        assert torch.equal(loaded.encode_text(["a sneaker", "a bag"]), t)


def test_beit3_text_path_has_no_shared_space_and_image_only_runs_have_no_text(tmp_path):
    enc = imagelm.load(make_run(tmp_path / "b3", *METHODS["beit3"]))
    with torch.inference_mode():
        assert enc.encode_text(["a sneaker"]).shape == (1, 32)
        with pytest.raises(ConfigError, match="no embedding space"):
            enc.zero_shot(_images(1), ["sneaker"])
    with pytest.raises(ConfigError, match="no text path"):
        imagelm.load(make_run(tmp_path / "aim")).encode_text(["a sneaker"])


def test_clear_errors_for_no_checkpoint_not_an_export_and_igpt_to_timm(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        imagelm.load(run)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="neither an imagelm run"):
        imagelm.load(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    with pytest.raises(ConfigError, match="not an imagelm export"):
        imagelm.load(tmp_path / "other")
    igpt = make_run(tmp_path / "igpt", "method=igpt", "igpt.palette=8", "igpt.resolution=8")
    capsys.readouterr()
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "x")]) == 2
    assert main(["export", str(igpt), "--to", "timm", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "has no checkpoint" in err[0] and "timm has no model" in err[1]
    assert main(["export", str(igpt), "--to", "hf", "--out", str(tmp_path / "y")]) == 0   # iGPT: hf only
    assert imagelm.load(tmp_path / "y").num_layers == 2
    assert main(["export", str(igpt), "--to", "hf", "--out", str(tmp_path / "y")]) == 0   # an export is replaced
    assert main(["export", str(igpt), "--to", "hf", "--out", str(tmp_path / "other")]) == 2   # anything else is not
    assert main(["export", str(tmp_path / "y"), "--to", "hf", "--out", str(tmp_path / "y")]) == 2
    assert (tmp_path / "other" / "config.json").exists() and (tmp_path / "y" / "model.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_encoder_moves_to_cuda(tmp_path):
    enc = imagelm.load(make_run(tmp_path / "run"))
    x = enc.preprocess(_images())
    ref = enc(x)
    enc.to("cuda")
    assert torch.allclose(enc(enc.preprocess(_images())).cpu(), ref, atol=1e-4)
