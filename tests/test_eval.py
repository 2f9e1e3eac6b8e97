import json

import pytest
import torch

from conftest import needs_fmnist, tiny_cfg
from imagelm.cli import main
from imagelm.data import sources
from imagelm.eval import parse_layers
from imagelm.eval import probe as P
from imagelm.eval.features import Features, extract, raw_pixels
from imagelm.train import Trainer


def _blobs(n, d=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 3
    return centres[y] + torch.randn(n, d, generator=g), y


def _train_test(n=600, nt=300, seed=0):
    """Blobs as one train set (with its fit/val split) and a test set."""
    (x, y), (xt, yt) = _blobs(n, seed=seed), _blobs(nt, seed=seed + 1)
    return x, y, P.split_train(y, 100), xt, yt


def test_linear_probe_and_knn_separate_separable_classes():
    x, y, split, xt, yt = _train_test()
    assert P.linear_probe({0: x}, y, split, 4, ({0: xt}, yt), iters=50)["acc"] > 0.97
    assert P.knn_probe({0: x}, y, split, 4, ({0: xt}, yt), k=5)["acc"] > 0.97
    shuffled = P.linear_probe({0: x}, y[torch.randperm(600)], split, 4, ({0: xt}, yt), iters=50)["acc"]
    assert shuffled < 0.5                        # labels carry the signal, not the probe


def test_knn_in_blocks_votes_as_one_similarity_matrix():
    """2,500 queries: two full blocks of 1,024 and a partial one, through the one reused buffer."""
    (x, y), (xt, yt) = _blobs(3000, seed=2), _blobs(2500, seed=3)
    g = torch.Generator().manual_seed(4)
    x, xt = x + 6 * torch.randn(x.shape, generator=g), xt + 6 * torch.randn(xt.shape, generator=g)   # overlapping
    xn, tn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(xt, dim=1)
    sim, idx = (tn @ xn.T).topk(20, dim=1)
    votes = torch.zeros(2500, 4).scatter_add_(1, y[idx], (sim / 0.07).exp())
    right = votes.argmax(1) == yt
    assert 0.5 < right.float().mean() < 0.99    # some images are voted wrong
    assert P.knn(x, y, xt, yt, 4, k=20, t=0.07)["acc"] == right.sum().item() / 2500
    assert P.knn(x, y, xt[1024:], yt[1024:], 4, k=20)["acc"] == right[1024:].sum().item() / 1476


def test_val_split_is_stratified_shuffled_and_seeded():
    y = torch.arange(4).repeat_interleave(250)          # sorted by class, as an image folder is read
    s = P.split_train(y, 100)
    assert len(s.val) == 100 and len(s.fit) == 900
    assert sorted(torch.cat([s.fit, s.val]).tolist()) == list(range(1000))          # a partition of train
    assert torch.bincount(y[s.val], minlength=4).tolist() == [25, 25, 25, 25]         # every class its share
    assert len(set(y[s.fit[:50]].tolist())) == 4 and len(set(y[s.val[:20]].tolist())) > 1   # shuffled
    assert torch.equal(P.split_train(y, 100).val, s.val)                              # fixed by the seed
    assert not torch.equal(P.split_train(y, 100, seed=1).val, s.val)
    assert len(P.split_train(y, 5000).val) == 200      # at most 20% of a small dataset


def test_a_dataset_smaller_than_val_size_still_probes():
    (x, y), (xt, yt) = _blobs(12), _blobs(20, seed=1)
    s = P.split_train(y, 5000)
    assert len(s.val) == 2 and len(s.fit) == 10
    tokens, tokens_t = x[:, None].expand(-1, 3, -1), xt[:, None].expand(-1, 3, -1)      # (N, K, D)
    for r in (P.linear_probe({0: x}, y, s, 4, ({0: xt}, yt), iters=20), P.knn_probe({0: x}, y, s, 4, ({0: xt}, yt)),
              P.attentive_probe(tokens, y, s, 4, (tokens_t, yt), epochs=10, heads=4)):     # 10 steps in all
        assert 0 <= r["val_acc"] <= 1 and 0 <= r["acc"] <= 1
    assert len(P.split_train(y[:2], 5000).fit) == 1
    with pytest.raises(ValueError, match="at least 2"):
        P.split_train(y[:1], 5000)


def _probe_data():
    """Two pooled layers and a token band whose informative parts differ between train and test:
    layer 1 and token 2 carry the label in train (so in val), layer 0 and token 4 only in test."""
    x, y, split, xt, yt = _train_test()
    noise, noise_t = torch.randn(600, 16), torch.randn(300, 16)
    g = torch.Generator().manual_seed(0)
    tokens, tokens_t = torch.randn(600, 6, 16, generator=g), torch.randn(300, 6, 16, generator=g)
    tokens[torch.arange(600), 2, y] += 4.0
    tokens_t[torch.arange(300), 4, yt] += 4.0
    return Features({0: noise, 1: x}, tokens), y, split, Features({0: xt, 1: noise_t}, tokens_t), yt


def test_each_probe_chooses_on_val_never_on_test():
    """Choices follow val where test disagrees: choosing on test would pick layer 0 and score > 97%."""
    from imagelm.config import EvalConfig
    from imagelm.eval import run_probes

    f, y, split, ft, yt = _probe_data()
    ecfg = EvalConfig(linear_iters=50, linear_wd=(1e-3, 0.0))
    res = run_probes(f, y, split, 4, ("linear", "knn"), ecfg, (ft, yt), log=lambda *a: None)
    for probe in ("linear", "knn"):
        assert res[probe]["layer"] == 1 and res[probe]["val_acc"] > 0.97 and res[probe]["acc"] < 0.5
        assert res[probe]["per_layer"]["0"] < 0.5          # val accuracy per layer: the noise layer lost
    assert res["knn"]["k"] == 20 and res["features"]["layer"] == 1
    only_knn = run_probes(f, y, split, 4, ("knn",), ecfg, (ft, yt), log=lambda *a: None)
    assert "linear" not in only_knn and {**only_knn["knn"], "seconds": 0} == {**res["knn"], "seconds": 0}


def test_no_probe_reads_test_labels_before_its_choices():
    """Poisoned test labels (garbage, then none at all) leave every choice and val figure unchanged."""
    from imagelm.config import EvalConfig
    from imagelm.eval import run_probes

    f, y, split, ft, yt = _probe_data()
    ecfg = EvalConfig(linear_iters=30, linear_wd=(1e-3, 0.0), attentive_epochs=2, attentive_lrs=(1e-3, 3e-2),
                      attentive_heads=4, select_images=200)

    def choices(test):
        r = run_probes(f, y, split, 4, ("linear", "knn", "attentive"), ecfg, test, log=lambda *a: None)
        return {p: {k: v for k, v in r[p].items() if k not in ("acc", "seconds")} for p in ("linear", "knn", "attentive")}

    clean = choices((ft, yt))
    assert clean == choices((ft, torch.randint(0, 4, yt.shape)))
    assert clean == choices(None)
    assert {"layer", "wd", "val_acc"} <= set(clean["linear"]) and {"lr", "val_acc"} <= set(clean["attentive"])


def test_attentive_probe_equals_batchnorm_then_attention_pool():
    probe = P.AttentiveProbe(24, 5, heads=4)
    bn = torch.nn.BatchNorm1d(24, affine=False)
    with torch.no_grad():
        probe.pool.kv.bias.normal_()
        probe.pool.query.normal_()
    x = torch.randn(7, 9, 24) * 3 + 1

    def reference(x):
        return probe.fc(probe.pool(bn(x.reshape(-1, 24)).view_as(x)))

    for mode in (True, False):       # the batch's statistics (and running ones updated alike), then the running ones
        probe.train(mode), bn.train(mode)
        assert torch.allclose(probe(x), reference(x), atol=1e-5)
        assert torch.allclose(probe.norm.running_var, bn.running_var) and torch.allclose(
            probe.norm.running_mean, bn.running_mean)


def test_attentive_probes_written_out_loss_and_gradient_equal_autograd_of_the_probe():
    """probes_loss writes out a training step of several probes on one batch: its loss and the
    gradients it gives their parameters are autograd's through BatchNorm1d -> AttentionPool ->
    linear, probe by probe."""
    import copy
    import torch.nn.functional as F
    torch.manual_seed(0)
    probes = [P.AttentiveProbe(24, 5, heads=4) for _ in range(2)]
    with torch.no_grad():
        for p in probes:
            p.pool.kv.bias.normal_(), p.pool.query.normal_(), p.fc.weight.normal_()
    refs = copy.deepcopy(probes)
    x, y = torch.randn(12, 9, 24) * 3 + 1, torch.randint(0, 5, (12,))
    idx = torch.randperm(12)[:7]
    mapped = P._Together(probes).train()(P.token_sums(x[idx]), 7 * 9)
    loss, grads = P.probes_loss(x[idx], y[idx], *(m.detach() for m in mapped))
    torch.autograd.backward(mapped, grads)
    total = 0
    for p, ref in zip(probes, refs):
        xb = torch.nn.BatchNorm1d(24, affine=False)(x[idx].reshape(-1, 24)).view(7, 9, 24)
        ref_loss = F.cross_entropy(ref.fc(ref.pool(xb)), y[idx])
        ref_loss.backward()
        total += ref_loss.item()
        for (name, a), b in zip(p.named_parameters(), ref.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    assert abs(loss.item() - total) < 1e-5


def test_attentive_probes_trained_together_equal_each_trained_alone():
    x, y = _blobs(300)
    tokens = x[:, None, :].expand(-1, 5, -1) + 0.3 * torch.randn(300, 5, 16)       # (N, K, D)
    lrs = (1e-3, 3e-3, 1e-2)
    together = P.train_attentive(tokens, y, 4, 3, lrs, heads=4, batch_size=64)
    for lr, probe in zip(lrs, together):
        alone = P.train_attentive(tokens, y, 4, 3, lr, heads=4, batch_size=64)
        for (name, a), b in zip(probe.state_dict().items(), alone.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-5), (lr, name)
    assert not torch.allclose(together[0].fc.weight, together[2].fc.weight, atol=1e-3)   # each its own lr


def test_attentive_probe_centres_tokens_once_or_batch_by_batch_alike(monkeypatch):
    """bf16 tokens are centred into an fp32 copy up front when it is small, batch by batch when not."""
    x, y = _blobs(300)
    tokens = (x[:, None, :].expand(-1, 5, -1) + 0.3 * torch.randn(300, 5, 16)).to(torch.bfloat16)
    up_front = P.train_attentive(tokens, y, 4, 2, 1e-2, heads=4, batch_size=64)
    monkeypatch.setattr(P, "TOKEN_COPY_MAX_BYTES", 0)
    per_batch = P.train_attentive(tokens, y, 4, 2, 1e-2, heads=4, batch_size=64)
    for a, b in zip(up_front.state_dict().values(), per_batch.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


@pytest.mark.parametrize("copy_max", [P.TOKEN_COPY_MAX_BYTES, 0])
def test_attentive_probe_on_rows_of_the_tokens_equals_it_on_their_copy(monkeypatch, copy_max):
    """train_attentive(tokens, y, rows=r) reads images r in place (centred up front or batch by
    batch) and trains as on tokens[r], y[r]."""
    x, y = _blobs(300)
    tokens = (x[:, None, :].expand(-1, 5, -1) + 0.3 * torch.randn(300, 5, 16)).to(torch.bfloat16)
    rows = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:200]
    monkeypatch.setattr(P, "TOKEN_COPY_MAX_BYTES", copy_max)
    on_rows = P.train_attentive(tokens, y, 4, 2, 1e-2, heads=4, batch_size=64, rows=rows)
    on_copy = P.train_attentive(tokens[rows], y[rows], 4, 2, 1e-2, heads=4, batch_size=64)
    on_all = P.train_attentive(tokens, y, 4, 2, 1e-2, heads=4, batch_size=64)
    for a, b in zip(on_rows.state_dict().values(), on_copy.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.allclose(on_rows.fc.weight, on_all.fc.weight, atol=1e-3)


def test_attentive_probe_in_bf16_learns_as_in_fp32_from_tokens_far_from_zero():
    """Tokens whose mean dwarfs their spread (random-init features point nearly one way) train a
    bf16 probe as well as an fp32 one, and both well: they are centred first, so the cast does not
    round them to a few values, and BatchNorm's running mean (it starts at 0) is near theirs
    after the 20 steps here, where uncentred it lags theirs by 12%."""
    x, y = _blobs(600)
    tokens = 1000 + x[:, None, :].expand(-1, 5, -1) + 0.3 * torch.randn(600, 5, 16)
    accs = [P.accuracy(P.predict(P.train_attentive(tokens[:400], y[:400], 4, 10, 1e-2, heads=4, token_dtype=dtype),
                                 tokens[400:]), y[400:]) for dtype in (torch.float32, torch.bfloat16)]
    assert accs[0] > 0.9 and accs[1] > accs[0] - 0.03, accs


def test_attentive_probe_trains_on_a_few_images():
    """10 epochs of one batch (a fit set of <= 256 images), or fewer steps: OneCycleLR's default
    warmup would be under one step (a division by zero)."""
    x, y = _blobs(200)
    tokens = x[:, None, :].expand(-1, 3, -1) + 0.1 * torch.randn(200, 3, 16)        # (N, K, D)
    for epochs in (10, 2, 1):
        probe = P.train_attentive(tokens, y, 4, epochs, 1e-2, heads=4)
        assert not probe.training and P.predict(probe, tokens).shape == (200, 4)
        if epochs == 10:
            assert P.accuracy(P.predict(probe, tokens), y) > 0.5


def test_logistic_objective_gradient_equals_autograd():
    import torch.nn.functional as F

    x, y = _blobs(300)
    clf = torch.nn.Linear(16, 4)
    ref = F.cross_entropy(clf(x), y) + 0.5 * 1e-2 * clf.weight.pow(2).sum()
    ref.backward()
    ref_grads = clf.weight.grad.clone(), clf.bias.grad.clone()
    for block in (8192, 128):       # one block, or three (the last one short)
        clf.zero_grad()
        loss = P._Objective(x, y, 4, block=block)(clf, 1e-2)
        assert torch.allclose(loss, ref, atol=1e-6)
        assert torch.allclose(clf.weight.grad, ref_grads[0], atol=1e-6)
        assert torch.allclose(clf.bias.grad, ref_grads[1], atol=1e-6)


def test_linear_probe_carries_a_strength_chosen_on_a_subsample_over_to_all_of_fit():
    """Choices on 100 of the 500 fit images: the strengths tried there are 5x the candidates (the
    same penalty on the summed loss); the reported wd is a candidate, val_acc from all of fit."""
    x, y, split, xt, yt = _train_test()
    seen = []
    real = P.logreg_path
    P.logreg_path = lambda x_, y_, c, wds, iters=300: seen.append((len(x_), sorted(wds))) or real(x_, y_, c, wds, iters)
    try:
        r = P.linear_probe({0: x, 1: x}, y, split, 4, ({0: xt, 1: xt}, yt), wds=(1e-2, 0.0), iters=30, select_images=100)
    finally:
        P.logreg_path = real
    assert seen and all(n == 100 and wds == [0.0, 5e-2] for n, wds in seen)
    assert r["wd"] in (1e-2, 0.0) and r["select_images"] == 100 and r["acc"] > 0.97
    assert set(r["per_wd"]) == {"0.01", "0"} and r["per_wd"][f"{r['wd']:g}"] == max(r["per_wd"].values())


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


def test_attentive_probe_finds_the_informative_token():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (700,), generator=g)
    tokens = torch.randn(700, 6, 12, generator=g)
    tokens[torch.arange(700), 2, y] += 4.0       # only token 2 carries the label
    split = P.split_train(y[:500], 100)
    r = P.attentive_probe(tokens[:500], y[:500], split, 3, (tokens[500:], y[500:]), epochs=10, lrs=(1e-2,), heads=4,
                          batch_size=64)
    assert r["acc"] > 0.9 and r["val_acc"] > 0.9 and r["lr"] == 1e-2


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


def test_eval_cli_json_with_baselines(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGELM_CACHE", str(tmp_path / "cache"))
    Trainer(tiny_cfg("train.steps=2"), tmp_path, progress=False).fit()
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--baselines", "--json", "eval.attentive_lrs=[0.01]"]) == 0
    res = json.loads(capsys.readouterr().out)
    for entry in (res, res["random_init"], res["raw_pixels"]):
        assert {"linear", "attentive", "knn"} <= set(entry)
        assert all(0 <= entry[p]["acc"] <= 1 and 0 <= entry[p]["val_acc"] <= 1 for p in ("linear", "attentive", "knn"))
    for probe in ("linear", "knn"):   # each probe sweeps the layers and picks its own on val
        assert set(res[probe]["per_layer"]) == {"0", "1", "2"} and res[probe]["layer"] in (0, 1, 2)
        assert res[probe]["val_acc"] == max(res[probe]["per_layer"].values())
    assert (tmp_path / "eval" / "probes.json").exists()
    assert (tmp_path / "plots" / "loss.png").exists() and (tmp_path / "plots" / "probe_layers.png").exists()
    assert main(["compare", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert tmp_path.name in out and "raw_pixels" in out and "random_init" in out
    knn_only = ["eval", str(tmp_path), "--probe", "knn", "--layers", "1", "--baselines", "eval.attentive_lrs=[0.01]"]
    assert main(knn_only) == 0
    assert "knn" in capsys.readouterr().out
    kept = json.loads((tmp_path / "eval" / "probes.json").read_text())   # merged into the earlier results
    assert kept["knn"]["layer"] == 1 and kept["linear"] == res["linear"]
    assert kept["raw_pixels"]["linear"] == res["raw_pixels"]["linear"] and "attentive" in kept["random_init"]
    assert len(list((tmp_path / "cache" / "eval").glob("*.json"))) == 4   # baselines of both evaluations
    assert main(knn_only) == 0 and capsys.readouterr().out.count("cached") == 2   # now read from the cache
    assert json.loads((tmp_path / "eval" / "probes.json").read_text())["raw_pixels"] == kept["raw_pixels"]
    from imagelm.viz import plot_layers   # results merged from older evaluations lack some sweeps
    del kept["random_init"]["knn"]["per_layer"]
    assert plot_layers(tmp_path, kept).exists()


def test_eval_probes_only_the_baseline_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMAGELM_CACHE", str(tmp_path / "cache"))
    Trainer(tiny_cfg("train.steps=2"), tmp_path, progress=False).fit()
    capsys.readouterr()
    quick = ["--probe", "knn", "--layers", "1", "--json"]
    assert main(["eval", str(tmp_path), "--baseline", "raw_pixels", *quick]) == 0
    res = json.loads(capsys.readouterr().out)
    assert "knn" in res["raw_pixels"] and "random_init" not in res
    assert main(["eval", str(tmp_path), "--baseline", "random_init", *quick]) == 0
    assert "knn" in json.loads(capsys.readouterr().out)["random_init"]
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--baseline", "imagenet"])
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err


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


def test_split_val_never_needs_a_test_split(tmp_path, capsys):
    """A folder dataset with only train/: `--split val` probes and fine-tunes on fit/val alone."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("dark", "light")):
        (tmp_path / "data" / "train" / name).mkdir(parents=True)
        for i in range(30):
            px = (torch.rand(8, 8, generator=g) * 100 + 120 * c).to(torch.uint8).numpy()
            Image.fromarray(px, mode="L").save(tmp_path / "data" / "train" / name / f"{i}.png")
    Trainer(tiny_cfg("train.steps=2", "data.dataset=folder", f"data.root={tmp_path / 'data'}"), tmp_path / "run",
            progress=False).fit()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--split", "val", "--finetune", "eval.finetune_epochs=1", "eval.finetune_batch=16",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for p in ("linear", "attentive", "knn", "finetune"):
        assert 0 <= res[p]["val_acc"] <= 1 and "acc" not in res[p]
    assert res["linear"]["val_acc"] > 0.9 and res["split"] == "val"
    assert (tmp_path / "run" / "eval" / "probes-val.json").exists()
    assert not (tmp_path / "run" / "eval" / "probes.json").exists()
    assert main(["compare", str(tmp_path / "run"), "--split", "val"]) == 0
    assert "val " in capsys.readouterr().out


def test_compare_markdown_groups_seeds(tmp_path, capsys):
    import yaml

    from imagelm import config

    for name, seed, lin in (("aim-x", 0, 0.80), ("aim-x-s1", 1, 0.82), ("mae-x", 0, 0.85)):
        cfg = tiny_cfg(f"train.seed={seed}") if name.startswith("aim") else tiny_cfg("method=mae")
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        res = {"linear": {"acc": lin, "val_acc": lin, "layer": 2}, "knn": {"acc": lin - 0.1, "val_acc": 0.7}}
        if name.startswith("aim"):       # both seeds with --baselines: random init per seed, pixels once
            res["random_init"] = {"linear": {"acc": 0.70 + seed / 50, "val_acc": 0.7}}
            res["raw_pixels"] = {"linear": {"acc": 0.84, "val_acc": 0.85}}
        (tmp_path / name / "eval" / "probes.json").write_text(json.dumps(res))
    assert main(["compare", *(str(tmp_path / n) for n in ("aim-x", "aim-x-s1", "mae-x")), "--markdown"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| encoder | seeds | linear (%) | knn (%) |"
    assert out[2] == "| aim-x | 2 | 81.00 ± 1.41 | 71.00 ± 1.41 |"
    assert out[3] == "| mae-x | 1 | 85.00 | 75.00 |"
    assert out[4] == "| random_init | 2 | 71.00 ± 1.41 | - |" and out[5] == "| raw_pixels | 1 | 84.00 | - |"
