import json

import torch

from conftest import needs_fmnist, tiny_cfg
from imagelm.cli import main
from imagelm.data import sources
from imagelm.eval import parse_layers
from imagelm.eval import probe as P
from imagelm.eval.features import extract, raw_pixels
from imagelm.train import Trainer


def _blobs(n, d=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 3
    return centres[y] + torch.randn(n, d, generator=g), y


def test_linear_probe_and_knn_separate_separable_classes():
    (x, y), (xt, yt) = _blobs(600), _blobs(300, seed=1)
    assert P.linear_probe(x, y, xt, yt, 4, val_size=100)["acc"] > 0.97
    assert P.knn(x, y, xt, yt, 4, k=5)["acc"] > 0.97
    shuffled = P.linear_probe(x, y[torch.randperm(600)], xt, yt, 4, val_size=100)["acc"]
    assert shuffled < 0.5                        # labels carry the signal, not the probe


@needs_fmnist
def test_linear_probe_fits_converge_on_correlated_real_features():
    """Standardised pixels are strongly correlated, as learned features are: from zeros, 100 L-BFGS
    steps (the old probe) stop well short of the optimum; the warm-started path reaches it."""
    import torch.nn.functional as F

    from imagelm.config import DataConfig, ModelConfig

    d = sources.load(DataConfig(dataset="fashion-mnist"), ModelConfig(img_size=28, patch_size=4, in_chans=1), "train")
    x, y = P.standardize(d.images[:3000].float().flatten(1))[0], d.labels[:3000]

    def objective(clf, wd):
        with torch.no_grad():
            return (F.cross_entropy(clf(x), y) + 0.5 * wd * clf.weight.pow(2).sum()).item()

    wd = 1e-4
    best = objective(P.fit_logreg(x, y, 10, wd, iters=5000), wd)
    assert objective(P.fit_logreg(x, y, 10, wd, iters=100), wd) > 1.05 * best
    fits = P.logreg_path(x, y, 10, (1e-2, 1e-3, wd), iters=300)
    assert list(fits) == [1e-2, 1e-3, wd]
    assert objective(fits[wd], wd) < 1.01 * best


def test_each_probe_picks_its_layer_on_held_out_train():
    from imagelm.config import EvalConfig
    from imagelm.eval import run_probes
    from imagelm.eval.features import Features

    (x, y), (xt, yt) = _blobs(600), _blobs(300, seed=1)
    noise, noise_t = torch.randn(600, 8), torch.randn(300, 8)
    f_train, f_test = Features({0: noise, 1: x}, None), Features({0: noise_t, 1: xt}, None)
    res = run_probes(f_train, f_test, y, yt, 4, ("linear", "knn"), EvalConfig(val_size=100), log=lambda *a: None)
    for probe in ("linear", "knn"):
        assert res[probe]["layer"] == 1 and res[probe]["acc"] > 0.97
        assert res[probe]["per_layer"]["0"] < 0.5          # the noise layer was probed, and lost
    assert res["knn"]["k"] == 20 and res["features"]["layer"] == 1
    only_knn = run_probes(f_train, f_test, y, yt, 4, ("knn",), EvalConfig(val_size=100), log=lambda *a: None)
    assert "linear" not in only_knn and only_knn["knn"] == res["knn"]


def test_attentive_probe_finds_the_informative_token():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (900,), generator=g)
    tokens = torch.randn(900, 6, 12, generator=g)
    tokens[torch.arange(900), 2, y] += 4.0       # only token 2 carries the label
    acc = P.attentive_probe(tokens[:600], y[:600], tokens[600:], y[600:], 3, epochs=15, lr=1e-2, heads=4,
                              batch_size=64)["acc"]
    assert acc > 0.9


def test_parse_layers():
    assert parse_layers("all", 3) == [0, 1, 2, 3]
    assert parse_layers("last:2", 6) == [5, 6]
    assert parse_layers("4,2", 6) == [2, 4]
    import pytest
    with pytest.raises(ValueError, match="0..6"):
        parse_layers("7", 6)


def test_features_are_per_layer_means_and_token_bands(tiny, monkeypatch):
    from imagelm.methods import build_method
    data = sources.load(tiny().data, tiny().model, "test")
    enc = build_method(tiny()).encoder
    f = extract(enc, data, [0, 2], [1, 2], batch_size=100, bf16=False)
    assert f.pooled[2].shape == (256, 32) and f.tokens.shape == (256, 16, 32)
    x = torch.stack([(data.images[:3].float() / 255 - data.mean[0]) / data.std[0]])[0]
    l1, l2 = enc.features(x, [1, 2])
    assert torch.allclose(f.pooled[2][:3], l2.mean(1), atol=1e-5)
    assert torch.allclose(f.tokens[:3].float(), (l1 + l2) / 2, atol=3e-2)   # stored in bf16
    monkeypatch.setattr("imagelm.eval.features.CPU_CHUNK_TOKENS", 32)   # 2 images (16 tokens each) a chunk
    g = extract(enc, data, [0, 2], [1, 2], batch_size=100, bf16=False)
    assert torch.allclose(f.pooled[2], g.pooled[2], atol=1e-5) and torch.equal(f.tokens, g.tokens)
    raw = raw_pixels(data, 2)
    assert raw.pooled[0].shape == (256, 64) and raw.tokens.shape == (256, 16, 4 + 16)


def test_eval_cli_json_with_baselines(tmp_path, capsys):
    Trainer(tiny_cfg("train.steps=2"), tmp_path, progress=False).fit()
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--baselines", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for entry in (res, res["random_init"], res["raw_pixels"]):
        assert {"linear", "attentive", "knn"} <= set(entry)
        assert all(0 <= entry[p]["acc"] <= 1 for p in ("linear", "attentive", "knn"))
    for probe in ("linear", "knn"):   # each probe sweeps the layers and picks its own on held-out train
        assert set(res[probe]["per_layer"]) == {"0", "1", "2"} and res[probe]["layer"] in (0, 1, 2)
        assert res[probe]["acc"] == res[probe]["per_layer"][str(res[probe]["layer"])]
    assert (tmp_path / "eval" / "probes.json").exists()
    assert (tmp_path / "plots" / "loss.png").exists() and (tmp_path / "plots" / "probe_layers.png").exists()
    assert main(["compare", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert tmp_path.name in out and "raw_pixels" in out and "random_init" in out
    assert main(["eval", str(tmp_path), "--probe", "knn", "--layers", "1", "--baselines"]) == 0
    assert "knn" in capsys.readouterr().out
    kept = json.loads((tmp_path / "eval" / "probes.json").read_text())   # merged into the earlier results
    assert kept["knn"]["layer"] == 1 and kept["linear"] == res["linear"]
    assert kept["raw_pixels"]["linear"] == res["raw_pixels"]["linear"] and "attentive" in kept["random_init"]
    from imagelm.viz import plot_layers   # results merged from older evaluations lack some sweeps
    del kept["random_init"]["knn"]["per_layer"]
    assert plot_layers(tmp_path, kept).exists()


def test_finetune_learns_and_eval_takes_only_eval_overrides(tmp_path):
    from imagelm.config import ConfigError
    from imagelm.eval import evaluate

    Trainer(tiny_cfg(), tmp_path / "run", progress=False).fit()
    res = evaluate(tmp_path / "run", probes=("linear",), layers="last:1", finetune=True,
                   overrides=["eval.finetune_epochs=4", "eval.finetune_images=0", "eval.finetune_lr=3e-3",
                              "eval.finetune_batch=32"], log=lambda *a: None)
    assert res["finetune"]["images"] == 512 and res["finetune"]["acc"] > 0.6     # 4 classes: chance 25%
    import pytest
    with pytest.raises(ConfigError, match="only eval"):
        evaluate(tmp_path / "run", overrides=["model.dim=8"])
